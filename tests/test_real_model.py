"""End to end on the real default model: convert the shipped GGUF once, reuse the cache, ask for Paris."""

from __future__ import annotations

import json

import pytest

from conftest import max_logit_gap_with_transformers, run_cli
from rechannel.ops.core import models


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    r = run_cli("models", "prepare", "smollm2-135m", env={"RECHANNEL_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    return cache, r.stdout.decode().strip()


@pytest.mark.slow
def test_prepare_prints_the_cached_directory(prepared):
    cache, path = prepared
    assert path == str(cache / "models" / "smollm2-135m")
    d = json.loads(run_cli("inspect", path, "--json", "--no-tensors").stdout)
    assert d["config"]["num_hidden_layers"] == 30 and d["parameters"] > 100_000_000


@pytest.mark.slow
def test_second_load_reuses_the_cache_and_paris_is_the_top_token(prepared, monkeypatch):
    import torch

    cache, path = prepared
    monkeypatch.setenv("RECHANNEL_CACHE", str(cache))

    def no_conversion(*a, **k):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr("rechannel.ops.core.convert.convert_gguf", no_conversion)
    lm = models.load_model("smollm2-135m", device="cpu")
    assert str(lm.path) == path
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = lm.model(ids).logits[0, -1].argmax().item()
    assert lm.tokenizer.decode([top]) == " Paris"
    assert lm.fingerprint == models.load_model(path, device="cpu").fingerprint  # alias and path agree


@pytest.mark.slow
def test_align_runs_on_the_real_model_with_its_chat_template(prepared, tmp_path):
    cache, path = prepared
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "add", "question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    r = run_cli("align", "--student", path, "--data", str(q), "--rollouts", "2", "--continuations", "2",
                "--candidates", "1", "--budget", "2", "--max-new-tokens", "12", "-o", str(tmp_path / "s.json"),
                "--device", "cpu", env={"RECHANNEL_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr.decode()
    records = [json.loads(line) for line in r.stdout.decode().splitlines()]
    head = records[-1]
    assert records[0]["kind"] == "run" and records[0]["config"]["budget"] == 2  # what --resume checks
    assert head["kind"] == "question" and head["prompt_tokens"] > 20  # the chat template wraps the question
    nodes = records[1:-1]
    assert len(nodes) == 2 and all(n["K"][0]["token"] == n["token"] for n in nodes)
    for n in nodes:
        t = n["teachers"]["self+reference"]
        assert 0 < n["K"][0]["p"] <= 1 and t["kl"] >= 0 and 0 <= t["js"] <= 0.7
    assert json.loads((tmp_path / "s.json").read_text())["nodes"] == 2


@pytest.mark.slow
def test_compressed_tensors_of_the_real_model_load_in_transformers(prepared, tmp_path, monkeypatch):
    """4-bit RTN, groups of 64 (SmolLM2's width 576 is not a multiple of 128, which compressed-tensors needs):
    transformers' logits equal rechannel's, its WikiText-2 perplexity (16 windows of 512) the packed model's to
    0.1%, and the directory is under 0.3x the fp16 size of the quantized weights plus the float tensors."""
    from pathlib import Path

    from rechannel import CompressConfig, EvalConfig, compress, evaluate

    cache, path = prepared
    monkeypatch.setenv("RECHANNEL_CACHE", str(cache))
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not data.is_dir():
        pytest.skip(f"the shared data is not at {data}")
    reports = {fmt: compress(CompressConfig(str(tmp_path / fmt), method="rtn", bits=4, group_size=64, format=fmt,
                                            device="cpu")) for fmt in ("compressed-tensors", "packed")}
    ct = tmp_path / "compressed-tensors"
    assert max_logit_gap_with_transformers(ct) <= 1e-3

    def ppl(model_dir, loader):
        doc = evaluate(EvalConfig(tasks="wikitext2", data_dir=str(data), seqlen=512, limit=16, model=model_dir,
                                  device="cpu", dtype="float32", loader=loader))
        return doc["results"]["wikitext2"]["ppl,none"]

    packed, transformers = ppl(str(tmp_path / "packed"), "rechannel"), ppl(str(ct), "transformers")
    assert abs(transformers - packed) <= 1e-3 * packed, (packed, transformers)
    totals = reports["compressed-tensors"]["totals"]
    assert totals["quantized_bytes"] <= 0.3 * 2 * totals["quantized_parameters"]  # the rest is as in fp16
