"""SparseGPT against a straightforward float64 implementation of the published algorithm."""

from __future__ import annotations

import pytest
import torch

from rechannel.ops.compress.masks import Pattern
from rechannel.ops.compress.obs import damped_inverse_cholesky as _inverse_cholesky
from rechannel.ops.compress.sparsegpt import sparsegpt
from rechannel.ops.core.errors import UserError


def reference_sparsegpt(w, h, sparsity, n, m, blocksize, percdamp=0.01):
    """The published procedure in float64 with every update applied at once (no lazy block updates)."""
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(cols, dtype=torch.float64) * percdamp * torch.diag(h).mean()
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # H^-1 = U^T U
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        if m == 0:
            score = w[:, start:stop] ** 2 / torch.diag(u)[start:stop] ** 2
            thresh = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            mask[:, start:stop] = score <= thresh
        for i in range(start, stop):
            if m and (i - start) % m == 0:
                score = w[:, i:i + m] ** 2 / torch.diag(u)[i:i + m] ** 2
                idx = torch.sort(score, dim=1, stable=True).indices[:, :n]
                mask[:, i:i + m] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
            q = torch.where(mask[:, i], 0.0, w[:, i])
            err = (w[:, i] - q) / u[i, i]
            w[:, i:] -= err[:, None] * u[i, i:][None, :]
            w[:, i] = q
    return w, mask


def _problem(rows, cols, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
    return torch.randn(rows, cols, generator=g), 2 * x.t() @ x / tokens


@pytest.mark.parametrize("rows, cols, blocksize, pattern", [
    (12, 40, 16, Pattern()), (9, 64, 128, Pattern()), (10, 48, 16, Pattern(2, 4)), (6, 32, 8, Pattern(4, 8)),
])
def test_matches_float64_reference(rows, cols, blocksize, pattern):
    w, h = _problem(rows, cols, 200, seed=cols)
    got, mask, report, _ = sparsegpt(w, h, 0.5, pattern, blocksize)
    ref, ref_mask = reference_sparsegpt(w, h, 0.5, pattern.n, pattern.m, blocksize)
    assert torch.equal(mask, ref_mask)
    # float32 Cholesky, inverse and Cholesky of H + λI, then the OBS updates, which solve with its principal
    # submatrices (condition ≤ κ = cond(H + λI)): forward error ≲ cols·u·κ·max|w| (≈ 1.6e-3 at κ ≈ 120)
    damped = h.double() + torch.eye(cols, dtype=torch.float64) * 0.01 * torch.diag(h.double()).mean()
    eig = torch.linalg.eigvalsh(damped)
    tol = cols * 2**-24 * (eig[-1] / eig[0]).item() * ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)
    assert torch.all(got[mask] == 0) and report.damping == 0.01 and report.retries == 0
    if pattern.structured:
        assert torch.all(mask.view(rows, -1, pattern.m).sum(2) == pattern.n)


def test_update_lowers_the_output_error_below_plain_masking():
    """With correlated inputs (as activations are) the OBS update recovers much of the pruning error."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(400, 64, generator=g)
    w, h = torch.randn(16, 64, generator=g), 2 * x.t() @ x / 400
    pruned, mask, _, _ = sparsegpt(w, h, 0.5, Pattern(), 32)
    masked = w.masked_fill(mask, 0)
    err = lambda v: ((w - v) @ h * (w - v)).sum()  # noqa: E731
    assert err(pruned) < 0.5 * err(masked)


def test_dead_inputs_are_zeroed():
    w, h = _problem(8, 24, 100, seed=2)
    h[3, :] = 0
    h[:, 3] = 0
    got, _, _, _ = sparsegpt(w, h, 0.5, Pattern(), 8)
    assert torch.all(got[:, 3] == 0)


def test_cholesky_failure_raises_the_damping_and_reports_it():
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: eigenvalues -1 and 3
    _, report = _inverse_cholesky(h, 0.01)
    # exact: the code computes percdamp * 10**retry, this very float expression
    assert report.retries >= 2 and report.damping == pytest.approx(0.01 * 10**report.retries)
    with pytest.raises(UserError, match="singular"):
        _inverse_cholesky(torch.tensor([[1.0, 0.0], [0.0, -1e9]]), 0.01)


@pytest.mark.parametrize("method", ["sparsegpt", "gptq"])
def test_the_report_names_layers_whose_damping_was_raised_whatever_percdamp(method):
    """raised_damping lists the layers whose Cholesky failed at --percdamp, not those above 0.01."""
    from rechannel.ops.compress.calibration import LayerStats
    from rechannel.ops.compress.grid import QuantSpec
    from rechannel.ops.compress.protocols import PruneConfig, PruneReport, prune_layer

    quant = QuantSpec(bits=4, group_size=-1) if method == "gptq" else None
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    cases = [(torch.eye(2), 0.1, False), (indefinite, 0.001, True)]
    report = PruneReport()
    for i, (h, percdamp, raised) in enumerate(cases):
        layer = torch.nn.Linear(2, 4, bias=False)
        cfg = PruneConfig(method, 0.0 if quant else 0.5, Pattern(), quant, percdamp=percdamp)
        entry, _ = prune_layer(layer, LayerStats(torch.ones(2), h), cfg, f"layer{i}")
        assert entry.damping_raised is raised and entry.damping >= percdamp
        report.layers.append(entry)
    assert report.totals()["raised_damping"] == ["layer1"]
