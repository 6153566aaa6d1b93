"""align's outputs around ops/align/api.align: the node file (read back for --resume, then written question by
question), the summary (-o), the table on stderr and the figures. Kept apart from cli/align.py, which only
parses the options."""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..ops.core.errors import UserError
from .console import bars, console, info, tame_libraries
from .jsonl import dumps, stdout_buffer, write_json

if TYPE_CHECKING:
    from ..ops.align.api import AlignRunConfig, Previous


def run(config: AlignRunConfig) -> None:
    """Outputs checked, then the API between the node file and the summary (-o), the table and the figures."""
    from ..ops.align.api import align
    from ..ops.core.distributed import world

    _outputs(config)
    tame_libraries()
    if not world().main:  # under torchrun, rank 0 writes the node file, the summary, the table and the figures
        align(config, previous=lambda: read_back(config.nodes, config.resume)[0], world=world())
        return
    node_file = NodeFile(config.nodes, config.resume)
    try:
        with bars() as report:
            summary = align(config, report, node_file.write, node_file.read, node_file.start, world())
    finally:
        node_file.close()
    names = summary["config"]["teachers"]
    write_json(config.output, summary)
    print_table(summary, names)
    if config.plot:
        from .plots import alignment_figures

        alignment_figures(config.plot, node_file.nodes, names)


def _outputs(config: AlignRunConfig) -> None:
    """Every output path checked against every input before anything loads."""
    from ..ops.align.api import SELF
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input, Output, check_outputs

    outs = [Output("-o", config.output), Output("--nodes", config.nodes)]
    if config.plot:
        from .plots import ALIGN_FIGURES

        outs += [Output("--plot", str(Path(config.plot) / name)) for name in ALIGN_FIGURES]
    specs = [config.student, *(t for t in config.teacher if t != SELF)]
    files = [c.removeprefix("template:") for c in [*config.context, config.prompt] if c.startswith("template:")]
    ins = [Input("--data", config.data), *(Input("--student/--teacher", p) for s in specs for p in model_paths(s)),
           *(Input("--context/--prompt", f) for f in files)]
    check_outputs(outs, ins)


class NodeFile:
    """--nodes for one run: what --resume reads back from it (align's `previous`), then the run record and each
    finished question's block written to it (align's `on_run` and `on_question`). Keeps every node record of the
    run, old and new, for the figures."""

    def __init__(self, path: str, resume: bool) -> None:
        self.path, self.resume = path, resume
        self.keep = 0  # bytes of the whole question blocks read back: the file is cut back to them
        self.nodes: list[dict] = []
        self._writer: QuestionWriter | None = None

    def read(self) -> Previous:
        old, self.keep = read_back(self.path, self.resume)
        self.nodes = list(old.nodes)
        return old

    def start(self, head: dict) -> None:
        self._writer = QuestionWriter(self.path, self.keep or None, head)

    def write(self, question: dict, nodes: list[dict]) -> None:
        self._writer.write(question, nodes)
        self.nodes += nodes
        if not question["selected"]:
            info(f"question {question['question']}: pass rate {question['pass_rate']:.2f} outside the selected "
                 "range, skipped")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_back(nodes: str, resume: bool) -> tuple[Previous, int]:
    """(what the file holds, the bytes of its whole question blocks): a question's record closes its block;
    what follows the last one (a block cut off by a kill) is dropped on resume. The file's first record, the
    settings of the run that wrote it, is handed on: align refuses another run's file before anything is cut."""
    from ..ops.align.api import Previous
    from ..ops.core.records import parse_object

    if not resume:
        return Previous(), 0
    if nodes == "-":
        raise UserError("--resume needs --nodes FILE: the node records written so far are read back from it")
    if not Path(nodes).exists():
        return Previous(), 0
    records, kept, keep = [], 0, 0
    with open(nodes, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):  # the last line, cut off mid-write
                break
            if raw.strip():
                records.append(parse_object(raw, f"{nodes}:{lineno}"))
            if records and records[-1].get("kind") in ("question", "run"):
                kept, keep = len(records), f.tell()
    head = records[0] if records else None  # checked closed block or not: a foreign file is never cut back
    records = records[:kept]
    return Previous(head, [r for r in records if r.get("kind") == "question"],
                    [r for r in records if r.get("kind") == "node"]), keep


class QuestionWriter:
    """Node records then their question record, one block per question: an interrupted run leaves whole
    questions (the question record closes its block, and --resume trusts only closed blocks). The file is
    opened at the first finished question; on --resume it is cut back at once to its last closed block (a
    block a kill cut off is dropped: its question is analysed again), then appended to."""

    def __init__(self, path: str, resume_at: int | None, head: dict) -> None:
        self.path, self.resume_at, self.head = path, resume_at, head
        self._out: IO[bytes] | None = stdout_buffer() if path == "-" else None
        if self._out is not None:
            self._write_head()
        elif resume_at is not None and Path(path).exists():
            self._out = self._open()

    def write(self, question: dict, nodes: list[dict]) -> None:
        if self._out is None:
            self._out = self._open()
        self._out.write(b"".join(dumps(r) for r in [*nodes, question]))
        self._out.flush()

    def _write_head(self) -> None:
        """The run's settings, first in the file: --resume checks them."""
        self._out.write(dumps(self.head))
        self._out.flush()

    def _open(self) -> IO[bytes]:
        if self.resume_at is None or not Path(self.path).exists():
            self._out = open(self.path, "wb")  # noqa: SIM115 -- closed in close()
            self._write_head()
            return self._out
        out = open(self.path, "r+b")  # noqa: SIM115
        out.truncate(self.resume_at)
        out.seek(self.resume_at)
        return out

    def close(self) -> None:
        if self._out is not None and self.path != "-":
            self._out.close()


def _cell(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:+.3f} {stats['share_positive']:>4.0%}" if stats["n"] else "-"


def print_table(summary: dict, teachers: list[str]) -> None:
    """Mean alignment (share positive, nodes with signal) per teacher and rollout correctness, on stderr."""
    from rich.table import Table

    from ..ops.align.summary import finding

    q = summary["questions"]
    title = (f"align: {q['selected']} of {q['seen']} questions analysed, {summary['nodes']} nodes, "
             f"{q['rollouts_correct']}/{q['rollouts']} rollouts correct")
    table = Table(title=title, caption="alignment: mean cosine with g_ideal, then the share above 0; signal: nodes "
                  "where it is defined (rKL on K); TA: teacher advantage; K: candidate set, V: whole vocabulary")
    for col in ("teacher", "rollouts", "nodes", "signal", "rKL K", "rKL V", "fKL K", "JSD K", "token K", "TA", "KL"):
        table.add_column(col, justify="left" if col in ("teacher", "rollouts") else "right", no_wrap=True)
    for t in teachers:
        for group in ("incorrect", "correct", "all"):
            b = summary["overall"][t][group]
            ta, kl = b["advantage"], b["kl"]
            table.add_row(t, group, str(b["nodes"]), str(b["align"]["rkl"]["n"]), _cell(b["align"]["rkl"]),
                          _cell(b["align_vocab"]["rkl"]), _cell(b["align"]["fkl"]), _cell(b["align"]["jsd"]),
                          _cell(b["align"]["sampled"]), f"{ta['mean']:+.4f}" if ta["n"] else "-",
                          f"{kl['mean']:.3f}" if kl["n"] else "-")
    out = console()
    if not out.is_terminal:  # a log file has no width: do not squeeze the table into 80 columns
        out.width = max(out.width, 150)
    out.print(table)
    for t in teachers:
        out.print(finding(summary, t), soft_wrap=True)
