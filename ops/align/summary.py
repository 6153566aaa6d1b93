"""Summaries of align's node records: alignment by teacher x rollout correctness, overall and per question.

Nodes whose alignment is undefined (g_ideal = 0: every candidate equally good after C continuations, or a
teacher equal to the student) are counted but left out of the statistics, so `n` says how many carried signal.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from .alignment import GRADIENTS

GROUPS = ("incorrect", "correct", "all")


def describe(values: Sequence[float | None]) -> dict[str, Any]:
    """n, mean, median, std (population) and the share above zero of the defined, finite values (a KL
    with a teacher that gives a token probability 0 is infinite; JSON writes it, and reads it back, as null)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "median": None, "std": None, "share_positive": None}
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "std": statistics.pstdev(values), "share_positive": sum(v > 0 for v in values) / len(values)}


def _group(nodes: Iterable[dict], group: str) -> list[dict]:
    if group == "all":
        return list(nodes)
    want = group == "correct"
    return [n for n in nodes if n["correct"] is want]


def _values(nodes: list[dict], teacher: str, scope: str, gradient: str) -> list[float]:
    out = []
    for n in nodes:
        v = n["teachers"][teacher][scope][gradient]
        if v is not None:
            out.append(v)
    return out


def teacher_block(nodes: list[dict], teacher: str) -> dict[str, Any]:
    """For one teacher: per correctness group, every alignment (on K and over the vocabulary), the teacher
    advantage, and the node divergences."""
    block: dict[str, Any] = {}
    for group in GROUPS:
        sel = _group(nodes, group)
        block[group] = {
            "nodes": len(sel),
            "align": {g: describe(_values(sel, teacher, "align", g)) for g in GRADIENTS},
            "align_vocab": {g: describe(_values(sel, teacher, "align_vocab", g)) for g in GRADIENTS},
            "advantage": describe([n["teachers"][teacher]["advantage"] for n in sel]),
            "kl": describe([n["teachers"][teacher]["kl"] for n in sel]),
            "js": describe([n["teachers"][teacher]["js"] for n in sel]),
        }
    return block


def summarise(questions: list[dict], nodes: list[dict], teachers: list[str], config: dict[str, Any]) -> dict:
    by_question: dict[Any, list[dict]] = {}
    for n in nodes:
        by_question.setdefault(n["question"], []).append(n)
    selected = [q for q in questions if q["selected"]]
    per_question = {}
    for q in selected:
        mine = by_question.get(q["question"], [])
        per_question[str(q["question"])] = {"pass_rate": q["pass_rate"], "nodes": len(mine),
                                            "teachers": {t: teacher_block(mine, t) for t in teachers}}
    return {
        "config": config,
        "questions": {"seen": len(questions), "selected": len(selected),
                      "rollouts_correct": sum(sum(q["correct"]) for q in selected),
                      "rollouts": sum(len(q["correct"]) for q in selected)},
        "nodes": len(nodes),
        "overall": {t: teacher_block(nodes, t) for t in teachers},
        "per_question": per_question,
    }


def finding(summary: dict, teacher: str, gradient: str = "rkl") -> str:
    """One line: is alignment on incorrect rollouts above that on correct ones, as the paper found?"""
    block = summary["overall"][teacher]
    inc, cor = block["incorrect"]["align"][gradient], block["correct"]["align"][gradient]
    if not inc["n"] or not cor["n"]:
        return f"{teacher}: not enough nodes with signal to compare (incorrect {inc['n']}, correct {cor['n']})"
    verdict = "above" if inc["mean"] > cor["mean"] else "not above"
    return (f"{teacher}: {gradient} alignment on incorrect rollouts {inc['mean']:+.3f} (n={inc['n']}) is {verdict} "
            f"that on correct ones {cor['mean']:+.3f} (n={cor['n']})")
