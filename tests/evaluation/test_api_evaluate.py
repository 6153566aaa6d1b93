"""The `eval` driver as a Python API: the document and records it returns are what `rechannel eval` writes,
bad options fail before the model loads, and an out-of-memory retry repeats no record."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from rechannel.ops.core.errors import UserError
from rechannel.ops.evaluation.api import EvalConfig, _with_batch_size, evaluate

TIMINGS = ("seconds", "tokens_per_s", "examples_per_s", "seconds_per_example")


def _mc_file(path):
    rows = [{"id": f"e{i}", "context": c, "choices": ch, "gold": g} for i, (c, ch, g) in enumerate([
        ("The capital of France is", ["Paris", "Rome", "a quick brown fox"], 0),
        ("Question: what is two plus two?\nAnswer:", ["four", "five"], 0),
        ("Compression removes", ["weights", "prompts", "dogs", "the capital"], 0)])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _untimed(doc):
    """The document without its wall-clock figures, which differ from run to run."""
    return {**doc, "results": {t: {k: v for k, v in r.items() if k not in TIMINGS} for t, r in doc["results"].items()}}


def _never_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the options were checked")


def test_evaluate_returns_what_the_cli_writes(tiny_model, tmp_path):
    data = _mc_file(tmp_path / "mine.jsonl")
    args = {"data": str(data), "data_dir": str(tmp_path), "batch_size": "2", "attention_profile": 2}
    out = tmp_path / "cli.json"
    r = run_cli("eval", "--model", str(tiny_model), "--data", args["data"], "--data-dir", args["data_dir"],
                "--batch-size", "2", "--attention-profile", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    cli_doc, cli_records = json.loads(out.read_text()), [json.loads(x) for x in r.stdout.splitlines()]

    doc = evaluate(EvalConfig(model=str(tiny_model), **args))  # no on_record: the records come back as samples
    samples = doc.pop("samples")
    # through JSON, as the CLI writes it: tuples become lists, and both sides compare as the same types
    assert _untimed(json.loads(json.dumps(doc))) == _untimed(cli_doc)
    assert list(doc) == ["results", "n-samples", "configs", "config", "per_example", "attention_profile"]
    assert json.loads(json.dumps(samples)) == {"mine": cli_records} and len(cli_records) == 3

    streamed = []
    again = evaluate(EvalConfig(model=str(tiny_model), **args), on_record=streamed.append)
    assert "samples" not in again and streamed == samples["mine"]


@pytest.mark.parametrize("changes, message", [
    ({"tasks": ","}, "--tasks is empty"),
    ({"batch_size": "0"}, "--batch-size '0'"),
    ({"kind": "ppl", "stride": 4, "prompts": "bank.safetensors"}, "--stride with --prompts"),
    ({"output": "SAME"}, "would overwrite the input --data"),
])
def test_bad_options_fail_before_the_model_loads(tiny_model, tmp_path, changes, message):
    data = _mc_file(tmp_path / "mine.jsonl")
    changes = {k: str(data) if v == "SAME" else v for k, v in changes.items()}
    config = EvalConfig(model=str(tiny_model), data=str(data), **changes)
    with pytest.raises(UserError, match=message):
        evaluate(config, load=_never_load)


def test_auto_batch_size_halves_on_gpu_out_of_memory():
    tried = []

    def run(b):
        tried.append(b)
        if b > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "ok"

    assert _with_batch_size(run, None, "cuda:0") == ("ok", 16) and tried == [64, 32, 16]
    with pytest.raises(UserError, match="out of GPU memory at --batch-size 32"):
        _with_batch_size(run, 32, "cuda:0")
    assert _with_batch_size(lambda b: b, None, "cpu") == (32, 32)


def test_out_of_memory_retry_hands_out_each_perplexity_window_once(tiny_model, docs_file, monkeypatch):
    """A batch that runs out of GPU memory after earlier batches scored: the retry must not repeat them."""
    import rechannel.ops.evaluation.perplexity as ppl_ops

    def fake_sums(model, stream, windows, batch_size, on_windows, prompts):
        on_windows(torch.tensor([1.0, 2.0]))  # the first batch scores, then the next one does not fit
        if batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        on_windows(torch.tensor([3.0]))
        return [15.0, 30.0, 45.0]  # summed over the 15 scored tokens of each window of 16

    monkeypatch.setattr(ppl_ops, "window_nll_sums", fake_sums)
    stages, records = [], []
    doc = evaluate(EvalConfig(model=str(tiny_model), device="cpu", data=str(docs_file), kind="ppl", seqlen=16,
                              windows=3),
                   progress=lambda stage, advance=0, total=None, note=None: stages.append((stage, advance)),
                   on_record=records.append)
    assert doc["config"]["batch_size_used"] == {"docs": 2} and doc["n-samples"]["docs"]["effective"] == 3
    assert records == [{"task": "docs", "window": i, "nll": v} for i, v in enumerate([1.0, 2.0, 3.0])]
    assert stages.count(("docs", 0)) == 5  # started at 32 (the CPU's auto batch), then 16, 8, 4 and 2
