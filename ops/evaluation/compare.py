"""Comparing recovery methods with intervals: which tasks count, each run's average and recovered share with
paired-bootstrap 95% intervals, and the paired tests the IDP experiment asks (bank vs one prompt, bank vs
LoRA). `rechannel table --recovery` prints it; the numbers come from the eval documents' per-example scores.

Tasks count when the dense model is above chance on them at the 95% level (Wilson lower bound above the
task's chance level), decided from the dense run alone, before any recovered number is looked at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .stats import (
    Estimate,
    above_chance,
    aligned,
    bootstrap_averages,
    difference,
    interval,
    recovered,
    wilson,
)

Doc = dict[str, Any]


def role(doc: Doc) -> str:
    """What a run is in the experiment: plain (no prompt, no adapter), lora, one prompt, bank, oracle, random,
    entropy, or another fixed prompt."""
    config = doc.get("config") or {}
    if config.get("adapter"):
        return "lora"
    bank = config.get("prompts") or {}
    route = bank.get("route", "none")
    if route == "none":
        return "plain"
    if route.startswith("fixed"):
        return "one prompt" if bank.get("prompts") == 1 else "fixed prompt"
    return {"attention": "bank"}.get(route, route)


def per_example(doc: Doc) -> dict[str, dict[str, float]]:
    """task -> example id -> score, from the document's per_example section."""
    return {task: dict(zip(map(str, v["id"]), v["score"], strict=True)) for task, v in doc["per_example"].items()}


def kept_tasks(dense: Doc) -> tuple[list[str], list[tuple[str, float, float]]]:
    """(tasks where the dense run is above chance, [(task, dense accuracy, chance) left out])."""
    kept, left = [], []
    for task, v in dense["per_example"].items():
        chance = dense["results"][task].get("chance", 0.0)
        scores = v["score"]
        (kept if above_chance(scores, chance) else left).append(task)
        if task in left:
            left[-1] = (task, sum(scores) / len(scores), chance)
    return kept, left


@dataclass
class RunStats:
    average: Estimate
    recovered: Estimate = field(default_factory=lambda: Estimate(None, None, None))
    task_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # Wilson, per kept task


@dataclass
class Test:
    model: str  # the compressed model's fingerprint
    a: int  # doc indices: a minus b
    b: int
    difference: Estimate
    p: float


@dataclass
class Comparison:
    tasks: list[str]
    left_out: list[tuple[str, float, float]]
    runs: dict[int, RunStats]
    tests: list[Test]
    no_loss: list[int]  # compressed runs whose loss against dense is not significant


def compare(docs: list[Doc], dense: int, seed: int = 0) -> Comparison:
    """Every run's statistics on the tasks the dense run is above chance on; groups are the runs of one
    compressed model (same fingerprint) with its plain run, each bootstrapped together with the dense run."""
    tasks, left = kept_tasks(docs[dense])
    fps = [(d.get("config") or {}).get("fingerprint") for d in docs]
    out = Comparison(tasks, left, {}, [], [])
    for fp in dict.fromkeys(fps):
        members = [i for i, f in enumerate(fps) if f == fp]
        base = next((i for i in members if role(docs[i]) == "plain"), None)
        group = list(dict.fromkeys([dense, *([base] if base is not None else []), *members]))
        scores = aligned([per_example(docs[i]) for i in group], tasks)
        if not scores:
            continue
        boot = bootstrap_averages(scores, seed=seed)  # (reps, len(group))
        full = np.mean([s.mean(1) for s in scores.values()], 0)  # (len(group),)
        for j, i in enumerate(group):
            stats = RunStats(interval(boot[:, j], float(full[j])),
                             task_intervals={t: wilson(float(s[j].sum()), s.shape[1]) for t, s in scores.items()})
            if base is not None and i not in (dense, base):
                stats.recovered = recovered(boot, full, 0, group.index(base), j)
            out.runs.setdefault(i, stats)
        if base is not None and base != dense:
            gap, _ = difference(boot, full, 0, group.index(base))
            if gap.low is None or gap.low <= 0:
                out.no_loss.append(base)
            out.tests += _tests(docs, group, boot, full, fp)
    return out


def _tests(docs: list[Doc], group: list[int], boot: np.ndarray, full: np.ndarray, fp: str) -> list[Test]:
    """Bank vs one prompt and bank vs LoRA, where the group has them."""
    by_role = {}
    for j, i in enumerate(group):
        by_role.setdefault(role(docs[i]), j)
    tests = []
    if "bank" in by_role:
        for other in ("one prompt", "lora"):
            if other in by_role:
                d, p = difference(boot, full, by_role["bank"], by_role[other])
                tests.append(Test(fp, group[by_role["bank"]], group[by_role[other]], d, p))
    return tests


def verdict(test: Test, other: str) -> str:
    """The test in words, at the 95% level."""
    d = test.difference
    if d.low is not None and d.low > 0:
        return f"the bank beats {other}"
    if d.high is not None and d.high < 0:
        return f"{other} beats the bank"
    return f"the bank and {other} cannot be told apart"
