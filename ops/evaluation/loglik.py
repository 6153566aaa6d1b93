"""Log-likelihood of continuations, with what an example's requests share computed once.

lm-evaluation-harness scores a multiple-choice example by running context+choice once per choice. Here the
longest token prefix shared by all of an example's requests (the context, for ordinary multiple choice;
the words before the blank, for WinoGrande's partial scoring) runs once, right-padded in a batch of
examples, keeping its keys and values; the cache rows are then repeated once per request and all the
remaining tokens of the batch run together on top of it. A continuation token that directly follows the
prefix is predicted by the prefix's last position, so one-token choices (yes/no, A-E) need no second pass
at all. Only positions that predict a scored token go through the output head.

Tokens are split as lm-evaluation-harness splits them (`encode_pair`), so the numbers agree with it.
An optional soft prompt (P, d) is placed in front of each prefix as input embeddings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.batching import pad_rows
from ..core.kvcache import cache_keyword, returned_cache


@dataclass(frozen=True)
class ScoreUnit:
    """A token prefix run once, and the rows that continue it: row i is `suffixes[i]`, of which the last
    `scored[i]` tokens are the continuation being scored."""

    prefix: tuple[int, ...]  # non-empty
    suffixes: tuple[tuple[int, ...], ...]  # each non-empty
    scored: tuple[int, ...]  # 1 <= scored[i] <= len(suffixes[i])
    prompt: int | None = None  # row of the prompt bank to prepend, None for no soft prompt


def share_prefix(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], prompt: int | None = None
                 ) -> tuple[list[ScoreUnit], list[tuple[int, int]]]:
    """Units for one example's (context ids, continuation ids) requests, and where each request went
    (unit, row). The shared prefix never reaches into a continuation; when the contexts differ from the
    first token on, each request is its own unit."""
    seqs = [tuple(c) + tuple(k) for c, k in pairs]
    limit = min(len(c) for c, _ in pairs)
    common = 0
    while common < limit and all(s[common] == seqs[0][common] for s in seqs):
        common += 1
    if common == 0:
        units = [ScoreUnit(tuple(c), (tuple(k),), (len(k),), prompt) for c, k in pairs]
        return units, [(i, 0) for i in range(len(pairs))]
    unit = ScoreUnit(seqs[0][:common], tuple(s[common:] for s in seqs), tuple(len(k) for _, k in pairs), prompt)
    return [unit], [(0, i) for i in range(len(pairs))]


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


@torch.inference_mode()
def score_batch(model: nn.Module, units: Sequence[ScoreUnit], prompts: torch.Tensor | None = None,
                pad_id: int = 0) -> list[list[ContinuationScore]]:
    """Score every row of every unit in two forward passes (one when no row needs more than its first token)."""
    decoder, embed = model.get_decoder(), model.get_input_embeddings()
    device = embed.weight.device
    n_prompt = prompts.shape[1] if prompts is not None else 0
    ids, mask = pad_rows([u.prefix for u in units], max(len(u.prefix) for u in units), pad_id)  # (B, Lp)
    prefix_len = mask.sum(1) + n_prompt  # (B,)
    if n_prompt:
        soft = prompts[[u.prompt for u in units]].to(device, embed.weight.dtype)  # (B, P, d)
        inputs = {"inputs_embeds": torch.cat([soft, embed(ids.to(device))], 1)}
        mask = torch.cat([torch.ones(len(units), n_prompt, dtype=torch.long), mask], 1)
    else:
        inputs = {"input_ids": ids.to(device)}
    out = decoder(**inputs, attention_mask=mask.to(device), use_cache=True)
    cache = returned_cache(out)
    rows = [(b, suffix, n) for b, u in enumerate(units) for suffix, n in zip(u.suffixes, u.scored, strict=True)]
    # token j of a suffix is predicted by the prefix's last position (j = 0) or by suffix position j - 1
    heads = [(r, b, suffix[0]) for r, (b, suffix, n) in enumerate(rows) if n == len(suffix)]
    owners = torch.tensor([b for _, b, _ in heads], dtype=torch.long)
    last = out.last_hidden_state[owners.to(device), (prefix_len[owners] - 1).to(device)]  # (heads, d)
    picks = _pick(model, last, [t for _, _, t in heads])
    tails = _score_suffixes(decoder, model, cache, rows, _Prefixes(mask, prefix_len, pad_id, device))
    for (r, _, _), pick in zip(heads, picks, strict=True):
        tails[r].insert(0, pick)
    scores: list[list[ContinuationScore]] = [[] for _ in units]
    for (b, _, n), tail in zip(rows, tails, strict=True):
        scores[b].append(ContinuationScore(sum(lp for lp, _ in tail), all(best for _, best in tail), n))
    return scores


def _pick(model: nn.Module, hidden: torch.Tensor, targets: Sequence[int]) -> list[tuple[float, bool]]:
    """(log-prob of each target, is it the argmax) from the hidden states that predict them. hidden (n, d)"""
    if not targets:
        return []
    logp = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)  # (n, V)
    t = torch.tensor(list(targets), device=logp.device).view(-1, 1)
    return list(zip(logp.gather(1, t).squeeze(1).tolist(), (logp.argmax(1) == t.squeeze(1)).tolist(), strict=True))


PAD_SLACK = 1.25  # a group of suffixes may hold at most this many padded tokens per real one


def width_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest member wastes little: shortest first,
    a new group whenever the padded size would exceed PAD_SLACK times the real tokens."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and lengths[i] * (len(groups[-1]) + 1) <= PAD_SLACK * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


@dataclass(frozen=True)
class _Prefixes:
    """The batch's prefixes, as the suffixes run on top of their cache: attention mask (B, P + Lp) of soft
    prompt and prefix tokens, real lengths (B,) counting the soft prompt, the pad id, and the model's device."""

    mask: torch.Tensor
    lengths: torch.Tensor
    pad_id: int
    device: torch.device


def _score_suffixes(decoder: nn.Module, model: nn.Module, cache, rows: list[tuple[int, tuple[int, ...], int]],
                    prefixes: _Prefixes) -> list[list[tuple[float, bool]]]:
    """Run every suffix but its last token on its prefix's cache, in groups of similar length; per row,
    (log-prob, is the argmax) of the scored suffix tokens after the first."""
    tails: list[list[tuple[float, bool]]] = [[] for _ in rows]
    todo = [r for r, (_, suffix, _) in enumerate(rows) if len(suffix) > 1]
    groups = width_groups([len(rows[r][1]) - 1 for r in todo])
    for g, members in enumerate(groups):
        group = [todo[i] for i in members]
        group_cache = cache if g == len(groups) - 1 else copy.deepcopy(cache)  # each forward extends its cache
        _score_group(decoder, model, group_cache, rows, group, prefixes, tails)
    return tails


def _score_group(decoder: nn.Module, model: nn.Module, cache, rows: list[tuple[int, tuple[int, ...], int]],
                 group: list[int], prefixes: _Prefixes, tails: list[list[tuple[float, bool]]]) -> None:
    """One group of suffixes (rows of `rows`) in one forward pass on a copy of their prefixes' cache rows;
    appends each row's scored (log-prob, is the argmax) to `tails`."""
    device = prefixes.device
    width = max(len(rows[r][1]) for r in group) - 1
    owner = torch.tensor([rows[r][0] for r in group])
    cache.batch_select_indices(owner.to(device))  # (B, ...) -> (group, ...): one copy of the prefix per row
    ids, mask = pad_rows([rows[r][1][:-1] for r in group], width, prefixes.pad_id)  # (group, width)
    positions = prefixes.lengths[owner].view(-1, 1) + torch.arange(width).view(1, -1)  # (group, width)
    attention = torch.cat([prefixes.mask[owner], mask], 1)
    hidden = decoder(input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
                     use_cache=True, **cache_keyword(decoder, cache)).last_hidden_state  # (group, width, d)
    where = [(i, r, j) for i, r in enumerate(group) for j in range(max(1, len(rows[r][1]) - rows[r][2]), len(rows[r][1]))]
    picks = _pick(model, hidden[[i for i, _, _ in where], [j - 1 for _, _, j in where]],
                  [rows[r][1][j] for _, r, j in where])
    for (_, r, _), pick in zip(where, picks, strict=True):
        tails[r].append(pick)


def _batches(units: Sequence[ScoreUnit], order: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive runs of `order` (longest first) of at most `batch_size` units and, with `max_tokens`, at
    most that many padded prefix+suffix tokens (a single unit may exceed it alone)."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (
                max_tokens is None or (len(batches[-1]) + 1) * _length(units[batches[-1][0]]) <= max_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _length(unit: ScoreUnit) -> int:
    return len(unit.prefix) + max(map(len, unit.suffixes))


def score_units(model: nn.Module, units: Sequence[ScoreUnit], batch_size: int, prompts: torch.Tensor | None = None,
                pad_id: int = 0, on_batch: Callable[[int], None] | None = None,
                max_tokens: int | None = None) -> list[list[ContinuationScore]]:
    """Score all units, longest first in batches of at most `batch_size` units (and `max_tokens` padded
    tokens: on a CPU, long sequences run faster in small batches), returned in the input order. Longest
    first keeps padding small and makes an oversized batch fail at once."""
    order = sorted(range(len(units)), key=lambda i: -_length(units[i]))
    results: list[list[ContinuationScore] | None] = [None] * len(units)
    for chunk in _batches(units, order, batch_size, max_tokens):
        for i, res in zip(chunk, score_batch(model, [units[i] for i in chunk], prompts, pad_id), strict=True):
            results[i] = res
        if on_batch:
            on_batch(len(chunk))
    return results  # type: ignore[return-value]
