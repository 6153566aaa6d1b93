"""Calibration windows and per-layer input statistics.

Windows are drawn as the GPTQ / SparseGPT / Wanda reference code draws C4 samples: with Python's
`random` seeded, pick a random document until one has more than `seqlen` tokens, then a random start
inside it; repeat for each sample. Documents are tokenized once (at most their first DOC_CHARS characters),
which changes nothing in the sequence of draws for documents shorter than that.

Statistics, per Linear layer of a decoder block, from its inputs (see LayerStats): Wanda's per-channel
squared norms and, with `hessian`, GPTQ / SparseGPT's H, both as the reference code accumulates them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.blocks import (
    BlockInputs,
    StopForward,
    capture_first_inputs,
    decoder_blocks,
    feed_block,
    linear_layers,
    run_block,
)
from ..core.errors import UserError


@dataclass
class LayerStats:
    """Statistics of one Linear layer's inputs, kept as running means over calibration windows.

    They are updated window by window in float32 with the very operations of the reference code, so that
    Wanda, SparseGPT and GPTQ see bit for bit the statistics their authors' scripts compute: after n
    windows X_1..X_n (each tokens x d_in),
      sqnorm = (1/n) sum_w ||X_w[:, j]||^2      (Wanda's scaler_row; its square root scores the weights)
      H      = (2/n) sum_w X_w^T X_w            (GPTQ / SparseGPT's Hessian)
    The division is by windows, not tokens, as in the reference. Neither algorithm depends on the scale
    (damping is relative to mean(diag H)), but the last bits do matter: 3-bit GPTQ perplexity on a small
    model moves by 10% with the rounding of H alone.
    """

    sqnorm: torch.Tensor  # (d_in,) float32
    hessian: torch.Tensor | None = None  # (d_in, d_in) float32
    windows: int = 0
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of windows, x (B, T, d_in), one window at a time."""
        for window in x.reshape(-1, x.shape[-2], x.shape[-1]):  # (T, d_in)
            self._add_window(window)

    def _add_window(self, x: torch.Tensor) -> None:
        n = self.windows
        xt = x.t()  # (d_in, T): the reference works on the transposed input
        self.sqnorm *= n / (n + 1)
        if self.hessian is not None:
            self.hessian *= n / (n + 1)
        n += 1
        self.sqnorm += torch.norm(xt.float(), p=2, dim=1) ** 2 / n
        if self.hessian is not None:
            xs = math.sqrt(2 / n) * xt.float()
            self.hessian += xs.matmul(xs.t())
        self.windows, self.tokens = n, self.tokens + x.shape[0]

    def cpu(self) -> LayerStats:
        """The same statistics in host memory (a 7B model's Hessians would not all fit on the GPU)."""
        h = self.hessian.cpu() if self.hessian is not None else None
        return LayerStats(self.sqnorm.cpu(), h, self.windows, self.tokens)

    def norms(self) -> torch.Tensor:
        """Wanda's per-input-channel ||X_j||_2, up to the constant 1/sqrt(n) (float32)."""
        return self.sqnorm.sqrt()


def new_stats(layer: nn.Linear, hessian: bool) -> LayerStats:
    d = layer.in_features
    dev = layer.weight.device
    return LayerStats(torch.zeros(d, dtype=torch.float32, device=dev),
                      torch.zeros(d, d, dtype=torch.float32, device=dev) if hessian else None)


def select_targets(block: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    """The block's Linear layers whose name matches the regex `pattern` (searched, not anchored)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"--targets {pattern!r} is not a valid regular expression ({e})") from None
    chosen = {n: m for n, m in linear_layers(block).items() if rx.search(n)}
    if not chosen:
        raise UserError(f"--targets {pattern!r} matches no Linear layer of a block "
                        f"(layers: {', '.join(linear_layers(block))})")
    return chosen


class _InputRecorder:
    """Forward pre-hooks feeding each target's inputs into its statistics.

    Layers that receive the very same input tensor in a forward (q/k/v, gate/up) share one LayerStats:
    accumulated once, stored once. The inputs of the current batch are held until every target has seen
    its own, so that the identity test cannot be fooled by a freed tensor's reused memory.
    """

    def __init__(self, targets: dict[str, nn.Linear], hessian: bool, stop_when_done: bool) -> None:
        self.targets = targets
        self.hessian = hessian
        self.stop_when_done = stop_when_done
        self.stats: dict[str, LayerStats] = {}
        self.batch: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        same = next((n for n, seen in self.batch.items() if seen is x), None)
        self.batch[name] = x
        if name not in self.stats:
            self.stats[name] = self.stats[same] if same is not None else new_stats(self.targets[name], self.hessian)
        if same is None or self.stats[same] is not self.stats[name]:
            self.stats[name].add(x)
        if len(self.batch) == len(self.targets):
            self.batch.clear()
            if self.stop_when_done:
                raise StopForward


def collect_block_stats(block: nn.Module, inputs: BlockInputs, targets: dict[str, nn.Linear], hessian: bool,
                        need_outputs: bool = True) -> tuple[dict[str, LayerStats], BlockInputs | None]:
    """Statistics of each target's inputs while `block` runs on `inputs` (one pass, by forward hooks),
    and the block's outputs from that same pass. Without `need_outputs` (the sequential protocol discards
    them) each batch stops as soon as the last target has seen its input, which skips e.g. down_proj."""
    recorder = _InputRecorder(targets, hessian, stop_when_done=not need_outputs)
    handles = [layer.register_forward_pre_hook(lambda mod, args, n=name: recorder(n, args[0]))
               for name, layer in targets.items()]
    try:
        outputs = run_block(block, inputs) if need_outputs else feed_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return recorder.stats, outputs


@torch.inference_mode()
def input_groups(block: nn.Module, inputs: BlockInputs, targets: dict[str, nn.Linear]) -> list[list[str]]:
    """The targets grouped by the input they share, in the order the block's forward calls them: for a
    Llama block [q, k, v], [o], [gate, up], [down]. GPTQ's true-sequential protocol compresses one group
    at a time, each calibrated on inputs computed through the groups already compressed. Found by running
    the first batch once."""
    seen: list[tuple[str, torch.Tensor]] = []

    def record(name: str, x: torch.Tensor) -> None:
        seen.append((name, x))
        if len(seen) == len(targets):
            raise StopForward

    handles = [layer.register_forward_pre_hook(lambda mod, args, n=name: record(n, args[0]))
               for name, layer in targets.items()]
    first = BlockInputs(inputs.hidden[:1], inputs.kwargs[:1])
    try:
        feed_block(block, first)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        same = next((g for t, g in groups if t is x), None)
        if same is None:
            groups.append((x, [name]))
        else:
            same.append(name)
    missed = set(targets) - {n for n, _ in seen}
    return [g for _, g in groups] + [[n] for n in targets if n in missed]  # never called: compressed last


@dataclass
class CalibrationResult:
    stats: dict[str, LayerStats] = field(default_factory=dict)  # key: "layers.{i}.{name}"
    tokens: int = 0


def calibrate(model: nn.Module, windows: torch.Tensor, targets: str, hessian: bool, batch_size: int = 8,
              on_block: Callable[[int], None] | None = None, hold: Hold | None = None) -> CalibrationResult:
    """Dense statistics for every target layer, block by block, each block fed the dense outputs before it.
    `hold(module)` keeps a module's weights in memory while it is used (a model streamed from disk); by
    default every weight is already there."""
    hold = hold or _resident
    with hold(model.get_input_embeddings()):
        inputs = capture_first_inputs(model, windows, batch_size)
    result = CalibrationResult(tokens=windows.numel())
    for i, block in enumerate(decoder_blocks(model)):
        with hold(block):
            stats, inputs = collect_block_stats(block, inputs, select_targets(block, targets), hessian)
        on_host: dict[int, LayerStats] = {}  # keep layers that share inputs sharing their statistics
        for name, st in stats.items():
            result.stats[f"layers.{i}.{name}"] = on_host.setdefault(id(st), st.cpu())
        if on_block:
            on_block(i)
    return result


Hold = Callable[[nn.Module], AbstractContextManager]


def _resident(module: nn.Module) -> AbstractContextManager:
    return nullcontext(module)


def stats_to_tensors(result: CalibrationResult, windows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a calibration-stats file (the windows, per layer sqnorm and H), and the aliases:
    layers that share their input's statistics with an earlier layer, stored once under it."""
    out = {"windows": windows.to(torch.int32)}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, s in result.stats.items():
        if id(s) in first:
            aliases[key] = first[id(s)]
            continue
        first[id(s)] = key
        out[f"{key}.sqnorm"] = s.sqnorm.cpu()
        if s.hessian is not None:
            out[f"{key}.hessian"] = s.hessian.cpu()
    return out, aliases


def stats_from_tensors(tensors: dict[str, torch.Tensor], windows: torch.Tensor,
                       aliases: dict[str, str] | None = None) -> dict[str, LayerStats]:
    """Inverse of `stats_to_tensors`, given the windows (N, T) the statistics were taken on."""
    if any(k.endswith(".sumsq") for k in tensors):
        raise UserError("this statistics file holds plain sums from an earlier rechannel; run calibrate again")
    keys = [k[: -len(".sqnorm")] for k in tensors if k.endswith(".sqnorm")]
    stats = {k: LayerStats(tensors[f"{k}.sqnorm"], tensors.get(f"{k}.hessian"), len(windows), windows.numel())
             for k in keys}
    for key, source in (aliases or {}).items():
        stats[key] = stats[source]
    return stats
