"""The C boundary of the CPU backend: build the kernels, load them, declare every exported function once.

Layout. The kernels' C sources are package data in lowbit/csrc/: `lowbit.h` (what every file shares: return codes,
threads, fp16/bf16 conversions, the AVX-512 switch), `common.c` (the probes `lb_isa` / `lb_openmp` and the thread
pool) and one file per format family (`nf4.c`, `intq.c`, `sz_decode.c`, `sz_encode.c`, `blockfp.c`). `build()` compiles every
.c file there, each its own translation unit, into one shared library with the system C compiler (-O3 -march=native
-fopenmp -ffp-contract=off; a few seconds once per machine, then cached on disk under `cache_dir()`, named by a hash
of the sources, the compiler and the CPU's flags). `library()` loads it with ctypes on first use; when it can not be
built (no compiler), it warns once and returns None, and every op takes the pure-torch reference.

Bindings. Every exported `lb_*` function is declared once, by `bind(kernel(...), ...)` in the Python module of the
family that calls it (lowbit._cpu: the 4-bit LUT and integer families and the SZ decoder; lowbit.formats._sz_encode:
the SZ encoder; lowbit._blockfp_cpu: block FP4; the probes here), with its C parameter names and ctypes types in the
C order. `BINDINGS` is the one table these declarations make, and every library loaded (`load()`) gets its argument
and return types from it.
tests/test_c_bindings.py parses the definitions in csrc/ and fails unless the table matches them exactly: the same
symbols, arity, parameter names and types. A new family adds csrc/<family>.c and calls `bind()` from its own
module: no shared file changes.

Return codes (csrc/lowbit.h): every kernel returns int; LB_ENOMEM (an allocation in C failed) raises MemoryError
naming the kernel, on every call (ctypes' errcheck); any other code is the kernel's own, returned to its caller.
A call with more arguments than declared raises TypeError too (ctypes itself refuses only fewer).

This is the bottom layer of the CPU backend: it imports nothing from lowbit (lowbit._cpu and
lowbit.formats._sz_encode build on it). `CALLS` counts the fast paths that ran, by name (for tests).
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

BACKENDS = ("fast", "reference", "triton")
CALLS: collections.Counter = collections.Counter()  # fast-path launches by name, e.g. CALLS["nf4.gemv"]

# The C types of the kernels' parameters: any pointer, int64_t (i64), int, float, double.
P, I64, INT, F32, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
LB_OK, LB_ENOMEM = 0, -1  # the return codes of csrc/lowbit.h

_LOCK = threading.Lock()
_STATE: dict = {"tried": False, "lib": None}


def backend() -> str:
    """The CPU backend named by LOWBIT_CPU_BACKEND ("fast" when unset)."""
    name = os.environ.get("LOWBIT_CPU_BACKEND", "fast")
    if name not in BACKENDS:
        raise ValueError(f"LOWBIT_CPU_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


# ----------------------------------------------------------------------------------------------
# The bindings table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One exported C function: its parameters as (C name, ctypes type) in order, and what it returns (an int:
    a return code where `status`, checked on every call; a flag for the probes)."""

    name: str
    params: tuple[tuple[str, type], ...]
    status: bool = True

    @property
    def argtypes(self) -> list:
        return [t for _, t in self.params]


def kernel(name: str, /, **params: type) -> Binding:
    """A kernel returning a code (LB_OK, LB_ENOMEM or its own), its parameters as C name=ctypes type in C order."""
    return Binding(name, tuple(params.items()))


def probe(name: str) -> Binding:
    """A function of no arguments returning an int flag (lb_isa, lb_openmp)."""
    return Binding(name, (), status=False)


BINDINGS: dict[str, Binding] = {}  # every exported lb_* function, declared once by bind()


def bind(*bindings: Binding) -> None:
    """Declare exported C functions (each once, whichever family's module declares it); a library already loaded
    gets their types at once, later ones in load()."""
    for b in bindings:
        if BINDINGS.get(b.name, b) != b:
            raise ValueError(f"lowbit: C function {b.name} declared twice, differently: {BINDINGS[b.name]} and {b}")
        BINDINGS[b.name] = b
    if _STATE["lib"] is not None:
        for b in bindings:
            _apply(_STATE["lib"], b)


def _arity(func, args) -> None:
    # ctypes refuses too few arguments but passes extra ones on to C, which ignores them: refuse those too
    if len(args) != len(func.argtypes):
        raise TypeError(f"lowbit CPU kernel {func.__name__} takes {len(func.argtypes)} arguments, got {len(args)}")


def _check_flag(result: int, func, args) -> int:
    _arity(func, args)
    return result


def _check_code(result: int, func, args) -> int:
    _arity(func, args)
    if result == LB_ENOMEM:
        raise MemoryError(f"lowbit CPU kernel {func.__name__}: out of memory (an allocation in C failed)")
    return result


def _apply(lib: ctypes.CDLL, b: Binding) -> None:
    fn = getattr(lib, b.name)
    fn.argtypes, fn.restype, fn.errcheck = b.argtypes, INT, _check_code if b.status else _check_flag


bind(probe("lb_isa"), probe("lb_openmp"))  # common.c: 1 when built with AVX-512 / OpenMP


# ----------------------------------------------------------------------------------------------
# Build once per machine (cached on disk), load with ctypes
# ----------------------------------------------------------------------------------------------


def load(path: os.PathLike | str) -> ctypes.CDLL:
    """The library at `path` with every declared binding's types set (the tests load other builds with it)."""
    lib = ctypes.CDLL(str(path))
    for b in BINDINGS.values():
        _apply(lib, b)
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, built on first use; None (after one warning) when they can not be built."""
    if not _STATE["tried"]:
        with _LOCK:
            if not _STATE["tried"]:
                try:
                    _STATE["lib"] = load(build())
                except Exception as e:  # no compiler, a failed compile, an unloadable library
                    warnings.warn(f"lowbit: the fast CPU backend could not be built ({e}); CPU ops run the pure-torch "
                                  "reference instead (same results, slower). Point CC at a C compiler to enable it, "
                                  "or set LOWBIT_CPU_BACKEND=reference to silence this.", RuntimeWarning, stacklevel=2)
                _STATE["tried"] = True
    return _STATE["lib"]


def fast_library() -> Optional[ctypes.CDLL]:
    """library() when LOWBIT_CPU_BACKEND is "fast", else None."""
    return library() if backend() == "fast" else None


def cache_dir() -> Path:
    """Where built kernels are kept: $LOWBIT_CACHE_DIR, else $XDG_CACHE_HOME/lowbit or ~/.cache/lowbit."""
    if os.environ.get("LOWBIT_CACHE_DIR"):
        return Path(os.environ["LOWBIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"


def sources() -> dict[str, str]:
    """{name: text} of every .c and .h file in lowbit/csrc/ (package data), by name: what build() compiles."""
    folder = resources.files(__package__).joinpath("csrc")
    return {f.name: f.read_text() for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith((".c", ".h"))}


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc or not shutil.which(cc):
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC')!r}, and no cc, gcc or clang on PATH)")
    return shutil.which(cc)


def _machine() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform's names."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


_VARIANTS = {"native": [], "generic": ["-DLB_GENERIC"], "no-gfni": ["-mno-gfni"]}


def build(variant: str = "native") -> Path:
    """Compile the kernels (or find them built) and return the library's path. The tests also build
    "generic" (plain C: what CPUs without AVX-512 run) and "no-gfni" (AVX-512 without GFNI, e.g. Skylake-X)."""
    cc = _compiler()
    st = os.stat(cc)
    extra = _VARIANTS[variant]  # after -march=native, which they amend
    srcs = sources()
    if not any(n.endswith(".c") for n in srcs):
        raise RuntimeError("no C sources in lowbit/csrc (an incomplete installation)")
    key = "\0".join([*(f"{n}\0{t}" for n, t in srcs.items()), cc, str(st.st_size), str(st.st_mtime_ns), _machine(),
                     sys.platform, *extra])
    name = f"cpu-{hashlib.sha256(key.encode()).hexdigest()[:24]}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"lowbit-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        if (folder / name).exists():
            return folder / name
        try:
            src = folder / f"{name}.{os.getpid()}.src"  # this build's copy of the sources
            src.mkdir(parents=True, exist_ok=True)
            for n, t in srcs.items():
                (src / n).write_text(t)
            break
        except OSError:
            shutil.rmtree(src, ignore_errors=True)
            continue
    else:
        raise RuntimeError("no writable folder for the built kernels (set LOWBIT_CACHE_DIR)")
    tmp, err = folder / f"{name}.{os.getpid()}.tmp", ""
    files = [str(src / n) for n in srcs if n.endswith(".c")]
    try:
        base = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
        # -fopenmp: share torch's OpenMP runtime (see parallel() in csrc/lowbit.h); not every compiler has
        # OpenMP or knows -march=native, so each is dropped in turn before giving up
        for arch in (["-march=native", "-fopenmp"], ["-march=native"], []):
            cmd = [cc, *base, *arch, *extra, *files, "-o", str(tmp), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                if err:
                    dropped = " and ".join(a for a in ("-march=native", "-fopenmp") if a not in arch)
                    warnings.warn(f"lowbit: the CPU kernels built without {dropped} (slower): {err}", RuntimeWarning,
                                  stacklevel=2)
                os.replace(tmp, folder / name)  # atomic: concurrent builders each write their own tmp
                return folder / name
            err = r.stderr.strip()[-400:]
        raise RuntimeError(f"{cc} failed: {err}")
    finally:
        shutil.rmtree(src, ignore_errors=True)
        tmp.unlink(missing_ok=True)
