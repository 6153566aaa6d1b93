"""The per-node quantities of DESIGN.md's per-token diagnosis, in float64.

At a node the student's next-token distribution is p, a teacher's q, and S_k the estimated chance of success
after forcing candidate k. On the candidate set K (p and q renormalised on K):
  V = Σ p_k S_k,  g_ideal = p ⊙ (S − V),  teacher advantage TA = ⟨q − p, S⟩,
and the logit-space distillation gradients −∂D/∂z = p ⊙ (f − Σ p f), f = −∂D/∂p:
  reverse KL  p ⊙ (log q − log p + KL(p‖q)),   forward KL  q − p,
  JSD(β)      (1−β) p ⊙ (−log(p/m) + KL(p‖m)), m = (1−β)p + βq (β the teacher's weight, as in GKD and TRL:
              β → 0 is forward KL, β → 1 reverse KL, to first order),   sampled token  A (e_y − p),
              A = log q_y − log p_y over the full vocabulary;
alignment = cosine(g_ideal, g). Over the whole vocabulary the distillation side uses the unnormalised p and q
with the norms from ops/vocab_stats (g_ideal is p_k (S_k − V) on K and zero elsewhere: S is only known on K).
A cosine with a zero vector (every candidate equally good, or q = p) is undefined and reported as None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .vocab_stats import COL

GRADIENTS = ("rkl", "fkl", "jsd", "sampled")


@dataclass(frozen=True)
class Candidates:
    """The candidate set K at one node; index 0 is the observed token y."""

    tokens: list[int]
    lp: torch.Tensor  # (K,) float64: full-vocabulary log p of each candidate
    s: torch.Tensor  # (K,) float64: estimated success probability after forcing it


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 or nb == 0.0 or not math.isfinite(na * nb):
        return None
    return float((a @ b).item() / (na * nb))


def log_on_k(lp: torch.Tensor) -> torch.Tensor:
    """(K,) full-vocabulary log-probabilities -> the log-probabilities renormalised on K (finite even where
    the probability underflows to 0, so log q − log p never meets −inf)."""
    return lp - torch.logsumexp(lp, 0)


def on_k(lp: torch.Tensor) -> torch.Tensor:
    """(K,) full-vocabulary log-probabilities -> the probabilities renormalised on K."""
    return log_on_k(lp).exp()


def deviation(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a − Σ p a on K, computed through y (index 0) as (a_k − a_y) − Σ_{j≠y} p_j (a_j − a_y).

    Exact when p_y is near 1: the naive form subtracts two numbers both near a_y, and at p_y = 1 − 1e-17
    leaves nothing of the other tokens' pull (a cosine of rounding noise)."""
    d = a - a[0]
    return d - (p[1:] * d[1:]).sum()


def centred(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """p ⊙ (a − Σ p a): the logit-space gradient of Σ p a (see deviation)."""
    return p * deviation(p, a)


def value_and_ideal(p: torch.Tensor, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    """V = Σ p S and g_ideal = p ⊙ (S − V) for p renormalised on K, both through y (see centred). When
    every S_k is the same, g_ideal is exactly zero: a cosine with it is undefined, not 0."""
    if bool(s.max() == s.min()):
        return float(s[0]), torch.zeros_like(p)
    return float(s[0] + (p[1:] * (s[1:] - s[0])).sum()), centred(p, s)


def gradients_on_k(p: torch.Tensor, q: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor, adv: float,
                   beta: float) -> dict[str, torch.Tensor]:
    """The four distillation gradients on K: p, q renormalised there, lp, lq their logs, adv the sampled
    token's A = log q_y − log p_y over the full vocabulary (renormalising would shift it by a constant and
    could flip its sign). 1 − p_y and q_y − p_y are taken as sums over the other candidates."""
    lm = torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
    fkl = q - p
    fkl[0] = (p[1:] - q[1:]).sum()
    sampled = -adv * p
    sampled[0] = adv * p[1:].sum()
    return {"rkl": centred(p, lq - lp), "fkl": fkl, "jsd": (1 - beta) * centred(p, lm - lp), "sampled": sampled}


def on_candidates(lp: torch.Tensor, lq: torch.Tensor, s: torch.Tensor, beta: float) -> dict:
    """Alignments and teacher advantage on K from the full-vocabulary log-probabilities of the candidates
    (index 0 is y) and their S."""
    lpk, lqk = log_on_k(lp), log_on_k(lq)
    p, q = lpk.exp(), lqk.exp()
    _, ideal = value_and_ideal(p, s)
    grads = gradients_on_k(p, q, lpk, lqk, float(lq[0] - lp[0]), beta)
    return {"align": {name: cosine(ideal, g) for name, g in grads.items()},
            "advantage": float(((q[1:] - p[1:]) * (s[1:] - s[0])).sum())}  # ⟨q − p, S⟩: Σ (q − p) = 0 on K


def over_vocabulary(c: Candidates, lq: torch.Tensor, stats: torch.Tensor, beta: float) -> dict[str, float | None]:
    """Cosines of g_ideal (on K) with the full-vocabulary gradients, whose norms come from vocab_stats."""
    st = stats.double()
    p = c.lp.exp()  # (K,) unnormalised: the mass outside K is part of the full-vocabulary gradients
    flat = bool(c.s.max() == c.s.min())
    ideal = torch.zeros_like(p) if flat else p * deviation(on_k(c.lp), c.s)  # (K,) p_k (S_k − V), V on K
    a_rkl = (lq - c.lp) - (lq[0] - c.lp[0]) - st[COL["b_rkl"]]  # a_k − ā, centred through y
    lm = torch.logaddexp(c.lp + math.log1p(-beta), lq + math.log(beta))
    a_jsd = (c.lp - lm) - (c.lp[0] - lm[0]) - st[COL["b_jsd"]]
    p_rest = st[COL["p_rest"]]  # 1 − p_y as the kernel sums it, over the other tokens
    p_y = 1.0 - p_rest
    adv = float(lq[0] - c.lp[0])
    dq = lq.exp() - p  # (K,) q − p; at y, (1 − p_y) − (1 − q_y)
    dq[0] = p_rest - (-torch.expm1(lq[0]))
    dots = {
        "rkl": (ideal * p * a_rkl).sum(),
        "fkl": (ideal * dq).sum(),
        "jsd": -(1 - beta) * (ideal * p * a_jsd).sum(),
        "sampled": adv * (ideal[0] * p_rest - (ideal[1:] * p[1:]).sum()),  # ⟨g_ideal, A (e_y − p)⟩
    }
    norms2 = {
        "rkl": p_y ** 2 * st[COL["b_rkl"]] ** 2 + st[COL["n_rkl"]],
        "fkl": st[COL["sum_dqp2"]],
        "jsd": (1 - beta) ** 2 * (p_y ** 2 * st[COL["b_jsd"]] ** 2 + st[COL["n_jsd"]]),
        "sampled": adv ** 2 * (st[COL["p_rest"]] ** 2 + st[COL["p2_rest"]]),
    }
    n_ideal = ideal.norm().item()
    return {name: _ratio(float(dots[name]), n_ideal * math.sqrt(max(float(norms2[name]), 0.0)))
            for name in GRADIENTS}


def _ratio(dot: float, norm: float) -> float | None:
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return max(-1.0, min(1.0, dot / norm))  # float32 norms can leave a cosine a hair outside [-1, 1]
