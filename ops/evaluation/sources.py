"""The built-in training sources for curated prompt banks, rendered from the shared benchmark data: each from
rows that no evaluation task reads.

    web          C4 documents 500-999 (calibration draws from 0-499; the `c4` perplexity task reads 500-999,
                 so a bank trained on `web` must not be scored on `--tasks c4`)
    science      ARC-Easy and ARC-Challenge dev (official files) and OpenBookQA dev (eval reads their test sets)
    commonsense  CommonsenseQA train (eval reads dev)
    trivia       TriviaQA sm_sub without the questions test1000 also asks (eval reads test1000)
    math         GSM8K train (align reads test)

Question-answer rows are rendered exactly as `eval` renders the matching task, with the correct answer
after the context (`text`); `input` is the context alone, what routing sees at evaluation. Each source's
rows are shuffled with a fixed seed and the first HELDOUT of them are held out from training, for measuring
routing against the source (`--split heldout`). TASK_SOURCE names each task's own source (the oracle route).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError, unknown_choice
from ..core.records import read_jsonl
from . import formats as fmt

HELDOUT = 200  # rows per built-in source kept out of training
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class Row:
    """One rendered row of a source: `input` is what routing reads, `text` what training reads."""

    id: str
    input: str
    text: str


def _c4(data: Path) -> list[Row]:
    path = data / "calibration" / "c4_en_train00000_first1000.jsonl"
    recs = read_jsonl(str(_need(path)), require=("text",))[500:1000]
    return [Row(f"c4-{500 + i}", r.field("text", str), r.field("text", str)) for i, r in enumerate(recs)]


def _answered(examples: list[fmt.ChoiceExample]) -> list[Row]:
    """Multiple-choice examples as eval renders them: the context, then the gold continuation."""
    return [Row(e.id, e.contexts[e.gold], e.contexts[e.gold] + e.continuations[e.gold]) for e in examples]


def _science(data: Path) -> list[Row]:
    arc = [e for task in ("arc_easy", "arc_challenge")
           for e in fmt.official_arc([_need(data / "tasks" / task / "dev_official.jsonl")], task)]
    obqa = fmt.openbookqa([_need(data / "tasks" / "openbookqa" / "dev.tsv")], "openbookqa")
    return _answered(arc) + _answered(obqa)


def _commonsense(data: Path) -> list[Row]:
    return _answered(fmt.official_letters([_need(data / "tasks" / "commonsenseqa" / "train.jsonl")], "commonsenseqa"))


def normalise_question(text: str) -> str:
    """Lower case, punctuation and the "Question:" label removed: how two copies of a question compare."""
    return re.sub(r"\W+", " ", text.lower().replace("question:", "")).strip()


def _trivia(data: Path) -> list[Row]:
    test = read_jsonl(str(_need(data / "tasks" / "triviaqa" / "test1000.jsonl")), require=("question",))
    asked = {normalise_question(r.field("question", str)) for r in test}
    rows = []
    for i, r in enumerate(read_jsonl(str(_need(data / "tasks" / "triviaqa" / "sm_sub.jsonl")),
                                     require=("context", "answer"))):
        context = r.field("context", str)  # "Question: ...\nAnswer:", as eval's QA template renders it
        if normalise_question(context.split("\n")[0]) not in asked:
            rows.append(Row(f"sm_sub-{i}", context, context + fmt.DELIMITER + r.field("answer", str)))
    return rows


def _math(data: Path) -> list[Row]:
    recs = read_jsonl(str(_need(data / "tasks" / "gsm8k" / "train.jsonl")), require=("question", "answer"))
    rows = []
    for i, r in enumerate(recs):
        context = fmt.QA_TEMPLATE.format(question=r.field("question", str).strip())
        rows.append(Row(f"gsm8k-train-{i}", context, context + fmt.DELIMITER + r.field("answer", str)))
    return rows


BUILTIN: dict[str, Callable[[Path], list[Row]]] = {
    "web": _c4, "science": _science, "commonsense": _commonsense, "trivia": _trivia, "math": _math}

# The source an evaluation task draws on (the oracle route's choice); tasks not named have none.
TASK_SOURCE = {"arc_easy": "science", "arc_challenge": "science", "openbookqa": "science",
               "commonsenseqa": "commonsense", "piqa": "commonsense", "winogrande": "commonsense",
               "triviaqa": "trivia", "boolq": "web", "lambada": "web", "wikitext2": "web", "c4": "web"}


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: not found (looked under --data-dir)")
    return path


def builtin_rows(name: str, data_dir: str, split: str, heldout: int = HELDOUT) -> list[Row]:
    """The rows of built-in source `name` in `split`: a fixed shuffle (seed 0), the first `heldout` held out."""
    if name not in BUILTIN:
        raise unknown_choice("source", name, BUILTIN)
    if split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    rows = BUILTIN[name](Path(data_dir))
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    if split == "heldout":
        order = order[:heldout]
    elif split == "train":
        order = order[heldout:]
    return [rows[i] for i in order]
