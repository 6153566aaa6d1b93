"""The evaluation task registry. Each task knows its files under the data directory, the reader of their
published format (formats.py) and its kind, which decides the metrics; `eval` looks tasks up
here, never in an if/elif chain. A user's own file becomes a task through `user_task`.

Kinds: `mc` (log-likelihood of each choice: acc, acc_norm), `partial` (WinoGrande's partial scoring: acc),
`lastword` (LAMBADA: acc of the greedy last word, perplexity), `qa` (greedy answer: exact match, F1),
`ppl` (perplexity over non-overlapping or sliding windows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..core.errors import UserError, unknown_choice
from . import formats as fmt
from .perplexity import wikitext2_text

KINDS = ("mc", "qa", "ppl")  # what a user's --kind may say


def _c4_heldout(files: list[Path], task: str) -> str:
    with open(files[0], "rb") as f:
        docs = [orjson.loads(line)["text"] for line in f if line.strip()]
    return " ".join(docs[500:1000])


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # mc | partial | lastword | qa | ppl
    files: tuple[str, ...]  # relative to the data directory (absolute for a user's file)
    read: Callable[[list[Path], str], Any]  # -> list of examples, or the text for ppl
    template: str  # how an example is put to the model, recorded with every result

    def paths(self, data_dir: str | Path) -> list[Path]:
        paths = [Path(data_dir) / f for f in self.files]
        for p in paths:
            if not p.is_file():
                raise UserError(f"task {self.name}: {p} not found (looked under --data-dir {data_dir})")
        return paths

    def load(self, data_dir: str | Path) -> Any:
        """The task's examples, or its text for a perplexity task."""
        data = self.read(self.paths(data_dir), self.name)
        if self.kind == "ppl":
            return data
        if not data:
            raise UserError(f"task {self.name}: {self.files[0]} holds no examples")
        return data


_MC = "context, then ' ' + choice; acc_norm divides by the choice's length"
TASKS: dict[str, Task] = {
    t.name: t for t in (
        Task("arc_easy", "mc", ("tasks/arc_easy/test.jsonl",), fmt.foundry_mc, f"'{{query}}\\nAnswer:'; {_MC}"),
        Task("arc_challenge", "mc", ("tasks/arc_challenge/test.jsonl",), fmt.foundry_mc,
             f"'{{query}}\\nAnswer:'; {_MC}"),
        Task("boolq", "mc", ("tasks/boolq/val.jsonl",), fmt.foundry_mc, f"'{{query}}\\nAnswer:', choices no/yes; {_MC}"),
        Task("piqa", "mc", ("tasks/piqa/valid.jsonl", "tasks/piqa/valid-labels.lst"), fmt.piqa,
             f"'Question: {{goal}}\\nAnswer:'; {_MC}"),
        Task("openbookqa", "mc", ("tasks/openbookqa/test.tsv",), fmt.openbookqa, f"'{{question stem}}'; {_MC}"),
        Task("winogrande", "partial", ("tasks/winogrande/dev.jsonl",), fmt.winogrande,
             "partial scoring: ' ' + continuation after each filled-in context"),
        Task("commonsenseqa", "mc", ("tasks/commonsenseqa/dev.jsonl",), fmt.official_letters,
             f"'Question: {{stem}}\\nA. ..\\nE. ..\\nAnswer:', choices the letters; {_MC}"),
        Task("lambada", "lastword", ("tasks/lambada/test.jsonl",), fmt.lambada,
             "' ' + last word after the passage; acc = greedy, perplexity = exp(-mean log-likelihood)"),
        Task("triviaqa", "qa", ("tasks/triviaqa/test1000.jsonl",), fmt.canonical_qa,
             f"{fmt.QA_TEMPLATE!r}, greedy until newline; SQuAD-normalised exact match and F1 over all aliases"),
        Task("wikitext2", "ppl", ("perplexity/wikitext2_test.raw",), lambda files, task: wikitext2_text(str(files[0])),
             "non-empty lines of wiki.test.raw joined by '\\n\\n'"),
        Task("c4", "ppl", ("calibration/c4_en_train00000_first1000.jsonl",), _c4_heldout,
             "documents 500-999 joined by ' ' (held out from calibration on 0-499)"),
    )
}

_USER_READERS = {"mc": (fmt.canonical_mc, "'{context}'; " + _MC),
                 "qa": (fmt.canonical_qa, f"{fmt.QA_TEMPLATE!r}, greedy until newline; exact match and F1"),
                 "ppl": (fmt.canonical_texts, "the texts joined by '\\n\\n'")}


def user_task(path: str, kind: str) -> Task:
    """A task made from a user's file in the canonical schema of `kind` (named after the file)."""
    if kind not in _USER_READERS:
        raise unknown_choice("kind", kind, KINDS)
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise UserError(f"--data {path}: no such file")
    reader, template = _USER_READERS[kind]
    return Task(p.stem, kind, (str(p),), reader, template)


def get_tasks(names: str) -> list[Task]:
    """Tasks from a comma-separated list; a typo gets a did-you-mean."""
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in TASKS:
            raise unknown_choice("task", name, TASKS)
        out.append(TASKS[name])
    if not out:
        raise UserError("--tasks is empty")
    return out
