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


@dataclass(frozen=True)
class Window:
    """stream[begin:end] through the model, scoring the targets from position `first` of the window on."""

    begin: int
    end: int
    first: int

    @property
    def scored(self) -> int:
        return self.end - self.begin - self.first


def plain_windows(n_tokens: int, seqlen: int, limit: int | None = None) -> list[Window]:
    """The first `limit` (all when None) non-overlapping windows of `seqlen` tokens; the tail is dropped."""
    n = n_tokens // seqlen if limit is None else min(n_tokens // seqlen, limit)
    if n == 0:
        raise UserError(f"the text has {n_tokens} tokens, fewer than one window of --seqlen {seqlen}")
    return [Window(i * seqlen, (i + 1) * seqlen, 1) for i in range(n)]


def sliding_windows(n_tokens: int, seqlen: int, stride: int, limit: int | None = None) -> list[Window]:
    """A window of `seqlen` tokens every `stride`, each scoring only the tokens no earlier window scored, so
    every token but the first is scored once with up to seqlen - 1 tokens of context (the Hugging Face recipe)."""
    if not 0 < stride <= seqlen:
        raise UserError(f"--stride {stride}: must be between 1 and --seqlen {seqlen}")
    if n_tokens < 2:
        raise UserError("the text has fewer than two tokens")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seqlen, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1) - begin))
        prev_end = end
        if end == n_tokens or (limit is not None and len(out) >= limit):
            break
    return out


def window_nll_sums(model: nn.Module, stream: torch.Tensor, windows: list[Window], batch_size: int = 1,
                    on_windows: Callable[[torch.Tensor], None] | None = None,
                    prompts: SoftPrompts | None = None) -> list[float]:
    """Summed NLL (float64) of each window's scored tokens; windows of one shape run `batch_size` at a time.
    `on_windows` gets each batch's mean NLL per window, (B,)."""
    device = next(model.parameters()).device
    sums: list[float] = []
    i = 0
    while i < len(windows):
        w = windows[i]
        j = i + 1
        while j < min(len(windows), i + batch_size) and (windows[j].end - windows[j].begin, windows[j].first) == \
                (w.end - w.begin, w.first):
            j += 1
        batch = torch.stack([stream[v.begin:v.end] for v in windows[i:j]])  # (B, T)
        soft = prompts(batch) if prompts else None
        nll = nll_sum(model, batch.to(device), w.first, soft).double().cpu()  # (B,)
        sums.extend(nll.tolist())
        if on_windows:
            on_windows(nll / w.scored)
        i = j
    return sums


def window_means(sums: list[float], windows: list[Window], sliding: bool) -> list[float]:
    """Each window's mean NLL per scored token: a non-overlapping window's float32 sum divided in float32 (as
    the reference scripts' per-window loss), a sliding window's in float64."""
    if sliding:
        return [s / w.scored for s, w in zip(sums, windows, strict=True)]
    return (torch.tensor(sums, dtype=torch.float32) / windows[0].scored).double().tolist()


def summarize(sums: list[float], windows: list[Window], seqlen: int, sliding: bool = False) -> PerplexityResult:
    """ppl = exp(mean NLL): over non-overlapping windows the mean of the window means (all windows score the
    same number of tokens), over sliding ones the total NLL / the tokens scored."""
    scored = sum(w.scored for w in windows)
    if sliding:
        mean = sum(sums) / scored
    else:
        mean = torch.tensor(window_means(sums, windows, False), dtype=torch.float64).mean().item()
    return PerplexityResult(math.inf if mean >= 700 else math.exp(mean), mean, len(windows), seqlen, scored)


def sliding_perplexity(model: nn.Module, stream: torch.Tensor, seqlen: int, stride: int, limit: int | None = None,
                       on_windows: Callable[[torch.Tensor], None] | None = None) -> PerplexityResult:
    """Perplexity with overlapping windows (sliding_windows), ppl = exp(total NLL / tokens scored)."""
    windows = sliding_windows(stream.numel(), seqlen, stride, limit)
    return summarize(window_nll_sums(model, stream, windows, 1, on_windows), windows, seqlen, sliding=True)


def perplexity(model: nn.Module, stream: torch.Tensor, seqlen: int, limit: int | None = None,
               batch_size: int = 1, on_windows: Callable[[torch.Tensor], None] | None = None,
               prompts: SoftPrompts | None = None) -> PerplexityResult:
    """Perplexity of `stream` (N,) over its first `limit` non-overlapping windows (all when None), each
    window behind the soft prompt `prompts` gives it, if any."""
    windows = plain_windows(stream.numel(), seqlen, limit)
    return summarize(window_nll_sums(model, stream, windows, batch_size, on_windows, prompts), windows, seqlen)
