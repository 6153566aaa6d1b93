"""The streaming safetensors writer against safetensors' own save_file: the same bytes, tensor by tensor."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from rechannel.ops.core.shardwriter import save_tensors, write_file

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(30):
        dtype = rng.choice(DTYPES)
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]  # scalars and empty tensors too
        t = torch.randn(shape, generator=g) * 50
        out[f"model.layers.{rng.randint(0, 12)}.{rng.choice('abqz')}{i}.weight"] = t.to(dtype)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_same_bytes_as_save_file(tmp_path, seed, metadata):
    tensors = _random_tensors(seed)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    save_tensors(tmp_path / "ours.safetensors", tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_fetch_one_at_a_time_in_file_order(tmp_path):
    """The layout may be meta tensors: each real tensor is asked for once, when its data is written."""
    tensors = {"b": torch.arange(6, dtype=torch.int64), "a": torch.ones(2, 3), "c": torch.zeros(4, dtype=torch.float16)}
    layout = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    asked = []
    write_file(tmp_path / "x.safetensors", layout, lambda n: asked.append(n) or tensors[n], {"format": "pt"})
    assert asked == ["b", "a", "c"]  # I64, F32, F16: safetensors' order
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_fetched_tensor_must_match_its_plan(tmp_path):
    layout = {"a": torch.empty(2, 3, device="meta")}
    with pytest.raises(ValueError, match="a: fetched torch.float16"):
        write_file(tmp_path / "x.safetensors", layout, lambda n: torch.zeros(2, 3, dtype=torch.float16))
