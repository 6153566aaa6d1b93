"""`make scale-check`: the same `rechannel eval` in one process and under torchrun, side by side.

Reads the two results documents and their records (written by the Makefile) and prints, per run, the world
size, each task's headline metric, the evaluation's seconds (wall time of the slowest rank, model loading
excluded), and how far the sharded run's per-example log-likelihoods are from the single process's.
"""

from __future__ import annotations

import json
import sys


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _logliks(rec: dict) -> list[float]:
    value = rec.get("loglik", rec.get("nll"))
    if value is None:  # generated answers (QA) carry no log-likelihood
        return []
    return value if isinstance(value, list) else [value]


def _headline(result: dict) -> str:
    for key in ("acc,none", "exact_match,none", "ppl,none"):
        if key in result:
            return f"{key.split(',')[0]} {result[key]:.4f}"
    return "-"


TOLERANCE = 1e-4  # per-example log-likelihoods: float32 sums over a few hundred tokens, batched differently


def main(one: str, many: str) -> int:
    docs = [json.load(open(f"{p}.json", encoding="utf-8")) for p in (one, many)]
    recs = [_records(f"{p}.jsonl") for p in (one, many)]
    keys = [[(r.get("task"), r.get("id", r.get("window"))) for r in rs] for rs in recs]
    pairs = [(a, b) for x, y in zip(*recs, strict=False) for a, b in zip(_logliks(x), _logliks(y), strict=False)]  # counts: `keys`
    gap = max((abs(a - b) for a, b in pairs), default=0.0)
    tasks = list(docs[0]["results"])
    print("| ranks | " + " | ".join(tasks) + " | seconds |")
    print("|---:|" + "---:|" * (len(tasks) + 1))
    for doc in docs:
        seconds = sum(r["seconds"] for r in doc["results"].values())
        print(f"| {doc['config']['world_size']} | " + " | ".join(_headline(doc["results"][t]) for t in tasks)
              + f" | {seconds:.1f} |")
    same = keys[0] == keys[1]
    print(f"records: {len(recs[1])} of {len(recs[0])}, {'same' if same else 'DIFFERENT'} order; largest "
          f"per-example log-likelihood difference {gap:.2e} (tolerance {TOLERANCE:g})")
    return 0 if same and gap <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
