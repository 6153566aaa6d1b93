"""The README's Python example runs as written, on the real default model and data, and prints what it shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _block(section: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text().split(f"## {section}", 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_the_python_example_prints_what_the_readme_shows(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"the shared data is not at {DATA}")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA)  # the example reads ../shared/data, as from a checkout
    (work / "example.py").write_text(_block("Python API", "python"))
    r = subprocess.run([sys.executable, "example.py"], cwd=work, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    got = r.stdout.strip().splitlines()
    want = re.search(r"It prints.*?```\n(.*?)```", (ROOT / "README.md").read_text().split("## Python API", 1)[1],
                     re.S).group(1).strip().splitlines()
    assert len(got) == len(want) == 3 and got[0] == want[0], (got, want)
    for g, w in zip(got[1:], want[1:], strict=True):  # the perplexities, to the two decimals the README prints
        name_g, ppl_g = g.rsplit(" ", 1)
        name_w, ppl_w = w.rsplit(" ", 1)
        # float32 forwards differ by a few ulps between CPUs; at two decimals that can move the last digit by one
        assert name_g == name_w and abs(float(ppl_g) - float(ppl_w)) <= 0.011, (got, want)
