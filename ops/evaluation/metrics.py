"""Per-example metrics and their aggregation, computed the way lm-evaluation-harness and SQuAD do.

- acc: the choice with the highest log-likelihood is the gold one (the first on ties, as numpy's argmax);
- acc_norm: the same after dividing each log-likelihood by the length of its choice string;
- exact match / F1: SQuAD normalisation (lower case, no punctuation, no articles a/an/the, single spaces),
  the best over all gold aliases;
- stderr of a mean: the sample standard deviation over sqrt(n), as the harness reports it.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_metrics(logliks: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one multiple-choice example."""
    pred = argmax(logliks)
    pred_norm = argmax([ll / max(len(c), 1) for ll, c in zip(logliks, choices, strict=True)])
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold:
        return float(pred == gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """Exact match and F1 of one generated answer against every alias, the best of each."""
    norm = normalize_answer(prediction)
    return {"exact_match": float(any(norm == normalize_answer(a) for a in answers)),
            "f1": max(_f1(prediction, a) for a in answers)}


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation / sqrt(n): the harness's stderr for a mean metric."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def primary_score(task_results: dict) -> float | None:
    """A task's headline number for averaging: acc for multiple choice and LAMBADA, exact match for QA."""
    for key in ("acc,none", "exact_match,none"):
        if task_results.get(key) is not None:
            return task_results[key]
    return None


def average_score(results: dict) -> float | None:
    """Mean headline score over the tasks that have one (perplexity tasks have none)."""
    scores = [s for s in (primary_score(r) for r in results.values()) if s is not None]
    return sum(scores) / len(scores) if scores else None


def average_stderr(results: dict) -> float | None:
    """Standard error of average_score from the tasks' own (independent across tasks): sqrt(sum se^2) / T."""
    ses = [r.get("acc_stderr,none", r.get("exact_match_stderr,none")) for r in results.values()
           if primary_score(r) is not None]
    if not ses or any(v is None for v in ses):
        return None
    return math.sqrt(sum(v * v for v in ses)) / len(ses)


MIN_LOSS = 1e-6  # below this, compression lost nothing to recover and a share means nothing


def recovered_share(dense: float, compressed: float, run: float) -> float | None:
    """Share of what compression lost that `run` wins back: 1 = back to dense, 0 = no better, < 0 worse;
    None when the compressed model scored as well as the dense one (nothing lost)."""
    lost = dense - compressed
    return (run - compressed) / lost if lost > MIN_LOSS else None


def ms_per_example(results: dict) -> float | None:
    """Wall time per example over the example tasks (not perplexity windows), in milliseconds."""
    pairs = [(r["seconds"], r["samples"]) for r in results.values() if "samples" in r and r.get("seconds")]
    n = sum(s for _, s in pairs)
    return 1000 * sum(t for t, _ in pairs) / n if n else None
