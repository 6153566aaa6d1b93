"""Log-likelihood of continuations after a context, with each context run once for all its continuations.

lm-evaluation-harness scores a multiple-choice example by running context+choice once per choice. Here a
batch of contexts runs once (right-padded, keys and values kept), the cache rows are then repeated once
per continuation, and all continuations of the batch run together on top of it. The first token of every
continuation is predicted by the context's last position, so one-token choices (yes/no, A-E) need no
second pass at all. Only the positions that predict a continuation token go through the output head.

Tokens are split as lm-evaluation-harness splits them (`encode_pair`), so the numbers agree with it.
An optional soft prompt (P, d) is placed in front of each context as input embeddings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ScoreUnit:
    """One context and the continuations scored after it."""

    context: tuple[int, ...]  # token ids, non-empty
    continuations: tuple[tuple[int, ...], ...]  # each non-empty
    prompt: int | None = None  # row of the prompt bank to prepend, None for no soft prompt


@dataclass(frozen=True)
class ContinuationScore:
    loglik: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax of its prediction
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness makes them: trailing spaces of the context
    move to the continuation, the pair is encoded whole, and the continuation is what follows the
    separately encoded context. No special tokens; an empty context becomes the end-of-text token."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def _pad_rows(rows: Sequence[Sequence[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, width) and the mask of real tokens (N, width)."""
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _head_logprobs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """log-softmax of the output head on selected positions. (n, d) -> (n, V) float32"""
    return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)


@torch.inference_mode()
def score_batch(model: nn.Module, units: Sequence[ScoreUnit], prompts: torch.Tensor | None = None,
                pad_id: int = 0) -> list[list[ContinuationScore]]:
    """Score every continuation of every unit in two forward passes (one when all are single tokens)."""
    decoder, embed = model.get_decoder(), model.get_input_embeddings()
    device = embed.weight.device
    n_prompt = prompts.shape[1] if prompts is not None else 0
    ctx_ids, ctx_mask = _pad_rows([u.context for u in units], max(len(u.context) for u in units), pad_id)
    ctx_len = ctx_mask.sum(1)  # (B,)
    if n_prompt:
        soft = prompts[[u.prompt for u in units]].to(device, embed.weight.dtype)  # (B, P, d)
        inputs = {"inputs_embeds": torch.cat([soft, embed(ctx_ids.to(device))], 1)}
        ctx_mask = torch.cat([torch.ones(len(units), n_prompt, dtype=torch.long), ctx_mask], 1)
    else:
        inputs = {"input_ids": ctx_ids.to(device)}
    out = decoder(**inputs, attention_mask=ctx_mask.to(device), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers >= 5.24 renamed it
    last = out.last_hidden_state[torch.arange(len(units)), n_prompt + ctx_len - 1]  # (B, d)
    first = _head_logprobs(model, last)  # (B, V)

    rows = [(b, c) for b, u in enumerate(units) for c in u.continuations]  # one row per continuation
    rest = _score_rest(decoder, model, cache, rows, ctx_mask, n_prompt + ctx_len, pad_id, device)
    first_lp, first_best = first.tolist(), first.argmax(1).tolist()
    scores: list[list[ContinuationScore]] = [[] for _ in units]
    for (b, cont), tail in zip(rows, rest, strict=True):
        loglik = first_lp[b][cont[0]] + sum(lp for lp, _ in tail)
        greedy = first_best[b] == cont[0] and all(best for _, best in tail)
        scores[b].append(ContinuationScore(loglik, greedy, len(cont)))
    return scores


def _cache_argument(decoder: nn.Module, cache) -> dict:
    """The keyword a decoder takes its key/value cache by: `cache` since transformers 5.24, before that
    `past_key_values`."""
    params = inspect.signature(decoder.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def _score_rest(decoder: nn.Module, model: nn.Module, cache, rows: list[tuple[int, tuple[int, ...]]],
                ctx_mask: torch.Tensor, prefix_len: torch.Tensor, pad_id: int, device) -> list[list[tuple[float, bool]]]:
    """Run tokens 1..n-1 of every continuation on the context cache: per row, (log-prob, is the argmax) of
    tokens 2..n."""
    width = max(len(c) for _, c in rows) - 1
    tails: list[list[tuple[float, bool]]] = [[] for _ in rows]
    if width == 0:
        return tails
    owner = torch.tensor([b for b, _ in rows])
    cache.batch_select_indices(owner.to(device))  # (B, ...) -> (rows, ...): one copy per continuation
    ids, mask = _pad_rows([c[:-1] for _, c in rows], width, pad_id)  # (rows, width)
    positions = prefix_len[owner].view(-1, 1) + torch.arange(width).view(1, -1)  # (rows, width)
    attention = torch.cat([ctx_mask[owner], mask], 1)
    hidden = decoder(input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
                     use_cache=True, **_cache_argument(decoder, cache)).last_hidden_state  # (rows, width, d)
    where = [(r, t) for r, (_, c) in enumerate(rows) for t in range(len(c) - 1)]
    logp = _head_logprobs(model, hidden[[r for r, _ in where], [t for _, t in where]])  # (n, V)
    targets = torch.tensor([rows[r][1][t + 1] for r, t in where], device=logp.device)  # (n,)
    picked = logp.gather(1, targets.view(-1, 1)).squeeze(1).tolist()
    is_best = (logp.argmax(1) == targets).tolist()
    for (r, _), lp, best in zip(where, picked, is_best, strict=True):
        tails[r].append((lp, best))
    return tails


def score_units(model: nn.Module, units: Sequence[ScoreUnit], batch_size: int, prompts: torch.Tensor | None = None,
                pad_id: int = 0, on_batch: Callable[[int], None] | None = None) -> list[list[ContinuationScore]]:
    """Score all units, longest first in batches of `batch_size` (padding stays small; an out-of-memory
    batch shows up first), returned in the input order."""
    order = sorted(range(len(units)), key=lambda i: -(len(units[i].context) + max(map(len, units[i].continuations))))
    results: list[list[ContinuationScore] | None] = [None] * len(units)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        for i, res in zip(chunk, score_batch(model, [units[i] for i in chunk], prompts, pad_id), strict=True):
            results[i] = res
        if on_batch:
            on_batch(len(chunk))
    return results  # type: ignore[return-value]
