"""The C boundary (lowbit/_clib.py, lowbit/csrc/): the one bindings table against the C definitions, the return
codes, the library's exported symbols, allocation failures, and the C sources shipping with the package.

`_clib.BINDINGS` is assembled from each family's `_clib.bind(...)` (lowbit._cpu, lowbit.formats._sz_encode, the
probes in _clib); ctypes trusts it blindly (a missing argument reads a register's garbage, a float passed as an
int64 is reinterpreted). The C side is parsed here from the definitions in csrc/*.c: a definition at the start of a
line, `<return type> lb_<name>(<parameters>) {`. Adding, dropping, renaming or retyping a parameter on one side
only fails `test_bindings_match_the_c_definitions`.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import lowbit  # noqa: F401 (imports every family's module: their bind() calls complete the table)
from lowbit import _clib, _cpu

CSRC = Path(_clib.__file__).parent / "csrc"
ROOT = Path(__file__).resolve().parent.parent

# C parameter types (qualifiers dropped) -> the ctypes type a binding must declare; any pointer is c_void_p
C_TYPES = {"i64": ctypes.c_int64, "int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float,
           "double": ctypes.c_double}
_DEFINITION = re.compile(r"^(?P<ret>[A-Za-z_][\w \t*]*?)\s*\b(?P<name>lb_\w+)\s*\((?P<params>[^)]*)\)\s*\{", re.M)


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), text, flags=re.S))


def _param(text: str, where: str) -> tuple[str, type]:
    """'const uint8_t *codes' -> ('codes', c_void_p)"""
    m = re.fullmatch(r"(?P<type>.*?)(?P<name>\w+)\s*(?P<array>\[[^\]]*\])?", text.strip(), re.S)
    assert m, f"{where}: can not read the parameter {text!r}"
    ctype = " ".join(w for w in m["type"].replace("*", " * ").split() if w not in ("const", "volatile", "restrict"))
    if "*" in ctype or m["array"]:
        return m["name"], ctypes.c_void_p
    assert ctype in C_TYPES, f"{where}: parameter {text!r} has a C type with no ctypes mapping here (add it)"
    return m["name"], C_TYPES[ctype]


def c_definitions() -> dict[str, tuple[str, list[tuple[str, type]]]]:
    """{name: (return type, [(parameter name, ctypes type)])} of every exported lb_* function in csrc/*.c."""
    out = {}
    for path in sorted(CSRC.glob("*.c")):
        for m in _DEFINITION.finditer(_strip_comments(path.read_text())):
            ret = m["ret"].split()
            if "static" in ret or "INLINE" in ret:
                continue  # not exported
            where = f"{path.name}: {m['name']}"
            params = [p for p in m["params"].split(",") if p.strip()]
            params = [] if [p.strip() for p in params] == ["void"] else [_param(p, where) for p in params]
            # defined again (the other side of an #if, e.g. lb_openmp): only with the same signature
            assert out.get(m["name"], (" ".join(ret), params)) == (" ".join(ret), params), f"{where}: two signatures"
            out[m["name"]] = (" ".join(ret), params)
    return out


def _show(params) -> str:
    return ", ".join(f"{n}: {t.__name__}" for n, t in params)


def test_bindings_match_the_c_definitions():
    c = c_definitions()
    assert c, f"no lb_* definitions found in {CSRC}"
    table = _clib.BINDINGS
    assert not set(c) - set(table), f"defined in C, not declared with lowbit._clib.bind(): {sorted(set(c) - set(table))}"
    assert not set(table) - set(c), f"declared, not defined in csrc/*.c: {sorted(set(table) - set(c))}"
    for name, (ret, params) in sorted(c.items()):
        b = table[name]
        assert ret == "int", f"{name} returns {ret}: every entry point returns int (a code; a flag for the probes)"
        assert len(b.params) == len(params), (f"{name}: C has {len(params)} parameters ({_show(params)}), the "
                                              f"binding {len(b.params)} ({_show(b.params)})")
        for i, ((cn, ct), (bn, bt)) in enumerate(zip(params, b.params)):
            assert (cn, ct) == (bn, bt), f"{name} parameter {i}: C has {cn}: {ct.__name__}, the binding {bn}: {bt.__name__}"


def test_the_parser_sees_every_definition():
    # the regex must not skip an unusually formatted definition: count the lines that start one, more loosely
    for path in sorted(CSRC.glob("*.c")):
        text = _strip_comments(path.read_text())
        loose = len(re.findall(r"^(?!static|INLINE)[^\s#][^;(]*\blb_\w+\s*\(", text, re.M))
        parsed = sum(1 for m in _DEFINITION.finditer(text) if not {"static", "INLINE"} & set(m["ret"].split()))
        assert loose == parsed, f"{path.name}: {loose} lines start an lb_* definition, the parser read {parsed}"


def test_return_codes_match_the_c_sources():
    header = (CSRC / "lowbit.h").read_text()
    codes = {k: int(v) for k, v in re.findall(r"#define (LB_OK|LB_E[A-Z]+)\s+\(?(-?\d+)\)?", header)}
    assert codes == {"LB_OK": _clib.LB_OK, "LB_ENOMEM": _clib.LB_ENOMEM}
    szd = {k: int(v) for k, v in re.findall(r"#define (SZD_\w+) (\d+)", (CSRC / "sz_decode.c").read_text())}
    assert szd == {k[1:]: getattr(_cpu, k) for k in dir(_cpu) if k.startswith("_SZD_")}, szd


def test_a_conflicting_declaration_is_refused():
    b = _clib.BINDINGS["lb_q4"]
    _clib.bind(b)  # the same declaration again (a module reloaded): fine
    with pytest.raises(ValueError, match="lb_q4 declared twice"):
        _clib.bind(_clib.kernel("lb_q4", x=_clib.P))
    assert _clib.BINDINGS["lb_q4"] is b


def _library():
    lib = _clib.library()
    if lib is None:
        try:
            _clib._compiler()
        except RuntimeError:
            pytest.skip("no C compiler: the kernels are not built (the reference runs; tests/test_cpu.py)")
        pytest.fail("a C compiler is here but the kernels did not build (see the RuntimeWarning)")
    return lib


def test_library_exports_exactly_the_bound_functions():
    # every exported function is declared (no helper leaks out of its file, no entry point is missing)
    lib = _library()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the library's symbols")
    out = subprocess.run([nm, "-D", "--defined-only", lib._name], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"nm -D failed: {out.stderr[-200:]}")
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == set(_clib.BINDINGS), (sorted(exported - set(_clib.BINDINGS)), sorted(set(_clib.BINDINGS) - exported))


def test_calls_with_the_wrong_number_of_arguments_raise():
    lib = _library()
    with pytest.raises(TypeError, match="lb_isa takes 0 arguments, got 1"):
        lib.lb_isa(1)
    v = np.zeros(1, dtype=np.float32)
    out = np.zeros(1, dtype=np.uint8)
    assert lib.lb_szexc(v.ctypes.data, v.ctypes.data, 1, 0.0, out.ctypes.data) == _clib.LB_OK
    with pytest.raises(TypeError, match="lb_szexc takes 5 arguments, got 6"):  # ctypes alone would pass it on
        lib.lb_szexc(v.ctypes.data, v.ctypes.data, 0, 0.0, out.ctypes.data, 7)
    with pytest.raises(TypeError):
        lib.lb_szexc(v.ctypes.data, v.ctypes.data, 0, 0.0)


# Sizes past any address space (2**59-2**62 bytes; no overflow before the allocation): the kernels return
# LB_ENOMEM before reading their inputs, and the binding raises MemoryError naming the kernel.
HUGE = 1 << 50


def _oom_calls(lib):
    P0 = None  # never read: the allocation fails first
    yield "lb_mv4t", lambda: lib.lb_mv4t(P0, HUGE, 1, P0, P0, P0, P0, P0, 0.0, 256, P0, 64, 64, P0, 1)  # in a worker
    yield "lb_mvit", lambda: lib.lb_mvit(P0, HUGE, P0, P0, P0, 4, 32, 1, 32, P0, 1)  # in a worker
    yield "lb_szhuff", lambda: lib.lb_szhuff(P0, 1 << 60, 12, P0)
    start = np.zeros(2, dtype=np.int64)
    err = np.zeros(2, dtype=np.int64)
    yield "lb_szd", lambda: lib.lb_szd(P0, 0, start.ctypes.data, 1, P0, 62, 1.0, 0, 1, 1, 1, P0, P0, 0, P0, 0, 1,
                                       err.ctypes.data)
    if lib.lb_isa():  # the AVX-512 GEMVs copy x into the kernels' order first
        yield "lb_mv4", lambda: lib.lb_mv4(P0, 1 << 20, 1 << 40, P0, P0, P0, P0, P0, 0.0, 256, P0, 64, 1, P0, 1)
        yield "lb_mvi", lambda: lib.lb_mvi(P0, 1 << 20, P0, P0, P0, 4, 32, 1, 1 << 40, P0, 1)
    # blockfp's GEMV copies x to fp32 in every build
    yield "lb_blockfp_gemv", lambda: lib.lb_blockfp_gemv(P0, 0, 1 << 20, 1 << 40, P0, P0, P0, 32, 1, P0, P0, 1)


@pytest.mark.parametrize("variant", ["native", "generic"])
def test_allocation_failure_raises_memory_error_naming_the_kernel(variant):
    lib = _library() if variant == "native" else _clib.load(_clib.build(variant))
    names = []
    for name, call in _oom_calls(lib):
        with pytest.raises(MemoryError, match=f"lowbit CPU kernel {name}: out of memory"):
            call()
        names.append(name)
    assert len(names) >= 4, names


def test_package_data_ships_the_c_sources():
    # a wheel without csrc/ builds no kernels (one warning, then the slow reference everywhere)
    setup = (ROOT / "setup.py").read_text()
    m = re.search(r'package_data=\{"lowbit":\s*\[([^\]]*)\]', setup)
    assert m, "setup.py: no package_data for lowbit"
    patterns = re.findall(r'"([^"]+)"', m.group(1))
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".c", ".h"):
            rel = f"csrc/{f.name}"
            assert any(Path(rel).match(p) for p in patterns), f"setup.py package_data does not ship {rel}: {patterns}"
