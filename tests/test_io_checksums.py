"""lowbit.io: a file whose tensors are not the ones its checksums list is refused.

tests/test_io.py flips a bit inside a tensor; a file that lost a tensor or gained one (an edited or
half-merged checkpoint re-saved with the old metadata) keeps every remaining checksum right, so only the
comparison of the two key sets catches it: without that check such a file loaded (strict=False then
leaves the layer's buffers as they were, silently).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.io import CheckpointError, read_state_dict


def _saved(tmp_path):
    m = nn.Sequential(lowbit.Linear4bit.from_linear(nn.Linear(64, 32)), nn.ReLU(),
                      lowbit.IntLinear.from_linear(nn.Linear(32, 16), bits=3))
    path = tmp_path / "m.safetensors"
    lowbit.save_state_dict(m, path)
    return path


def _rewrite(path, change):
    """The file's tensors changed by `change`, written back under the original header metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    change(sd)
    out = path.with_name("edited.safetensors")
    save_file(sd, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("edit", ["drop a tensor", "add a tensor"])
def test_tensors_and_checksums_must_name_the_same_keys(tmp_path, edit):
    path = _saved(tmp_path)
    read_state_dict(path)  # the file as written reads

    def change(sd):
        if edit == "drop a tensor":
            sd.pop("2.scale")
        else:
            sd["2.extra"] = torch.zeros(3)

    bad = _rewrite(path, change)
    with pytest.raises(CheckpointError, match="tensors and checksums differ"):
        read_state_dict(bad)
