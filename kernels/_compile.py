"""Compile lowbit's kernels ahead of time for sm_80/sm_90 exactly as the JIT would, without a GPU.

Why "exactly as the JIT would" takes some care: `kernel[grid](*args)` does not compile the
kernel's source alone. Triton's JIT first *specializes* every argument: a pointer whose address
is a multiple of 16 and an integer divisible by 16 get the attribute `tt.divisibility = 16`
(which is what lets the compiler emit 64- and 128-bit vector loads), and an integer equal to 1
becomes the constant 1 (so `stride_xk = 1` folds away). Compiling with a hand-written signature
and no attributes builds a different, slower kernel than the one that runs.

So a compile spec here is not a signature but a *launch*: `launch_spec` (kernels/_spec.py) calls the real launcher
(nf4.matmul_4bit, intq.matmul_int, ...) on `meta` tensors (shape, dtype and strides, no memory;
their data_ptr() is 0, i.e. aligned like a fresh torch allocation) and intercepts the
`kernel[grid](...)` call. `compile_spec` then feeds those arguments through Triton's own binder
(the function `JITFunction.run` builds per kernel) and `_pack_args`, and compiles the resulting
(signature, constexprs, attrs, options) for a GPUTarget. That is the JIT's code path from
`run()` to `compile()`, minus the driver.

`python -m lowbit._aot [--arch 80 90] [--filter NAME]` (this module's `main`) compiles every spec
that the family kernel modules (every kernels/<family>.py with an `aot_specs()`, found by
kernels/_families.py) list in `aot_specs()`, one process per core, and prints one JSON line per
(spec, arch) on stdout (registers, stack, local memory, spill bytes, tensor-core use, which
pointer offsets are 64-bit) and one progress line per compile on stderr.

Triton internals are imported inside the functions, so importing lowbit.kernels never depends
on them (the GPU image has Triton 3.6; this was written against 3.9's jit.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from ._families import families
from ._spec import KernelSpec


# ----------------------------------------------------------------------------------------------
# Specialize and compile, as JITFunction.run does
# ----------------------------------------------------------------------------------------------


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def specialize(spec: KernelSpec, arch: int):
    """(signature, constexprs, attrs, options) of `spec` as the JIT would compile it for `arch`.

    Mirrors triton/runtime/jit.py (3.9): JITFunction.run() adds the debug/instrumentation
    options, the binder from create_function_from_signature() specializes each argument with the
    backend's specialize_impl, and _pack_args() turns that into what ASTSource takes.
    """
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    fn = spec.fn
    kwargs = dict(spec.kwargs)
    known = set(backend.parse_options({}).__dict__)
    runtime_options = {
        "debug": kwargs.get("debug", getattr(fn, "debug", False)) or knobs.runtime.debug,
        "instrumentation_mode": getattr(knobs.compilation, "instrumentation_mode", None),
        "fpsan_homomorphic_casts": getattr(knobs.compilation, "fpsan_homomorphic_casts", None),
    }
    kwargs.update({k: v for k, v in runtime_options.items() if k in known and v is not None})
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def compile_spec(spec: KernelSpec, arch: int):
    """The triton CompiledKernel of `spec` for sm_`arch` (asm: ttir, ttgir, llir, ptx, cubin)."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(spec.fn, JITFunction):
        raise RuntimeError(f"{spec.name}: the kernel is not a JITFunction; TRITON_INTERPRET=1 was set when "
                           "lowbit.kernels was imported (unset it for the compile tier and the cost report)")
    signature, constexprs, attrs, options = specialize(spec, arch)
    src = ASTSource(spec.fn, signature, constexprs, attrs)
    return triton.compile(src, target=_target(arch), options=options.__dict__)


def specialization_summary(spec: KernelSpec, arch: int) -> dict:
    """The JIT's view of the launch: which runtime arguments it marks divisible by 16, which it
    folds to the constant 1, and the value of every constexpr (as str when not a plain value)."""
    signature, constexprs, attrs, _ = specialize(spec, arch)
    names = list(signature)
    runtime = {i for i, p in enumerate(spec.fn.params) if not p.is_constexpr}
    return {
        "divisible_16": sorted(names[path[0]] for path, a in attrs.items() if ["tt.divisibility", 16] in a),
        "constant_1": sorted(names[path[0]] for path, v in constexprs.items() if path[0] in runtime and v == 1),
        "constexprs": {names[path[0]]: v if isinstance(v, (int, float, str, type(None))) else str(v)
                       for path, v in constexprs.items() if path[0] not in runtime},
    }


# ----------------------------------------------------------------------------------------------
# Reading the cubin: resource usage and SASS (tools that ship inside Triton's wheel)
# ----------------------------------------------------------------------------------------------


def nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_on_cubin(cubin: bytes, *argv: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([*argv, path], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame, shared and local memory (bytes) as cuobjdump reads them."""
    out = _run_on_cubin(cubin, nvidia_tool("cuobjdump"), "--dump-resource-usage")
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


def disassemble(cubin: bytes) -> str:
    """SASS from nvdisasm, annotated with the Python source line and the PTX line of each
    instruction (`//## File "nf4.py", line N`, `//## File ".nv_debug_ptx_txt", line N`)."""
    return _run_on_cubin(cubin, nvidia_tool("nvdisasm"), "--print-line-info", "--print-line-info-ptx",
                         "--print-code")


def spill_store_bytes(sass: str) -> int:
    """Bytes stored to local memory by STL instructions (static count): ptxas's "spill stores"."""
    total = 0
    for m in re.finditer(r"\bSTL(\.\w+)*", sass):
        mods = m.group(0).split(".")[1:]
        width = next((int(x) for x in mods if x in ("64", "128")), 32)
        width = 8 if {"U8", "S8"} & set(mods) else 16 if {"U16", "S16"} & set(mods) else width
        total += width // 8
    return total


# ----------------------------------------------------------------------------------------------
# Reading the TTIR: are activation-row offsets 64-bit?
# ----------------------------------------------------------------------------------------------

_PTR_OP = re.compile(r"^\s*(%[\w.$-]+) = tt\.(splat|broadcast|expand_dims|reshape|trans|addptr) "
                     r"(%[\w.$-]+)(?:, (%[\w.$-]+))?[^:]*: (.*?)(?:\s+loc\(.*\))?$")


def pointer_offsets(ttir: str) -> dict[str, list[str]]:
    """For each pointer argument of the kernel, the offsets added to it, as "tensor:i64",
    "scalar:i32", ...: every tt.addptr on a value derived (splat, broadcast, expand_dims,
    reshape, addptr) from that argument."""
    header = next(line for line in ttir.splitlines() if "tt.func" in line)
    roots = re.findall(r"(%\w+): !tt\.ptr<", header)
    origin = {r: r[1:] for r in roots}
    offsets: dict[str, set[str]] = {r[1:]: set() for r in roots}
    for line in ttir.splitlines():
        m = _PTR_OP.match(line)
        if not m or m.group(3) not in origin:
            continue
        result, op, src, _, types = m.groups()
        origin[result] = origin[src]
        if op == "addptr":
            off_type = types.rsplit(", ", 1)[-1]
            elem = re.search(r"(i\d+)>?$", off_type).group(1)
            offsets[origin[src]].add(f"{'tensor' if off_type.startswith('tensor') else 'scalar'}:{elem}")
    return {k: sorted(v) for k, v in offsets.items()}


# ----------------------------------------------------------------------------------------------
# The compile tier: every spec, every arch, one JSON line each
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def all_specs() -> tuple[KernelSpec, ...]:
    """Every spec that a family kernel module (kernels/_families.py) lists in aot_specs(), names unique."""
    specs = [s for mod in families().values() for s in mod.aot_specs()]
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate spec names: {sorted(dupes)[:5]}")
    return tuple(specs)


def report(spec: KernelSpec, arch: int) -> dict:
    """Compile `spec` for sm_`arch` and summarize what a reviewer of the kernel wants to know."""
    t0 = time.perf_counter()
    compiled = compile_spec(spec, arch)
    ptx = compiled.asm["ptx"]
    usage = resource_usage(compiled.asm["cubin"])
    # A spill needs a stack frame; disassemble (a third of a second for a large kernel) only then.
    spill = spill_store_bytes(disassemble(compiled.asm["cubin"])) if usage["stack"] or usage["local"] else 0
    return {
        "name": spec.name,
        "arch": arch,
        **usage,
        "spill": spill,
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        "wgmma": "wgmma" in ptx,
        "specialization": specialization_summary(spec, arch),
        "offsets": pointer_offsets(compiled.asm["ttir"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _job(job: tuple[str, int]) -> dict:
    name, arch = job
    spec = next(s for s in all_specs() if s.name == name)
    try:
        return report(spec, arch)
    except Exception as e:  # report, do not hide: the compile tier fails on "error"
        return {"name": name, "arch": arch, "error": f"{type(e).__name__}: {e}"[:3000]}


def main(argv: list[str] | None = None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces @triton.jit at import
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the tests run the kernels
    p = argparse.ArgumentParser(prog="python -m lowbit._aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--filter", default="", help="only specs whose name contains this")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    names = [s.name for s in all_specs() if a.filter in s.name]  # built before the workers fork
    jobs = [(n, arch) for n in names for arch in a.arch]
    t0 = time.perf_counter()
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        futures = [ex.submit(_job, j) for j in jobs]
        for i, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            if "error" in r:
                status = "ERROR " + r["error"].splitlines()[0][:100]
            else:
                status = f"{r['reg']:>3} regs  stack {r['stack']:>4}  local {r['local']:>3}  spill {r['spill']:>4}"
            print(f"[{i:>3}/{len(jobs)} {time.perf_counter() - t0:5.0f}s] sm{r['arch']} {r['name'][:70]:70} {status}",
                  file=sys.stderr, flush=True)
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
