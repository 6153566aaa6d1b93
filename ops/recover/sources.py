"""Training sources for curated prompt banks: one domain of text per source, one prompt (or K) per source.

A source is a name and its texts. `train-prompts --data NAME=FILE` (repeated) reads one source per file;
`--source-field F` splits one file by a record field. `rechannel sources` renders the built-in ones from the
shared benchmark data, each from rows that no evaluation task reads:

    web          C4 documents 500-999 (calibration draws from 0-499; the `c4` perplexity task reads 500-999,
                 so a bank trained on `web` must not be scored on `--tasks c4`)
    science      ARC-Easy and ARC-Challenge dev (official files) and OpenBookQA dev (eval reads their test sets)
    commonsense  CommonsenseQA train (eval reads dev)
    trivia       TriviaQA sm_sub without the questions test1000 also asks (eval reads test1000)
    math         GSM8K train (align reads test)

Question-answer rows are rendered exactly as `eval` renders the matching task, with the correct answer
after the context (`text`); `input` is the context alone, what routing sees at evaluation. Each source's
rows are shuffled with a fixed seed and the first HELDOUT of them are held out from training, for measuring
routing against the source (`--split heldout`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError, unknown_choice
from ..core.records import read_jsonl
from ..evaluation import formats as fmt

HELDOUT = 200  # rows per built-in source kept out of training
SPLITS = ("train", "heldout", "all")
PACK_CHARS_PER_TOKEN = 8  # a packed training document holds at least this many characters per window token


@dataclass(frozen=True)
class Row:
    """One rendered row of a source: `input` is what routing reads, `text` what training reads."""

    id: str
    input: str
    text: str


@dataclass(frozen=True)
class Source:
    name: str
    texts: list[str]  # training texts (documents, or rendered question + answer)


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


def parse_source_spec(spec: str) -> tuple[str, str]:
    """`NAME=FILE` or `FILE` (named by the file's stem) -> (name, file)."""
    name, sep, path = spec.partition("=")
    if not sep:
        return Path(spec).stem, spec
    if not name or not path:
        raise UserError(f"--data {spec!r}: expected FILE or NAME=FILE")
    return name, path


def pack_texts(texts: list[str], seqlen: int) -> list[str]:
    """Consecutive texts joined by blank lines into documents of at least PACK_CHARS_PER_TOKEN * seqlen
    characters, so that windows of `seqlen` tokens can be drawn from sources of short rows (a question and
    its answer); a long document stays alone. Windows never cross sources: each source is packed apart."""
    out, part, size = [], [], 0
    for t in texts:
        part.append(t)
        size += len(t) + 2
        if size >= PACK_CHARS_PER_TOKEN * seqlen:
            out.append("\n\n".join(part))
            part, size = [], 0
    if part:
        out.append("\n\n".join(part))
    return out


def load_sources(data: str | list[str] | tuple[str, ...], field: str, docs: str,
                 source_field: str | None = None) -> list[Source]:
    """The training sources: one per `NAME=FILE` (or `FILE`), or one file split by `source_field` (sources in
    order of first appearance); `docs` selects each file's records (START:END) before the split. Every
    record is checked before any work starts."""
    from ..core.records import load_texts, parse_range

    specs = [data] if isinstance(data, str) else list(data)
    if not specs:
        raise UserError("--data: give at least one file")
    if source_field:
        if len(specs) != 1:
            raise UserError("--source-field splits one --data file into sources; give one file")
        by: dict[str, list[str]] = {}
        for r in read_jsonl(specs[0], require=(field, source_field))[parse_range(docs)]:
            by.setdefault(str(r.field(source_field)), []).append(r.field(field, str))
        if not by:
            raise UserError(f"{specs[0]}: no records in range --docs {docs}")
        return [Source(name, texts) for name, texts in by.items()]
    named = [parse_source_spec(s) for s in specs]
    names = [n for n, _ in named]
    if len(set(names)) < len(names):
        raise UserError(f"--data: two sources share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        "name them with NAME=FILE")
    return [Source(name, load_texts(path, field, docs)) for name, path in named]
