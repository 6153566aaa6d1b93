"""The train-prompts driver as a Python API (ops/recover/api.py): the CLI is a thin shell around it, so the
API's summary, bank, PEFT export and loss log must be what `rechannel train-prompts` writes for the same
options; refusals come before the model loads and before anything is written."""

from __future__ import annotations

import json

import orjson
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from rechannel.ops.core.errors import UserError
from rechannel.ops.recover.api import TrainConfig, check_teacher, train_prompts

SETTINGS = {"num_prompts": 2, "prompt_len": 4, "batch": 2, "seqlen": 16, "steps": 3, "save_every": 2}


def _cli_args(config: TrainConfig) -> list[str]:
    """The train-prompts command line for the SETTINGS part of `config`."""
    args = ["--model", config.model, "--data", config.data, "-o", config.output, "--teacher", config.teacher,
            "--log", config.log, "--export-peft", config.export_peft, "--member", "1"]
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _curve(path: str) -> list[dict]:
    """The loss log's records without their timings."""
    with open(path, "rb") as f:
        return [{k: v for k, v in orjson.loads(line).items() if k != "seconds"} for line in f]


def test_api_writes_what_the_cli_writes(tiny_model, docs_file, tmp_path):
    def config(name: str) -> TrainConfig:
        d = tmp_path / name
        return TrainConfig(str(docs_file), str(d / "bank.safetensors"), teacher=str(tiny_model), log=str(d / "loss.log"),
                           export_peft=str(d / "peft"), member=1, model=str(tiny_model), device="cpu", **SETTINGS)

    api, cli = config("api"), config("cli")
    reports = []
    summary = train_prompts(api, progress=lambda stage, advance=0, total=None, note=None: reports.append(
        (stage, advance, total)))
    r = run_cli("train-prompts", *_cli_args(cli))
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    strip = ("output", "seconds", "peft")  # the paths differ by the directory; the time by the clock
    assert {k: v for k, v in summary.items() if k not in strip} == {k: v for k, v in printed.items() if k not in strip}
    assert summary["peft"] == api.export_peft and summary["final_loss"] == summary["final_loss"]  # not NaN
    assert torch.equal(load_file(api.output)["prompts"], load_file(cli.output)["prompts"])  # (M, P, d), bit for bit
    assert torch.equal(load_file(f"{api.export_peft}/adapter_model.safetensors")["prompt_embeddings"],
                       load_file(f"{cli.export_peft}/adapter_model.safetensors")["prompt_embeddings"])
    api_log, cli_log = (_curve(c.log) for c in (api, cli))
    assert api_log == cli_log and [rec["step"] for rec in api_log] == [1, 2, 3]
    stage = "training 2x4 prompts"  # one stage, started with its total, advanced once per step
    assert reports[0] == (stage, 0, 3) and sum(a for s, a, _ in reports if s == stage) == 3


def test_lora_through_the_api_resumes_to_the_uninterrupted_run(tiny_model, docs_file, tmp_path):
    common = {"method": "lora", "rank": 2, "targets": "q_proj,v_proj", "objective": "lm", "batch": 2, "seqlen": 16,
              "model": str(tiny_model), "device": "cpu"}
    whole = train_prompts(TrainConfig(str(docs_file), str(tmp_path / "whole"), steps=4, **common))
    part = TrainConfig(str(docs_file), str(tmp_path / "part"), steps=2, save_every=2, **common)
    train_prompts(part)
    resumed = train_prompts(TrainConfig(str(docs_file), str(tmp_path / "part"), steps=4, save_every=2, resume=True,
                                        **common))
    assert resumed["final_loss"] == whole["final_loss"] and resumed["modules"] == 4  # 2 layers x 2 targets
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals_come_before_the_model_loads(tiny_model, docs_file, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(UserError, match="--method 'adapter': expected prompts or lora"):
        train_prompts(TrainConfig(str(docs_file), str(out), method="adapter", model="no-such-model"))
    with pytest.raises(UserError, match="no documents in range --docs 900:"):
        train_prompts(TrainConfig(str(docs_file), str(out), docs="900:", model=str(tiny_model)))
    with pytest.raises(UserError):  # -o onto the data it reads
        train_prompts(TrainConfig(str(docs_file), str(docs_file), model=str(tiny_model)))
    assert not out.exists() and not (tmp_path / "x.safetensors.ckpt").exists()


def test_check_teacher_refuses_a_teacher_that_outputs_too_few_logits(tiny_model):
    from rechannel.ops.core.models import load_model

    lm = load_model(str(tiny_model), device="cpu")
    check_teacher(lm, lm, str(tiny_model))  # the model is its own teacher
    small = load_model(str(tiny_model), device="cpu")
    small.model.resize_token_embeddings(len(lm.tokenizer) - 1)
    with pytest.raises(UserError, match="fewer than the tokenizer's"):
        check_teacher(small, lm, "small")
