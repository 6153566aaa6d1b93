"""What prompt and LoRA training share: the state a run checkpoints, the losses, the optimizer loop.

Both train a few tensors in front of, or beside, a frozen model on windows of text: `kd`, the per-token
KL(teacher || student) over the vocabulary with the dense model as teacher (the recovery setting), or
`lm`, next-token cross-entropy. The loop is deterministic given the windows: step s always trains on
windows [s*B, (s+1)*B) (wrapping around), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rechannel.ops.errors import unknown_choice

OBJECTIVES = ("kd", "lm")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    params: dict[str, torch.Tensor]  # the trained tensors by name, float32, in host memory
    step: int = 0  # steps done
    adam: dict[str, torch.Tensor] = field(default_factory=dict)  # "{name}.exp_avg", "{name}.exp_avg_sq"
    counts: list[int] = field(default_factory=list)  # prompt training: windows each prompt has trained on


@dataclass(frozen=True)
class StepLog:
    step: int  # 1-based
    loss: float
    counts: list[int]  # prompt training: windows each prompt got in this step
    seconds: float


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise unknown_choice("objective", objective, OBJECTIVES)


def token_loss(objective: str, logits: torch.Tensor, ids: torch.Tensor,
               teacher: torch.Tensor | None) -> torch.Tensor:
    """(B,) mean per-token loss of each window. logits, teacher (B, T, V); ids (B, T)."""
    if objective == "lm":
        logp = torch.log_softmax(logits.float(), -1)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        return nll.mean(1)
    width = min(logits.shape[-1], teacher.shape[-1])  # a family's models can pad their vocabularies differently
    logp = torch.log_softmax(logits[..., :width].float(), -1)
    t = torch.log_softmax(teacher[..., :width].float(), -1)
    return (t.exp() * (t - logp)).sum(-1).mean(1)  # KL(teacher || student), (B,)


def window_batch(windows: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """Windows [step*size, (step+1)*size) of windows (N, T), wrapping around: (size, T)."""
    return windows[(torch.arange(size) + step * size) % len(windows)]


@torch.no_grad()
def teacher_logits(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = teacher.get_input_embeddings().weight.device
    return teacher(input_ids=ids.to(device), use_cache=False).logits.to(ids.device)


StepLoss = Callable[[int], tuple[torch.Tensor, list[int]]]  # step -> (scalar loss, per-prompt counts)


def fit(params: dict[str, nn.Parameter], step_loss: StepLoss, steps: int, lr: float, weight_decay: float,
        state: TrainState, on_step: Callable[[StepLog, TrainState], None] | None = None) -> TrainState:
    """AdamW on `params` from step state.step to `steps` (moments restored from state.adam)."""
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    for name, p in params.items():
        if f"{name}.exp_avg" in state.adam:
            opt.state[p] = {"step": torch.tensor(float(state.step)),
                            **{k: state.adam[f"{name}.{k}"].to(p.device) for k in ADAM_KEYS}}
    for step in range(state.step, steps):
        t0 = time.perf_counter()
        loss, counts = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state = TrainState({n: p.detach().cpu().clone() for n, p in params.items()}, step + 1,
                           {f"{n}.{k}": opt.state[p][k].detach().cpu().clone() for n, p in params.items() for k in ADAM_KEYS},
                           [a + b for a, b in zip(state.counts or [0] * len(counts), counts, strict=True)])
        if on_step:
            on_step(StepLog(step + 1, loss.item(), counts, time.perf_counter() - t0), state)
    return state
