"""The evaluation task registry. Each task knows its file under the data directory, its published
format and its metric; `eval` looks tasks up here, never in an if/elif chain.

Perplexity tasks are here today: WikiText-2 (raw test, lines joined by blank lines, as the GPTQ/Wanda
loaders join them) and held-out C4 (documents 500-999 of the calibration shard joined by spaces, so that
calibrating on 0-499 never sees them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from rechannel.ops.errors import UserError, unknown_choice
from rechannel.ops.perplexity import wikitext2_text


def _c4_heldout(path: str) -> str:
    with open(path, "rb") as f:
        docs = [orjson.loads(line)["text"] for line in f if line.strip()]
    return " ".join(docs[500:1000])


@dataclass(frozen=True)
class PerplexityTask:
    name: str
    file: str  # relative to the data directory
    read: Callable[[str], str]
    joining: str  # how the text is assembled, recorded with every result

    def path(self, data_dir: str | Path) -> Path:
        p = Path(data_dir) / self.file
        if not p.is_file():
            raise UserError(f"task {self.name}: {p} not found (looked under --data-dir {data_dir})")
        return p


TASKS: dict[str, PerplexityTask] = {
    t.name: t for t in (
        PerplexityTask("wikitext2", "perplexity/wikitext2_test.raw", wikitext2_text,
                       "non-empty lines of wiki.test.raw joined by '\\n\\n'"),
        PerplexityTask("c4", "calibration/c4_en_train00000_first1000.jsonl", _c4_heldout,
                       "documents 500-999 joined by ' ' (held out from calibration on 0-499)"),
    )
}


def get_tasks(names: str) -> list[PerplexityTask]:
    """Tasks from a comma-separated list; a typo gets a did-you-mean."""
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in TASKS:
            raise unknown_choice("task", name, TASKS)
        out.append(TASKS[name])
    if not out:
        raise UserError("--tasks is empty")
    return out
