"""Per-token statistics of a student distribution p and a teacher distribution q over the whole vocabulary.

`align` needs, at every node, KL(p‖q), the entropy of p, the Jensen-Shannon divergence, and the norms of the
full-vocabulary distillation gradients (reverse KL, forward KL, JSD(β), sampled token) so that their cosine
with the ideal gradient can be taken. A [tokens, vocab] float32 probability tensor is 0.6 GB for 1k tokens of
a 152k vocabulary, so everything here streams over vocabulary chunks: pass 1 finds the log-normalisers
(online softmax), pass 2 the sums that need them, pass 3 the centred norms that need pass 2's means.
Log-probabilities are taken relative to the observed token's logit: log p_k = (z_k - z_y) - (lse - z_y).

Exactness when the observed token y has p_y near 1: a gradient p ⊙ (a − Σ p a) is centred through y,
a_k − ā = b_k − B with b_k = a_k − a_y and B = Σ_{k≠y} p_k b_k (a sum over the other tokens only), and
1 − p_y is Σ_{k≠y} p_k; no quantity is formed as a difference of two numbers near 1.

Twin of rechannel.triton_kernels.vocab_stats.vocab_stats (same columns, float32).
"""

from __future__ import annotations

import math

import torch

from ..core.dispatch import kernels, use_triton

# Output columns, one row per token (float32).
COLUMNS = (
    "lnorm_p", "lnorm_q",  # log-normalisers relative to the observed token: lse(z) - z_y (log p_y = -lnorm_p)
    "kl_pq",  # KL(p‖q)
    "kl_pm", "kl_qm",  # KL(p‖m), KL(q‖m) with m = βp + (1-β)q
    "entropy_p",  # -Σ p log p
    "sum_p2",  # Σ p²
    "sum_dqp2",  # Σ (q - p)²: the squared norm of the forward-KL gradient (y's term from the sums over the others)
    "p_rest", "p2_rest",  # Σ_{k≠y} p_k, Σ_{k≠y} p_k²
    "b_rkl", "n_rkl",  # reverse KL, a = log q - log p: B = Σ_{k≠y} p_k (a_k - a_y); Σ_{k≠y} p_k² (a_k - a_y - B)²
    "b_jsd", "n_jsd",  # JSD, a = log p - log m: the same two sums
)
COL = {name: i for i, name in enumerate(COLUMNS)}
CHUNK = 8192  # vocabulary columns per step of the torch path


def vocab_stats(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """(T, V) student logits, (T, V) teacher logits, (T,) observed tokens -> (T, len(COLUMNS)) float32."""
    _check(zp, zq, y, beta)
    if use_triton(zp):
        out = torch.empty(zp.shape[0], len(COLUMNS), dtype=torch.float32, device=zp.device)
        return kernels("vocab_stats").vocab_stats(zp, zq, y, beta, out=out)
    return vocab_stats_torch(zp, zq, y, beta)


def _check(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor, beta: float) -> None:
    if zp.shape != zq.shape or zp.dim() != 2 or y.shape != zp.shape[:1]:
        raise ValueError(f"logits {tuple(zp.shape)} and {tuple(zq.shape)}, tokens {tuple(y.shape)} do not match")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")


def _chunks(v: int):
    for start in range(0, v, CHUNK):
        yield slice(start, min(start + CHUNK, v))


def vocab_stats_torch(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """The plain-torch path: the same three passes, one chunk of the vocabulary at a time."""
    t, v = zp.shape
    rows = torch.arange(t, device=zp.device)
    zp_y, zq_y = zp[rows, y].float(), zq[rows, y].float()  # (T,): the anchors log p and log q are taken from
    sp_p, sp_q = _log_normaliser(zp, y, zp_y), _log_normaliser(zq, y, zq_y)  # (T,): lse - z_y
    lp_y, lq_y = -sp_p, -sp_q
    lm_y = _log_mix(lp_y, lq_y, beta)
    a_rkl_y, a_jsd_y = lq_y - lp_y, lp_y - lm_y
    anchors = (zp_y, zq_y, sp_p, sp_q)
    sums = torch.zeros(t, 11, device=zp.device)  # kl_pq kl_pm kl_qm ent sum_p2 dqp2 p_rest p2_rest b_rkl b_jsd q_rest
    for cols in _chunks(v):
        lp, lq, other = _chunk_logs(zp, zq, y, anchors, cols)  # (T, C) each
        p, q = lp.exp(), lq.exp()
        lm = _log_mix(lp, lq, beta)
        po, qo = p * other, q * other
        sums += torch.stack([
            (p * (lp - lq)).sum(1), (p * (lp - lm)).sum(1), (q * (lq - lm)).sum(1), -(p * lp).sum(1),
            (p * p).sum(1), ((qo - po) ** 2).sum(1), po.sum(1), (po * p).sum(1),
            (po * (lq - lp - a_rkl_y[:, None])).sum(1), (po * (lp - lm - a_jsd_y[:, None])).sum(1), qo.sum(1),
        ], 1)
    sums[:, 5] += (sums[:, 10] - sums[:, 6]) ** 2  # y's (q_y - p_y)², as (1 - p_y) - (1 - q_y): centred
    b_rkl, b_jsd = sums[:, 8], sums[:, 9]
    norms = torch.zeros(t, 2, device=zp.device)
    for cols in _chunks(v):
        lp, lq, other = _chunk_logs(zp, zq, y, anchors, cols)
        p2o = lp.exp() ** 2 * other
        lm = _log_mix(lp, lq, beta)
        norms += torch.stack([
            (p2o * (lq - lp - a_rkl_y[:, None] - b_rkl[:, None]) ** 2).sum(1),
            (p2o * (lp - lm - a_jsd_y[:, None] - b_jsd[:, None]) ** 2).sum(1),
        ], 1)
    lnorm = torch.stack([sp_p, sp_q], 1)
    return torch.cat([lnorm, sums[:, :8], b_rkl[:, None], norms[:, :1], b_jsd[:, None], norms[:, 1:]], 1)


def _log_normaliser(z: torch.Tensor, y: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
    """Pass 1, lse(z) - z_y = softplus(log Σ_{k≠y} exp(z_k - z_y)), by an online softmax over the other tokens.

    Taken relative to the observed token's logit so that log p_y = -softplus(...) keeps its digits when p_y is
    near 1 (lse - z_y in float32 would be rounding noise of the size of the logits)."""
    t = z.shape[0]
    m = torch.full((t,), -math.inf, device=z.device)
    s = torch.zeros(t, device=z.device)  # Σ_{k≠y} exp(z_k - m)
    for cols in _chunks(z.shape[1]):
        c = z[:, cols].float()  # (T, C)
        ids = torch.arange(cols.start, cols.stop, device=z.device)
        m_new = torch.maximum(m, c.amax(1))
        e = torch.exp(c - m_new[:, None]).masked_fill(ids[None, :] == y[:, None], 0.0)
        s = s * torch.exp(m - m_new) + e.sum(1)
        m = m_new
    return torch.nn.functional.softplus(s.log() + m - z_y)


def _chunk_logs(zp, zq, y, anchors, cols: slice):
    """log p, log q on one chunk of columns, and a 0/1 mask of the columns that are not the observed token."""
    zp_y, zq_y, sp_p, sp_q = anchors
    lp = (zp[:, cols].float() - zp_y[:, None]) - sp_p[:, None]  # (T, C)
    lq = (zq[:, cols].float() - zq_y[:, None]) - sp_q[:, None]
    ids = torch.arange(cols.start, cols.stop, device=zp.device)
    other = (ids[None, :] != y[:, None]).float()
    return lp, lq, other


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """log m, m = (1-β) p + β q (β the teacher's weight, as in GKD), from log p and log q in log space."""
    return torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
