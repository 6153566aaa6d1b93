"""JSON Lines and JSON out: `-` is stdout, files are written atomically. (Reading, with its `file:line`
errors, is ops/core/records.py: task files are read in ops too.)

Output goes through orjson; non-finite floats, which JSON cannot hold,
are written as null (orjson's behaviour) and counted in one warning on stderr, so a NaN loss or an
overflowed perplexity is never silently turned into a missing value.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import orjson

from ..ops.core.atomic import atomic_open
from ..ops.core.errors import UserError
from ..ops.core.records import STDIO
from .console import warn


def _to_json(obj: Any) -> Any:
    """orjson's fallback for what it does not know: tensors, paths, dtypes, sets."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, type)) or type(obj).__module__ == "torch":
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def count_nonfinite(obj: Any) -> int:
    if isinstance(obj, float):
        return 0 if math.isfinite(obj) else 1
    if isinstance(obj, dict):
        return sum(count_nonfinite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(count_nonfinite(v) for v in obj)
    return 0


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_to_json, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


def stdout_buffer() -> IO[bytes]:
    """Standard output's byte stream; a closed stdout (`>&-`) is a UserError, not an AttributeError."""
    if sys.stdout is None:
        raise UserError("stdout is closed: nowhere to write the records; give -o FILE or leave stdout open")
    return sys.stdout.buffer


class JsonlWriter:
    """Writes records to stdout (`-`, flushed per record) or atomically to a file (on successful close)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.nonfinite = 0
        self._stack = ExitStack()
        self._out: IO[bytes] | None = None

    def __enter__(self) -> JsonlWriter:
        # take stdout's buffer now, before any progress bar can wrap sys.stdout
        self._out = stdout_buffer() if self.path == STDIO else self._stack.enter_context(atomic_open(self.path))
        return self

    def write(self, record: dict[str, Any]) -> None:
        self.nonfinite += count_nonfinite(record)
        self._out.write(dumps(record))
        if self.path == STDIO:
            self._out.flush()

    def write_all(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)
        if self.nonfinite:
            where = "stdout" if self.path == STDIO else self.path
            warn(f"{self.nonfinite} non-finite number(s) (NaN or ±inf) written as null to {where}")


def write_json(path: str, obj: Any) -> None:
    """One JSON document (indented) to `path` atomically, or to stdout for `-`."""
    data = orjson.dumps(obj, default=_to_json, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
                        | orjson.OPT_SERIALIZE_NUMPY)
    n = count_nonfinite(obj)
    if path == STDIO:
        out = stdout_buffer()
        out.write(data)
        out.flush()
    else:
        with atomic_open(path) as f:
            f.write(data)
    if n:
        warn(f"{n} non-finite number(s) (NaN or ±inf) written as null to {path}")
