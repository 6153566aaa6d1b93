"""Perplexity against a hand computation, the task registry, and eval's outputs and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_docs, run_cli
from rechannel.ops.errors import UserError
from rechannel.ops.models import load_model
from rechannel.ops.perplexity import perplexity, wikitext2_text
from rechannel.ops.tasks import get_tasks


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
    assert got.windows == n and got.perplexity == pytest.approx(want, rel=1e-5)
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
    mean = sum(w["nll"] for w in windows) / 5
    assert res["ppl,none"] == pytest.approx(math.exp(mean)) and res["ppl_stderr,none"] > 0
    assert doc["config"]["seqlen"] == 32 and doc["config"]["fingerprint"]
    r = run_cli("table", str(out), "--json")
    assert json.loads(r.stdout)["wikitext2 ppl"] == pytest.approx(res["ppl,none"])


def test_eval_missing_file_names_the_path_and_data_dir(tiny_model, tmp_path):
    r = run_cli("eval", "--model", str(tiny_model), "--data-dir", str(tmp_path), "-o", str(tmp_path / "r.json"))
    assert r.returncode == 1 and "perplexity/wikitext2_test.raw not found" in r.stderr.decode()
    assert f"--data-dir {tmp_path}" in r.stderr.decode() and not (tmp_path / "r.json").exists()
