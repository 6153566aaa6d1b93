"""Error bounds for the suite's comparisons of floating-point results.

The tests run on any x86 CPU, whose vectorised reductions, SIMD exp/log and BLAS kernels round differently,
so every bound here follows from error analysis (first order in the unit roundoff u), never from what one
machine printed:
  - a sum or dot product of n terms is off by ≤ n·u·Σ|terms|, a matmul of inner dimension k by k·u·|A||B|;
  - a float32 log-softmax over V logits is off by (V + 2)·u from its Σ of exps, plus ≤ 6u·max|z| from the
    rounding of z − max z and of the result (`log_softmax_error`);
  - a model forward: every matmul, norm or attention reduction of length k on a value's path adds k·u
    relative to the magnitudes it combines (`forward_path`); behind an RMSNorm (‖h‖ ≤ √d·max|g|) those
    are bounded by `logit_bound` for a logit, by `attention_score_bound` for an attention logit;
  - the SparseGPT / GPTQ column loop: `column_loop_error`.
A comparison of two float32 computations of the same quantity allows the sum of their two bounds.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff


def log_softmax_error(vocab: int, zmax: float, unit: float = U32) -> float:
    """Abs error of one log-softmax entry over `vocab` logits of magnitude ≤ zmax: the log of a Σ of V exps
    ((V + 2)·u: the sum, and each exp within 2u), their arguments z − max z rounded (2u·zmax, which exp turns
    into a relative error), and the rounding of z − max z and of the result (≤ 4u·zmax)."""
    return unit * (vocab + 2 + 6 * zmax)


def _dims(model) -> tuple[int, int, int, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.hidden_size, cfg.intermediate_size, head_dim, cfg.num_hidden_layers


def _layer_path(model, keys: int) -> int:
    """Σ of the reduction lengths one decoder layer puts on a value's path: the two RMSNorms, q, k, v, o,
    gate and up (d each), q·k (head_dim), the softmax's Σ and p·v (keys each), down (intermediate)."""
    d, inter, head_dim, _ = _dims(model)
    return 8 * d + head_dim + 2 * keys + inter


def forward_path(model, keys: int) -> int:
    """Σ of the reduction lengths on a logit's path through a forward attending to ≤ `keys` positions:
    every layer, then the final RMSNorm and the output head (d each)."""
    d, _, _, layers = _dims(model)
    return layers * _layer_path(model, keys) + 2 * d


def logit_bound(model) -> float:
    """max Σ_k |h_k||W_vk| over the output head's rows: ≤ ‖h‖·‖W_v‖ with ‖h‖ ≤ √d·max|g| behind the final
    RMSNorm (x / rms(x) has norm √d)."""
    head = model.get_output_embeddings().weight.detach().double()
    g = model.get_decoder().norm.weight.detach().double().abs().max().item()
    return math.sqrt(head.shape[1]) * g * head.norm(dim=1).max().item()


def logit_error(model, keys: int) -> float:
    """First-order abs error of one float32 logit of `model` against exact arithmetic (module doc)."""
    return forward_path(model, keys) * U32 * logit_bound(model)


def attention_score_bound(model) -> float:
    """max over layers and heads of ‖q‖‖k‖/√head_dim, q = W_q h and k = W_k h per head with h behind the
    layer's input RMSNorm (‖h‖ ≤ √d·max|g|, ‖q‖ ≤ ‖W_q,head‖₂·‖h‖; rotary embeddings keep norms): what
    Σ|q||k|/√head_dim, to which an attention logit's rounding is relative, cannot exceed."""
    d, _, head_dim, _ = _dims(model)
    best = 0.0
    for block in model.get_decoder().layers:
        g = block.input_layernorm.weight.detach().double().abs().max().item()
        wq, wk = (block.self_attn.q_proj.weight, block.self_attn.k_proj.weight)
        nq, nk = (torch.linalg.matrix_norm(w.detach().double().reshape(-1, head_dim, d), ord=2).max().item()
                  for w in (wq, wk))
        best = max(best, d * g * g * nq * nk / math.sqrt(head_dim))
    return best


def attention_mass_error(model, layer: int, keys: int) -> float:
    """First-order abs error of a float32 sum of attention probabilities (≤ 1) at `layer` over ≤ `keys`
    keys: its logits are off by Δs = (the layers before + input norm, q and k projections, q·k)·u·bound,
    which moves a share of the mass by ≤ 2Δs, and the softmax rounds by (keys + 4)·u plus 2u·|s|."""
    d, _, head_dim, _ = _dims(model)
    bound = attention_score_bound(model)
    path = layer * _layer_path(model, keys) + 3 * d + head_dim
    return U32 * (2 * path * bound + keys + 4 + 2 * bound)


def entropy_error(logp: torch.Tensor, dz: float, e: float, terms: int, unit: float = U32) -> float:
    """Abs error of a float32 entropy H = −Σ p log p whose logits are off by ≤ dz, given float64 log-probs
    `logp` (..., V) of those logits: to first order dH = −Σ p (log p + H) dz, so ≤ dz·Σ p|log p + H|;
    log-probs off by e (its own float32 log-softmax) move H by ≤ e·Σ p (|log p| + 1) = e·(H + 1); `terms`
    roundings of numbers ≤ H (the Σ over V, a mean over tokens) add terms·u·H. The worst position counts."""
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, 0.0).sum(-1, keepdim=True)  # p = 0 (log p = −inf) adds nothing
    spread = torch.where(p > 0, p * (logp + h).abs(), 0.0).sum(-1).max().item()
    hmax = h.max().item()
    return dz * spread + e * (hmax + 1) + terms * unit * hmax


def column_loop_error(w0: torch.Tensor, hinv: torch.Tensor, final: torch.Tensor,
                      kept: torch.Tensor | None = None,
                      unit: float = U32) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order bounds (on each final weight, on each scaled error) of how far the OBS / GPTQ column loop

        err_i = (w_i − q_i) / hinv_ii,   w[:, i:] −= err_i ⊗ hinv[i, i:],   w_i = q_i

    run in floating point with unit roundoff `unit` can be from the same loop in exact arithmetic with the
    same masks and codes. Before column i is reached an entry has taken ≤ i updates, immediate (a product
    and a difference: 2u) or lazy (k of them in one matmul and a difference: (k + 1)·u ≤ 2k·u), each times a
    number no larger than |w0| + Σ|err||hinv| so far: ≤ 2i·u·that. An error an entry carries into its own
    column moves err_i by its size / |hinv_ii|, and err_i carries it on through hinv[i, i:].
    `final` (R, C): the loop's q (the value kept, 0 where pruned, the grid point when quantized); `kept`:
    entries left as they are (err exactly 0, the weight keeps its error). Both sides must use the same hinv.
    The exact loop is emulated in float64."""
    w = w0.detach().double().cpu().clone()
    h = hinv.detach().double().cpu()
    q = final.detach().double().cpu()
    kept = torch.zeros_like(w, dtype=torch.bool) if kept is None else kept.cpu()
    size = w.abs()  # bound on every intermediate value of each entry, and on the products it takes
    carried = torch.zeros_like(w)  # error carried into each entry through the errors of earlier columns
    err_bound = torch.zeros_like(w)
    weight_bound = torch.zeros_like(w)
    for i in range(w.shape[1]):
        here = carried[:, i] + 2 * i * unit * size[:, i]  # this column's error when the loop reaches it
        e = torch.where(kept[:, i], 0.0, (w[:, i] - q[:, i]) / h[i, i])  # (R,)
        moved = here / h[i, i].abs() + 2 * unit * e.abs()  # and the subtraction and the division round
        err_bound[:, i] = torch.where(kept[:, i], 0.0, moved)
        weight_bound[:, i] = torch.where(kept[:, i], here, 0.0)  # a grid point or 0 is exact
        w[:, i + 1:] -= e[:, None] * h[i, i + 1:][None, :]
        size[:, i + 1:] += e.abs()[:, None] * h[i, i + 1:].abs()[None, :]
        carried[:, i + 1:] += err_bound[:, i, None] * h[i, i + 1:].abs()
    return weight_bound, err_bound
