"""Per-token vocabulary statistics in one program per token, streaming over vocabulary chunks.

Twin of rechannel.ops.align.vocab_stats.vocab_stats_torch (its COLUMNS, in that order; float32). Pass 1 is an online softmax
over both logit rows (running max and rescaled sum per lane, lanes combined at the end), pass 2 the sums that need the log-normalisers, pass 3
the norms centred through the observed token (see ops/align/vocab_stats.py for why). Nothing of size
[tokens, vocab] is written; logits are read in their own dtype and upcast per chunk.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _logs(zp_ptr, zq_ptr, row_p, row_q, cols, v, zp_y, zq_y, sp_p, sp_q):
    valid = cols < v
    lp = (tl.load(zp_ptr + row_p + cols, mask=valid, other=-float("inf")).to(tl.float32) - zp_y) - sp_p
    lq = (tl.load(zq_ptr + row_q + cols, mask=valid, other=-float("inf")).to(tl.float32) - zq_y) - sp_q
    return lp, lq, valid


@triton.jit
def _log1p(u):
    """log(1 + u) to full precision for small u (w - 1 is exact in floating point: Goldberg's trick)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _exp_diff(a, b):
    """exp(a - b), and 0 where a is -inf (a lane that has seen no token yet: -inf - -inf would be nan)."""
    return tl.where(a == -float("inf"), 0.0, tl.exp(a - b))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _log_mix(lp, lq, log_wp, log_wq):
    a = lp + log_wp
    b = lq + log_wq
    hi = tl.maximum(a, b)
    hi_safe = tl.where(hi == -float("inf"), 0.0, hi)
    return hi_safe + tl.log(tl.exp(a - hi_safe) + tl.exp(b - hi_safe))


@triton.jit
def _vocab_stats_kernel(zp_ptr, zq_ptr, y_ptr, out_ptr, v, stride_p, stride_q, log_wp, log_wq,
                        NCOL: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    row_p = t.to(tl.int64) * stride_p
    row_q = t.to(tl.int64) * stride_q
    offs = tl.arange(0, BLOCK)
    y = tl.load(y_ptr + t)
    zp_y = tl.load(zp_ptr + row_p + y).to(tl.float32)
    zq_y = tl.load(zq_ptr + row_q + y).to(tl.float32)
    # pass 1: online softmax over the tokens other than y, for both rows, lane by lane (vectors carried
    # through the loop, reduced once at the end)
    m_p = tl.full((BLOCK,), -float("inf"), tl.float32)
    m_q = tl.full((BLOCK,), -float("inf"), tl.float32)
    s_p = tl.zeros((BLOCK,), tl.float32)
    s_q = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, v, BLOCK):
        cols = start + offs
        other = (cols < v) & (cols != y)
        zp = tl.load(zp_ptr + row_p + cols, mask=other, other=-float("inf")).to(tl.float32)
        zq = tl.load(zq_ptr + row_q + cols, mask=other, other=-float("inf")).to(tl.float32)
        mp_new = tl.maximum(m_p, zp)
        mq_new = tl.maximum(m_q, zq)
        s_p = s_p * _exp_diff(m_p, mp_new) + _exp_diff(zp, mp_new)
        s_q = s_q * _exp_diff(m_q, mq_new) + _exp_diff(zq, mq_new)
        m_p = mp_new
        m_q = mq_new
    mp_all = tl.max(m_p, axis=0)
    mq_all = tl.max(m_q, axis=0)
    s_p_all = tl.sum(s_p * _exp_diff(m_p, mp_all), axis=0)
    s_q_all = tl.sum(s_q * _exp_diff(m_q, mq_all), axis=0)
    sp_p = _softplus(tl.log(s_p_all) + mp_all - zp_y)  # lse - z_y, exact when p_y is near 1 (ops/align/vocab_stats.py)
    sp_q = _softplus(tl.log(s_q_all) + mq_all - zq_y)
    lp_y = -sp_p
    lq_y = -sp_q
    a_rkl_y = lq_y - lp_y
    a_jsd_y = lp_y - _log_mix(lp_y, lq_y, log_wp, log_wq)
    # pass 2: sums that need the log-normalisers
    kl_pq = tl.zeros((BLOCK,), tl.float32)
    kl_pm = tl.zeros((BLOCK,), tl.float32)
    kl_qm = tl.zeros((BLOCK,), tl.float32)
    ent = tl.zeros((BLOCK,), tl.float32)
    p2 = tl.zeros((BLOCK,), tl.float32)
    dqp2 = tl.zeros((BLOCK,), tl.float32)
    p_rest = tl.zeros((BLOCK,), tl.float32)
    p2_rest = tl.zeros((BLOCK,), tl.float32)
    q_rest = tl.zeros((BLOCK,), tl.float32)
    b_rkl = tl.zeros((BLOCK,), tl.float32)
    b_jsd = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, v, BLOCK):
        cols = start + offs
        lp, lq, valid = _logs(zp_ptr, zq_ptr, row_p, row_q, cols, v, zp_y, zq_y, sp_p, sp_q)
        p = tl.where(valid, tl.exp(lp), 0.0)
        q = tl.where(valid, tl.exp(lq), 0.0)
        lp0 = tl.where(valid, lp, 0.0)
        lq0 = tl.where(valid, lq, 0.0)
        lm0 = tl.where(valid, _log_mix(lp, lq, log_wp, log_wq), 0.0)
        other = valid & (cols != y)
        po = tl.where(other, p, 0.0)
        kl_pq += p * (lp0 - lq0)
        kl_pm += p * (lp0 - lm0)
        kl_qm += q * (lq0 - lm0)
        ent -= p * lp0
        p2 += p * p
        qo = tl.where(other, q, 0.0)
        dqp2 += (qo - po) * (qo - po)  # the other tokens; y's term is added centred after the loop
        p_rest += po
        q_rest += qo
        p2_rest += po * p
        b_rkl += po * (lq0 - lp0 - a_rkl_y)
        b_jsd += po * (lp0 - lm0 - a_jsd_y)
    p_rest_t = tl.sum(p_rest, axis=0)
    dq_y = tl.sum(q_rest, axis=0) - p_rest_t  # p_y - q_y = (1 - q_y) - (1 - p_y), no difference of numbers near 1
    dqp2_t = tl.sum(dqp2, axis=0) + dq_y * dq_y
    b_rkl_t = tl.sum(b_rkl, axis=0)
    b_jsd_t = tl.sum(b_jsd, axis=0)
    # pass 3: norms centred through the observed token
    n_rkl = tl.zeros((BLOCK,), tl.float32)
    n_jsd = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, v, BLOCK):
        cols = start + offs
        lp, lq, valid = _logs(zp_ptr, zq_ptr, row_p, row_q, cols, v, zp_y, zq_y, sp_p, sp_q)
        other = valid & (cols != y)
        p = tl.where(other, tl.exp(lp), 0.0)
        lp0 = tl.where(other, lp, 0.0)
        lq0 = tl.where(other, lq, 0.0)
        lm0 = tl.where(other, _log_mix(lp, lq, log_wp, log_wq), 0.0)
        d_rkl = tl.where(other, lq0 - lp0 - a_rkl_y - b_rkl_t, 0.0)
        d_jsd = tl.where(other, lp0 - lm0 - a_jsd_y - b_jsd_t, 0.0)
        n_rkl += p * p * d_rkl * d_rkl
        n_jsd += p * p * d_jsd * d_jsd
    out = out_ptr + t * NCOL
    tl.store(out + 0, sp_p)
    tl.store(out + 1, sp_q)
    tl.store(out + 2, tl.sum(kl_pq, axis=0))
    tl.store(out + 3, tl.sum(kl_pm, axis=0))
    tl.store(out + 4, tl.sum(kl_qm, axis=0))
    tl.store(out + 5, tl.sum(ent, axis=0))
    tl.store(out + 6, tl.sum(p2, axis=0))
    tl.store(out + 7, dqp2_t)
    tl.store(out + 8, p_rest_t)
    tl.store(out + 9, tl.sum(p2_rest, axis=0))
    tl.store(out + 10, b_rkl_t)
    tl.store(out + 11, tl.sum(n_rkl, axis=0))
    tl.store(out + 12, b_jsd_t)
    tl.store(out + 13, tl.sum(n_jsd, axis=0))


NCOL = 14  # the columns the kernel writes, in the order of ops/align/vocab_stats.COLUMNS


def vocab_stats(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor, beta: float = 0.5,
                block: int = 2048, out: torch.Tensor | None = None) -> torch.Tensor:
    """(T, V) student logits, (T, V) teacher logits, (T,) tokens -> (T, NCOL) float32, into `out` if given."""
    t, v = zp.shape
    zp = zp if zp.stride(1) == 1 else zp.contiguous()
    zq = zq if zq.stride(1) == 1 else zq.contiguous()
    out = torch.empty(t, NCOL, dtype=torch.float32, device=zp.device) if out is None else out
    if t == 0:
        return out
    y = y.to(device=zp.device, dtype=torch.int64).contiguous()
    _vocab_stats_kernel[(t,)](zp, zq, y, out, v, zp.stride(0), zq.stride(0), math.log1p(-beta), math.log(beta),
                              NCOL=out.shape[1], BLOCK=min(block, triton.next_power_of_2(v)))
    return out
