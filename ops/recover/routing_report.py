"""What routing did, as numbers a results document carries: how often each prompt was chosen and, where
the inputs' sources are known, how often the chosen prompt was trained on the input's own source."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def routing_report(rows: Sequence[int | None], prompts: int, row_sources: Sequence[str] | None = None,
                   expected: str | None = None) -> dict[str, Any]:
    """The histogram of chosen rows (counts and shares, (M,)), the largest share, the counts per source name
    when the bank has names, and with `expected` (the inputs' designated source) the share routed to a row
    trained on it."""
    chosen = [r for r in rows if r is not None]
    n = len(chosen)
    counts = [0] * prompts
    for r in chosen:
        counts[r] += 1
    out: dict[str, Any] = {"examples": n, "histogram": counts,
                           "shares": [round(c / n, 4) if n else 0.0 for c in counts],
                           "top_share": round(max(counts) / n, 4) if n else 0.0}
    if row_sources:
        by = Counter(row_sources[r] for r in chosen)
        out["by_source"] = {s: by.get(s, 0) for s in dict.fromkeys(row_sources)}
        if expected is not None:
            out["source"] = expected
            out["accuracy"] = round(by.get(expected, 0) / n, 4) if n else None
    return out


def routing_accuracy(chosen: Sequence[str], truth: Sequence[str]) -> dict[str, Any]:
    """Chosen prompts' sources against the inputs' own sources: overall accuracy, per true source, the
    confusion counts {true: {chosen: n}}, and chance (1 / the number of true sources)."""
    per: dict[str, Counter] = {}
    for c, t in zip(chosen, truth, strict=True):
        per.setdefault(t, Counter())[c] += 1
    n = len(truth)
    return {"examples": n, "accuracy": round(sum(c == t for c, t in zip(chosen, truth, strict=True)) / n, 4) if n else None,
            "per_source": {t: round(cnt[t] / sum(cnt.values()), 4) for t, cnt in per.items()},
            "confusion": {t: dict(cnt) for t, cnt in per.items()},
            "chance": round(1 / len(per), 4) if per else None}
