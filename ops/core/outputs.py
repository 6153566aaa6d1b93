"""Output paths checked before any work: an unwritable place fails at once, and no output may destroy an input.

Every command that reads and writes files names its outputs (option, path, file or directory) and its inputs
(option, path) here before it loads a model, so that `calibrate --data F -o F` or `compress --model D -o D`
is one line of error and not the silent loss of F or D. Paths are compared after symbolic links are followed
and by inode, so `./F`, a link to F and a hard link to F are all F.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import is_sink, resolve_target
from .errors import UserError

STDIO = "-"


@dataclass(frozen=True)
class Output:
    option: str  # as the user typed it: "-o", "--nodes", "--plot"
    path: str
    kind: str = "file"  # "file" or "dir": what the command will put there


@dataclass(frozen=True)
class Input:
    option: str
    path: str


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(inner: Path, outer: Path) -> bool:
    return outer in inner.parents


def _check_place(out: Output, real: Path) -> None:
    """The target's kind and its directory's permissions, as far as they can be known before writing."""
    if real.is_dir() and out.kind == "file":
        raise UserError(f"{out.option} {out.path}: is a directory; give a file path")
    if real.exists() and not real.is_dir() and out.kind == "dir":
        raise UserError(f"{out.option} {out.path}: exists and is not a directory; this command writes a "
                        "directory there: give a new path or an existing directory to replace")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{out.option} {out.path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out.option} {out.path}: cannot write in {parent} (permission denied)")


def check_outputs(outputs: Sequence[Output], inputs: Iterable[Input] = ()) -> None:
    """Refuse, with one line naming both options, an output that is an input, lies inside an input directory,
    or holds an input (a directory output replaces everything under it); refuse two outputs at one path."""
    inputs = [(i, resolve_target(i.path)) for i in inputs if i.path and i.path != STDIO]
    seen: list[tuple[Output, Path]] = []
    for out in outputs:
        if not out.path or out.path == STDIO or is_sink(out.path):
            continue
        real = resolve_target(out.path)
        _check_place(out, real)
        for inp, src in inputs:
            if _same(real, src) or _inside(src, real) or _inside(real, src):
                raise UserError(f"{out.option} {out.path} would overwrite the input {inp.option} {inp.path}; "
                                "write the output somewhere else")
        for other, path in seen:
            if _same(real, path) or _inside(real, path) or _inside(path, real):
                raise UserError(f"{out.option} {out.path} and {other.option} {other.path} are the same place; "
                                "give each output its own path")
        seen.append((out, real))
