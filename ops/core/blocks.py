"""Run a decoder-only model one block at a time, the way GPTQ, SparseGPT and Wanda calibrate.

The inputs of block 0 are captured by swapping it for a module that records its arguments and stops the
forward; afterwards each block is run on the stored activations to produce the next block's inputs. Only
one block's inputs and outputs are held at a time (N windows x T tokens x d), never all layers'.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UserError


class StopForward(Exception):
    """Raised from a hook to end a forward early once everything needed from it has been seen."""


class _Catcher(nn.Module):
    """Stands in for block 0: stores what it receives, then aborts the forward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.hidden, self.kwargs = hidden_states, kwargs
        raise StopForward


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama, Mistral, Qwen, OPT-style layouts)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    raise UserError(f"cannot find the decoder blocks of {type(model).__name__}")


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's Linear modules by their name inside the block (e.g. 'self_attn.q_proj')."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass
class BlockInputs:
    """Activations entering one block for all calibration windows, in batches."""

    hidden: list[torch.Tensor]  # each (B, T, d)
    kwargs: list[dict[str, Any]]  # the keyword arguments the model passes each block, per batch


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


@torch.inference_mode()
def capture_first_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Embed `windows` (N, T) and record the inputs of block 0, batch by batch."""
    blocks = decoder_blocks(model)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    device = model.get_input_embeddings().weight.device  # the one module that runs (others may be on meta)
    hidden, kwargs = [], []
    try:
        for batch in _batches(windows, batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except StopForward:
                pass
            hidden.append(catcher.hidden)
            kwargs.append({k: v for k, v in catcher.kwargs.items() if k not in ("past_key_values", "cache")})
    finally:
        blocks[0] = catcher.block
    return BlockInputs(hidden, kwargs)


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs for every batch: the next block's inputs."""
    return BlockInputs([_output(block(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True)],
                       inputs.kwargs)


@torch.inference_mode()
def feed_block(block: nn.Module, inputs: BlockInputs) -> None:
    """Run the block on every batch for its hooks' sake only; a hook may end a batch with StopForward."""
    for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True):
        try:
            block(h, **kw)
        except StopForward:
            pass
