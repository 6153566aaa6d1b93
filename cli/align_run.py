"""align's driver loop: questions in order, records written question by question, then the summary, the table
and the figures. Kept apart from cli/align.py, which only parses and checks."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from .console import console, info, progress
from .jsonl import dumps, stdout_buffer, write_json


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


def run(lm: Any, view: Any, scorers: list[Any], verifier: Any, cfg: Any, questions: list[Any], old_q: list[dict],
        old_nodes: list[dict], writer: QuestionWriter, output: str, max_questions: int | None, plot: str | None,
        config: dict[str, Any]) -> None:
    from ..ops.align.contexts import prompt_ids
    from ..ops.align.diagnosis import Diagnosis, Scorer
    from ..ops.align.summary import summarise

    done = {q["question"] for q in old_q}
    analysed = sum(q["selected"] for q in old_q)
    student_prompt = prompt_ids(lm.tokenizer)
    student = Scorer("student", lm.model, lambda rec: student_prompt(view.render(rec)))
    diag = Diagnosis(student, lm.tokenizer, scorers, verifier, cfg, _stop_ids(lm))
    all_q, all_nodes = list(old_q), list(old_nodes)
    todo = [q for q in questions if q.qid not in done]
    try:
        with progress() as bar:
            task = bar.add_task("questions", total=len(todo))
            node_task = bar.add_task("nodes", total=cfg.budget)
            for q in todo:
                if max_questions is not None and analysed >= max_questions:
                    break
                bar.reset(node_task, total=cfg.budget)
                head, recs = diag.run(q, on_node=lambda: bar.advance(node_task))
                writer.write(head, recs)
                all_q.append(head)
                all_nodes += recs
                analysed += head["selected"]
                bar.advance(task)
                if not head["selected"]:
                    info(f"question {q.qid}: pass rate {head['pass_rate']:.2f} outside the selected range, skipped")
    finally:
        writer.close()
    names = [s.name for s in scorers]
    summary = summarise(all_q, all_nodes, names, config)
    write_json(output, summary)
    print_table(summary, names)
    if plot:
        from .plots import alignment_figures

        alignment_figures(plot, all_nodes, names)


def _stop_ids(lm: Any) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    extra = getattr(lm.model.generation_config, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return {i for i in ids if i is not None}


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
