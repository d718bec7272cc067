"""lowbit.io: safetensors files carry format metadata and a checksum per tensor; damaged,
truncated or foreign files raise lowbit's CheckpointError naming the path (and the tensor)."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from torch import nn

import lowbit
from lowbit.io import CheckpointError, layer_formats, read_state_dict


def _model():
    m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    m[0] = lowbit.Linear4bit.from_linear(m[0], quant_type="fp4")
    m[2] = lowbit.IntLinear.from_linear(m[2], bits=3)
    return m


def _fresh():
    return nn.Sequential(lowbit.Linear4bit(128, 64, quant_type="fp4"), nn.ReLU(), lowbit.IntLinear(64, 32, bits=3))


def _tensor_span(path, key):
    """(start, end) byte offsets of tensor `key`'s data in a safetensors file."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    a, b = header[key]["data_offsets"]
    return 8 + n + a, 8 + n + b


def test_round_trip_with_metadata_in_the_file(tmp_path):
    m = _model()
    path = tmp_path / "m.safetensors"
    lowbit.save_state_dict(m, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["lowbit.format_version"] == "3"
    layers = json.loads(meta["lowbit.layers"])
    assert layers["0"]["quant_type"] == "fp4" and layers["2"]["bits"] == 3
    assert layer_formats(path)["0"]["family"] == "nf4"
    fresh = _fresh()
    lowbit.load_state_dict(fresh, path)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), m(x))


def test_a_flipped_bit_raises_naming_the_tensor_and_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    lowbit.save_state_dict(_model(), path)
    a, b = _tensor_span(path, "0.weight")
    raw = bytearray(open(path, "rb").read())
    raw[(a + b) // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*tensor '0\.weight' fails its checksum"):
        lowbit.load_state_dict(_fresh(), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_damaged_truncated_or_foreign_files_raise_lowbits_error(tmp_path, damage):
    path = tmp_path / "m.safetensors"
    lowbit.save_state_dict(_model(), path)
    raw = open(path, "rb").read()
    bad = {"truncate": raw[: len(raw) // 2], "garbage": bytes(range(256)) * 8, "empty": b"",
           "header": raw[:8] + b"[" + raw[9:]}[damage]
    open(path, "wb").write(bad)
    with pytest.raises(CheckpointError, match="m.safetensors"):
        read_state_dict(path)
    assert issubclass(CheckpointError, ValueError)


def test_files_without_lowbit_metadata_still_load(tmp_path):
    from safetensors.torch import save_file

    m = _model()
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    fresh = _fresh()
    lowbit.load_state_dict(fresh, path)
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), m(x))


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lowbit.save_state_dict(_model(), path)
    assert path.read_bytes() == b"keep me"


# ------------------------------------------------------------------------------ file mode (the umask)


def _saved_mode(tmp_path, umask, name="m.safetensors", **kw):
    old = os.umask(umask)
    try:
        lowbit.save_state_dict(_model(), tmp_path / name, **kw)
        with open(tmp_path / f"{name}.plain", "w"):  # what open() makes under the same umask
            pass
    finally:
        os.umask(old)
    return stat.S_IMODE(os.stat(tmp_path / name).st_mode), stat.S_IMODE(os.stat(tmp_path / f"{name}.plain").st_mode)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    # safetensors' save_file writes 0600 whatever the umask: a checkpoint others should read was private
    assert _saved_mode(tmp_path, umask) == (mode, mode)


def test_an_overwritten_file_keeps_its_mode(tmp_path):
    _saved_mode(tmp_path, 0o022)
    os.chmod(tmp_path / "m.safetensors", 0o640)
    got, _ = _saved_mode(tmp_path, 0o077, overwrite=True)  # open(path, "w") keeps an existing file's mode too
    assert got == 0o640


def test_the_umask_is_read_without_proc_and_left_as_it_was(monkeypatch):
    from lowbit import io

    def no_proc(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(io, "open", no_proc, raising=False)  # shadows the builtin inside lowbit.io only
    old = os.umask(0o027)
    try:
        assert io._umask() == 0o027
        assert os.umask(0o027) == 0o027  # still set
    finally:
        os.umask(old)


def test_save_pretrained_bnb_follows_the_umask(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lowbit.integrations.bitsandbytes import save_pretrained_bnb

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = lowbit.replace_linear(transformers.LlamaForCausalLM(cfg).eval(), "nf4", progress=False)
    old = os.umask(0o022)
    try:
        save_pretrained_bnb(model, tmp_path / "bnb")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "bnb" / "model.safetensors").st_mode) == 0o644


class _Tied(nn.Module):
    """An embedding tied to an output Linear (a causal LM's input embeddings and lm_head), one quantized layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.body = lowbit.IntLinear.from_linear(nn.Linear(64, 64), bits=4, group_size=32)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_tied_weights_are_stored_once_and_come_back_tied_names(tmp_path):
    # Catches: a tied weight written twice (SmolLM2's quantized folder held its 113 MB embedding twice), an alias
    # that does not come back (strict load fails: missing head.weight), an alias restored to the wrong tensor.
    from safetensors import safe_open

    torch.manual_seed(0)
    m = _Tied()
    path = tmp_path / "tied.safetensors"
    lowbit.save_state_dict(m, path)
    with safe_open(str(path), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert "head.weight" not in keys and "embed.weight" in keys
    assert json.loads(header["lowbit.tied"]) == {"head.weight": "embed.weight"}
    sd = read_state_dict(path)
    assert torch.equal(sd["head.weight"], m.embed.weight.detach())
    fresh = _Tied()
    fresh.body = lowbit.IntLinear(64, 64, bits=4, group_size=32)
    lowbit.load_state_dict(fresh, path)  # strict
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids), m(ids))
    # a lowbit.tied entry naming a tensor the file does not hold: refused, not silently dropped
    bad = {"head.weight": "nope.weight"}
    from lowbit.io import save_safetensors

    sd_file = {k: v for k, v in read_state_dict(path).items() if k != "head.weight"}
    header = dict(header, **{"lowbit.tied": json.dumps(bad)})
    save_safetensors(sd_file, tmp_path / "bad.safetensors", metadata=header)
    with pytest.raises(CheckpointError, match="lowbit.tied"):
        read_state_dict(tmp_path / "bad.safetensors")
