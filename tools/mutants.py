#!/usr/bin/env python3
"""Planted-bug check (`make mutants`): apply each mutation of tools/mutants.toml, one at a time, to a
temporary copy of the working tree, run the tests that must catch it, and report the ones that survive.

Every mutation names its file, an exact snippet of it (which must occur exactly once, so a list that no
longer matches the code fails loudly instead of silently testing nothing), the replacement, the pytest
node ids that must fail with it, and one line saying what the planted bug does.

The working tree is never written: the tracked and untracked-but-not-ignored files are copied (`git
ls-files | tar`) to a temporary folder, pytest runs there with that copy's python/ first on PYTHONPATH
(lowbit is installed editable from the working tree; the tool checks that lowbit and lowbit.kernels
import from the copy), PYTHONDONTWRITEBYTECODE=1 (a restored file must never meet the mutant's cached
bytecode) and LOWBIT_CACHE_DIR inside the temporary folder (a mutated csrc/*.c hashes to a new library
name, so it is really compiled, and no mutant library lands in the user's cache). The copy is deleted at
the end, also on Ctrl-C or an exception (--keep keeps it).

    python tools/mutants.py                 # baseline (the selected tests pass unmutated), then every mutant
    python tools/mutants.py --list          # the mutations, checked against the sources, nothing run
    python tools/mutants.py --only NAME ... # some of them
Exit status: 0 every mutant caught, 1 some survived (or errored), 2 the list or the baseline is broken.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "tools" / "mutants.toml"
TIMEOUT_S = 900  # one mutant's test run; a mutant that hangs the tests counts as caught (they did not pass)


def load(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        mutants = tomllib.load(f)["mutant"]
    names = set()
    for m in mutants:
        missing = {"name", "file", "find", "replace", "tests", "description"} - set(m)
        if missing:
            sys.exit(f"mutants: {m.get('name', m)} lacks {sorted(missing)}")
        if m["name"] in names:
            sys.exit(f"mutants: duplicate name {m['name']!r}")
        names.add(m["name"])
        if m["find"] == m["replace"] or not m["tests"]:
            sys.exit(f"mutants: {m['name']}: the replacement must differ and name at least one test")
    return mutants


def check_snippets(mutants: list[dict], tree: Path) -> None:
    """Each snippet must occur exactly once in its file: the tool refuses to run a list that has rotted."""
    bad = []
    for m in mutants:
        path = tree / m["file"]
        if not path.is_file():
            bad.append(f"{m['name']}: {m['file']} does not exist")
            continue
        n = path.read_text().count(m["find"])
        if n != 1:
            bad.append(f"{m['name']}: its snippet occurs {n} times in {m['file']} (must be exactly once)")
    if bad:
        sys.exit("mutants: the list does not match the sources:\n  " + "\n  ".join(bad))


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked-not-ignored files (symlinks kept: python/lowbit/kernels
    points at ../../kernels, which in the copy is the copy's kernels/)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    present = b"\0".join(f for f in dict.fromkeys(files) if f and os.path.lexists(ROOT / os.fsdecode(f)))
    pack = subprocess.Popen(["tar", "--null", "-T", "-", "-cf", "-"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    unpack = subprocess.Popen(["tar", "-xf", "-"], cwd=dst, stdin=pack.stdout)
    pack.stdout.close()
    pack.stdin.write(present)
    pack.stdin.close()
    if pack.wait() or unpack.wait():
        sys.exit("mutants: copying the working tree failed")


def environment(tree: Path, tmp: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "python"), str(tree)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["LOWBIT_CACHE_DIR"] = str(tmp / "cache")
    env.pop("LOWBIT_CPU_BACKEND", None)
    return env


def check_isolation(tree: Path, env: dict) -> None:
    # lowbit, its kernels (through the symlink) and the C sources the backend compiles: all the copy's
    code = ("import importlib.resources as r, lowbit, lowbit.kernels.nf4 as k; "
            "print(lowbit.__file__); print(k.__file__); print(r.files('lowbit').joinpath('csrc/lowbit.h'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    paths = out.stdout.split()
    real = tree.resolve()
    if out.returncode or len(paths) != 3 or not all(Path(p).resolve().is_relative_to(real) for p in paths):
        sys.exit(f"mutants: the copy does not import its own lowbit (got {paths}; {out.stderr[-2000:]})")


def run_tests(tree: Path, env: dict, tests: list[str], first_failure: bool) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tree),
           "-c", str(tree / "pytest.ini")]
    if first_failure:
        cmd.append("-x")
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd + tests, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        return r.returncode, r.stdout + r.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\n(timed out after {TIMEOUT_S} s)", time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="check and print the mutations, run nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output of every run")
    args = ap.parse_args()

    mutants = load(LIST)
    check_snippets(mutants, ROOT)
    if args.only:
        unknown = set(args.only) - {m["name"] for m in mutants}
        if unknown:
            sys.exit(f"mutants: no mutation named {sorted(unknown)}")
        mutants = [m for m in mutants if m["name"] in args.only]
    if args.list:
        for m in mutants:
            print(f"{m['name']:34} {m['file']:36} {m['description']}")
        print(f"{len(mutants)} mutations; every snippet matches its file exactly once")
        return 0

    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-mutants-"))
    tree = tmp / "tree"
    tree.mkdir()
    results = []
    try:
        copy_tree(tree)
        check_snippets(mutants, tree)  # the copy is what runs (the tree may have moved since the first check)
        env = environment(tree, tmp)
        check_isolation(tree, env)
        print(f"mutants: {len(mutants)} mutations, tests run in a copy of the working tree at {tree}", flush=True)
        if not args.no_baseline:
            union = list(dict.fromkeys(t for m in mutants for t in m["tests"]))
            rc, out, secs = run_tests(tree, env, union, first_failure=False)
            if args.verbose or rc:
                print(out)
            if rc:
                print(f"mutants: the selected tests fail WITHOUT any mutation (pytest exit {rc}); fix them first")
                return 2
            print(f"baseline: the {len(union)} selected test ids pass unmutated ({secs:.0f} s)", flush=True)
        for m in mutants:
            path = tree / m["file"]
            original = path.read_text()
            try:
                path.write_text(original.replace(m["find"], m["replace"], 1))
                rc, out, secs = run_tests(tree, env, m["tests"], first_failure=True)
            finally:
                path.write_text(original)
            verdict = {1: "caught", -1: "caught (timeout)", 0: "SURVIVED"}.get(rc, f"ERROR (pytest exit {rc})")
            results.append((m, verdict, secs))
            print(f"{verdict:18} {secs:6.1f} s  {m['name']:34} {m['description']}", flush=True)
            if args.verbose or not verdict.startswith("caught"):
                print("    " + "\n    ".join(out.strip().splitlines()[-25:]))
    except KeyboardInterrupt:
        print("mutants: interrupted; the working tree was never modified")
        return 130
    finally:
        if args.keep:
            print(f"mutants: the copy is kept at {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    caught = sum(v.startswith("caught") for _, v, _ in results)
    total = time.monotonic() - start
    print(f"\nmutants: {caught} caught of {len(results)} ({total / 60:.1f} min)")
    for m, v, _ in results:
        if not v.startswith("caught"):
            print(f"  {v}: {m['name']} ({m['file']}): {m['description']}\n    tests: {' '.join(m['tests'])}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
