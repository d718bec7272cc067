"""Shipped per-card config tables (kernels/_configs/<card>.json): a key in the table is used
without timing, the nearest shape of the same kernel/M/dtype/format is the fallback, configs that
do not fit the call are ignored, no table falls back to the tuner; `lowbit tune` needs CUDA."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels import _common  # noqa: E402
from lowbit.kernels._common import GradXConfig, MatmulConfig  # noqa: E402

C = MatmulConfig


@pytest.fixture
def card(tmp_path, monkeypatch):
    """A fake CUDA card whose table lives in tmp_path; returns a writer for it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_common, "card_name", lambda device=None: "test-card")
    monkeypatch.setenv("LOWBIT_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(_common, "_tuned", {})
    monkeypatch.setattr(_common, "_tables", {})

    def write(entries, version=_common.TABLE_VERSION):
        data = {"version": version, "card": "test card", "entries": [
            {"key": _common.key_to_json(k), "config": _common.config_to_json(c)} for k, c in entries]}
        (tmp_path / "test-card.json").write_text(json.dumps(data))
    return write


def _never_run(cfg):
    raise AssertionError("a config was timed although the table has one")


def test_records_round_trip_through_json():
    for cfg in (C("words", 1, 128, 32, 16, 1, 1), GradXConfig(16, 64, 128, 4, 4, 3, 2), _common.DEQUANT):
        assert _common.config_from_json(json.loads(json.dumps(_common.config_to_json(cfg)))) == cfg


def test_exact_key_is_used_without_timing(card):
    a, b = C("words", 1, 128, 32, 16, 1, 1), C("gemv", 1, 32, 64, 4, 4, 3)
    card([(("fwd", 1, 4096, 4096, torch.bfloat16, True, 64), b)])
    assert _common.pick(("fwd", 1, 4096, 4096, torch.bfloat16, True, 64), [a, b], _never_run) == b


def test_nearest_shape_of_the_same_kernel_and_format(card):
    a, b, c = C("words", 1, 128, 32, 16, 1, 1), C("gemv", 1, 32, 64, 4, 4, 3), C("gemv", 1, 64, 64, 2, 4, 3)
    card([(("fwd", 1, 4096, 4096, torch.bfloat16, True, 64), b), (("fwd", 1, 16384, 16384, torch.bfloat16, True, 64), c),
          (("fwd", 1, 6000, 6000, torch.float16, True, 64), a)])  # another dtype: never the answer here
    assert _common.pick(("fwd", 1, 5000, 4096, torch.bfloat16, True, 64), [a, b, c], _never_run) == b
    assert _common.pick(("fwd", 1, 14000, 16000, torch.bfloat16, True, 64), [a, b, c], _never_run) == c


def test_table_config_that_does_not_fit_is_ignored(card, monkeypatch):
    a, b = C("words", 1, 128, 32, 16, 1, 1), C("gemv", 1, 32, 64, 4, 4, 3)
    card([(("fwd", 1, 4096, 4096, torch.bfloat16, True, 64), b)])
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "0")
    assert _common.pick(("fwd", 1, 4096, 4096, torch.bfloat16, True, 64), [a], _never_run) == a


def test_no_table_falls_back_to_the_first_config_without_autotune(card, monkeypatch):
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "0")
    a, b = C("words", 1, 128, 32, 16, 1, 1), C("gemv", 1, 32, 64, 4, 4, 3)
    assert _common.pick(("fwd", 1, 4096, 4096, torch.bfloat16, True, 64), [a, b], _never_run) == a


def test_nothing_is_timed_at_run_time_by_default(card, monkeypatch):
    """The first-call tuner is opt-in (LOWBIT_AUTOTUNE=1): without the variable, no table means the
    first candidate, and _never_run proves nothing was launched to time it."""
    monkeypatch.delenv("LOWBIT_AUTOTUNE", raising=False)
    a, b = C("words", 1, 128, 32, 8, 1, 1), C("gemv", 1, 32, 64, 4, 4, 3)
    assert not _common.autotune_enabled()
    assert _common.pick(("fwd", 1, 4096, 2048, torch.bfloat16, True, 64), [a, b], _never_run) == a


def test_a_table_of_another_version_is_refused(card):
    card([], version=99)
    with pytest.raises(ValueError, match="config table version 99.*lowbit tune"):
        _common.pick(("fwd", 1, 4096, 4096, torch.bfloat16, True, 64), [C("gemv", 1, 32, 64, 4, 4, 3)] * 2,
                     _never_run)


def test_tune_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: lowbit tune would run")
    from lowbit import cli

    assert cli.main(["tune", "--out", str(tmp_path / "t.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_grad_scale_split_reads_the_sm_count_once_per_device(monkeypatch):
    """intq's grad_scale sizes SPLIT_M for two waves of the device's SMs, read once per device; meta
    tensors (the AOT compile, the cost report) get an H100 SXM's 132, the JIT's launch there."""
    import types

    from lowbit.kernels import _launch, intq

    calls = []

    def props(index):
        calls.append(index)
        return types.SimpleNamespace(multi_processor_count={0: 114, 1: 132}[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(_launch, "_SMS", {})
    # N = 4096 in tiles of 64 rows, one group: 64 tiles; 2 * 114 // 64 = 3 splits, 2 * 132 // 64 = 4
    args = (4096, 4096, 1, 64, 64)
    assert intq._split_m(*args, torch.device("cuda", 0)) == 3
    assert intq._split_m(*args, torch.device("cuda", 0)) == 3
    assert intq._split_m(*args, torch.device("cuda", 1)) == 4
    assert intq._split_m(*args, torch.device("meta")) == 4 and _launch.DEFAULT_SMS == 132
    assert calls == [0, 1]
