"""The compression methods, in one registry: what each needs (calibration data, Hessians, --bits) and the
function that compresses one layer. Adding a method touches this file only.

magnitude, wanda and sparsegpt prune; rtn and gptq quantize; sparsegpt with `quant` does both jointly
(SparseGPT's own joint mode), and magnitude or wanda with `quant` round the pruned weights to nearest (zero is
a grid point, so pruned weights stay zero). A quantized layer's weight is replaced by its de-quantized value
at once, so later blocks are calibrated on what the packed model will compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.errors import unknown_choice
from ..core.packed import QuantizedWeight
from .calibration import LayerStats
from .gptq import gptq
from .grid import QuantSpec
from .masks import Pattern, select_mask
from .obs import ObsReport
from .rtn import rtn
from .sparsegpt import sparsegpt


@dataclass(frozen=True)
class PruneConfig:
    method: str  # a name in METHODS
    sparsity: float  # 0 for rtn and gptq
    pattern: Pattern
    quant: QuantSpec | None = None
    targets: str = r"(self_attn|mlp)\."
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    error_tokens: int = 4096  # calibration tokens the relative output error is measured on (the first ones)
    true_sequential: bool = False  # sequential within a block too: one input group at a time (GPTQ's option)


Outcome = tuple[ObsReport | None, QuantizedWeight | None]  # the damping report (OBS methods), the codes
LayerFn = Callable[[torch.Tensor, LayerStats | None, PruneConfig], Outcome]  # compresses weight (R, C) in place


@dataclass(frozen=True)
class Method:
    name: str
    prunes: bool  # takes --sparsity / --pattern
    quantizes: bool  # needs --bits
    needs_data: bool  # calibration windows or statistics
    needs_hessian: bool  # the statistics must hold H
    layer: LayerFn


def _round(w: torch.Tensor, cfg: PruneConfig) -> QuantizedWeight | None:
    """With --bits, round the (pruned) weight to nearest; its de-quantized value replaces it."""
    if cfg.quant is None:
        return None
    qw = rtn(w, cfg.quant)
    w.copy_(qw.dequantize(w.dtype))
    return qw


def _magnitude(w: torch.Tensor, stats: LayerStats | None, cfg: PruneConfig) -> Outcome:
    w.masked_fill_(select_mask(w, None, cfg.sparsity, cfg.pattern), 0)
    return None, _round(w, cfg)


def _wanda(w: torch.Tensor, stats: LayerStats | None, cfg: PruneConfig) -> Outcome:
    w.masked_fill_(select_mask(w, stats.norms().to(w.device), cfg.sparsity, cfg.pattern), 0)
    return None, _round(w, cfg)


def _sparsegpt(w: torch.Tensor, stats: LayerStats | None, cfg: PruneConfig) -> Outcome:
    new_w, _, obs, qw = sparsegpt(w, stats.hessian.to(w.device), cfg.sparsity, cfg.pattern, cfg.blocksize,
                                  cfg.percdamp, cfg.quant)
    w.copy_(new_w.to(w.dtype))
    return obs, qw


def _rtn(w: torch.Tensor, stats: LayerStats | None, cfg: PruneConfig) -> Outcome:
    return None, _round(w, cfg)


def _gptq(w: torch.Tensor, stats: LayerStats | None, cfg: PruneConfig) -> Outcome:
    qw, obs, new_w = gptq(w, stats.hessian.to(w.device), cfg.quant, cfg.blocksize, cfg.percdamp)
    w.copy_(new_w.to(w.dtype))
    return obs, qw


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("magnitude", prunes=True, quantizes=False, needs_data=False, needs_hessian=False, layer=_magnitude),
    Method("wanda", prunes=True, quantizes=False, needs_data=True, needs_hessian=False, layer=_wanda),
    Method("sparsegpt", prunes=True, quantizes=False, needs_data=True, needs_hessian=True, layer=_sparsegpt),
    Method("rtn", prunes=False, quantizes=True, needs_data=False, needs_hessian=False, layer=_rtn),
    Method("gptq", prunes=False, quantizes=True, needs_data=True, needs_hessian=True, layer=_gptq),
)}
PRUNERS = tuple(n for n, m in METHODS.items() if m.prunes)
QUANTIZERS = tuple(n for n, m in METHODS.items() if m.quantizes)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown_choice("method", name, METHODS)
    return METHODS[name]


def needs_hessian(method: str) -> bool:
    return get_method(method).needs_hessian


def needs_data(method: str) -> bool:
    return get_method(method).needs_data
