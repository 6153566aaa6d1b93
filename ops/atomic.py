"""Atomic outputs: write beside the target under a temporary name, rename into place only on success.

A failure, an exception or Ctrl-C (KeyboardInterrupt, and SIGTERM, which the CLI turns into SystemExit)
removes the temporary file or directory, so a run never leaves a half-written output and never
clobbers a good one. It lives in ops/ because ops writes files too (the model cache).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _replace_dir(tmp: Path, target: Path) -> None:
    """Directories cannot be swapped in one rename: move the old one aside, move the new one in, drop the old."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (not created); on success it becomes `target`.

    The caller makes a file or a directory there. Used for libraries that want a path (safetensors,
    save_pretrained) and by `atomic_open`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if tmp.is_dir():
            _replace_dir(tmp, target)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create files owner-only
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "wb") -> Iterator[IO]:
    """`open(target, mode)` that only appears at `target` once the block finishes without error."""
    with atomic_path(target) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
