"""Training a LoRA adapter on a frozen (compressed) model: the re-training baseline IDP is compared with.

The same windows, objective and optimizer loop as prompt training (training.py), so the two differ
only in where the extra parameters sit: rank-r matrices beside the targeted projections instead of
virtual tokens in front of the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.distributed import World, local_rows
from ..core.errors import UserError
from .lora import LoraLinear, add_lora, lora_parameters
from .training import (
    StepLog,
    TrainState,
    batch_mean,
    check_objective,
    fit,
    teacher_logits,
    token_loss,
    window_batch,
)


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    objective: str = "kd"
    steps: int = 300
    lr: float = 1e-3
    batch: int = 8
    seed: int = 0

    def check(self) -> None:
        check_objective(self.objective)
        if self.rank < 1 or self.steps < 1 or self.batch < 1:
            raise UserError("--rank, --steps and --batch must be at least 1")


def init_lora(model: nn.Module, cfg: LoraTrainConfig) -> dict[str, LoraLinear]:
    """Wrap the targets with fresh adapters (A drawn from the seed, B zero)."""
    torch.manual_seed(cfg.seed)
    return add_lora(model, list(cfg.targets), cfg.rank, cfg.alpha)


def train_lora(model: nn.Module, wrapped: dict[str, LoraLinear], teacher: nn.Module | None, windows: torch.Tensor,
               cfg: LoraTrainConfig, state: TrainState,
               on_step: Callable[[StepLog, TrainState], None] | None = None, world: World = World()) -> TrainState:
    """Train the adapters in `wrapped` (already in `model`) from state.step to cfg.steps on windows (N, T);
    state.params, keyed by PEFT names, seeds them (a fresh run passes the wrapped layers' own tensors)."""
    model.requires_grad_(False)
    params = lora_parameters(wrapped)
    for key, p in params.items():
        p.data.copy_(state.params[key].to(p.device, p.dtype))
        p.requires_grad_(True)
    device = model.get_input_embeddings().weight.device

    def step_loss(step: int) -> tuple[torch.Tensor, list[int]]:
        ids = window_batch(windows, step, cfg.batch)[local_rows(cfg.batch, "training windows", world)].to(device)  # (b, T)
        target = teacher_logits(teacher, ids) if cfg.objective == "kd" else None
        logits = model(input_ids=ids, use_cache=False).logits  # (b, T, V)
        return batch_mean(token_loss(cfg.objective, logits, ids, target), cfg.batch), []

    return fit(params, step_loss, cfg.steps, cfg.lr, 0.0, state, on_step, world)

