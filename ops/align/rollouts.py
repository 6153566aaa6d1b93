"""Sampling many continuations of one prefix from a shared key/value cache.

A node's targeted rollouts are |K| x C continuations of the same prefix: the prefix is run once, its cache
repeated across the rows, and every row decodes from there. Question rollouts work the same way from the
prompt. No padding is needed: every row shares the prefix; a row that emits a stop token leaves the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.kvcache import LayerKV, build_cache, cache_keyword, layer_kv, returned_cache


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


@dataclass(frozen=True)
class Sampling:
    """How continuation rows are drawn, the same for every prefix of a run: at `temperature` (0: greedy), a row
    ending after any of `stop_ids` (kept), at most `max_rows` rows decoded together (None: all), tokens drawn
    from the first `width` logits only (None: all)."""

    temperature: float
    stop_ids: set[int] | frozenset[int]
    max_rows: int | None = None
    width: int | None = None


def continue_rows(model: Any, prefix: list[LayerKV], length: int, first: torch.Tensor, max_new: int,
                  generator: torch.Generator, sampling: Sampling) -> list[list[int]]:
    """Rows = copies of the cached prefix (its first `length` positions); row i starts with token first[i]
    and decodes up to `max_new` tokens in all, stopping after a stop token (kept). first: (B,).

    At most `sampling.max_rows` rows decode together: each row holds its own copy of the prefix's cache,
    so on a large model the batch, not the model, can set the memory. The rows of later chunks draw from
    the generator after those of earlier ones: the samples depend on max_rows, not only on the seed.
    Tokens are drawn from the first `sampling.width` logits only, so a student whose logit matrix is
    padded wider than a teacher's never samples an id the teacher has no logit for."""
    size = sampling.max_rows or max(1, first.shape[0])
    out: list[list[int]] = []
    for i in range(0, first.shape[0], size):
        out += _decode_rows(model, prefix, length, first[i:i + size], max_new, generator, sampling)
    return out


def _decode_rows(model: Any, prefix: list[LayerKV], length: int, first: torch.Tensor, max_new: int,
                 generator: torch.Generator, sampling: Sampling) -> list[list[int]]:
    """One chunk of continue_rows: the rows decoded together, finished rows leaving the batch."""
    rows = first.shape[0]
    kv = [(k[:, :, :length].repeat(rows, 1, 1, 1), v[:, :, :length].repeat(rows, 1, 1, 1)) for k, v in prefix]
    stops = torch.tensor(sorted(sampling.stop_ids), device=first.device)
    out_rows: list[list[int]] = [[t] for t in first.tolist()]
    active = torch.arange(rows, device=first.device)[~torch.isin(first, stops)]  # rows still decoding
    last = first[active]  # (A,)
    kv = [(k[active], v[active]) for k, v in kv]
    with torch.inference_mode():
        for _ in range(max_new - 1):
            if active.numel() == 0:
                break
            out = model(input_ids=last[:, None], use_cache=True, **cache_keyword(model, build_cache(kv)))
            kv = layer_kv(returned_cache(out))
            last = draw(out.logits[:, -1, :sampling.width], sampling.temperature, generator)[:, 0]  # (A,)
            for i, t in zip(active.tolist(), last.tolist(), strict=True):
                out_rows[i].append(t)
            going = ~torch.isin(last, stops)
            if not bool(going.all()):  # drop finished rows from the batch: the rest decode faster
                active, last = active[going], last[going]
                kv = [(k[going], v[going]) for k, v in kv]
    return out_rows
