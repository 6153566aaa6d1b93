"""Readers for each benchmark file in its published format, producing the canonical examples `eval` scores.

Templates follow lm-evaluation-harness's task definitions: a context, then each choice after the target
delimiter " "; acc_norm divides by the choice's length. Every reader checks what it reads and names
`file:line` when something is wrong (a missing field, a gold index out of range).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.errors import UserError
from ..core.records import Record, read_jsonl

DELIMITER = " "  # lm-evaluation-harness's target_delimiter


@dataclass(frozen=True)
class ChoiceExample:
    """A multiple-choice example: choice i is scored as `continuations[i]` after `contexts[i]`."""

    id: str
    contexts: tuple[str, ...]  # one per choice (all equal unless partial scoring)
    continuations: tuple[str, ...]  # one per choice, delimiter included
    gold: int
    choices: tuple[str, ...]  # the choice strings; acc_norm divides by their lengths
    routed: int | None = None  # the bank row `rechannel route` chose for this record, if it did


@dataclass(frozen=True)
class QAExample:
    id: str
    prompt: str
    answers: tuple[str, ...]
    routed: int | None = None


def _gold(rec: Record, value: object, n_choices: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_choices:
        raise UserError(f"{rec.where}: gold {value!r} is not a choice index (0..{n_choices - 1})")
    return value


def _strings(rec: Record, name: str) -> list[str]:
    values = rec.field(name, list)
    if not values or not all(isinstance(v, str) for v in values):
        raise UserError(f"{rec.where}: field {name!r} should be a non-empty list of strings")
    return values


def _shared(rid: str, context: str, choices: list[str], gold: int) -> ChoiceExample:
    return ChoiceExample(rid, (context,) * len(choices), tuple(DELIMITER + c for c in choices), gold, tuple(choices))


def _routed(rec: Record) -> int | None:
    """`route.prompt` of a record written by `rechannel route`, if it has one."""
    route = rec.data.get("route")
    if route is None:
        return None
    k = route.get("prompt") if isinstance(route, dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise UserError(f"{rec.where}: 'route' should be {{\"prompt\": K, ...}} as `rechannel route` writes it")
    return k


def _id(rec: Record, task: str, i: int) -> str:
    value = rec.data.get("id")
    return str(value) if value is not None else f"{task}-{i}"


def foundry_mc(files: list[Path], task: str) -> list[ChoiceExample]:
    """llm-foundry copies (ARC, BoolQ): `query` already holds "Question: ..."; the harness adds "\\nAnswer:"."""
    out = []
    for i, rec in enumerate(read_jsonl(str(files[0]), require=("query", "choices", "gold"))):
        choices = _strings(rec, "choices")
        out.append(_shared(_id(rec, task, i), rec.field("query") + "\nAnswer:", choices,
                           _gold(rec, rec.data["gold"], len(choices))))
    return out


def piqa(files: list[Path], task: str) -> list[ChoiceExample]:
    """Official PIQA: `{goal, sol1, sol2}` rows and a separate file of labels, one per line."""
    records = read_jsonl(str(files[0]), require=("goal", "sol1", "sol2"))
    labels = [line.strip() for line in files[1].read_text().splitlines() if line.strip()]
    if len(labels) != len(records):
        raise UserError(f"{files[1]}: {len(labels)} labels for {len(records)} rows of {files[0]}")
    out = []
    for i, (rec, label) in enumerate(zip(records, labels, strict=True)):
        if label not in ("0", "1"):
            raise UserError(f"{files[1]}:{i + 1}: label {label!r} is not 0 or 1")
        out.append(_shared(_id(rec, task, i), f"Question: {rec.field('goal')}\nAnswer:",
                           [rec.field("sol1"), rec.field("sol2")], int(label)))
    return out


_OBQA_CHOICE = re.compile(r"\(([A-Z])\)\s*")


def openbookqa(files: list[Path], task: str) -> list[ChoiceExample]:
    """Official OpenBookQA TSV: the question stem is the context, "(A) .. (B) .." the choices."""
    out = []
    with open(files[0], encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[1:]
    col = {name: header.index(name) for name in ("ID", "Question Stem", "Choices", "Answer Key") if name in header}
    if len(col) < 4:
        raise UserError(f"{files[0]}:1: expected columns ID, Question Stem, Choices, Answer Key; got {header}")
    for lineno, row in enumerate(body, start=2):
        parts = _OBQA_CHOICE.split(row[col["Choices"]])[1:]  # [label, text, label, text, ...]
        labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
        key = row[col["Answer Key"]].strip()
        if not texts or key not in labels:
            raise UserError(f"{files[0]}:{lineno}: answer key {key!r} is not one of the choices {labels}")
        out.append(_shared(row[col["ID"]], row[col["Question Stem"]], texts, labels.index(key)))
    return out


def winogrande(files: list[Path], task: str) -> list[ChoiceExample]:
    """Partial scoring: the shared continuation is scored after each filled-in context."""
    out = []
    for i, rec in enumerate(read_jsonl(str(files[0]), require=("context_options", "continuation", "gold"))):
        options = _strings(rec, "context_options")
        cont = DELIMITER + rec.field("continuation")
        out.append(ChoiceExample(_id(rec, task, i), tuple(options), (cont,) * len(options),
                                 _gold(rec, rec.data["gold"], len(options)), tuple(options)))
    return out


def _official(rec: Record) -> tuple[str, list[dict], int]:
    """An official ARC/CommonsenseQA row: (the stripped stem, the choices, the gold index)."""
    q = rec.field("question", dict)
    choices = q.get("choices") or []
    labels = [c.get("label") for c in choices]
    if rec.data["answerKey"] not in labels or "stem" not in q:
        raise UserError(f"{rec.where}: answerKey {rec.data['answerKey']!r} is not one of the labels {labels}")
    return q["stem"].strip(), choices, labels.index(rec.data["answerKey"])


def official_letters(files: list[Path], task: str) -> list[ChoiceExample]:
    """Official CommonsenseQA: the choices are listed in the context and the answer is their letter, as
    the harness's commonsense_qa task asks it."""
    out = []
    for i, rec in enumerate(read_jsonl(str(files[0]), require=("question", "answerKey"))):
        stem, choices, gold = _official(rec)
        listed = "".join(f"\n{c['label']}. {c['text']}" for c in choices)
        out.append(_shared(_id(rec, task, i), f"Question: {stem}{listed}\nAnswer:", [c["label"] for c in choices],
                           gold))
    return out


def official_arc(files: list[Path], task: str) -> list[ChoiceExample]:
    """Official ARC (dev): rendered as the llm-foundry test copies `eval` scores are, "Question: {stem}" then
    "\\nAnswer:", each choice's text after the delimiter."""
    out = []
    for i, rec in enumerate(read_jsonl(str(files[0]), require=("question", "answerKey"))):
        stem, choices, gold = _official(rec)
        out.append(_shared(_id(rec, task, i), f"Question: {stem}\nAnswer:", [c["text"] for c in choices], gold))
    return out


def lambada(files: list[Path], task: str) -> list[ChoiceExample]:
    """LAMBADA (OpenAI): the last word after the passage; one 'choice', scored for greedy and likelihood."""
    return [ChoiceExample(_id(rec, task, i), (rec.field("context"),), (DELIMITER + rec.field("continuation"),), 0,
                          (rec.field("continuation"),))
            for i, rec in enumerate(read_jsonl(str(files[0]), require=("context", "continuation")))]


def canonical_mc(files: list[Path], task: str) -> list[ChoiceExample]:
    """A user's file: `{"id", "context", "choices", "gold"}`; each choice follows the context after " "."""
    out = []
    for i, rec in enumerate(read_jsonl(str(files[0]), require=("context", "choices", "gold"))):
        choices = _strings(rec, "choices")
        ex = _shared(_id(rec, task, i), rec.field("context"), choices, _gold(rec, rec.data["gold"], len(choices)))
        out.append(replace(ex, routed=_routed(rec)))
    return out


QA_TEMPLATE = "Question: {question}\nAnswer:"


def canonical_qa(files: list[Path], task: str) -> list[QAExample]:
    """TriviaQA (test1000) and any user file: `{"id", "question", "answers"}`, answers being all aliases."""
    return [QAExample(_id(rec, task, i), QA_TEMPLATE.format(question=rec.field("question").strip()),
                      tuple(_strings(rec, "answers")), _routed(rec))
            for i, rec in enumerate(read_jsonl(str(files[0]), require=("question", "answers")))]


def canonical_texts(files: list[Path], task: str) -> str:
    """A user's perplexity file: `{"text"}` rows joined by blank lines."""
    return "\n\n".join(rec.field("text") for rec in read_jsonl(str(files[0]), require=("text",)))
