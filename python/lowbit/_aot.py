"""Ahead-of-time compile of lowbit's Triton kernels for sm_80/sm_90, without a GPU.

`python -m lowbit._aot [--arch 80 90] [--filter NAME]` compiles every spec that the kernel
modules list in `aot_specs()` and prints one JSON line per (kernel, config, arch) with the
registers, stack frame, shared and local memory that cuobjdump reads from the cubin, and whether
the PTX uses mma / wgmma. The compile tier of the tests runs this in a subprocess, because
TRITON_INTERPRET (set for the interpreter tier) replaces @triton.jit at decoration time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(spec["signature"])
    for k in spec["constexprs"]:
        sig[k] = "constexpr"
    src = ASTSource(fn=spec["fn"], signature=sig, constexprs=spec["constexprs"])
    opts = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    opts.update(spec.get("options", {}))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out.stdout)
        usage[key.lower()] = int(m.group(1)) if m else None
    return {
        "name": spec["name"],
        "arch": arch,
        **usage,
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        "wgmma": "wgmma" in ptx,
    }


def all_specs() -> list[dict]:
    import lowbit.kernels as k

    specs: list[dict] = []
    for mod in (getattr(k, name) for name in sorted(getattr(k, "__all__", []))):
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs())
    return specs


def _job(args):
    idx, arch, filt = args
    spec = [s for s in all_specs() if filt in s["name"]][idx]
    try:
        return compile_spec(spec, arch)
    except Exception as e:  # report, do not hide: the test fails on "error"
        return {"name": spec["name"], "arch": arch, "error": f"{type(e).__name__}: {e}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--filter", default="")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    n = len([s for s in all_specs() if a.filter in s["name"]])
    jobs = [(i, arch, a.filter) for i in range(n) for arch in a.arch]
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        for res in ex.map(_job, jobs):
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
