"""Intervals and paired tests of table --recovery, against cases whose answers can be worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import run_inproc
from rechannel.ops.evaluation.compare import compare
from rechannel.ops.evaluation.stats import aligned, bootstrap_averages, difference, recovered, wilson

REPS = 2000
SHARE_TOL = 5 * math.sqrt(0.25 * 0.75 / REPS)  # five binomial standard deviations of a share near 1/4


def test_wilson_interval_by_hand():
    # k = 8 of n = 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71682; half 1.41601 * sqrt(0.016 + 0.009604)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_bootstrap_of_two_examples_has_the_enumerable_distribution():
    # one task, scores [1, 0]: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    boot = bootstrap_averages({"t": np.array([[1.0, 0.0]])}, REPS)[:, 0]
    for value, share in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert abs(float((boot == value).mean()) - share) < SHARE_TOL * (2 if share == 0.5 else 1)


def test_paired_difference_and_its_p_value_by_hand():
    # run a scores [1, 0], run b [1, 1]: a - b is -1, -0.5 or 0 (1/4, 1/2, 1/4); P(d >= 0) = 1/4, so p = 1/2
    scores = {"t": np.array([[1.0, 0.0], [1.0, 1.0]])}
    boot = bootstrap_averages(scores, REPS)
    d, p = difference(boot, np.array([0.5, 1.0]), 0, 1)
    assert d.value == -0.5 and d.low == -1.0 and d.high == 0.0
    assert abs(p - 0.5) < 2 * SHARE_TOL


def test_recovered_share_and_its_interval_by_hand():
    # dense always right, compressed always wrong: a replicate's share is the run's resampled mean, a
    # Binomial(4, 1/2) / 4 whose 2.5% and 97.5% percentiles are 0 and 1 (each end has probability 1/16)
    scores = {"t": np.array([[1.0] * 4, [0.0] * 4, [1.0, 1.0, 0.0, 0.0]])}
    boot = bootstrap_averages(scores, REPS)
    r = recovered(boot, np.array([1.0, 0.0, 0.5]), 0, 1, 2)
    assert (r.value, r.low, r.high) == (0.5, 0.0, 1.0)
    same = {"t": np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])}  # compression lost nothing: no share
    boot = bootstrap_averages(same, REPS)
    assert recovered(boot, np.array([0.5, 0.5, 0.0]), 0, 1, 2).value is None


def test_alignment_keeps_the_examples_every_run_scored():
    got = aligned([{"t": {"a": 1.0, "b": 0.0, "c": 1.0}}, {"t": {"c": 0.0, "a": 1.0}}], ["t", "u"])
    assert list(got) == ["t"] and got["t"].tolist() == [[1.0, 1.0], [1.0, 0.0]]  # ids a, c in sorted order


def _doc(tmp_path, name, scores: dict[str, list[float]], chance: dict[str, float], fingerprint="fp-dense",
         compression=None, prompts=None, adapter=None) -> str:
    results = {t: {"acc,none": sum(s) / len(s), "acc_stderr,none": 0.01, "chance": chance[t], "samples": len(s),
                   "seconds": 1.0} for t, s in scores.items()}
    doc = {"results": results, "per_example": {t: {"id": list(range(len(s))), "score": s} for t, s in scores.items()},
           "config": {"fingerprint": fingerprint, "compression": compression, "prompts": prompts, "adapter": adapter,
                      "extra_parameters": (prompts or {}).get("parameters", 0)}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_table_recovery_counts_only_tasks_above_chance_and_says_the_verdicts(tmp_path):
    n = 400
    chance = {"easy": 0.25, "coin": 0.5}
    rng = np.random.default_rng(1)
    dense_easy = (rng.random(n) < 0.7).astype(float).tolist()
    coin = (rng.random(n) < 0.5).astype(float).tolist()  # the dense model guesses: left out
    comp_easy = [x * float(rng.random() < 0.6) for x in dense_easy]  # loses ~40% of what dense gets right
    one = [max(c, d * float(rng.random() < 0.3)) for c, d in zip(comp_easy, dense_easy, strict=True)]
    bank = [max(c, d * float(rng.random() < 0.9)) for c, d in zip(comp_easy, dense_easy, strict=True)]
    lora = bank[:]
    wanda = {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"}
    files = [_doc(tmp_path, "dense", {"easy": dense_easy, "coin": coin}, chance),
             _doc(tmp_path, "wanda", {"easy": comp_easy, "coin": coin}, chance, "fp-w", wanda),
             _doc(tmp_path, "one", {"easy": one, "coin": coin}, chance, "fp-w", wanda,
                  {"route": "fixed:0", "prompts": 1, "parameters": 10}),
             _doc(tmp_path, "bank", {"easy": bank, "coin": coin}, chance, "fp-w", wanda,
                  {"route": "attention", "prompts": 5, "parameters": 50}),
             _doc(tmp_path, "lora", {"easy": lora, "coin": coin}, chance, "fp-w", wanda, adapter={"rank": 8})]
    r = run_inproc("table", *files, "--recovery", "--markdown")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "above chance at the 95% level (Wilson): easy" in out and "left out (dense not above chance): coin" in out
    assert "the bank beats one prompt at the 95% level" in out
    assert "the bank and LoRA cannot be told apart at the 95% level" in out
    docs = [json.loads(open(f).read()) for f in files]
    c = compare(docs, 0)
    expected = (np.mean(bank) - np.mean(comp_easy)) / (np.mean(dense_easy) - np.mean(comp_easy))
    assert c.runs[3].recovered.value == pytest.approx(expected, abs=1e-12)
    assert c.runs[3].recovered.low < expected < c.runs[3].recovered.high
    assert c.runs[0].average.value == pytest.approx(np.mean(dense_easy), abs=1e-12)  # coin is not averaged


def test_table_recovery_without_a_significant_loss_prints_no_share(tmp_path):
    """Dense and compressed within noise: the share would divide noise by noise, so none is printed."""
    chance = {"t": 0.25}
    same = [1.0, 0.0] * 100
    files = [_doc(tmp_path, "dense", {"t": same}, chance),
             _doc(tmp_path, "comp", {"t": same[1:] + same[:1]}, chance, "fp-c", {"method": "wanda", "sparsity": 0.5}),
             _doc(tmp_path, "one", {"t": [1.0] * 200}, chance, "fp-c", {"method": "wanda", "sparsity": 0.5},
                  {"route": "fixed:0", "prompts": 1, "parameters": 1})]
    r = run_inproc("table", *files, "--recovery", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[2]["recovered"] is None
