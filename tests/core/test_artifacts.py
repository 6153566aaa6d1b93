"""safetensors artefacts carry provenance, and one made for another model is refused."""

from __future__ import annotations

import json

import pytest
import torch

from rechannel.ops.core.artifacts import Provenance, load_artifact, read_provenance, save_artifact
from rechannel.ops.core.errors import UserError
from rechannel.ops.core.tensorfile import read_header


def _bank(tmp_path, fingerprint="aaaa0000bbbb1111"):
    path = tmp_path / "bank.safetensors"
    t = torch.randn(4, 3, 5)
    save_artifact(path, {"prompts": t}, Provenance("prompt-bank", "smollm2-135m", fingerprint,
                                                   args={"num_prompts": 4, "lr": 0.03}, extra={"final_loss": 1.25}))
    return path, t


def test_roundtrip_keeps_tensors_and_metadata(tmp_path):
    path, t = _bank(tmp_path)
    tensors, meta = load_artifact(path, kind="prompt-bank", fingerprint="aaaa0000bbbb1111")
    assert torch.equal(tensors["prompts"], t)
    assert meta["kind"] == "prompt-bank" and meta["args"] == {"num_prompts": 4, "lr": 0.03}
    assert meta["source"] == {"model": "smollm2-135m", "fingerprint": "aaaa0000bbbb1111"}
    assert meta["final_loss"] == 1.25 and meta["version"]
    raw = read_header(path).metadata  # string -> string, as the format requires
    assert all(isinstance(v, str) for v in raw.values()) and json.loads(raw["rechannel"])["kind"] == "prompt-bank"


def test_artifact_for_another_model_is_refused(tmp_path):
    path, _ = _bank(tmp_path)
    with pytest.raises(UserError) as e:
        load_artifact(path, kind="prompt-bank", fingerprint="ffff0000ffff0000", model="./pruned")
    msg = str(e.value)
    assert "made for model 'smollm2-135m' (fingerprint aaaa0000bbbb1111)" in msg
    assert "'./pruned'" in msg and "ffff0000ffff0000" in msg


def test_wrong_kind_and_foreign_files_are_refused(tmp_path):
    path, _ = _bank(tmp_path)
    with pytest.raises(UserError, match="is a 'prompt-bank' artefact, expected 'calibration-stats'"):
        load_artifact(path, kind="calibration-stats")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="not a rechannel artefact"):
        read_provenance(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(UserError, match="not a safetensors file"):
        read_provenance(junk)


def test_save_interrupted_midway_writes_nothing(tmp_path, monkeypatch):
    from rechannel.ops.core import shardwriter

    def half_then_interrupt(filename, tensors, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(shardwriter, "save_tensors", half_then_interrupt)
    path = tmp_path / "bank.safetensors"
    with pytest.raises(KeyboardInterrupt):
        save_artifact(path, {"x": torch.ones(2)}, Provenance("prompt-bank", "m", "f"))
    assert list(tmp_path.iterdir()) == []
