"""Perplexity against a hand computation, the task registry, and eval's outputs and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tolerances import U32, log_softmax_error, logit_bound, logit_error

from conftest import make_docs, run_cli
from rechannel.ops.core.errors import UserError
from rechannel.ops.core.models import load_model
from rechannel.ops.evaluation.perplexity import perplexity, wikitext2_text
from rechannel.ops.evaluation.tasks import get_tasks


def _ppl_rtol(model, tokens: int, ppl: float, dz: float) -> float:
    """ppl = exp(mean NLL), so its relative error is the mean NLL's abs error: per token, the float32
    log-softmax's own (log_softmax_error) and 2·dz from logits off by ≤ dz between the two sides; per window,
    the float32 Σ and division of `tokens` losses ≤ NLL each ((tokens + 1)·u·NLL)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return log_softmax_error(vocab, logit_bound(model)) + 2 * dz + (tokens + 1) * U32 * math.log(ppl)


def test_perplexity_equals_the_reference_formula_in_float64(tiny_model):
    lm = load_model(str(tiny_model), device="cpu")
    stream = lm.tokenizer(" ".join(make_docs()), return_tensors="pt").input_ids[0]
    seqlen = 40
    n = stream.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(n):  # the GPTQ/Wanda loop: loss of window i times seqlen, exp of the total / (n seqlen)
            ids = stream[i * seqlen:(i + 1) * seqlen].view(1, -1)
            logp = torch.log_softmax(lm.model(ids).logits[0, :-1].double(), -1)
            loss = -logp.gather(1, ids[0, 1:, None]).mean()
            nlls.append(loss * seqlen)
    want = math.exp(torch.stack(nlls).sum().item() / (n * seqlen))
    got = perplexity(lm.model, stream, seqlen, batch_size=3)
    # float32 CE of batches of 3 against float64 log-softmax of forwards one window at a time: the two
    # float32 forwards' logits are each within logit_error of exact (tests/tolerances.py): ≈ 6e-4
    rtol = _ppl_rtol(lm.model, seqlen - 1, want, 2 * logit_error(lm.model, seqlen))
    assert got.windows == n and got.perplexity == pytest.approx(want, rel=rtol)
    assert perplexity(lm.model, stream, seqlen, limit=2).windows == 2
    with pytest.raises(UserError, match="fewer than one window"):
        perplexity(lm.model, stream[:10], seqlen)


def test_wikitext_joining(tmp_path):
    raw = tmp_path / "wiki.raw"
    raw.write_bytes(b" = Title = \r\n\r\n First line .\r\n Second line .\r\n")
    assert wikitext2_text(str(raw)) == " = Title = \n\n First line .\n\n Second line ."


def test_task_typo_suggests():
    with pytest.raises(UserError, match="did you mean 'wikitext2'"):
        get_tasks("wikitxt2")


def test_eval_writes_results_in_harness_layout(tiny_model, tmp_path):
    data = tmp_path / "data"
    (data / "perplexity").mkdir(parents=True)
    (data / "perplexity" / "wikitext2_test.raw").write_text("\n".join(make_docs()))
    out = tmp_path / "res.json"
    r = run_cli("eval", "--model", str(tiny_model), "--tasks", "wikitext2", "--data-dir", str(data),
                "--seqlen", "32", "--limit", "5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    windows = [json.loads(x) for x in r.stdout.splitlines()]
    doc = json.loads(out.read_text())
    res = doc["results"]["wikitext2"]
    assert len(windows) == 5 == res["windows"] and doc["n-samples"]["wikitext2"]["effective"] == 5
    mean = sum(w["nll"] for w in windows) / 5  # the records' float64 NLLs: ppl is exp of their torch mean,
    # which differs from this Σ/5 by ≤ 5·u64 relative: approx's 1e-6 is ample
    assert res["ppl,none"] == pytest.approx(math.exp(mean)) and res["ppl_stderr,none"] > 0
    assert doc["config"]["seqlen"] == 32 and doc["config"]["fingerprint"]
    r = run_cli("table", str(out), "--json")
    assert json.loads(r.stdout)["wikitext2 ppl"] == pytest.approx(res["ppl,none"])  # same float via JSON


def test_eval_missing_file_names_the_path_and_data_dir(tiny_model, tmp_path):
    r = run_cli("eval", "--model", str(tiny_model), "--data-dir", str(tmp_path), "-o", str(tmp_path / "r.json"))
    assert r.returncode == 1 and "perplexity/wikitext2_test.raw not found" in r.stderr.decode()
    assert f"--data-dir {tmp_path}" in r.stderr.decode() and not (tmp_path / "r.json").exists()


def test_sliding_perplexity_scores_every_token_once_with_the_longest_context(tiny_model):
    from rechannel.ops.evaluation.perplexity import sliding_perplexity

    lm = load_model(str(tiny_model), device="cpu")
    stream = lm.tokenizer(" ".join(make_docs(8)), return_tensors="pt").input_ids[0][:150]
    seqlen, stride = 40, 16
    total, count = 0.0, 0
    with torch.no_grad():  # token t >= 1 is predicted from the window that first reaches it
        logits = {}
        for t in range(1, stream.numel()):
            begin = max(0, -(-(t + 1 - seqlen) // stride) * stride)  # first window start with t < begin + seqlen
            if begin not in logits:
                logits[begin] = torch.log_softmax(lm.model(stream[begin:begin + seqlen].view(1, -1)).logits[0].double(), -1)
            total -= logits[begin][t - 1 - begin, stream[t]].item()
            count += 1
    got = sliding_perplexity(lm.model, stream, seqlen, stride)
    assert got.tokens_scored == count == stream.numel() - 1
    # the same decoder call on the same window; only the head runs on other rows, each side within
    # d·u·|h||W| (k = d) of exact; float32 CE against float64 log-softmax as in _ppl_rtol: ≈ 4e-5
    want = math.exp(total / count)
    head = lm.model.config.hidden_size * U32 * logit_bound(lm.model)
    assert got.perplexity == pytest.approx(want, rel=_ppl_rtol(lm.model, seqlen - 1, want, 2 * head))
    with pytest.raises(UserError, match="--stride 50"):
        sliding_perplexity(lm.model, stream, seqlen, 50)


def _mc_file(path, rows=None):
    rows = rows or [{"id": f"e{i}", "context": c, "choices": ch, "gold": g} for i, (c, ch, g) in enumerate([
        ("The capital of France is", ["Paris", "Rome", "a quick brown fox"], 0),
        ("Question: what is two plus two?\nAnswer:", ["four", "five"], 0),
        ("Compression removes", ["weights", "prompts", "dogs", "the capital"], 0)])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_multiple_choice_records_and_results(tiny_model, tmp_path):
    data = _mc_file(tmp_path / "mine.jsonl")
    out = tmp_path / "res.json"
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--kind", "mc", "--batch-size", "2",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in r.stdout.splitlines()]
    res = json.loads(out.read_text())["results"]["mine"]
    assert [x["id"] for x in records] == ["e0", "e1", "e2"] and res["samples"] == 3
    choices = [["Paris", "Rome", "a quick brown fox"], ["four", "five"], ["weights", "prompts", "dogs", "the capital"]]
    for rec, ch in zip(records, choices, strict=True):
        lls = rec["loglik"]
        assert rec["pred"] == max(range(len(lls)), key=lambda i: lls[i]) and rec["correct"] == (rec["pred"] == 0)
        assert rec["pred_norm"] == max(range(len(lls)), key=lambda i: lls[i] / len(ch[i]))
    # the same float64 Σ/3 of the same 0/1 values, in the same order, as ops/evaluate.py: exact
    assert res["acc,none"] == pytest.approx(sum(x["acc"] for x in records) / 3)
    assert res["acc_norm,none"] == pytest.approx(sum(x["acc_norm"] for x in records) / 3)
    assert res["examples_per_s"] > 0 and json.loads(out.read_text())["config"]["extra_parameters"] == 0
    assert "acc_norm" in r.stderr.decode()  # the summary table
    row = json.loads(run_cli("table", str(out), "--metrics", "acc", "--json").stdout)
    assert row["mine acc"] == res["acc,none"] and "mine acc_norm" not in row and row["run"] == "dense"
    md = run_cli("table", str(out), "--transpose", "--markdown").stdout.decode().splitlines()
    size = json.loads(out.read_text())["config"]["model_bytes"] / 1e6  # the model's weight files
    assert md[0] == "| task metric | dense |" and md[2] == f"| size MB | {round(size, 1):.1f} |"
    assert md[3] == f"| mine acc | {res['acc,none']:.3f} |"


def test_eval_with_a_prompt_bank_and_a_lora_adapter(tiny_model, tmp_path):
    from rechannel.ops.core.artifacts import Provenance, save_artifact
    from rechannel.ops.core.models import model_fingerprint

    data = _mc_file(tmp_path / "mine.jsonl")
    bank = tmp_path / "bank.safetensors"
    save_artifact(bank, {"prompts": torch.randn(2, 3, 64)},
                  Provenance("prompt-bank", str(tiny_model), model_fingerprint(tiny_model)))
    base = run_cli("eval", "--model", str(tiny_model), "--data", str(data))
    routed = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--prompts", str(bank),
                     "--route", "fixed:1", "-o", str(tmp_path / "p.json"))
    assert routed.returncode == 0, routed.stderr
    a, b = ([json.loads(x) for x in r.stdout.splitlines()] for r in (base, routed))
    assert all(x["prompt"] == 1 for x in b) and a[0]["loglik"] != b[0]["loglik"]
    assert json.loads((tmp_path / "p.json").read_text())["config"]["extra_parameters"] == 2 * 3 * 64
    assert json.loads(run_cli("table", str(tmp_path / "p.json"), "--json").stdout)["run"] == "dense + prompt 1 of 2"
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--prompts", str(bank), "--route", "fixed:2")
    assert r.returncode == 1 and "the bank has 2 prompts" in r.stderr.decode()


def test_prompted_perplexity_equals_a_direct_computation(tiny_model, tmp_path):
    """Each window behind its prompt: the same tokens scored, the prompt only adds context."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rechannel.ops.core.artifacts import Provenance, save_artifact
    from rechannel.ops.core.models import model_fingerprint

    text = "The capital of France is Paris. The capital of Italy is Rome. " * 6
    data = tmp_path / "ppl.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    torch.manual_seed(4)
    prompts = torch.randn(2, 3, 64)
    bank = tmp_path / "bank.safetensors"
    save_artifact(bank, {"prompts": prompts}, Provenance("prompt-bank", str(tiny_model), model_fingerprint(tiny_model)))
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--kind", "ppl", "--seqlen", "16",
                "--prompts", str(bank), "--route", "fixed:1", "-o", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads((tmp_path / "r.json").read_text())["results"]
    got = next(iter(got.values()))
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    stream = tok(text, return_tensors="pt").input_ids[0]
    n = stream.numel() // 16
    windows = stream[: n * 16].view(n, 16)
    with torch.no_grad():
        x = torch.cat([prompts[1].expand(n, -1, -1), model.get_input_embeddings()(windows)], 1)
        logits = model(inputs_embeds=x).logits[:, 3:-1].double()  # positions predicting tokens 1..15
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    # float32 CE (eval's own batches, another process) against float64 log-softmax of one float32 forward of
    # every window: each forward's logits within logit_error of exact (tests/tolerances.py): ≈ 6e-4
    want = math.exp(nll.item())
    rtol = _ppl_rtol(model, 15, want, 2 * logit_error(model, 3 + 16))
    assert got["windows"] == n and got["ppl,none"] == pytest.approx(want, rel=rtol)


def test_eval_closed_book_qa(tiny_model, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "question": q, "answers": a}) + "\n" for i, (q, a) in
                            enumerate([("What is the capital of France?", ["Paris"]), ("Two plus two?", ["four", "4"])])))
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--kind", "qa", "-o", str(tmp_path / "q.json"))
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(records) == 2 and all("\n" not in x["prediction"] for x in records)
    from rechannel.ops.evaluation.metrics import qa_metrics

    for rec, answers in zip(records, [["Paris"], ["four", "4"]], strict=True):
        assert rec["f1"] == qa_metrics(rec["prediction"], answers)["f1"]
    res = json.loads((tmp_path / "q.json").read_text())["results"]["qa"]
    assert res["exact_match,none"] == sum(x["exact_match"] for x in records) / 2


@pytest.mark.parametrize("args, message", [
    (["--kind", "mc"], "bad.jsonl:2: gold 3 is not a choice index"),
    (["--route", "fixed:0"], "--route fixed:0 needs a prompt bank"),
    (["--batch-size", "0"], "--batch-size '0'"),
    (["--route", "atention"], "did you mean"),
])
def test_eval_bad_input_is_one_line_and_writes_nothing(tiny_model, tmp_path, args, message):
    data = _mc_file(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b", "c"], "gold": 0},
                                            {"context": "a", "choices": ["b", "c"], "gold": 3}])
    if args[0] != "--kind":
        data = _mc_file(tmp_path / "good.jsonl")
    out = tmp_path / "r.json"
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), *args, "-o", str(out))
    err = r.stderr.decode()
    assert r.returncode == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and r.stdout == b""


def test_last_word_accuracy_and_perplexity_follow_the_records(tiny_model):
    from rechannel.ops.evaluation.evaluator import Conditioning, run_choice_task
    from rechannel.ops.evaluation.formats import ChoiceExample

    lm = load_model(str(tiny_model), device="cpu")
    examples = [ChoiceExample(str(i), (c,), (" " + w,), 0, (w,)) for i, (c, w) in enumerate(
        [("The capital of France is", "Paris."), ("A quick brown fox jumps over the lazy", "dog"),
         ("Question: what is two plus two?\nAnswer:", "four.")])]
    run = run_choice_task(lm.model, lm.tokenizer, "lam", "lastword", examples, 2, Conditioning())
    lls = [r["loglik"] for r in run.records]  # metrics come from these floats by the same Σ/3 and exp: exact
    assert run.metrics["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / 3))
    assert run.metrics["acc,none"] == pytest.approx(sum(r["greedy"] for r in run.records) / 3)
