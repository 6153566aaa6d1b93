"""Choosing a bank's prompt per input (IDP), and running an input behind a cached prompt.

A prompt's keys and values do not depend on the input: `bank_kv` computes them once, every prompt at the
positions it was trained at (0..P-1). Attention routing then runs the input once, at positions P..P+T-1,
with all M prompts' keys in front of it (each prompt sees only itself; the input sees every prompt and
its own past), and scores prompt k by the attention mass the input's tokens put on k's keys, averaged
over heads, over the input's real tokens and over the chosen layers. The forward stops after the last
chosen layer, so routing on the first layers costs a fraction of a pass; the chosen prompt's forward then
starts from that prompt's cache instead of re-running its P tokens.

Entropy routing (an ablation) runs the input behind each prompt and picks the one under which the
model's next-token distributions have the lowest mean entropy: M passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..core.batching import pad_rows
from ..core.blocks import StopForward, decoder_blocks
from ..core.errors import UserError
from ..core.kvcache import LayerKV, build_cache, cache_keyword, layer_kv, returned_cache

BY = ("attention", "entropy")


@dataclass
class BankKV:
    """Every prompt's keys and values, per layer: each (M, kv_heads, P, head_dim)."""

    layers: list[LayerKV]
    prompts: int  # M
    length: int  # P

    def chosen(self, rows: torch.Tensor) -> object:
        """A fresh cache holding prompt rows[b] for input b. rows (B,)"""
        return build_cache([(k[rows], v[rows]) for k, v in self.layers])

    def side_by_side(self, batch: int) -> object:
        """A fresh cache with all M prompts one after another, (B, kv_heads, M*P, head_dim) per layer."""
        def flat(t: torch.Tensor) -> torch.Tensor:
            m, h, p, d = t.shape
            return t.permute(1, 0, 2, 3).reshape(1, h, m * p, d).expand(batch, -1, -1, -1).contiguous()
        return build_cache([(flat(k), flat(v)) for k, v in self.layers])


@torch.no_grad()
def bank_kv(model: nn.Module, bank: torch.Tensor) -> BankKV:
    """Run each prompt of `bank` (M, P, d) alone, once, and keep its keys and values."""
    embed = model.get_input_embeddings()
    out = model.get_decoder()(inputs_embeds=bank.to(embed.weight.device, embed.weight.dtype), use_cache=True)
    return BankKV(layer_kv(returned_cache(out)), bank.shape[0], bank.shape[1])


def parse_layers(text: str, n_layers: int) -> list[int]:
    """`all`, `A:B` (half-open), or `i,j,k`; the default `first` is the first ceil(L/8) layers."""
    if text == "first":
        return list(range(max(1, -(-n_layers // 8))))
    if text == "all":
        return list(range(n_layers))
    try:
        if ":" in text:
            a, b = text.split(":")
            picked = list(range(int(a or 0), int(b or n_layers)))
        else:
            picked = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise UserError(f"--layers {text!r}: expected first, all, A:B or a comma list of layer indices") from None
    if not picked or picked[0] < 0 or picked[-1] >= n_layers:
        raise UserError(f"--layers {text!r}: the model has layers 0..{n_layers - 1}")
    return picked


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Attention computed explicitly, so that each attention module returns its weights; restored after."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {k: getattr(c, "_attn_implementation", None) for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    blocks = decoder_blocks(model)
    if not all(hasattr(b, "self_attn") for b in blocks):
        raise UserError(f"attention routing needs blocks with a `self_attn` module ({type(blocks[0]).__name__} has none)")
    return [b.self_attn for b in blocks]


@torch.no_grad()
def attention_scores(model: nn.Module, kv: BankKV, ids: torch.Tensor, mask: torch.Tensor,
                     layers: Sequence[int]) -> torch.Tensor:
    """(B, M): mean attention mass that the real tokens of ids (B, T) put on each prompt's keys."""
    b, t = ids.shape
    m, p = kv.prompts, kv.length
    device = kv.layers[0][0].device
    mask = mask.to(device)
    total = torch.zeros(b, t, m, device=device)  # (B, T, M), summed over the chosen layers
    last = max(layers)

    def hook(i: int):
        def record(module, args, output):
            nonlocal total
            weights = output[1]  # (B, H, T, M*P + T)
            total = total + weights[..., : m * p].float().reshape(b, -1, t, m, p).sum(-1).mean(1)
            if i == last:
                raise StopForward
        return record

    attn = _attention_modules(model)
    handles = [attn[i].register_forward_hook(hook(i)) for i in layers]
    positions = (p + torch.arange(t, device=device)).expand(b, -1)  # (B, T)
    full_mask = torch.cat([torch.ones(b, m * p, dtype=mask.dtype, device=device), mask], 1)  # (B, M*P + T)
    decoder = model.get_decoder()
    try:
        with eager_attention(model):
            decoder(input_ids=ids.to(device), attention_mask=full_mask, position_ids=positions, use_cache=True,
                    **cache_keyword(decoder, kv.side_by_side(b)))
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    real = mask.float().unsqueeze(-1)  # (B, T, 1)
    return (total * real).sum(1) / real.sum(1).clamp_min(1) / len(layers)


@torch.no_grad()
def prompted_logits(model: nn.Module, kv: BankKV, rows: torch.Tensor, ids: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of ids (B, T) behind prompt rows[b], from the cached keys and values."""
    b, t = ids.shape
    device = kv.layers[0][0].device
    mask = mask.to(device)
    positions = (kv.length + torch.arange(t, device=device)).expand(b, -1)
    full_mask = torch.cat([torch.ones(b, kv.length, dtype=mask.dtype, device=device), mask], 1)
    return model(input_ids=ids.to(device), attention_mask=full_mask, position_ids=positions, use_cache=True,
                 **cache_keyword(model, kv.chosen(rows.to(device)))).logits


@torch.no_grad()
def entropy_scores(model: nn.Module, kv: BankKV, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, M): mean next-token entropy over the real tokens of ids (B, T) behind each prompt."""
    real = mask.to(kv.layers[0][0].device).float()  # (B, T)
    out = []
    for k in range(kv.prompts):
        rows = torch.full((ids.shape[0],), k, dtype=torch.long)
        logp = torch.log_softmax(prompted_logits(model, kv, rows, ids, mask).float(), -1)  # (B, T, V)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
        out.append((entropy * real).sum(1) / real.sum(1).clamp_min(1))
    return torch.stack(out, 1)


def route(model: nn.Module, kv: BankKV, ids: torch.Tensor, mask: torch.Tensor, by: str,
          layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen prompt (B,), scores (B, M)): the most attended prompt, or the least uncertain one."""
    if by == "attention":
        scores = attention_scores(model, kv, ids, mask, layers)
        return scores.argmax(1), scores
    scores = entropy_scores(model, kv, ids, mask)
    return scores.argmin(1), scores


ROUTE_TOKENS = 512  # routing reads at most an input's first this many tokens


def routing_ids(tokenizer, texts: Sequence[str], limit: int = ROUTE_TOKENS) -> list[list[int]]:
    """The tokens routing reads for each text: as eval encodes contexts (no special tokens), the first `limit`
    of them (which prompt fits a document shows in its beginning, and the attention weights routing reads
    grow with the square of the length); an empty text becomes the end-of-sequence token, so every input
    has something to attend from."""
    return [(tokenizer(t, add_special_tokens=False).input_ids or [tokenizer.eos_token_id])[:limit] for t in texts]


def route_rows(model: nn.Module, kv: BankKV, rows: Sequence[Sequence[int]], by: str, layers: Sequence[int],
               batch_size: int = 16, pad_id: int = 0,
               advance: Callable[[int], None] | None = None) -> list[tuple[int, list[float]]]:
    """(chosen prompt, scores) for every token row, in input order; rows run `batch_size` at a time, sorted
    by length so that little of a batch is padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[tuple[int, list[float]]] = [(0, [])] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_rows([rows[i] for i in chunk], max(len(rows[i]) for i in chunk), pad_id)
        chosen, scores = route(model, kv, ids, mask, by, layers)
        for i, k, sc in zip(chunk, chosen.tolist(), scores.tolist(), strict=True):
            out[i] = (k, sc)
        if advance:
            advance(len(chunk))
    return out


@torch.no_grad()
def prefix_attention(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                     soft: torch.Tensor | None = None) -> torch.Tensor:
    """(L,) per layer, the mean attention mass (over heads and the real tokens of ids (B, T)) on the keys in
    front of the input: the soft prompt soft (B, P, d) when given, else the input's first token (where a
    model without a prompt parks attention it does not need elsewhere)."""
    b, t = ids.shape
    embed = model.get_input_embeddings()
    device = embed.weight.device
    p = soft.shape[1] if soft is not None else 0
    x = embed(ids.to(device))
    if soft is not None:
        x = torch.cat([soft.to(device, x.dtype), x], 1)  # (B, P + T, d)
    full_mask = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], 1).to(device)
    real = mask.to(device).float()  # (B, T)
    width = p or 1
    per_layer = []

    def record(module, args, output):
        weights = output[1][:, :, p:, :width].float().sum(-1).mean(1)  # (B, T): mass on the prefix
        per_layer.append(((weights * real).sum() / real.sum().clamp_min(1)).item())

    handles = [a.register_forward_hook(record) for a in _attention_modules(model)]
    try:
        with eager_attention(model):
            model.get_decoder()(inputs_embeds=x, attention_mask=full_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.tensor(per_layer)
