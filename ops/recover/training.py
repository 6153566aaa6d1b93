"""What prompt and LoRA training share: the state a run checkpoints, the losses, the optimizer loop.

Both train a few tensors in front of, or beside, a frozen model on windows of text: `kd`, the per-token
KL(teacher || student) over the vocabulary with the dense model as teacher (the recovery setting), or
`lm`, next-token cross-entropy. The loop is deterministic given the windows (torch's deterministic
algorithms are on while it runs): step s always trains on windows [s*B, (s+1)*B) (wrapping around), so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have. Under torchrun the
step's batch is the global batch: each rank takes a contiguous share of its rows, and the gradients are summed
over the ranks before every optimizer step, so the ranks train what one process on the whole batch trains,
and a checkpoint resumes at any world size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.distributed import World, all_reduce_sum
from ..core.errors import unknown_choice

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


TOKEN_CHUNK = 1024  # tokens whose [tokens, vocab] float32 log-probabilities exist at once


def token_loss(objective: str, logits: torch.Tensor, ids: torch.Tensor,
               teacher: torch.Tensor | None) -> torch.Tensor:
    """(B,) mean per-token loss of each window. logits, teacher (B, T, V); ids (B, T).

    Computed TOKEN_CHUNK tokens at a time under activation checkpointing: the float32 log-softmaxes exist
    for one chunk at a time, in the forward and again in the backward, never for the whole batch (at
    8 x 256 tokens and a 152k vocabulary that would be 1.2 GB a tensor)."""
    b, t, v = logits.shape
    if objective == "lm":  # position i predicts ids[i + 1]; the last position has no target
        per = _chunked(_nll_rows, logits.reshape(-1, v), ids.roll(-1, 1).reshape(-1))  # (B T,)
        return per.view(b, t)[:, :-1].mean(1)
    width = min(v, teacher.shape[-1])  # a family's models can pad their vocabularies differently
    per = _chunked(_kl_rows, logits[..., :width].reshape(-1, width), teacher[..., :width].reshape(-1, width))
    return per.view(b, t).mean(1)


def _kl_rows(z: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """(N, V) student and teacher logits -> (N,) KL(teacher || student)."""
    logp = torch.log_softmax(z.float(), -1)
    lt = torch.log_softmax(zt.float(), -1)
    return (lt.exp() * (lt - logp)).sum(-1)


def _nll_rows(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, V) logits, (N,) targets -> (N,) negative log-likelihoods."""
    return -torch.log_softmax(z.float(), -1).gather(-1, target[:, None]).squeeze(-1)


def _chunked(fn: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
    """fn over rows (N, ...) TOKEN_CHUNK at a time, checkpointed when a gradient will flow: (N,)."""
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and rows[0].requires_grad
    outs = []
    for i in range(0, rows[0].shape[0], TOKEN_CHUNK):
        part = [r[i:i + TOKEN_CHUNK] for r in rows]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part))
    return torch.cat(outs)


def window_batch(windows: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """Windows [step*size, (step+1)*size) of windows (N, T), wrapping around: (size, T)."""
    return windows[(torch.arange(size) + step * size) % len(windows)]


@torch.no_grad()
def teacher_logits(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = teacher.get_input_embeddings().weight.device
    return teacher(input_ids=ids.to(device), use_cache=False).logits.to(ids.device)


StepLoss = Callable[[int], tuple[torch.Tensor, list[int]]]  # step -> (this rank's share of the loss, counts)


def fit(params: dict[str, nn.Parameter], step_loss: StepLoss, steps: int, lr: float, weight_decay: float,
        state: TrainState, on_step: Callable[[StepLog, TrainState], None] | None = None,
        world: World = World()) -> TrainState:
    """AdamW on `params` from step state.step to `steps` (moments restored from state.adam), under
    torch's deterministic algorithms: with several CPU threads, a backward op otherwise accumulates in an
    order that changes from run to run (two runs of 6 steps differed by 1e-5 in the prompts; with the
    deterministic algorithms, and with one thread, they agree bit for bit)."""
    with deterministic_algorithms():
        return _fit(params, step_loss, steps, lr, weight_decay, state, on_step, world)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch.use_deterministic_algorithms inside, warning (not failing) where an op has no deterministic
    version (cuBLAS without CUBLAS_WORKSPACE_CONFIG); the caller's setting restored after."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def _sum_over_ranks(params: dict[str, nn.Parameter], loss: torch.Tensor, world: World) -> None:
    """Under torchrun each rank's loss is its rows' share of the global batch's mean: summing the gradients
    (and the loss, for the log) over the ranks gives what one process on the whole batch computes."""
    if world.size == 1:
        return
    for p in params.values():
        if p.grad is None:  # every rank must reduce the same tensors
            p.grad = torch.zeros_like(p)
    all_reduce_sum([p.grad for p in params.values()] + [loss.detach()], world)


def batch_mean(per_row: torch.Tensor, rows: int) -> torch.Tensor:
    """This rank's share of the mean over a step's `rows` rows: the sum of its own rows' losses / rows."""
    return per_row.sum() / rows


def _fit(params: dict[str, nn.Parameter], step_loss: StepLoss, steps: int, lr: float, weight_decay: float,
         state: TrainState, on_step: Callable[[StepLog, TrainState], None] | None, world: World) -> TrainState:
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
        _sum_over_ranks(params, loss, world)
        opt.step()
        state = TrainState({n: p.detach().cpu().clone() for n, p in params.items()}, step + 1,
                           {f"{n}.{k}": opt.state[p][k].detach().cpu().clone() for n, p in params.items() for k in ADAM_KEYS},
                           [a + b for a, b in zip(state.counts or [0] * len(counts), counts, strict=True)])
        if on_step:
            on_step(StepLog(step + 1, loss.item(), counts, time.perf_counter() - t0), state)
    return state
