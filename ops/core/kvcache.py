"""Key/value caches across transformers versions: how a decoder takes one, returns one, and how one is
built from, or read back as, per-layer (keys, values) tensors.

Soft prompts do not depend on the input, so their keys and values are computed once and reused: routing
puts every prompt of a bank in one cache, and a prompted forward starts from the chosen prompt's cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: each (B, kv_heads, S, head_dim)


def cache_keyword(decoder: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword a decoder takes its cache by: `cache` since transformers 5.24, `past_key_values` before."""
    params = inspect.signature(decoder.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def returned_cache(out: Any) -> Any:
    """The cache a forward returned (`out.cache` since transformers 5.24, `out.past_key_values` before)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def layer_kv(cache: Any) -> list[LayerKV]:
    """Per-layer (keys, values) of a DynamicCache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def build_cache(kv: list[LayerKV]) -> Any:
    """A fresh DynamicCache holding `kv` (a forward appends to its cache, so build one per forward)."""
    from transformers import DynamicCache

    if "ddp_cache_data" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(kv)
    return DynamicCache.from_legacy_cache(tuple(kv))
