"""Verifiers: does a completion answer a record correctly? A registry, each naming the fields it reads.

- gsm8k: the last number in the completion equals the number after `####` in the record's `answer`
  (commas, a `$` and a trailing period ignored; compared as numbers), the GSM8K convention.
- mc: the last standalone capital letter A–J in the completion (e.g. "The answer is (B)") equals `answer`,
  given as a letter or as a 0-based index.
- exact: the completion equals `answer` after normalisation (case, surrounding space and punctuation,
  runs of spaces).
- regex:PATTERN: the last match of PATTERN in the completion (its first group, when it has one) equals
  `answer` after the same normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import UserError, unknown_choice

ANSWER_FIELD = "answer"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-J])\b")


@dataclass(frozen=True)
class Verifier:
    name: str
    fields: tuple[str, ...]  # the record fields it reads besides the question
    check: Callable[[str, dict[str, Any]], bool]  # (completion, record) -> correct


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").rstrip("."))
    except ValueError:
        return None


def gsm8k_reference(answer: str) -> float | None:
    return _number(answer.rsplit("####", 1)[-1].strip()) if "####" in answer else None


def _gsm8k(completion: str, record: dict[str, Any]) -> bool:
    found = _NUMBER.findall(completion)
    got = _number(found[-1]) if found else None
    return got is not None and got == gsm8k_reference(str(record[ANSWER_FIELD]))


def _mc(completion: str, record: dict[str, Any]) -> bool:
    want = record[ANSWER_FIELD]
    if isinstance(want, int) and not isinstance(want, bool):
        want = "ABCDEFGHIJ"[want]
    found = _LETTER.findall(completion)
    return bool(found) and found[-1] == str(want).strip().strip("()").upper()


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def _exact(completion: str, record: dict[str, Any]) -> bool:
    return normalise(completion) == normalise(str(record[ANSWER_FIELD]))


def _regex(pattern: re.Pattern) -> Callable[[str, dict[str, Any]], bool]:
    def check(completion: str, record: dict[str, Any]) -> bool:
        matches = list(pattern.finditer(completion))
        if not matches:
            return False
        last = matches[-1]
        got = last.group(1) if pattern.groups else last.group(0)
        return normalise(got or "") == normalise(str(record[ANSWER_FIELD]))
    return check


VERIFIERS = {"gsm8k": _gsm8k, "mc": _mc, "exact": _exact}


def get_verifier(spec: str) -> Verifier:
    """`gsm8k`, `mc`, `exact` or `regex:PATTERN`."""
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as e:
            raise UserError(f"--verifier {spec!r}: not a regular expression ({e})") from None
        return Verifier(spec, (ANSWER_FIELD,), _regex(pattern))
    if spec not in VERIFIERS:
        raise unknown_choice("verifier", spec, [*VERIFIERS, "regex:PATTERN"])
    return Verifier(spec, (ANSWER_FIELD,), VERIFIERS[spec])


def check_record(verifier: Verifier, record: Any) -> None:
    """A UserError naming file:line when a record cannot be verified (ops.records.Record)."""
    for name in verifier.fields:
        value = record.field(name, (str, int, float))
        if verifier.name == "gsm8k" and gsm8k_reference(str(value)) is None:
            raise UserError(f"{record.where}: field {name!r} has no '#### <number>' final answer for gsm8k")
