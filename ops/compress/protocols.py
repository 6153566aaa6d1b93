"""The compression protocols: sequential (block by block, as the reference code) and one-shot, and the
per-layer report. What each method does to one layer is in methods.py.

Sequential (the reference protocol for Wanda and SparseGPT): for each block, collect the statistics of its
Linear inputs from the outputs of the already-pruned blocks before it, prune every target layer, then run
the pruned block again to produce the next block's inputs, measuring each layer's relative output error
||WX - W'X|| / ||WX|| on the inputs it sees there (the first `error_tokens` of them). True-sequential
(GPTQ's `--true-sequential`): within a block too, one group of layers sharing an input at a time ([q, k, v],
[o], [gate, up], [down]), each group's statistics taken with the groups before it already compressed.
One-shot: prune every layer from dense statistics (a `calibrate` file); the error then comes from H when the
file has it (tr(dW H dW^T) / tr(W H W^T)).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.blocks import BlockInputs, capture_first_inputs, decoder_blocks, run_block
from ..core.packed import QuantizedWeight
from ..core.qlinear import QuantLinear
from .calibration import LayerStats, collect_block_stats, input_groups, select_targets
from .masks import check_pattern
from .methods import PruneConfig, get_method, needs_hessian


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float  # achieved: zeros / entries
    rel_error: float | None  # ||WX - W'X|| / ||WX|| on calibration inputs, None without data
    damping: float | None = None  # SparseGPT and GPTQ only: the relative damping finally used
    damping_raised: bool = False  # the Cholesky failed at --percdamp and the damping was raised
    seconds: float = 0.0


@dataclass
class PruneReport:
    layers: list[LayerReport] = field(default_factory=list)
    quantized: dict[str, QuantLinear] = field(default_factory=dict)  # module name -> packed layer, in host memory

    def totals(self) -> dict[str, Any]:
        entries = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        errs = [r.rel_error for r in self.layers if r.rel_error is not None]
        return {"layers": len(self.layers), "parameters": entries, "pruned": round(zeros),
                "sparsity": zeros / entries if entries else 0.0,
                "mean_rel_error": sum(errs) / len(errs) if errs else None,
                "max_rel_error": max(errs) if errs else None,
                "raised_damping": [r.name for r in self.layers if r.damping_raised]}


def prune_layer(layer: nn.Linear, stats: LayerStats | None, cfg: PruneConfig,
                name: str) -> tuple[LayerReport, QuantizedWeight | None]:
    """Compress one Linear in place from its input statistics (None is fine for magnitude and rtn)."""
    t0 = time.perf_counter()
    w = layer.weight.data
    method = get_method(cfg.method)
    if method.prunes:
        check_pattern(cfg.pattern, w.shape[1], name)
    obs, qw = method.layer(w, stats, cfg)  # obs: the damping report of SparseGPT and GPTQ
    achieved = (w == 0).float().mean().item()
    return LayerReport(name, tuple(w.shape), achieved, None, obs and obs.damping, obs is not None and obs.retries > 0,
                       time.perf_counter() - t0), qw


class _ErrorMeter:
    """A forward hook accumulating ||Wx - W'x||^2 and ||Wx||^2 (W dense, W'x the layer's own output) over
    the first `budget` calibration tokens: the extra dense matmul then costs a fixed amount, not a pass."""

    def __init__(self, dense: torch.Tensor, budget: int) -> None:
        self.dense = dense
        self.left = budget
        self.num = 0.0
        self.den = 0.0

    def __call__(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        if self.left <= 0:
            return
        x = args[0].reshape(-1, args[0].shape[-1])[: self.left]  # (tokens, C)
        y = output.reshape(-1, output.shape[-1])[: self.left].float()  # (tokens, R)
        self.left -= x.shape[0]
        ref = nn.functional.linear(x, self.dense, module.bias).float()
        self.num += (ref - y).pow(2).sum().item()
        self.den += ref.pow(2).sum().item()

    def value(self) -> float:
        return (self.num / self.den) ** 0.5 if self.den > 0 else 0.0


def _run_measuring(block: nn.Module, inputs: BlockInputs, dense: dict[str, torch.Tensor],
                   layers: dict[str, nn.Linear], budget: int) -> tuple[BlockInputs, dict[str, float]]:
    meters = {n: _ErrorMeter(dense[n], budget) for n in layers}
    handles = [layers[n].register_forward_hook(meters[n]) for n in layers]
    try:
        outputs = run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs, {n: m.value() for n, m in meters.items()}


def prune_sequential(model: nn.Module, windows: torch.Tensor, cfg: PruneConfig,
                     on_block: Callable[[int], None] | None = None) -> PruneReport:
    """The reference protocol: block by block, statistics from the already-pruned model's activations."""
    inputs = capture_first_inputs(model, windows, cfg.batch_size)
    report = PruneReport()
    paths = module_paths(model)
    for i, block in enumerate(decoder_blocks(model)):
        inputs = sequential_block(block, i, inputs, cfg, report, paths)
        if on_block:
            on_block(i)
    return report


def sequential_block(block: nn.Module, i: int, inputs: BlockInputs, cfg: PruneConfig, report: PruneReport,
                     paths: dict[int, str]) -> BlockInputs:
    """Compress block `i` in place on the inputs the compressed blocks before it produced; its layer reports
    and packed layers go into `report`; returns the next block's inputs. Both compress paths (the model in
    memory, or streamed block by block from disk) run this very function, so their outputs are identical."""
    layers = select_targets(block, cfg.targets)
    dense = {n: layer.weight.data.clone() for n, layer in layers.items()}
    groups = input_groups(block, inputs, layers) if cfg.true_sequential else [list(layers)]
    reports = {}
    for group in groups:
        subset = {n: layers[n] for n in group}
        stats, _ = collect_block_stats(block, inputs, subset, needs_hessian(cfg.method), need_outputs=False)
        for n, layer in subset.items():
            reports[n], qw = prune_layer(layer, stats[n], cfg, f"layers.{i}.{n}")
            _keep(report, paths[id(layer)], qw)
        del stats
    inputs, errors = _run_measuring(block, inputs, dense, layers, cfg.error_tokens)
    for n in layers:  # the report lists layers in the block's order
        reports[n].rel_error = errors[n]
        report.layers.append(reports[n])
    return inputs


def hessian_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """sqrt(tr(dW H dW^T) / tr(W H W^T)): the relative output error on the inputs H was built from."""
    d = dense.float() - pruned.float()
    w = dense.float()
    num = ((d @ hessian) * d).sum()
    den = ((w @ hessian) * w).sum()
    return (num / den).clamp_min(0).sqrt().item() if den > 0 else 0.0


def prune_one_shot(model: nn.Module, stats: dict[str, LayerStats], cfg: PruneConfig,
                   on_block: Callable[[int], None] | None = None) -> PruneReport:
    """Every layer from dense statistics (or none, for magnitude); no forward pass."""
    report = PruneReport()
    paths = module_paths(model)
    for i, block in enumerate(decoder_blocks(model)):
        one_shot_block(block, i, stats, cfg, report, paths)
        if on_block:
            on_block(i)
    return report


def one_shot_block(block: nn.Module, i: int, stats: dict[str, LayerStats], cfg: PruneConfig, report: PruneReport,
                   paths: dict[int, str]) -> None:
    """Compress block `i` in place from dense statistics; shared by both compress paths as sequential_block."""
    for n, layer in select_targets(block, cfg.targets).items():
        key = f"layers.{i}.{n}"
        s = stats.get(key)
        dense = layer.weight.data.clone() if s is not None and s.hessian is not None else None
        r, qw = prune_layer(layer, s, cfg, key)
        _keep(report, paths[id(layer)], qw)
        if dense is not None:
            r.rel_error = hessian_error(dense, layer.weight.data, s.hessian.to(dense.device))
        report.layers.append(r)


def module_paths(model: nn.Module) -> dict[int, str]:
    """id(module) -> its dotted name in the model: the names the packed file's tensors carry."""
    return {id(m): name for name, m in model.named_modules()}


def _keep(report: PruneReport, name: str, qw: QuantizedWeight | None) -> None:
    """Keep a layer's codes packed (bits/8 bytes per weight) and in host memory, ready to save."""
    if qw is not None:
        report.quantized[name] = QuantLinear.from_quantized(qw, None).cpu()


def write_stored_weights(model: nn.Module, quantized: dict[str, QuantLinear]) -> None:
    """Give every quantized layer the weight its stored codes and float16 scales stand for, so a dense
    export equals the packed file (GPTQ's loop ran on float32 scales)."""
    for name, packed in quantized.items():
        w = model.get_submodule(name).weight
        w.data.copy_(packed.dequantize(w.dtype).to(w.device))
