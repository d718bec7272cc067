"""A fresh clone installs and imports: the top-level `kernels/` folder never shadows Hugging Face's `kernels`
distribution (transformers >= 5.25 imports it), the wheel carries lowbit.kernels, and the test environment is
the locked one (requirements/test.lock).

The bug these catch: `kernels/__init__.py` at the repo root made `import kernels` - from pytest's rootdir
insertion, `python -m lowbit.cli` or any interpreter started in the clone - find lowbit's Triton folder instead
of the installed package, so transformers failed to import and no test ran."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "test.lock"


def _run_in_root(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -c code` started in the repo root: sys.path[0] is the root, as in a REPL opened in the clone."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_kernels_folder_is_not_a_regular_package():
    # a regular package (an __init__.py) at the root wins `import kernels` against site-packages; a namespace
    # portion (no __init__.py) loses to any installed regular package of that name
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not (ROOT / "kernels.py").exists()
    # lowbit.kernels is the same folder, reached through python/lowbit/kernels (a symlink to it)
    link = ROOT / "python" / "lowbit" / "kernels"
    assert link.resolve() == (ROOT / "kernels").resolve()


def test_import_kernels_from_the_root_is_never_lowbits():
    out = _run_in_root("import kernels, sys; print(getattr(kernels, '__file__', None)); "
                       "print(list(getattr(kernels, '__path__', [])))")
    assert out.returncode == 0, out.stderr
    file_line, path_line = out.stdout.splitlines()[-2:]
    try:
        md.distribution("kernels")
    except md.PackageNotFoundError:
        # without Hugging Face's kernels the root folder is at most an empty namespace portion
        assert file_line == "None", file_line
    else:
        # theirs: a regular package from site-packages (which may sit inside the clone, in .venv)
        assert file_line != "None" and not Path(file_line).resolve().is_relative_to(ROOT / "kernels"), file_line
        assert "site-packages" in file_line, file_line


def test_transformers_imports_from_the_root():
    pytest.importorskip("transformers")
    out = _run_in_root("import transformers.integrations.hub_kernels, transformers; "
                       "from transformers import LlamaForCausalLM; print('ok')")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_lowbit_kernels_imports_every_family_with_triton():
    pytest.importorskip("triton")
    out = _run_in_root("from lowbit._backend import kernels; k = kernels(); "
                       "print(k.nf4.__name__, k.intq.__name__, k.sz.__name__)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["lowbit.kernels.nf4", "lowbit.kernels.intq", "lowbit.kernels.sz"]


def test_cli_module_runs_from_the_root(tmp_path):
    """`python -m lowbit.cli quantize` from the root (the clash broke it: the CLI imports transformers)."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(tmp_path / "tiny"), str(tmp_path / "q"),
                          "--format", "nf4"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "q").iterdir())


@pytest.mark.slow
def test_wheel_without_build_isolation_carries_lowbit_kernels(tmp_path):
    """`pip wheel --no-build-isolation` from the root (setuptools loads every installed distribution's entry points,
    Hugging Face's kernels among them, with the root on sys.path); the wheel has lowbit/kernels/*.py and no
    top-level kernels, and lowbit.kernels imports from it outside the clone."""
    pytest.importorskip("setuptools")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lowbit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("_common.py", "_compile.py", "_spec.py", "cost.py", "intq.py", "nf4.py", "sz.py"):
        assert f"lowbit/kernels/{f}" in names, f
    assert not [n for n in names if n.startswith("kernels/")]
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-I", "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); import lowbit.kernels.nf4 as m; print(m.__file__)",
                            str(tmp_path / "site")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert Path(probe.stdout.strip()).is_relative_to(tmp_path / "site")


# ------------------------------------------------------------------------------ the lock


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: every line pins one exact version, got {line!r}"
            pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_closure() -> set[str]:
    """Every distribution lowbit[test] needs in this environment (markers evaluated), transitively."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(r, {"test"}) for r in md.requires("lowbit") or []]
    while todo:
        text, extras = todo.pop()
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [(r, set(req.extras)) for r in md.requires(req.name) or []]
        except md.PackageNotFoundError:
            pass
    return seen


@pytest.mark.skipif(os.environ.get("LOWBIT_UNLOCKED") == "1", reason="make test-latest floats the lock on purpose")
def test_environment_is_the_lock():
    """make test installs requirements/test.lock; a dependency that floats (a new upstream release) or that the
    lock forgets fails here, not overnight on main."""
    pytest.importorskip("packaging")
    pins = _lock()
    missing, differ = [], []
    for name in sorted(_requirement_closure()):
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        if name not in pins:
            missing.append(f"{name} (installed {have}, not in the lock)")
        elif have.split("+")[0] != pins[name]:
            differ.append(f"{name}: installed {have}, locked {pins[name]}")
    assert not differ, "the environment is not the lock (run `make clean test`):\n" + "\n".join(differ)
    assert not missing, "requirements of lowbit[test] the lock does not pin:\n" + "\n".join(missing)


@pytest.mark.skipif(os.environ.get("LOWBIT_UNLOCKED") == "1", reason="make test-latest floats the lock on purpose")
def test_real_model_data_is_the_lock():
    """requirements/realmodel.lock (installed --no-deps): the SmolLM2 GGUF and the Lee corpus at their versions."""
    for line in (ROOT / "requirements" / "realmodel.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert md.version(name) == version, name
