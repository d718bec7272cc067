"""Compile tier: every Triton kernel spec compiles for sm_80 and sm_90 without a GPU.

Runs lowbit._aot in a subprocess (TRITON_INTERPRET must be off there) and prints registers,
stack frame and local memory per kernel, so a spill shows up on this machine. Compile errors fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "lowbit._aot", "--arch", "80", "90"], capture_output=True,
                         text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_sm80_and_sm90(aot_results):
    from lowbit._aot import all_specs

    names = {s["name"] for s in all_specs()}
    assert len(aot_results) == 2 * len(names)
    errors = [r for r in aot_results if "error" in r]
    print("\nkernel                                                       arch  regs  stack  local  mma")
    for r in aot_results:
        if "error" not in r:
            print(f"{r['name'][:60]:60} sm{r['arch']}  {r['reg']:>4}  {r['stack']:>5}  {r['local']:>5}  {r['mma']}")
    assert not errors, errors[:3]
    assert {r["name"] for r in aot_results} == names


def test_matmul_kernels_use_tensor_cores(aot_results):
    dots = [r for r in aot_results if r["name"].startswith(("dot_", "grad_x_")) and "error" not in r]
    assert dots and all(r["mma"] for r in dots)
    assert any(r["wgmma"] for r in dots if r["arch"] == 90)
