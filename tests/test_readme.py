"""README.md promises its python blocks run as written: every block, in order, in a fresh folder and a fresh
interpreter (offline). A block that raises or asserts fails this test; so does a README without blocks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_blocks_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4, "the API examples went missing from README.md"
    (tmp_path / "readme.py").write_text("\n\n".join(blocks))
    out = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.splitlines()
    # replace_linear's in-place contract as the README states it: three layer types, the head dense
    assert lines[0].split() == ["Linear4bit", "IntLinear", "SZLinear", "Linear"], out.stdout
    assert lines[1:] == ["refused bf16"], out.stdout  # sz_decompress refuses a dtype that breaks the bound
