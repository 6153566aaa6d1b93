"""Vocabulary statistics: the Triton kernel (interpreter here) and its torch twin against float64 math.

The float64 reference materialises p, q and every gradient explicitly, as DESIGN.md writes them, so it
shares no algebra with the streamed, centred-through-y formulas under test.
"""

from __future__ import annotations

import pytest
import torch

from rechannel.ops.align.vocab_stats import COL, vocab_stats_torch
from rechannel.triton_kernels import vocab_stats as kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BETA = 0.3


U = 2.0 ** -24  # float32 unit roundoff
DEPTH = 151936 // 256 + 8 + 8  # additions a float32 sum goes through: V / lanes (>= 256 lanes) + log2(lanes) + the combine


def _stable_logs(z: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax anchored at each row's maximum, with log1p: torch's own sums exp(z - max) with the
    1 of the top token first, so every later term below 2^-53 is lost, and 1 - p_top (the very quantity a
    peaked row is about) is wrong in the third digit at V = 152k. Here the other tokens are summed alone."""
    m = z.max(1, keepdim=True).values
    others = torch.exp(z - m)
    others[torch.arange(z.shape[0]), z.argmax(1)] = 0.0
    return z - m - torch.log1p(others.sum(1, keepdim=True))


def _reference(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor, beta: float) -> dict[str, tuple]:
    """name -> (value, magnitude) per row in float64. The magnitude is what float32 rounding errors scale with
    (see _check): the sum of |terms| for sums of probabilities; for a weight times a log-ratio w·r, the sum of
    w·(|r| + 1), since r itself is formed with an absolute error (its parts are logs of size up to L); for
    w²·r², the sum of w²·(|r| + 1)²."""
    zp, zq = zp.double().cpu(), zq.double().cpu()
    lp, lq = _stable_logs(zp), _stable_logs(zq)
    p, q = lp.exp(), lq.exp()
    lm = torch.log((1 - beta) * p + beta * q)  # β: the teacher's weight
    kl, kl_pm = (p * (lp - lq)).sum(1, keepdim=True), (p * (lp - lm)).sum(1, keepdim=True)
    rows, yc = torch.arange(zp.shape[0]), y.cpu()
    rest = torch.ones_like(p)
    rest[rows, yc] = 0.0
    one_minus_py = -torch.expm1(lp[rows, yc])  # 1 - p_y without cancellation
    d = p * rest - (1 - rest) * one_minus_py[:, None]  # p - e_y, its y entry taken as -(1 - p_y)
    linear = {"kl_pq": (p, lp - lq), "kl_pm": (p, lp - lm), "kl_qm": (q, lq - lm), "entropy_p": (p, -lp)}
    squared = {"rkl_norm2": (p, lq - lp + kl), "jsd_norm2": ((1 - beta) * p, -(lp - lm) + kl_pm)}
    for name, a in (("rkl", lq - lp), ("jsd", lp - lm)):  # the sums the centred norms are built from
        r = a - a[rows, yc][:, None]
        linear[f"b_{name}"] = (p * rest, r)
        squared[f"n_{name}"] = (p * rest, r - (p * rest * r).sum(1, keepdim=True))
    plain = {"sum_p2": p * p, "sum_dqp2": (q - p) ** 2, "p_rest": p * rest, "p2_rest": p * p * rest,
             "sampled_norm2": d ** 2}
    out = {name: (t.sum(1), t.abs().sum(1)) for name, t in plain.items()}
    out |= {name: ((w * r).sum(1), (w * (r.abs() + 1)).sum(1)) for name, (w, r) in linear.items()}
    out |= {name: ((w * r).pow(2).sum(1), (w * (r.abs() + 1)).pow(2).sum(1)) for name, (w, r) in squared.items()}
    for name, logs in (("lnorm_p", lp), ("lnorm_q", lq)):
        v = -logs[rows, yc]
        out[name] = (v, 1.0 + v.abs())  # a log: its float32 error is absolute, about the sum's relative error
    return out


def _derived(out: torch.Tensor, y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The full-vocabulary squared norms as align forms them from the columns."""
    o = out.double().cpu()
    p_y = 1 - o[:, COL["p_rest"]]
    return {
        "rkl_norm2": p_y ** 2 * o[:, COL["b_rkl"]] ** 2 + o[:, COL["n_rkl"]],
        "jsd_norm2": (1 - beta) ** 2 * (p_y ** 2 * o[:, COL["b_jsd"]] ** 2 + o[:, COL["n_jsd"]]),
        "sampled_norm2": o[:, COL["p_rest"]] ** 2 + o[:, COL["p2_rest"]],
    }


def _check(out: torch.Tensor, ref: dict[str, tuple], y: torch.Tensor, logit_range: float, beta: float = BETA
           ) -> None:
    """|got - want| <= bound * magnitude, the bound being float32's first-order error for these sums:
    - a log-probability of size up to L (logit_range: max |z| plus any offset the inputs carry) is formed with
      an absolute rounding error up to a few L·u, which exp turns into a relative error of the same size, and a
      term squared (the norms) doubles;
    - each streamed sum adds at most DEPTH·u relative to the sum of its absolute terms.
    So bound = 4 (2 L + DEPTH) u: 2 L for the two anchors subtracted, 4 for squaring twice (the norms of
    products of p and a log-ratio) — a worst case; rounding errors of random sign stay far below it."""
    bound = 4 * (2 * logit_range + DEPTH) * U
    o = out.double().cpu()
    derived = _derived(out, y, beta)
    for name, (want, mag) in ref.items():
        got = o[:, COL[name]] if name in COL else derived[name]
        err = ((got - want).abs() / (mag * bound).clamp_min(1e-300)).max().item()
        assert err <= 1.0, f"{name}: error {err:.2f} x the float32 bound {bound:.1e}\n got {got}\nwant {want}"


def _range(zp: torch.Tensor, zq: torch.Tensor, offset: float = 0.0) -> float:
    return float(torch.stack([zp.double().abs().max(), zq.double().abs().max()]).max()) + abs(offset)


def _logits(t: int, v: int, seed: int, offset: float = 0.0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(t, v, generator=g) * scale + offset
    zq = zp + torch.randn(t, v, generator=g) * 1.5  # a related teacher
    y = torch.randint(0, v, (t,), generator=g)
    return zp, zq, y


def _peaked(v: int, seed: int):
    """Rows where the observed token holds p_y = 1 - 1e-8 to 1 - 1e-10: in float32, 1 - p_y would round to 0 or
    to 1.2e-7; the float64 reference resolves it because it sums the other tokens alone (_stable_logs)."""
    zp, zq, y = _logits(3, v, seed)
    rows = torch.arange(3)
    zp[rows, y] = zp.max(1).values + torch.tensor([20.0, 23.0, 25.0])
    zq[0, y[0]] += 30.0
    return zp, zq, y


@pytest.mark.parametrize("v", [49152, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_twin_equal_float64(v, dtype):
    zp, zq, y = _logits(3, v, seed=v % 97, offset=0.0)
    zp, zq = zp.to(dtype), zq.to(dtype)  # the reference sees the same rounded logits
    ref = _reference(zp, zq, y, BETA)
    for fn in (vocab_stats_torch, kernel.vocab_stats):
        _check(fn(zp.to(DEVICE), zq.to(DEVICE), y.to(DEVICE), BETA), ref, y, _range(zp, zq))


@pytest.mark.parametrize("offset", [-3000.0, 5000.0])
def test_large_logit_offsets_change_nothing(offset):
    zp, zq, y = _logits(2, 1031, seed=3)
    ref = _reference(zp, zq, y, BETA)
    got = kernel.vocab_stats((zp + offset).to(DEVICE), (zq - offset).to(DEVICE), y.to(DEVICE), BETA)
    # an offset of 5000 leaves float32 logits ~5e-4 apart: the statistics see that rounding, nothing more
    _check(got, ref, y, _range(zp, zq, offset))


@pytest.mark.parametrize("v", [49152, 151936])
def test_peaked_rows_stay_exact(v):
    zp, zq, y = _peaked(v, seed=11)
    ref = _reference(zp, zq, y, BETA)
    assert ref["p_rest"][0].max() < 1e-7  # below float32's resolution of 1 - p_y: the case the centring exists for
    for fn in (vocab_stats_torch, kernel.vocab_stats):
        _check(fn(zp.to(DEVICE), zq.to(DEVICE), y.to(DEVICE), BETA), ref, y, _range(zp, zq))


def test_odd_shapes_and_strided_rows():
    zp, zq, y = _logits(5, 4099, seed=5)
    wide = torch.zeros(5, 5000)
    wide[:, :4099] = zq
    ref = _reference(zp, zq, y, BETA)
    assert wide.to(DEVICE)[:, :4099].stride(0) == 5000  # the slice is taken where the kernel runs: rows strided
    for block in (512, 2048):
        out = kernel.vocab_stats(zp.to(DEVICE), wide.to(DEVICE)[:, :4099], y.to(DEVICE), BETA, block=block)
        _check(out, ref, y, _range(zp, zq))


def test_twin_and_kernel_each_within_the_bound_on_every_column():
    zp, zq, y = _logits(4, 3001, seed=9, scale=6.0)
    ref = _reference(zp, zq, y, BETA)
    assert set(ref) >= set(COL)  # every output column has its float64 reference
    for fn in (vocab_stats_torch, kernel.vocab_stats):
        _check(fn(zp.to(DEVICE), zq.to(DEVICE), y.to(DEVICE), BETA), ref, y, _range(zp, zq))


def test_the_gpu_benchmark_reference_computes_the_same_columns():
    """tests/bench/vocab.py checks the kernel against its own eager formulas on the GPU: they must be right."""
    from tests.bench.vocab import eager

    zp, zq, y = _logits(6, 3001, seed=21, scale=3.0)
    _check(eager(zp, zq, y), _reference(zp, zq, y, 0.5), y, _range(zp, zq), beta=0.5)
