"""The command line as a user meets it: exit codes, stdout only for data, pipes, inspect, generate."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import torch

from conftest import run_cli
from rechannel.ops.core.fingerprint import model_fingerprint


def _greedy_reference(model_dir, prompt: str, n: int) -> list[int]:
    """Greedy decoding by hand: argmax of the last position's logits, n times, no generate()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            out.append(nxt.item())
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def test_generate_passes_fields_through_and_matches_hand_greedy(tiny_model):
    lines = b'{"id": 1, "prompt": "The capital of", "meta": {"x": [1]}}\n{"id": 2, "prompt": "A quick"}\n'
    r = run_cli("generate", "--model", str(tiny_model), "--max-new-tokens", "5", "--batch-size", "2", input=lines)
    assert r.returncode == 0, r.stderr
    recs = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [x["id"] for x in recs] == [1, 2] and recs[0]["meta"] == {"x": [1]}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for rec in recs:
        ref = _greedy_reference(tiny_model, rec["prompt"], 5)
        assert rec["completion"] == tok.decode(ref, skip_special_tokens=True)
        assert rec["completion_tokens"] == len(ref)


def test_malformed_line_exits_1_with_file_and_line_and_writes_nothing(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "ok"}\n{"prompt": \n')
    out = tmp_path / "out.jsonl"
    r = run_cli("generate", "--model", str(tiny_model), "-i", str(src), "-o", str(out))
    assert r.returncode == 1
    assert r.stderr.decode().strip().splitlines() == [f"error: {src}:2: not valid JSON (unexpected end of data)"]
    assert r.stdout == b"" and not out.exists()


def test_usage_error_exits_2():
    r = run_cli("generate", "--max-new-tokens", "zero")
    assert r.returncode == 2 and b"Traceback" not in r.stderr


def test_user_error_is_one_line_and_debug_shows_the_traceback():
    r = run_cli("inspect", "does/not/exist")
    assert r.returncode == 1 and r.stderr.decode() == "error: does/not/exist: no such file or directory\n"
    r = run_cli("inspect", "does/not/exist", "--debug")
    assert r.returncode == 1 and b"Traceback" in r.stderr and b"error: does/not/exist" in r.stderr


def test_empty_stdin_is_a_clear_error(tiny_model):
    r = run_cli("generate", "--model", str(tiny_model))
    assert r.returncode == 1 and r.stderr.decode() == "error: <stdin>: no records\n"


def test_closed_pipe_prints_no_traceback(tiny_model):
    lines = b"".join(orjson.dumps({"prompt": f"The capital {i}"}) + b"\n" for i in range(64))
    cmd = (f"{sys.executable} -m rechannel.cli.main generate --model {tiny_model} --max-new-tokens 2 "
           "--batch-size 1 | head -n 1")
    r = subprocess.run(["bash", "-c", cmd], input=lines, capture_output=True, timeout=300)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    assert b"Traceback" not in r.stderr and b"BrokenPipe" not in r.stderr, r.stderr


def test_inspect_model_directory_json(tiny_model):
    r = run_cli("inspect", str(tiny_model), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["kind"] == "model" and d["fingerprint"] == model_fingerprint(tiny_model)
    from safetensors.torch import load_file

    sd = load_file(tiny_model / "model.safetensors")
    assert d["parameters"] == sum(v.numel() for v in sd.values())
    assert {t["name"]: t["shape"] for t in d["tensors"]} == {k: list(v.shape) for k, v in sd.items()}


def test_inspect_artifact_shows_provenance_in_a_table(tmp_path):
    from rechannel.ops.core.artifacts import Provenance, save_artifact

    path = tmp_path / "stats.safetensors"
    save_artifact(path, {"x": torch.ones(3, 2)}, Provenance("calibration-stats", "smollm2-135m", "0123456789abcdef"))
    r = run_cli("inspect", str(path), env={"COLUMNS": "200"})
    text = r.stdout.decode()
    assert r.returncode == 0 and "calibration-stats" in text and "0123456789abcdef" in text and "3×2" in text
    assert r.stderr == b""
    d = json.loads(run_cli("inspect", str(path), "--json").stdout)
    assert d["kind"] == "calibration-stats" and d["metadata"]["rechannel"]["source"]["model"] == "smollm2-135m"


def test_models_lists_the_default_alias_as_jsonl(cache):
    r = run_cli("models", "--json", env={"RECHANNEL_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows[0]["name"] == "smollm2-135m" and rows[0]["default"] and rows[0]["cached"] is False
    assert rows[0]["cache"] == str(cache / "models" / "smollm2-135m")
