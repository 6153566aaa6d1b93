"""Perplexity over a token stream, as GPTQ, SparseGPT and Wanda report it.

The text is tokenized whole, cut into non-overlapping windows of `seqlen` tokens (the tail that does not
fill a window is dropped), and ppl = exp(mean over windows of the window's mean next-token loss), which
is the reference `exp(sum(loss_i * seqlen) / (n * seqlen))`. The loss is computed from the final hidden
states through the output head in chunks, so no (T, vocab) float32 tensor is held for a whole window.
Perplexity is only comparable at the same window length and text joining: both are reported with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserError

HEAD_CHUNK = 512  # tokens whose logits are materialised at once


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    windows: int
    seqlen: int
    tokens_scored: int


def wikitext2_text(path: str) -> str:
    """WikiText-2 raw test as the reference loaders join it: non-empty lines joined by blank lines."""
    with open(path, encoding="utf-8") as f:
        return "\n\n".join(line.rstrip("\n") for line in f if line.strip())


SoftPrompts = Callable[[torch.Tensor], torch.Tensor]  # windows (B, T) -> the soft prompt of each, (B, P, d)


@torch.inference_mode()
def nll_sum(model: nn.Module, ids: torch.Tensor, first_target: int = 1, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of -log p(ids[:, t] | ids[:, :t]) over t >= first_target, behind the soft prompts soft (B, P, d)
    when given (the prompt adds context; the scored tokens stay the same). ids (B, T) -> (B,) float32"""
    if soft is None:
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d)
    else:
        embed = model.get_input_embeddings()
        x = torch.cat([soft.to(ids.device, embed.weight.dtype), embed(ids)], 1)  # (B, P + T, d)
        hidden = model.get_decoder()(inputs_embeds=x, use_cache=False).last_hidden_state[:, soft.shape[1]:]
    head = model.get_output_embeddings()
    total = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
    for s in range(first_target - 1, ids.shape[1] - 1, HEAD_CHUNK):
        e = min(s + HEAD_CHUNK, ids.shape[1] - 1)
        logits = head(hidden[:, s:e]).float()  # (B, chunk, V)
        targets = ids[:, s + 1:e + 1]  # (B, chunk)
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        total += nll.view(targets.shape).sum(1)
    return total


def window_nll(model: nn.Module, ids: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window. ids (B, T) -> (B,) float32"""
    return nll_sum(model, ids, soft=soft) / (ids.shape[1] - 1)


def sliding_perplexity(model: nn.Module, stream: torch.Tensor, seqlen: int, stride: int, limit: int | None = None,
                       on_windows: Callable[[torch.Tensor], None] | None = None) -> PerplexityResult:
    """Perplexity with overlapping windows: a window of `seqlen` tokens every `stride`, each scoring only the
    tokens no earlier window scored, so every token but the first is scored once with up to seqlen - 1
    tokens of context (the Hugging Face recipe). ppl = exp(total NLL / tokens scored)."""
    if not 0 < stride <= seqlen:
        raise UserError(f"--stride {stride}: must be between 1 and --seqlen {seqlen}")
    if stream.numel() < 2:
        raise UserError("the text has fewer than two tokens")
    device = next(model.parameters()).device
    total, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, stream.numel() - 1, stride):
        end = min(begin + seqlen, stream.numel())
        first = max(prev_end, begin + 1) - begin  # first target inside this window
        nll = nll_sum(model, stream[begin:end].view(1, -1).to(device), first).double().cpu()  # (1,)
        total, scored, windows, prev_end = total + nll.item(), scored + end - begin - first, windows + 1, end
        if on_windows:
            on_windows(nll / (end - begin - first))
        if end == stream.numel() or (limit is not None and windows >= limit):
            break
    mean = total / scored
    return PerplexityResult(math.inf if mean >= 700 else math.exp(mean), mean, windows, seqlen, scored)


def perplexity(model: nn.Module, stream: torch.Tensor, seqlen: int, limit: int | None = None,
               batch_size: int = 1, on_windows: Callable[[torch.Tensor], None] | None = None,
               prompts: SoftPrompts | None = None) -> PerplexityResult:
    """Perplexity of `stream` (N,) over its first `limit` non-overlapping windows (all when None), each
    window behind the soft prompt `prompts` gives it, if any."""
    n = stream.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise UserError(f"the text has {stream.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    windows = stream[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    nlls = []
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        soft = prompts(batch) if prompts else None
        nlls.append(window_nll(model, batch.to(device), soft).double().cpu())
        if on_windows:
            on_windows(nlls[-1])
    mean = torch.cat(nlls).mean().item()
    return PerplexityResult(math.inf if mean >= 700 else math.exp(mean), mean, n, seqlen, n * (seqlen - 1))
