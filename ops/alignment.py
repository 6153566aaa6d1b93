"""The per-node quantities of DESIGN.md's per-token diagnosis, in float64.

At a node the student's next-token distribution is p, a teacher's q, and S_k the estimated chance of success
after forcing candidate k. On the candidate set K (p and q renormalised on K):
  V = Σ p_k S_k,  g_ideal = p ⊙ (S − V),  teacher advantage TA = ⟨q − p, S⟩,
and the logit-space distillation gradients −∂D/∂z = p ⊙ (f − Σ p f), f = −∂D/∂p:
  reverse KL  p ⊙ (log q − log p + KL(p‖q)),   forward KL  q − p,
  JSD(β)      β p ⊙ (−log(p/m) + KL(p‖m)), m = βp + (1−β)q,   sampled token  A (e_y − p), A = log q_y − log p_y;
alignment = cosine(g_ideal, g). Over the whole vocabulary the distillation side uses the unnormalised p and q
with the norms from ops/vocab_stats (g_ideal is p_k (S_k − V) on K and zero elsewhere: S is only known on K).
A cosine with a zero vector (every candidate equally good, or q = p) is undefined and reported as None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rechannel.ops.vocab_stats import COL

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


def value_and_ideal(p: torch.Tensor, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    """V = Σ p S and g_ideal = p ⊙ (S − V) for a distribution p on K (already renormalised). When every S_k
    is the same, g_ideal is exactly zero (V computed in floating point would leave rounding noise in S − V,
    and a cosine with noise is not an alignment)."""
    v = float((p * s).sum())
    if bool(s.max() == s.min()):
        return float(s[0]), torch.zeros_like(p)
    return v, p * (s - v)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def gradients_on_k(p: torch.Tensor, q: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The four distillation gradients for distributions p, q on K (renormalised; index 0 is y)."""
    lp, lq = p.log(), q.log()
    m = beta * p + (1 - beta) * q
    e_y = torch.zeros_like(p)
    e_y[0] = 1.0
    return {
        "rkl": p * (lq - lp + kl(p, q)),
        "fkl": q - p,
        "jsd": beta * p * (-(lp - m.log()) + kl(p, m)),
        "sampled": float(lq[0] - lp[0]) * (e_y - p),
    }


def on_candidates(p: torch.Tensor, q: torch.Tensor, s: torch.Tensor, beta: float) -> dict:
    """Alignments and teacher advantage on K from full-vocabulary probabilities p, q on K and S."""
    p, q = p / p.sum(), q / q.sum()
    _, ideal = value_and_ideal(p, s)
    grads = gradients_on_k(p, q, beta)
    return {"align": {name: cosine(ideal, g) for name, g in grads.items()},
            "advantage": float(((q - p) * s).sum())}


def over_vocabulary(c: Candidates, lq: torch.Tensor, stats: torch.Tensor, beta: float) -> dict[str, float | None]:
    """Cosines of g_ideal (on K) with the full-vocabulary gradients, whose norms come from vocab_stats."""
    st = stats.double()
    p = c.lp.exp()  # (K,) unnormalised: the mass outside K is part of the full-vocabulary gradients
    v, flat = value_and_ideal(p / p.sum(), c.s)
    ideal = p * (c.s - v) if flat.any() else flat  # (K,) nonzero entries of the full-vocabulary g_ideal
    a_rkl = (lq - c.lp) - (lq[0] - c.lp[0]) - st[COL["b_rkl"]]  # a_k − ā, centred through y
    lm = torch.logaddexp(c.lp + math.log(beta), lq + math.log1p(-beta))
    a_jsd = (c.lp - lm) - (c.lp[0] - lm[0]) - st[COL["b_jsd"]]
    p_y = 1.0 - st[COL["p_rest"]]
    adv = float(lq[0] - c.lp[0])
    dots = {
        "rkl": (ideal * p * a_rkl).sum(),
        "fkl": (ideal * (lq.exp() - p)).sum(),
        "jsd": -beta * (ideal * p * a_jsd).sum(),
        "sampled": adv * (ideal[0] - (ideal * p).sum()),
    }
    norms2 = {
        "rkl": p_y ** 2 * st[COL["b_rkl"]] ** 2 + st[COL["n_rkl"]],
        "fkl": st[COL["sum_dqp2"]],
        "jsd": beta ** 2 * (p_y ** 2 * st[COL["b_jsd"]] ** 2 + st[COL["n_jsd"]]),
        "sampled": adv ** 2 * (st[COL["p_rest"]] ** 2 + st[COL["p2_rest"]]),
    }
    n_ideal = ideal.norm().item()
    return {name: _ratio(float(dots[name]), n_ideal * math.sqrt(max(float(norms2[name]), 0.0)))
            for name in GRADIENTS}


def _ratio(dot: float, norm: float) -> float | None:
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return max(-1.0, min(1.0, dot / norm))  # float32 norms can leave a cosine a hair outside [-1, 1]
