"""Training a bank of M soft prompts (P virtual tokens each) in front of a frozen model.

Each training window goes to one prompt, chosen by the same rule `route` uses at inference (`router`:
the prompt its tokens attend to most, under the current bank), by the router's scores under a capacity
(`balanced`: no prompt takes more than ceil(B/M) of a batch's B windows, so one prompt cannot win every
window and leave the others untrained), at random (`random`), or to every prompt (`all`, each prompt then
sees all the data); only the prompts receive gradients (AdamW). Objectives, per
token of the window: `kd`, KL(teacher || student with prompt) over the vocabulary, the teacher being the
dense model on the same window without a prompt (the recovery setting); `lm`, next-token cross-entropy.

Random assignment at step s depends on (seed, s) only, so a resumed run continues exactly (training.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.distributed import World, local_rows
from ..core.errors import UserError, unknown_choice
from .routing import attention_scores, bank_kv
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

ASSIGN = ("router", "balanced", "random", "all")
VOCAB_INIT_TOKENS = 5000  # prompt tuning's "sampled vocabulary" init draws from the first (most frequent) ids


@dataclass(frozen=True)
class PromptTrainConfig:
    prompts: int = 4  # K per source (M = K with one source)
    length: int = 16  # P
    objective: str = "kd"
    assign: str = "router"
    steps: int = 300
    lr: float = 3e-2
    batch: int = 8
    weight_decay: float = 0.0  # prompt tuning does not decay its prompts
    route_layers: tuple[int, ...] = (0,)
    seed: int = 0

    def check(self) -> None:
        check_objective(self.objective)
        if self.assign not in ASSIGN:
            raise unknown_choice("assign", self.assign, ASSIGN)
        if self.prompts < 1 or self.length < 1 or self.steps < 1 or self.batch < 1:
            raise UserError("--num-prompts, --prompt-len, --steps and --batch must be at least 1")


def init_bank(model: nn.Module, tokenizer, prompts: int, length: int, init: str, seed: int) -> torch.Tensor:
    """(M, P, d) float32 starting prompts: embeddings of random vocabulary tokens (`vocab`), or of the
    tokens of a text (`text:...`, repeated to length P; prompts after the first get independent noise of
    1% of the embeddings' standard deviation, so that the router can tell them apart from the start)."""
    table = model.get_input_embeddings().weight.detach().float().cpu()  # (V, d)
    g = torch.Generator().manual_seed(seed)
    if init == "vocab":
        ids = torch.randint(0, min(VOCAB_INIT_TOKENS, table.shape[0]), (prompts, length), generator=g)
        return table[ids].clone()
    if init.startswith("text:") and init[5:]:
        ids = tokenizer(init[5:], add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"--init {init!r}: the text has no tokens")
        row = table[torch.tensor(ids).repeat(-(-length // len(ids)))[:length]]  # (P, d)
        noise = torch.randn(prompts, length, table.shape[1], generator=g) * 0.01 * table.std()
        noise[0] = 0
        return row.expand(prompts, -1, -1) + noise
    raise UserError(f"--init {init!r}: expected vocab or text:\"some words\"")


def _student_logits(model: nn.Module, soft: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) at the window's positions, soft (B, P, d) prepended as input embeddings."""
    embed = model.get_input_embeddings()
    x = torch.cat([soft.to(embed.weight.dtype), embed(ids)], 1)  # (B, P + T, d)
    return model(inputs_embeds=x, use_cache=False).logits[:, soft.shape[1]:]


def assign(model: nn.Module, bank: torch.Tensor, ids: torch.Tensor, cfg: PromptTrainConfig,
           step: int) -> torch.Tensor:
    """The prompt each window of the step trains, (B,); for `all`, every window is repeated M times."""
    b = ids.shape[0]
    if cfg.assign == "all":
        return torch.arange(cfg.prompts).repeat(b)
    if cfg.prompts == 1:
        return torch.zeros(b, dtype=torch.long)
    if cfg.assign == "random":
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return torch.randint(0, cfg.prompts, (b,), generator=g)
    scores = attention_scores(model, bank_kv(model, bank.detach()), ids, torch.ones_like(ids), cfg.route_layers)
    if cfg.assign == "balanced":
        return balanced_assignment(scores.cpu(), -(-b // cfg.prompts))
    return scores.argmax(1).cpu()


def balanced_assignment(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """scores (B, M) -> (B,) prompts: the (window, prompt) pairs taken greedily from the highest score down,
    a window once, a prompt at most `capacity` times (B <= M * capacity). Ties go to the lower index."""
    b, m = scores.shape
    out = torch.full((b,), -1, dtype=torch.long)
    taken = [0] * m
    for flat in torch.sort(scores.flatten(), descending=True, stable=True).indices.tolist():
        i, k = divmod(flat, m)
        if out[i] < 0 and taken[k] < capacity:
            out[i] = k
            taken[k] += 1
    return out


def train_prompts(model: nn.Module, teacher: nn.Module | None, windows: Sequence[torch.Tensor],
                  cfg: PromptTrainConfig, state: TrainState,
                  on_step: Callable[[StepLog, TrainState], None] | None = None, world: World = World()) -> TrainState:
    """Train state.params["prompts"] (S*K, P, d) from step state.step to cfg.steps on windows, one (N, T)
    tensor per source: each step, source s gives cfg.batch windows, assigned among its own K = cfg.prompts
    rows s*K .. s*K+K-1 only, so a prompt never sees another source's text. `model` and `teacher` stay
    frozen."""
    device = model.get_input_embeddings().weight.device
    model.requires_grad_(False)
    bank = nn.Parameter(state.params["prompts"].to(device))
    k = cfg.prompts

    def source_batch(s: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = window_batch(windows[s], step, cfg.batch).to(device)  # (B, T)
        rows = assign(model, bank[s * k:(s + 1) * k], ids, cfg, step).to(device) + s * k  # (B,) or (B*K,)
        return ids.repeat_interleave(len(rows) // len(ids), 0), rows

    def step_loss(step: int) -> tuple[torch.Tensor, list[int]]:
        parts = [source_batch(s, step) for s in range(len(windows))]
        ids = torch.cat([i for i, _ in parts])  # (S*B, T), or (S*B*K, T) for `all`
        rows = torch.cat([r for _, r in parts])
        mine = local_rows(len(rows), "training windows", world)  # under torchrun, this rank's share of the batch
        target = teacher_logits(teacher, ids[mine]) if cfg.objective == "kd" else None
        per = token_loss(cfg.objective, _student_logits(model, bank[rows[mine]], ids[mine]), ids[mine], target)
        return batch_mean(per, len(rows)), torch.bincount(rows.cpu(), minlength=k * len(windows)).tolist()

    return fit({"prompts": bank}, step_loss, cfg.steps, cfg.lr, cfg.weight_decay, state, on_step, world)
