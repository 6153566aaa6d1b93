"""Sampling many continuations of one prefix from a shared key/value cache.

A node's targeted rollouts are |K| x C continuations of the same prefix: the prefix is run once, its cache
repeated across the rows, and every row decodes from there. Question rollouts work the same way from the
prompt. No padding is needed: every row shares the prefix, and rows that have stopped keep decoding until
all have (their extra tokens are dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rechannel.ops.kvcache import LayerKV, build_cache, cache_keyword, layer_kv, returned_cache


def forward_with_cache(model: Any, ids: Sequence[int]) -> tuple[torch.Tensor, list[LayerKV]]:
    """One forward over `ids` (batch 1): (L, V) logits and the per-layer keys/values of the whole sequence."""
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    with torch.inference_mode():
        out = model(input_ids=x, use_cache=True)
    return out.logits[0], layer_kv(returned_cache(out))


def logits_of(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """(L, V) next-token logits at every position of `ids` (no cache kept)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False).logits[0]


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """(B, V) logits -> (B, n) tokens: argmax at temperature 0, otherwise sampled from softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True).expand(-1, n)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def continue_rows(model: Any, prefix: list[LayerKV], length: int, first: torch.Tensor, max_new: int,
                  temperature: float, stop_ids: set[int], generator: torch.Generator) -> list[list[int]]:
    """Rows = copies of the cached prefix (its first `length` positions); row i starts with token first[i]
    and decodes up to `max_new` tokens in all, stopping after a stop token (kept). first: (B,)."""
    rows = first.shape[0]
    kv = [(k[:, :, :length].repeat(rows, 1, 1, 1), v[:, :, :length].repeat(rows, 1, 1, 1)) for k, v in prefix]
    cache = build_cache(kv)
    tokens = [first]  # list of (B,)
    done = torch.tensor([t in stop_ids for t in first.tolist()], device=first.device)
    stops = torch.tensor(sorted(stop_ids), device=first.device)
    with torch.inference_mode():
        while len(tokens) < max_new and not bool(done.all()):
            out = model(input_ids=tokens[-1][:, None], use_cache=True, **cache_keyword(model, cache))
            cache = returned_cache(out)
            nxt = draw(out.logits[:, -1], temperature, generator)[:, 0]  # (B,)
            tokens.append(nxt)
            done = done | torch.isin(nxt, stops)
    return [_cut(row, stop_ids) for row in torch.stack(tokens, 1).tolist()]


def _cut(row: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[: i + 1]
    return row
