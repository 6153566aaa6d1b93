"""`make stream-check`: the demo's compressed models made again with `compress --stream`, against the in-memory
outputs: every file byte for byte, and each run's time from its report. Exits 1 when a directory differs."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main(out: str, runs: list[str]) -> int:
    root = Path(out)
    print("| run | in memory (s) | --stream (s) | files | outputs |")
    print("|---|---:|---:|---:|---|")
    ok = True
    for run in runs:
        seconds = [json.loads((root / f"{name}.report.json").read_text())["seconds"] for name in (run, f"{run}.stream")]
        same = _same(root / run, root / f"{run}.stream")
        ok &= same
        files = len(list((root / run).iterdir()))
        print(f"| {run} | {seconds[0]:.1f} | {seconds[1]:.1f} | {files} | {'byte-identical' if same else 'DIFFERENT'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
