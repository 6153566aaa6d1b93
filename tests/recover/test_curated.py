"""Curated banks: one prompt per training source, calibrated routing, routing reports, oracle and random routes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import orjson
import pytest
import torch

from conftest import run_inproc
from rechannel.ops.core.errors import UserError
from rechannel.ops.recover import prompt_training
from rechannel.ops.recover.api import TrainConfig, pooled, train_prompts
from rechannel.ops.recover.route_calibration import choose
from rechannel.ops.recover.routing_report import routing_accuracy, routing_report
from rechannel.ops.recover.sources import load_sources, pack_texts

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

# Two sources written in disjoint characters: a window holding a digit and a letter crossed sources.
ALPHA = ["abba cad dab bad cab.", "dad cab add baba dab."]
DIGITS = ["12 34 4321 1234 21.", "2143 3412 11 22 43."]


def _write(path: Path, texts: list[str], **extra) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"text": t, **extra}) + b"\n" for t in texts))
    return path


# --- calibration rules, by hand ---------------------------------------------------------------------------

SCORES = torch.tensor([[0.50, 0.30], [0.46, 0.34]])  # (B=2, M=2): prompt 0 is loud on every input
MEAN = torch.tensor([[0.48, 0.30], [0.44, 0.35]])  # (S=2, M=2): row m's mean score on source s's texts
STD = torch.tensor([[0.02, 0.01], [0.02, 0.01]])
ROWS_OF = [[0], [1]]  # row 0 trained on source 0, row 1 on source 1


def test_raw_argmax_sends_everything_to_the_loud_prompt():
    assert choose(SCORES, "none").tolist() == [0, 0]


def test_ratio_divides_by_the_mean_on_the_rows_own_source():
    # input 0: 0.50/0.48 = 1.0417 vs 0.30/0.35 = 0.857 -> 0; input 1: 0.46/0.48 = 0.958 vs 0.34/0.35 = 0.971 -> 1
    assert choose(SCORES, "ratio", MEAN, STD, ROWS_OF).tolist() == [0, 1]


def test_zscore_pools_the_sources_equally():
    # row 0: mu = 0.46, var = mean(0.02^2 + 0.48^2, 0.02^2 + 0.44^2) - 0.46^2 = 0.0004 + 0.0004 = 0.0008
    # row 1: mu = 0.325, var = 0.0001 + mean(0.09, 0.1225) - 0.325^2 = 0.0001 + 0.000625 = 0.000725
    # input 0: (0.04 / 0.02828, -0.025 / 0.02693) -> 0; input 1: (0.0, 0.015 / 0.02693) -> 1
    assert choose(SCORES, "zscore", MEAN, STD, ROWS_OF).tolist() == [0, 1]


def test_centroid_picks_the_source_whose_score_pattern_is_nearest():
    # input 0 vs source 0: z = (1, 0); vs source 1: z = (3, -5) -> source 0 -> row 0
    # input 1 vs source 0: z = (-1, 4); vs source 1: z = (1, -1) -> source 1 -> row 1 (equal std: log terms cancel)
    assert choose(SCORES, "centroid", MEAN, STD, ROWS_OF).tolist() == [0, 1]
    # a source no row was trained on: the raw argmax
    assert choose(SCORES, "centroid", MEAN, STD, [[0, 1], []]).tolist() == [0, 0]


# --- routing reports, by hand ----------------------------------------------------------------------------

def test_routing_report_histogram_and_accuracy():
    r = routing_report([0, 2, 2, None, 1], 3, ["web", "trivia", "trivia"], expected="trivia")
    assert r["examples"] == 4 and r["histogram"] == [1, 1, 2] and r["shares"] == [0.25, 0.25, 0.5]
    assert r["top_share"] == 0.5 and r["by_source"] == {"web": 1, "trivia": 3} and r["accuracy"] == 0.75
    assert "accuracy" not in routing_report([0], 1)


def test_routing_accuracy_against_the_sources():
    a = routing_accuracy(["a", "a", "b", "c", "c", "a"], ["a", "b", "b", "c", "c", "c"])
    assert a["accuracy"] == round(4 / 6, 4) and a["chance"] == round(1 / 3, 4)
    assert a["per_source"] == {"a": 1.0, "b": 0.5, "c": round(2 / 3, 4)}
    assert a["confusion"] == {"a": {"a": 1}, "b": {"a": 1, "b": 1}, "c": {"c": 2, "a": 1}}


# --- sources ---------------------------------------------------------------------------------------------

def test_sources_are_named_by_stem_or_name_and_split_by_field(tmp_path):
    a, b = _write(tmp_path / "letters.jsonl", ALPHA), _write(tmp_path / "b.jsonl", DIGITS)
    assert [s.name for s in load_sources((str(a), f"numbers={b}"), "text", "")] == ["letters", "numbers"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(orjson.dumps({"text": t, "source": s}) + b"\n"
                               for s, t in [("x", "1"), ("y", "2"), ("x", "3")]))
    got = load_sources(str(mixed), "text", "", "source")
    assert [(s.name, s.texts, s.inputs) for s in got] == [("x", ["1", "3"], ["1", "3"]), ("y", ["2"], ["2"])]
    mixed.write_bytes(b"".join(orjson.dumps({"text": t + " answer", "input": t, "source": "x"}) + b"\n" for t in "12"))
    got = load_sources(str(mixed), "text", "", "source", input_field="input")  # routing statistics read "input"
    assert got[0].texts == ["1 answer", "2 answer"] and got[0].inputs == ["1", "2"]
    with pytest.raises(UserError, match="share a name"):
        load_sources((str(a), f"letters={b}"), "text", "")


def test_packing_joins_short_rows_and_keeps_long_ones_alone():
    assert pack_texts(["ab", "cd", "x" * 100], 2) == ["ab\n\ncd\n\n" + "x" * 100]  # 16 characters make a document
    assert pack_texts(["x" * 20, "ab"], 2) == ["x" * 20, "ab"]


def test_pooled_windows_are_the_per_source_batches_side_by_side():
    w = [torch.arange(12).view(6, 2), 100 + torch.arange(12).view(6, 2)]  # 2 sources, 6 windows of 2 tokens
    p = pooled(w, batch=3)  # step s of the pooled run: source 0's step-s batch, then source 1's
    assert torch.equal(p[:6], torch.cat([w[0][:3], w[1][:3]])) and torch.equal(p[6:], torch.cat([w[0][3:], w[1][3:]]))


# --- training on curated sources -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def curated(tiny_model, tmp_path_factory):
    """A 2-source bank (one prompt each) trained on the tiny model, and the windows each prompt saw."""
    d = tmp_path_factory.mktemp("curated")
    a, b = _write(d / "letters.jsonl", ALPHA * 4), _write(d / "digits.jsonl", DIGITS * 4)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = prompt_training._student_logits

    def spy(model, soft, ids):
        seen.append((soft.detach().clone(), ids.clone()))
        return real(model, soft, ids)

    prompt_training._student_logits = spy
    try:
        summary = train_prompts(TrainConfig((f"letters={a}", f"digits={b}"), str(d / "bank.safetensors"),
                                            teacher=str(tiny_model), model=str(tiny_model), num_prompts=1,
                                            prompt_len=2, steps=3, batch=2, seqlen=8, save_every=0, device="cpu"))
    finally:
        prompt_training._student_logits = real
    return d, summary, seen


def test_each_prompt_trains_only_on_its_own_source(curated, tiny_model):
    from rechannel.ops.core.models import load_model

    d, summary, seen = curated
    tok = load_model(str(tiny_model), device="cpu").tokenizer
    foreign = [set("1234"), set("abcd")]  # characters source 0 (letters) and source 1 (digits) never hold
    assert summary["sources"] == ["letters", "digits"] and summary["assignment"] == [0.5, 0.5]
    assert len(seen) == 3
    for soft, ids in seen:  # (4, P, d), (4, T): two windows of each source per step, in source order
        assert ids.shape == (4, 8)
        for row, window in enumerate(ids.tolist()):
            text = tok.decode(window)
            assert not set(text) & foreign[row // 2], f"window {text!r} of source {row // 2} crossed sources"
        assert torch.equal(soft[0], soft[1]) and torch.equal(soft[2], soft[3])  # one prompt per source
        assert not torch.equal(soft[0], soft[2])


def test_the_bank_stores_its_sources_and_score_statistics(curated):
    from safetensors import safe_open

    d, _, _ = curated
    with safe_open(str(d / "bank.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["rechannel"])
        mean, std = f.get_tensor("score_mean"), f.get_tensor("score_std")
    assert meta["sources"] == ["letters", "digits"] and meta["score_sources"] == ["letters", "digits"]
    assert mean.shape == std.shape == (2, 2) and bool((std >= 0).all())
    assert bool(((mean > 0) & (mean < 1)).all())  # attention mass on a prompt: a share of the whole


def test_route_reports_accuracy_against_the_source(curated, tiny_model, tmp_path):
    d, _, _ = curated
    inputs = b"".join(orjson.dumps({"text": t, "source": s}) + b"\n"
                      for s, texts in (("letters", ALPHA), ("digits", DIGITS)) for t in texts)
    r = run_inproc("route", "-m", str(tiny_model), "-p", str(d / "bank.safetensors"), "--source-field", "source",
                   "--summary", str(tmp_path / "s.json"), "--device", "cpu", input=inputs)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(rec["route"]["source"] == ["letters", "digits"][rec["route"]["prompt"]] for rec in records)
    summary = json.loads((tmp_path / "s.json").read_text())
    truth = [rec["source"] for rec in records]
    chosen = [rec["route"]["source"] for rec in records]
    assert summary["against_source"]["accuracy"] == round(sum(c == t for c, t in zip(chosen, truth, strict=True)) / 4, 4)
    assert sum(summary["histogram"]) == 4 and summary["against_source"]["chance"] == 0.5
    assert b"routing accuracy against the source" in r.stderr


def test_oracle_and_random_routes_in_eval(curated, tiny_model, tmp_path):
    from rechannel import EvalConfig, evaluate

    d, _, _ = curated
    task = tmp_path / "arc_easy.jsonl"  # a user task named like a built-in one has no designated source
    task.write_bytes(b"".join(orjson.dumps({"id": i, "context": t, "choices": ["a", "b"], "gold": 0}) + b"\n"
                              for i, t in enumerate(ALPHA + DIGITS)))
    doc = evaluate(EvalConfig(data=str(task), model=str(tiny_model), prompts=str(d / "bank.safetensors"),
                              route="random", device="cpu"))
    routing = doc["results"]["arc_easy"]["routing"]
    assert routing["examples"] == 4 and sum(routing["histogram"]) == 4
    again = evaluate(EvalConfig(data=str(task), model=str(tiny_model), prompts=str(d / "bank.safetensors"),
                                route="random", device="cpu"))
    assert again["samples"] == doc["samples"]  # seeded: the same rows every run
    with pytest.raises(UserError, match="no prompt of the bank was trained on source 'science'"):
        evaluate(EvalConfig(data=str(task), model=str(tiny_model), prompts=str(d / "bank.safetensors"),
                            route="oracle", device="cpu"))


def test_a_bank_without_source_names_still_loads_and_routes(tiny_model, tmp_path):
    """A bank as rechannel wrote them before sources: prompts and provenance only."""
    from rechannel import EvalConfig, evaluate
    from rechannel.ops.core.artifacts import Provenance, save_artifact
    from rechannel.ops.core.models import load_model

    lm = load_model(str(tiny_model), device="cpu")
    old = tmp_path / "old.safetensors"
    prompts = torch.randn(3, 2, lm.model.config.hidden_size) * 0.02
    save_artifact(old, {"prompts": prompts}, Provenance("prompt-bank", str(tiny_model), lm.fingerprint,
                                                        {"layers": [0]}, {"prompts": 3}))
    task = tmp_path / "t.jsonl"
    task.write_bytes(b"".join(orjson.dumps({"id": i, "context": t, "choices": ["a", "b"], "gold": 1}) + b"\n"
                              for i, t in enumerate(ALPHA + DIGITS)))
    doc = evaluate(EvalConfig(data=str(task), model=str(tiny_model), prompts=str(old), route="attention",
                              calibration="none", device="cpu"))
    routing = doc["results"]["t"]["routing"]
    assert sum(routing["histogram"]) == 4 and "by_source" not in routing
    with pytest.raises(UserError, match="stores no score statistics"):
        evaluate(EvalConfig(data=str(task), model=str(tiny_model), prompts=str(old), route="attention",
                            calibration="centroid", device="cpu"))
    r = run_inproc("route", "-m", str(tiny_model), "-p", str(old), "--calibration", "none", "--device", "cpu",
                   input=b'{"text": "alpha beta"}\n')
    assert r.returncode == 0, r.stderr
    route = json.loads(r.stdout)["route"]
    assert "source" not in route and 0 <= route["prompt"] < 3 and math.isclose(sum(route["scores"]), sum(route["scores"]))


# --- the built-in sources --------------------------------------------------------------------------------

@pytest.mark.skipif(not DATA.is_dir(), reason="the shared data is not beside the repository")
def test_builtin_sources_hold_out_rows_and_never_ask_an_evaluation_question():
    from rechannel.ops.evaluation.sources import BUILTIN, builtin_rows, normalise_question

    test = {normalise_question(json.loads(line)["question"])
            for line in (DATA / "tasks" / "triviaqa" / "test1000.jsonl").read_text().splitlines() if line.strip()}
    for name in BUILTIN:
        train, held = builtin_rows(name, str(DATA), "train"), builtin_rows(name, str(DATA), "heldout")
        assert len(held) == 200 and not {r.id for r in train} & {r.id for r in held}
        assert all(r.text.startswith(r.input) for r in train[:50])
    trivia = builtin_rows("trivia", str(DATA), "all")
    assert not any(normalise_question(r.input.split("\n")[0]) in test for r in trivia)
    assert len(trivia) == 3000 - 268  # sm_sub shares 268 questions with test1000
    first = next(r for r in builtin_rows("science", str(DATA), "all") if r.id == "MCAS_2000_4_6")  # ARC-Easy dev's first
    assert first.text == "Question: Which technology was developed most recently?\nAnswer: cellular telephone"


def test_training_runs_under_deterministic_algorithms_and_restores_the_setting():
    """Two CPU threads made prompt training differ from run to run (an accumulating backward); the loop
    turns torch's deterministic algorithms on while it runs and gives the caller's setting back."""
    from rechannel.ops.recover.training import TrainState, fit

    p = torch.nn.Parameter(torch.zeros(3))
    seen = []

    def step_loss(step):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return ((p - 1.0) ** 2).sum(), []

    assert not torch.are_deterministic_algorithms_enabled()
    state = fit({"p": p}, step_loss, 2, 0.1, 0.0, TrainState({"p": p.detach().clone()}))
    assert seen == [True, True] and state.step == 2 and not torch.are_deterministic_algorithms_enabled()
