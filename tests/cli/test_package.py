"""Packaging and architecture: one import name, light --help, ops free of CLI concerns, help snapshots."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = Path(__file__).parent / "snapshots"
COMMANDS = [[], ["models"], ["models", "prepare"], ["inspect"], ["generate"], ["calibrate"], ["compress"], ["eval"],
            ["train-prompts"], ["sources"], ["route"], ["align"], ["table"]]


def test_wheel_installs_only_the_rechannel_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("rechannel-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"rechannel", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    installed = {p.name for p in site.iterdir()} - {"bin"}
    assert not installed & {"cli", "ops", "triton_kernels", "tests"}
    assert {"rechannel"} <= installed
    for sub in ("cli", "ops", "triton_kernels"):
        assert (site / "rechannel" / sub / "__init__.py").is_file()
    entry = (site / "rechannel-0.1.0.dist-info" / "entry_points.txt").read_text()
    assert "rechannel = rechannel.cli.main:main" in entry
    r = subprocess.run([sys.executable, "-c", "import rechannel.cli.main as m, rechannel; print(rechannel.__file__)"],
                       env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == str(site / "rechannel" / "__init__.py"), r.stderr


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom rechannel.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules]\n"
            "print('heavy:' + ','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "heavy:"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_data_flows_one_way_cli_ops_kernels():
    for path in (ROOT / "ops").glob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("typer", "rich") or n.startswith("rechannel.cli")}
        assert not bad, f"{path.name} imports {bad}"
    for path in (ROOT / "triton_kernels").glob("*.py"):
        bad = {n for n in _imports(path) if n.startswith("rechannel.cli")}
        assert not bad, f"{path.name} imports {bad}"


def _help(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "CI": "true"}
    env.pop("FORCE_COLOR", None)
    r = subprocess.run([sys.executable, "-m", "rechannel.cli.main", *args, "--help"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return "\n".join(line.rstrip() for line in r.stdout.splitlines()) + "\n"


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: "-".join(a) or "app")
def test_help_starts_with_real_examples_and_matches_its_snapshot(args):
    text = _help(args)
    examples = [line.strip() for line in text.split("Examples", 1)[1].split("╭")[0].splitlines()
                if line.strip().startswith("rechannel ") or "| rechannel" in line]
    assert examples, "every --help shows examples"
    commands = {c[0] for c in COMMANDS if c}
    for ex in examples:
        for part in re.findall(r"rechannel (\S+)", ex):
            assert part in commands, f"example uses an unknown command: {ex}"
    snap = SNAPSHOTS / f"help-{'-'.join(args) or 'app'}.txt"
    if os.environ.get("RECHANNEL_UPDATE_SNAPSHOTS") or not snap.exists():
        snap.write_text(text)
    assert text == snap.read_text(), f"--help changed; if intended, rerun with RECHANNEL_UPDATE_SNAPSHOTS=1 ({snap})"
