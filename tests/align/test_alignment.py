"""The per-node quantities against a hand-computed case and against autograd in float64.

Each distillation gradient is, by DESIGN.md's definition, −∂D(softmax(z), q)/∂z and g_ideal is
∂(Σ_k softmax(z)_k S_k)/∂z: autograd computes both without any of the closed forms under test.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rechannel.ops.align.alignment import Candidates, on_candidates, over_vocabulary
from rechannel.ops.align.diagnosis import choose_nodes, depth_windows
from rechannel.ops.align.summary import describe
from rechannel.ops.align.vocab_stats import vocab_stats_torch

BETA = 0.4


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_hand_built_case():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    s = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    out = on_candidates(p.log(), q.log(), s, BETA)
    # 1e-12 below: float64 on 3 terms of magnitude ≤ 1 (through log, exp and decimal constants): a few u64
    # V = 0.3 + 0.1 = 0.4; g_ideal = (-0.2, 0.18, 0.02); forward KL: q - p = (-0.3, 0.2, 0.1)
    assert out["align"]["fkl"] == pytest.approx(0.098 / (math.sqrt(0.0728) * math.sqrt(0.14)), abs=1e-12)
    assert out["advantage"] == pytest.approx(0.25, abs=1e-12)  # ⟨q - p, S⟩ = 0 + 0.2 + 0.05
    kl = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    g_rkl = [pk * (math.log(qk) - math.log(pk) + kl) for pk, qk in zip([0.5, 0.3, 0.2], [0.2, 0.5, 0.3], strict=True)]
    ideal = [-0.2, 0.18, 0.02]
    want = sum(a * b for a, b in zip(ideal, g_rkl, strict=True)) / (math.hypot(*ideal) * math.hypot(*g_rkl))
    assert out["align"]["rkl"] == pytest.approx(want, abs=1e-12)
    # sampled token y = index 0: A = log(0.2 / 0.5) < 0, g = A (e_0 - p) = A (0.5, -0.3, -0.2)
    e = [0.5, -0.3, -0.2]
    want_tok = -sum(a * b for a, b in zip(ideal, e, strict=True)) / (math.hypot(*ideal) * math.hypot(*e))
    assert out["align"]["sampled"] == pytest.approx(want_tok, abs=1e-12)


def test_equal_success_or_teacher_equal_to_student_is_undefined():
    p = torch.tensor([0.6, 0.4], dtype=torch.float64)
    flat = on_candidates(p.log(), torch.tensor([0.1, 0.9], dtype=torch.float64).log(), torch.tensor([1.0, 1.0]).double(),
                         BETA)
    assert all(v is None for v in flat["align"].values())
    p2 = torch.tensor([0.1, 0.3], dtype=torch.float64)  # renormalised, Σ p S = 0.49999999999999994, not 0.5
    noisy = on_candidates(p2.log(), p2.flip(0).log(), torch.full((2,), 0.5, dtype=torch.float64), BETA)
    assert all(v is None for v in noisy["align"].values())
    same = on_candidates(p.log(), p.log(), torch.tensor([0.0, 1.0]).double(), BETA)
    assert same["align"]["fkl"] is None and same["align"]["rkl"] is None and same["advantage"] == 0.0


def _autograd_gradients(zp: torch.Tensor, q: torch.Tensor, s: torch.Tensor, y: int,
                        adv: float | None = None) -> dict[str, torch.Tensor]:
    """−∂D/∂z for each divergence, and ∂V/∂z, by autograd on logits z (float64); `adv` the sampled token's
    reward (default: log q_y − log p_y of these distributions)."""
    def grad(f):
        z = zp.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(z.softmax(-1), z.log_softmax(-1)), z)
        return g

    def jsd(p, lp):
        m = (1 - BETA) * p + BETA * q  # GKD's JSD(β): β weighs the teacher
        return (1 - BETA) * (p * (lp - m.log())).sum() + BETA * (q * (q.log() - m.log())).sum()

    adv = float(q.log()[y] - zp.log_softmax(-1)[y]) if adv is None else adv
    return {
        "ideal": grad(lambda p, lp: (p * s).sum()),
        "rkl": -grad(lambda p, lp: (p * (lp - q.log())).sum()),
        "fkl": -grad(lambda p, lp: (q * (q.log() - lp)).sum()),
        "jsd": -grad(jsd),
        "sampled": adv * grad(lambda p, lp: lp[y]),
    }


def test_closed_forms_on_k_equal_autograd():
    g = torch.Generator().manual_seed(0)
    zp, zq = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    s = torch.rand(6, generator=g, dtype=torch.float64)
    lp, lq = zp.log_softmax(-1) + math.log(0.3), zq.log_softmax(-1) + math.log(0.7)  # K's mass: renormalised inside
    ref = _autograd_gradients(zp, zq.softmax(-1), s, y=0, adv=float(lq[0] - lp[0]))  # A from the full vocabulary
    out = on_candidates(lp, lq, s, BETA)
    for name in ("rkl", "fkl", "jsd", "sampled"):  # float64, 6 terms of O(1) logits: ~10·u64, 1e-10 is ample
        assert out["align"][name] == pytest.approx(_cos(ref["ideal"], ref[name]), abs=1e-10), name


@pytest.mark.parametrize("peak", [0.0, 12.0])
def test_full_vocabulary_cosines_equal_autograd(peak):
    g = torch.Generator().manual_seed(1)
    v, y = 50, 7
    zp = torch.randn(v, generator=g, dtype=torch.float64) * 2
    zp[y] += peak
    zq = zp + torch.randn(v, generator=g, dtype=torch.float64)
    cands = [y, 3, 11, 40]
    s_k = torch.tensor([0.25, 0.0, 1.0, 0.5], dtype=torch.float64)
    # the reference: g_ideal over the vocabulary with S on K, and p's own V on K, zero elsewhere
    p = zp.softmax(-1)
    pk = p[cands]
    v_k = float((pk / pk.sum() * s_k).sum())
    ideal = torch.zeros(v, dtype=torch.float64)
    ideal[cands] = pk * (s_k - v_k)
    ref = _autograd_gradients(zp, zq.softmax(-1), torch.zeros(v, dtype=torch.float64), y)
    stats = vocab_stats_torch(zp.float()[None], zq.float()[None], torch.tensor([y]), BETA)[0]
    lp = zp.float().double().log_softmax(-1)[cands]
    lq = zq.float().double().log_softmax(-1)[cands]
    got = over_vocabulary(Candidates(cands, lp, s_k), lq, stats, BETA)
    # float32 statistics over V = 50 logits |z| ≲ 20 (and the logits rounded to float32, which the reference
    # is not): log-probs off by ~|z|·u ≈ 1e-6, their sums by V·u; the centred norms (spread ~1) by ≲ 1e-5
    # relative, so a cosine by ≲ 2e-5; 2e-4 leaves 10x
    for name in ("rkl", "fkl", "jsd", "sampled"):
        assert got[name] == pytest.approx(_cos(ideal, ref[name]), abs=2e-4), name


def test_depth_windows_grow_exponentially_and_cover_the_rollout():
    assert [list(w) for w in depth_windows(10)] == [[0], [1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert depth_windows(0) == []


def test_nodes_follow_the_budget_and_spread_over_depths():
    rng = random.Random(0)
    lengths = [300, 5, 40, 300]
    nodes = choose_nodes(lengths, budget=6, rng=rng)
    # budget 6 over 4 rollouts: 2, 2, 1, 1 windows, evenly spaced and shifted by the rollout's index
    assert sorted((r, w) for r, _, w in nodes) == [(0, 0), (0, 4), (1, 0), (1, 1), (2, 2), (3, 3)]
    for r, t, w in nodes:
        assert t in depth_windows(lengths[r])[w]
    everything = choose_nodes(lengths, budget=1000, rng=rng)
    assert {(r, w) for r, _, w in everything} == {(r, w) for r, n in enumerate(lengths)
                                                  for w in range(len(depth_windows(n)))}  # one per window


def test_nodes_are_shared_equally_between_correct_and_incorrect_rollouts():
    correct = [False, False, True, False, False, False, False, False]
    nodes = choose_nodes([100] * 8, budget=10, rng=random.Random(1), correct=correct)
    on_correct = sorted(w for r, _, w in nodes if correct[r])
    assert len(nodes) == 10 and on_correct == [0, 1, 3, 4, 6]  # 5 of its 7 windows, spread to the deepest
    assert sorted((r, w) for r, _, w in nodes if not correct[r]) == [(0, 0), (1, 1), (3, 2), (4, 3), (5, 4)]


def test_describe():
    d = describe([-1.0, 0.5, 2.0, 0.5])
    # dyadic data: fmean and pstdev (exact fractions inside) round once, as math.sqrt does
    assert d == {"n": 4, "mean": 0.5, "median": 0.5, "std": pytest.approx(math.sqrt(1.125)), "share_positive": 0.75}
    assert describe([])["mean"] is None
    assert describe([None, 1.0, math.inf, 3.0]) == describe([1.0, 3.0])  # undefined and infinite: left out


def _mp_cosines(zp, zq, cands, s, beta, on_k_only):
    """Every cosine at 50 digits (mpmath), from the definitions, with nothing centred or rearranged."""
    import mpmath as mp

    mp.mp.dps = 50
    zp, zq = [mp.mpf(float(x)) for x in zp], [mp.mpf(float(x)) for x in zq]
    ids = list(cands) if on_k_only else list(range(len(zp)))

    def dist(z):
        e = [mp.exp(z[i]) for i in ids]
        return [x / mp.fsum(e) for x in e]

    p, q = dist(zp), dist(zq)
    y = ids.index(cands[0])
    s_full = {k: mp.mpf(float(v)) for k, v in zip(cands, s.tolist(), strict=True)}
    pk = [mp.exp(zp[k]) for k in cands]
    v = mp.fsum(a * s_full[k] for a, k in zip(pk, cands, strict=True)) / mp.fsum(pk)
    ideal = [p[j] * (s_full[i] - v) if i in s_full else mp.mpf(0) for j, i in enumerate(ids)]
    e_p, e_q = [mp.exp(x) for x in zp], [mp.exp(x) for x in zq]  # A: the full-vocabulary reward in both cases
    adv = mp.log(e_q[cands[0]] / mp.fsum(e_q)) - mp.log(e_p[cands[0]] / mp.fsum(e_p))
    m = [(1 - beta) * a + beta * b for a, b in zip(p, q, strict=True)]
    kl = mp.fsum(a * mp.log(a / b) for a, b in zip(p, q, strict=True))
    kl_m = mp.fsum(a * mp.log(a / c) for a, c in zip(p, m, strict=True))
    grads = {"rkl": [a * (mp.log(b / a) + kl) for a, b in zip(p, q, strict=True)],
             "fkl": [b - a for a, b in zip(p, q, strict=True)],
             "jsd": [(1 - beta) * a * (-mp.log(a / c) + kl_m) for a, c in zip(p, m, strict=True)],
             "sampled": [adv * ((j == y) - a) for j, a in enumerate(p)]}

    def cos(a, b):
        return float(mp.fsum(x * w for x, w in zip(a, b, strict=True))
                     / mp.sqrt(mp.fsum(x * x for x in a) * mp.fsum(w * w for w in b)))

    return {name: cos(ideal, g) for name, g in grads.items()}


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("case", ["hand", "random"])
def test_a_confident_student_keeps_every_cosine(case, kernel):
    """p_y = 1 − 1e-17 (a logit gap of 40): 1 − p_y and S − V do not survive as differences in float64;
    taken through y they do. References at 50 digits."""
    if case == "hand":
        zp = torch.tensor([40.0, 0.0, 0.5, -1.0], dtype=torch.float64)
        zq = torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        cands, s = [0, 1], torch.tensor([1.0, 0.0], dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(5)
        zp = torch.randn(60, generator=g, dtype=torch.float64)
        zp[9] += 40.0
        zq = zp * 0.1 + torch.randn(60, generator=g, dtype=torch.float64)
        cands, s = [9, 4, 17], torch.tensor([0.75, 0.25, 0.5], dtype=torch.float64)
    zp, zq = zp.float().double(), zq.float().double()  # what the float32 statistics see
    stats_fn = kernel_vocab_stats if kernel else vocab_stats_torch
    stats = stats_fn(zp.float()[None], zq.float()[None], torch.tensor([cands[0]]), BETA)[0]
    lp = zp.log_softmax(-1)[cands]  # float64 log-probs are exact here; the run takes them relative to y too
    lq = zq.log_softmax(-1)[cands]
    on_k = on_candidates(lp, lq, s, BETA)["align"]
    vocab = over_vocabulary(Candidates(cands, lp, s), lq, stats, BETA)
    want_k = _mp_cosines(zp, zq, cands, s, BETA, on_k_only=True)
    want_v = _mp_cosines(zp, zq, cands, s, BETA, on_k_only=False)
    # on K: float64 through y keeps each component's relative accuracy (~|K|·u64·|z| ≈ 1e-14, |z| ≤ 43)
    # even at p_y = 1 − 1e-17: 1e-9 is ample; over the vocabulary the float32 statistics (V = 60, |z| ≤ 43)
    # carry ~|z|·u ≈ 3e-6 in each log-prob and V·u in each sum: ≲ 2e-5 in a cosine, and 1e-4 leaves 5x
    for name in ("rkl", "fkl", "jsd", "sampled"):
        assert on_k[name] == pytest.approx(want_k[name], abs=1e-9), (name, on_k[name], want_k[name])
        assert vocab[name] == pytest.approx(want_v[name], abs=1e-4), (name, vocab[name], want_v[name])
    if case == "hand":  # a two-token K: every gradient is ±(1, −1), and all four point away from success
        assert all(v == pytest.approx(-1.0, abs=1e-9) for v in on_k.values())  # float64, as on K above


def kernel_vocab_stats(zp, zq, y, beta):
    from rechannel.triton_kernels.vocab_stats import vocab_stats

    return vocab_stats(zp, zq, y, beta).cpu()


def test_a_candidate_whose_probability_underflows_keeps_the_cosines_finite():
    """A teacher's top token the student gives e^-900 (0 in float64): its log-probability stays finite,
    so the cosines equal those at e^-700, where nothing underflows, instead of turning into NaN."""
    s = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    lq = torch.tensor([-1.0, -0.5, -3.0], dtype=torch.float64)
    far = on_candidates(torch.tensor([-0.1, -2.4, -900.0], dtype=torch.float64), lq, s, BETA)
    near = on_candidates(torch.tensor([-0.1, -2.4, -700.0], dtype=torch.float64), lq, s, BETA)
    for name in ("rkl", "fkl", "jsd", "sampled"):  # e^-700 terms (~1e-304) vanish against O(1) in float64
        assert math.isfinite(far["align"][name]) and far["align"][name] == pytest.approx(near["align"][name], abs=1e-12)
