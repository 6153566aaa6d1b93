"""Reading JSON Lines: `-` is stdin, every line is checked before any work starts, and a bad line is an
error naming `file:line`. Task files and command inputs both read through here."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any

import orjson

from .errors import UserError

STDIO = "-"


@dataclass
class Record:
    """One input object and where it came from, for error messages (`file:line`)."""

    data: dict[str, Any]
    where: str

    def field(self, name: str, kind: type | tuple[type, ...] = str) -> Any:
        """The value of a required field, checked for type; a UserError naming file:line otherwise."""
        if name not in self.data:
            raise UserError(f"{self.where}: missing field {name!r} (fields: {', '.join(self.data) or 'none'})")
        value = self.data[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise UserError(f"{self.where}: field {name!r} should be {want}, got {type(value).__name__}")
        return value


def _open_input(path: str) -> tuple[IO[bytes], str]:
    if path == STDIO:
        if sys.stdin is None:
            raise UserError("no input: stdin is closed; give a JSONL file, or pipe JSON Lines into stdin")
        if sys.stdin.isatty():
            raise UserError("no input: give a JSONL file, or pipe JSON Lines into stdin")
        return sys.stdin.buffer, "<stdin>"
    try:
        return open(path, "rb"), path
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a JSONL file") from None


def parse_object(raw: bytes, where: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(path: str, require: Sequence[str] = (), allow_empty: bool = False) -> list[Record]:
    """All records of `path` (or stdin for `-`), each checked to be an object holding `require`."""
    f, name = _open_input(path)
    records = []
    with ExitStack() as stack:
        if name != "<stdin>":
            stack.enter_context(f)
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                rec = Record(parse_object(raw, f"{name}:{lineno}"), f"{name}:{lineno}")
                for field in require:
                    rec.field(field, object)
                records.append(rec)
    if not records and not allow_empty:
        raise UserError(f"{name}: no records")
    return records


def parse_range(text: str) -> slice:
    """'500:1000' -> slice(500, 1000); '' -> everything. Half-open, like a Python slice."""
    if not text:
        return slice(None)
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise UserError(f"--docs {text!r}: expected START:END, e.g. 0:500") from None


def load_texts(data: str, field: str, docs: str) -> list[str]:
    """The texts of `data` (JSONL) in the range `docs`; every record checked before any work starts."""
    records = read_jsonl(data, require=(field,))
    texts = [r.field(field, str) for r in records][parse_range(docs)]
    if not texts:
        raise UserError(f"{data}: no documents in range --docs {docs}")
    return texts
