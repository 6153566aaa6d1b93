"""Atomic outputs: write beside the target under a temporary name, rename into place only on success.

A failure, an exception or Ctrl-C (KeyboardInterrupt, and SIGTERM, which the CLI turns into SystemExit)
removes the temporary file or directory, so a run never leaves a half-written output and never
clobbers a good one. A SIGKILL cannot be caught: its temporary stays, named after its target and the
process that made it (`.NAME.tmp-PID-HEX`), and the next write to the same target removes it once that
process is gone.

Two kinds of target are not renamed over:
- a symbolic link is followed, and its final target is written (the link stays a link);
- a character device, a FIFO, a socket or an open descriptor (`/dev/null`, `/dev/stdout`, `/proc/self/fd/N`,
  a named pipe) is a sink, not a file: the output is streamed into it once complete (`-o /dev/null`
  discards, `-o /dev/stdout` writes to standard output, even when that is a file opened for appending).
Files and directories get the mode the umask gives (libraries such as safetensors create owner-only files).
It lives in ops/ because ops writes files too (the model cache).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import UserError

_FD_DIRS = ("/proc/self/fd", "/dev/fd", f"/proc/{os.getpid()}/fd")
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


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


def descriptor_of(path: str | Path) -> int | None:
    """The open file descriptor a path names (/dev/stdout, /dev/fd/1, /proc/self/fd/1, or a link to one)."""
    path = str(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if path in ("/dev/stdout", "/dev/stderr"):
            return 1 if path == "/dev/stdout" else 2
        head, _, tail = path.rpartition("/")
        if head in _FD_DIRS and tail.isdigit():
            return int(tail)
        if not os.path.islink(path):
            return None
        link = os.readlink(path)
        path = link if os.path.isabs(link) else os.path.join(os.path.dirname(path), link)
    return None


def is_sink(path: str | Path) -> bool:
    """True for a target written into rather than replaced: a descriptor, device, FIFO or socket."""
    if descriptor_of(path) is not None:
        return True
    try:
        mode = os.stat(path).st_mode  # follows links
    except (FileNotFoundError, NotADirectoryError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def resolve_target(target: str | Path) -> Path:
    """The path an output really lands at: symbolic links followed (a dangling link: where it points)."""
    return Path(os.path.realpath(target))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(target: Path) -> None:
    """Remove temporaries of `target` left by processes that no longer run (killed with SIGKILL); an old copy
    moved aside just before such a kill is put back when the target itself is missing."""
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            m = _LEFTOVER.match(entry.name)
            if m is None or m["name"] != target.name or _alive(int(m["pid"])):
                continue
            if ".old-" in entry.name and not target.exists():
                os.replace(entry, target)
            else:
                _remove(entry)


def _apply_umask(path: Path) -> None:
    """Give every file and directory under `path` the mode a plain `open`/`mkdir` would."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Directories cannot be swapped in one rename: move the old one aside, move the new one in, drop the old."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


@contextlib.contextmanager
def open_sink(target: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A stream into a sink: a duplicate of the descriptor it names (so appending stays appending),
    or the device / FIFO opened for writing."""
    fd = descriptor_of(target)
    if fd is not None:
        try:
            f = os.fdopen(os.dup(fd), mode)
        except OSError as e:
            raise UserError(f"{target}: cannot write to descriptor {fd} ({e.strerror})") from None
    else:
        f = open(target, mode)  # noqa: SIM115 -- closed below
    with f:
        yield f


@contextlib.contextmanager
def _through_sink(target: Path) -> Iterator[Path]:
    """A private temporary file; once complete, its bytes are streamed into the sink `target`."""
    with tempfile.TemporaryDirectory(prefix="rechannel-") as d:
        tmp = Path(d) / target.name
        yield tmp
        if tmp.is_dir():
            raise UserError(f"{target}: is not a directory (a device, pipe or descriptor): cannot write a "
                            "directory there")
        with open(tmp, "rb") as src, open_sink(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (not created); on success it becomes `target`.

    The caller makes a file or a directory there. Used for libraries that want a path (safetensors,
    save_pretrained) and by `atomic_open`.
    """
    if is_sink(target):
        with _through_sink(Path(target)) as tmp:
            yield tmp
        return
    target = resolve_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        _apply_umask(tmp)
        if tmp.is_dir():
            _replace_dir(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "wb") -> Iterator[IO]:
    """`open(target, mode)` that only appears at `target` once the block finishes without error."""
    if is_sink(target):
        with open_sink(target, mode) as f:
            yield f
        return
    with atomic_path(target) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
