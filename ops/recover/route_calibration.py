"""Calibrated attention routing: a prompt's raw attention mass mixes how well it fits an input with how much
it draws attention in general, so the raw argmax tends to send every input to the one loudest prompt.

After training, a bank stores each row's score statistics on each source's texts: `score_mean`,
`score_std` (S, M), row m's mean and standard deviation of its attention score over source s's texts. Rules
(raw scores x (B, M)):

    auto      centroid where the bank's statistics fit the routing layers, else none
    none      argmax_m x_m                                   (the published rule)
    ratio     argmax_m x_m / mean[own(m), m]                 (relative to its own training data)
    zscore    argmax_m (x_m - mu_m) / sd_m                   (mu, sd over all sources, each weighted equally)
    centroid  the source s maximising the diagonal-Gaussian log-likelihood of the whole score vector,
              sum_m -((x_m - mean[s,m]) / std[s,m])^2 / 2 - log std[s,m]; then the row of s with the
              highest raw score (the highest raw score overall when no row was trained on s)

`centroid` reads the pattern of all M scores, not one prompt's, which is what lets it tell sources apart when
one prompt is loud on every input.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..core.errors import UserError, unknown_choice

CALIBRATIONS = ("auto", "none", "ratio", "zscore", "centroid")
AUTO = "centroid"  # what `auto` means when the bank has statistics read on the routing layers (else none)
STATS_TEXTS = 64  # texts per source whose scores the statistics are taken over
MIN_STD = 1e-6  # a floor on standard deviations (a row scoring the same on every text)


def source_score_stats(model, tokenizer, kv, texts: Sequence[Sequence[str]], layers: Sequence[int],
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (S, M): the attention score of every bank row over up to STATS_TEXTS texts of each
    source (drawn with `seed`, each read as routing reads an input: its first ROUTE_TOKENS tokens)."""
    from .routing import route_rows, routing_ids

    means, stds = [], []
    for source_texts in texts:
        picked = random.Random(seed).sample(list(source_texts), min(STATS_TEXTS, len(source_texts)))
        rows = routing_ids(tokenizer, picked)
        scores = torch.tensor([sc for _, sc in route_rows(model, kv, rows, "attention", layers,
                                                          pad_id=tokenizer.pad_token_id or 0)])  # (n, M)
        means.append(scores.mean(0))
        stds.append(scores.std(0, correction=0) if len(scores) > 1 else torch.zeros_like(scores[0]))
    return torch.stack(means), torch.stack(stds)


def resolve_calibration(rule: str, mean: torch.Tensor | None, bank_layers: Sequence[int] | None,
                        layers: Sequence[int]) -> str:
    """The rule routing applies: `auto` is AUTO where the bank's statistics fit (they exist and were read on
    the routing layers), else none; an explicit rule the bank cannot serve is refused."""
    if rule not in CALIBRATIONS:
        raise unknown_choice("calibration", rule, CALIBRATIONS)
    same_layers = bank_layers is None or list(bank_layers) == list(layers)
    if rule == "auto":
        return AUTO if mean is not None and same_layers else "none"
    if rule != "none" and mean is None:
        raise UserError(f"--calibration {rule}: the bank stores no score statistics (trained by an older "
                        "rechannel, or with one prompt); use --calibration none")
    if rule != "none" and not same_layers:
        raise UserError(f"--calibration {rule}: the bank's statistics were read on layers {list(bank_layers)}, "
                        f"routing reads {list(layers)}; route on the same --layers or use --calibration none")
    return rule


def own_rows(row_sources: Sequence[str], stat_sources: Sequence[str]) -> list[list[int]]:
    """For each statistics source, the bank rows trained on it."""
    return [[m for m, name in enumerate(row_sources) if name == s] for s in stat_sources]


def choose(scores: torch.Tensor, rule: str, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
           rows_of: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """(B,) chosen rows for raw scores (B, M) under `rule`; mean, std (S, M) and rows_of (the rows trained on
    each of the S sources) come from the bank."""
    if rule == "none":
        return scores.argmax(1)
    scores = scores.double()
    mean, std = mean.double(), std.double().clamp_min(MIN_STD)
    if rule == "zscore":
        mu = mean.mean(0)  # (M,)
        sd = ((std ** 2 + mean ** 2).mean(0) - mu ** 2).clamp_min(MIN_STD ** 2).sqrt()
        return ((scores - mu) / sd).argmax(1)
    if rule == "ratio":
        own = torch.stack([_own_mean(mean, rows_of, m) for m in range(scores.shape[1])])  # (M,)
        return (scores / own.clamp_min(MIN_STD)).argmax(1)
    loglik = (-0.5 * ((scores[:, None, :] - mean) / std) ** 2 - std.log()).sum(-1)  # (B, S)
    source = loglik.argmax(1)
    out = scores.argmax(1)
    for b, s in enumerate(source.tolist()):
        if rows_of and rows_of[s]:
            out[b] = rows_of[s][int(scores[b, rows_of[s]].argmax())]
    return out


def _own_mean(mean: torch.Tensor, rows_of: Sequence[Sequence[int]], m: int) -> torch.Tensor:
    """Row m's mean score over the sources it was trained on (all of them for a pooled row)."""
    mine = [s for s, rows in enumerate(rows_of) if m in rows]
    return mean[mine or list(range(mean.shape[0])), m].mean()
