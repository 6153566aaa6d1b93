"""`table --recovery` on documents with per-example scores: intervals, the tasks that count, and the verdicts
in words (the numbers come from ops/evaluation/compare.py)."""

from __future__ import annotations

from typing import Any

CI = "95% CI"


def recovery_with_intervals(rows: list[dict[str, Any]], docs: list[dict[str, Any]], fps: list[Any], dense: int,
                            columns: list[str]) -> list[str]:
    """Fill avg, recovered and their intervals into `rows`; give each counted task's columns its Wilson interval
    column beside them (the tasks left out keep theirs, unaveraged); the notes say which tasks were left out
    and what the paired tests found."""
    from ..ops.evaluation.compare import compare, role, verdict

    c = compare(docs, dense)
    _add_interval_columns(columns, c.tasks)
    for i, row in enumerate(rows):
        stats = c.runs.get(i)
        row["avg"] = stats.average.value if stats else None
        row[f"avg {CI}"] = _pair(stats.average) if stats else None
        row["recovered"] = stats.recovered.value if stats else None
        row[f"recovered {CI}"] = _pair(stats.recovered) if stats else None
        for task, (lo, hi) in (stats.task_intervals.items() if stats else []):
            row[f"{task} {CI}"] = [lo, hi]
    _insert_after(columns, "avg", f"avg {CI}")
    _insert_after(columns, "recovered", f"recovered {CI}")
    notes = [f"averages over the {len(c.tasks)} tasks where the dense model is above chance at the 95% level "
             f"(Wilson): {', '.join(c.tasks)}"]
    if c.left_out:
        notes.append("left out (dense not above chance): " + ", ".join(
            f"{t} ({acc:.3f} vs chance {ch:.3f})" for t, acc, ch in c.left_out))
    notes += [f"{rows[i]['run']}: no recovered share: the dense model is not better at the 95% level"
              for i in c.no_loss]
    for t in c.tests:
        other = "LoRA" if role(docs[t.b]) == "lora" else "one prompt"
        d = t.difference
        notes.append(f"{rows[t.a]['run']} vs {rows[t.b]['run']}: {d.value:+.4f} [{d.low:.4f}, {d.high:.4f}], "
                     f"paired bootstrap p {_p(t.p)}: {verdict(t, other)} at the 95% level")
    notes.append("intervals: 95%, paired bootstrap over examples (2000 replicates, seed 0); per task: Wilson")
    return notes


def _p(p: float) -> str:
    from ..ops.evaluation.stats import REPLICATES

    return f"< {1 / REPLICATES:g}" if p == 0 else f"= {p:.3g}"


def _pair(e: Any) -> list[float] | None:
    return [e.low, e.high] if e.low is not None else None


def _insert_after(columns: list[str], anchor: str, new: str) -> None:
    if new not in columns:
        columns.insert(columns.index(anchor) + 1 if anchor in columns else len(columns), new)


def _add_interval_columns(columns: list[str], tasks: list[str]) -> None:
    """Each counted task's metric columns gain its interval column; perplexity and size stay."""
    for task in tasks:
        mine = [c for c in columns if c.split(" ")[0] == task]
        if mine:
            _insert_after(columns, mine[0], f"{task} {CI}")
