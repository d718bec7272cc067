"""Compile tier: every kernel spec compiles for sm_80 and sm_90 without a GPU, as the JIT builds it.

The specs are the launchers' own launches on meta tensors, specialized by Triton's binder
(kernels/_compile.py): pointers aligned, sizes and strides divisible by 16, unit strides folded to
the constant 1, as on a GPU. `python -m lowbit._aot` compiles them once, in a subprocess (the
interpreter tier's TRITON_INTERPRET replaces @triton.jit at import); its progress, one line per
compile, goes straight to the terminal, its JSON lines come back to the tests below.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot_results(pytestconfig):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    # pytest -q captures output, the subprocess's stderr too (fd capture): lift it for this run so
    # that the progress lines reach the terminal while the tier compiles.
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    lifted = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    t0 = time.perf_counter()
    with lifted:
        print("\ncompile tier: python -m lowbit._aot --arch 80 90", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, "-m", "lowbit._aot", "--arch", "80", "90"], stdout=subprocess.PIPE,
                             stderr=None, text=True, env=env, timeout=1800)
        print(f"compile tier: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    assert out.returncode == 0, out.stdout[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _ok(results):
    return [r for r in results if "error" not in r]


def test_every_spec_compiles_for_sm80_and_sm90(aot_results):
    errors = [r for r in aot_results if "error" in r]
    assert not errors, errors[:3]
    archs: dict[str, set] = {}
    for r in aot_results:
        archs.setdefault(r["name"], set()).add(r["arch"])
    assert len(archs) > 100  # every config of every table, not a handful
    assert all(a == {80, 90} for a in archs.values())
    assert len(aot_results) == 2 * len(archs)
    families = {n.split("[")[0].rsplit("_", 1)[0] for n in archs}
    assert {"gemv", "dot", "grad_x", "grad_scale", "quantize", "dequantize", "sz"} <= families


# The quantize kernel's PTX declares a 32-64 B __local_depot that no instruction touches (no STL or
# LDL in the SASS); ptxas still reserves it as a stack frame on sm_90. It is not a config-table
# kernel and nothing spills, so it may keep the frame; every other kernel may not.
UNUSED_FRAME_OK = ("quantize_4bit[",)


def test_shipped_configs_do_not_spill(aot_results):
    """No spill stores, no local memory and no stack frame in any compiled config."""
    bad = []
    for r in _ok(aot_results):
        frame_ok = r["stack"] == 0 or (r["name"].startswith(UNUSED_FRAME_OK) and r["spill"] == 0)
        if r["spill"] or r["local"] or not frame_ok:
            bad.append(f"{r['name']} sm{r['arch']}: {r['reg']} registers, spill {r['spill']} B, "
                       f"stack {r['stack']} B, local {r['local']} B")
    assert not bad, "\n".join(bad)


def test_matmul_kernels_use_tensor_cores(aot_results):
    dots = [r for r in _ok(aot_results) if r["name"].startswith(("dot_", "grad_x_", "grad_scale_"))]
    assert dots and all(r["mma"] for r in dots)
    assert any(r["wgmma"] for r in dots if r["arch"] == 90)


def test_specs_carry_the_jit_specialization(aot_results):
    """What the JIT would see at a real call: every pointer 16-byte aligned, K/N/row strides divisible
    by 16, unit strides and M = 1 folded to constants. A spec compiled without them (no attributes)
    would build scalar loads that never run on a GPU."""
    for r in _ok(aot_results):
        spec = r["specialization"]
        pointers = [p for p in r["offsets"]]
        assert set(pointers) <= set(spec["divisible_16"]), r["name"]
    gemv = next(r for r in aot_results if r["name"].startswith("gemv_4bit[bf16,dq=True,1x"))["specialization"]
    assert {"M", "stride_xk", "stride_yn"} <= set(gemv["constant_1"])
    assert {"N", "K", "stride_wn", "stride_xm", "stride_ym"} <= set(gemv["divisible_16"])
    dot = next(r for r in aot_results if r["name"].startswith("dot_int3[bf16,rows,16x"))["specialization"]
    assert {"stride_xk", "stride_yn"} <= set(dot["constant_1"]) and "M" in dot["divisible_16"]


def _row_pointers() -> dict[str, tuple[str, ...]]:
    """Pointers whose offsets grow with M (activation rows) or with N * K (weight bytes), by spec-name
    prefix: every family kernel module's INT64_POINTERS (kernels/_families.py finds the modules)."""
    from lowbit.kernels import _families

    out = {}
    for family, module in _families.families().items():
        assert isinstance(getattr(module, "INT64_POINTERS", None), dict), f"kernels/{family}.py: no INT64_POINTERS"
        out.update(module.INT64_POINTERS)
    return out


def test_activation_and_weight_offsets_are_int64(aot_results):
    """Every pointer whose offset scales with M or N*K gets a 64-bit tensor offset (tt.addptr with
    an i64 tensor) in the TTIR, so a 2**31-element activation or weight addresses correctly
    without allocating one.

    A pointer is built as `p + row_term + col_term`, one tt.addptr each: the column term (< K) may
    stay int32, the row term must not. Reverting `offs_m.to(tl.int64) * stride` to int32 leaves the
    pointer's chain with no i64 tensor offset (the split index `pid_k.to(tl.int64) * stride_ys` of
    y is a scalar, so it does not count). Exempt: x and y of a BLOCK_M = 1 GEMV, whose row offset
    is the constant 0 and folds away."""
    row_pointers = _row_pointers()
    checked, bad = 0, []
    for r in _ok(aot_results):
        family = next((f for f in row_pointers if r["name"].startswith(f)), None)
        if family is None:
            continue
        one_row = r["specialization"]["constexprs"].get("BLOCK_M") == 1 and family.startswith("gemv")
        for ptr in row_pointers[family]:
            if one_row and ptr in ("x_ptr", "y_ptr"):
                continue
            checked += 1
            if "tensor:i64" not in r["offsets"][ptr]:
                bad.append(f"{r['name']} sm{r['arch']}: {ptr} offsets {r['offsets'][ptr]}")
    assert checked > 300
    assert not bad, "\n".join(bad[:10])


FAMILY = """
from ._spec import KernelSpec

COST_BUDGETS = []
INT64_POINTERS = {}


def aot_specs():
    return [KernelSpec("new_kernel[bf16]", None, (), {})]
"""


def test_a_new_family_file_is_found_without_editing_a_shared_file(tmp_path, monkeypatch):
    """kernels/_families.py finds every module of its folder that defines aot_specs(): a new
    kernels/<family>.py joins the AOT compile, the cost report and their tests as it is. Modules
    starting with "_", the cost tool and modules without aot_specs() are not families."""
    import shutil

    from lowbit.kernels import _families, _spec

    pkg = tmp_path / "fakekernels"
    pkg.mkdir()
    shutil.copy(_families.__file__, pkg / "_families.py")
    shutil.copy(_spec.__file__, pkg / "_spec.py")
    (pkg / "newfam.py").write_text(FAMILY)
    (pkg / "_helpers.py").write_text("def aot_specs():\n    raise AssertionError('not a family')\n")
    (pkg / "cost.py").write_text("raise AssertionError('the cost tool is not imported as a family')\n")
    (pkg / "notes.py").write_text("X = 1\n")  # no aot_specs(): imported, not a family
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = importlib.import_module("fakekernels._families").families()
        assert list(found) == ["newfam"]
        assert [s.name for s in found["newfam"].aot_specs()] == ["new_kernel[bf16]"]
        assert "fakekernels.notes" in sys.modules and "fakekernels.cost" not in sys.modules
    finally:
        for name in [m for m in sys.modules if m == "fakekernels" or m.startswith("fakekernels.")]:
            del sys.modules[name]
