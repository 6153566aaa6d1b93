"""Training a bank of M soft prompts (P virtual tokens each) in front of a frozen model.

Each training window goes to one prompt, chosen by the same rule `route` uses at inference (`router`:
the prompt its tokens attend to most, under the current bank), at random (`random`), or to every prompt
(`all`, each prompt then sees all the data); only the prompts receive gradients (AdamW). Objectives, per
token of the window: `kd`, KL(teacher || student with prompt) over the vocabulary, the teacher being the
dense model on the same window without a prompt (the recovery setting); `lm`, next-token cross-entropy.

The loop is deterministic given the seed: window i of the run is fixed by the draw, and the random
assignment of step s depends on (seed, s) only, so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rechannel.ops.errors import UserError, unknown_choice
from rechannel.ops.routing import attention_scores, bank_kv

OBJECTIVES = ("kd", "lm")
ASSIGN = ("router", "random", "all")
VOCAB_INIT_TOKENS = 5000  # prompt tuning's "sampled vocabulary" init draws from the first (most frequent) ids


@dataclass(frozen=True)
class PromptTrainConfig:
    prompts: int = 4  # M
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
        if self.objective not in OBJECTIVES:
            raise unknown_choice("objective", self.objective, OBJECTIVES)
        if self.assign not in ASSIGN:
            raise unknown_choice("assign", self.assign, ASSIGN)
        if self.prompts < 1 or self.length < 1 or self.steps < 1 or self.batch < 1:
            raise UserError("--num-prompts, --prompt-len, --steps and --batch must be at least 1")


@dataclass
class TrainState:
    bank: torch.Tensor  # (M, P, d) float32, the trained parameters
    step: int = 0  # steps done
    adam: dict[str, torch.Tensor] = field(default_factory=dict)  # exp_avg, exp_avg_sq: each (M, P, d)
    counts: list[int] = field(default_factory=list)  # windows each prompt has trained on so far


@dataclass(frozen=True)
class StepLog:
    step: int  # 1-based
    loss: float
    counts: list[int]  # windows assigned to each prompt in this step
    seconds: float


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


def token_loss(objective: str, logits: torch.Tensor, ids: torch.Tensor,
               teacher: torch.Tensor | None) -> torch.Tensor:
    """(B,) mean per-token loss of each window. logits, teacher (B, T, V); ids (B, T)."""
    logp = torch.log_softmax(logits.float(), -1)
    if objective == "lm":
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        return nll.mean(1)
    t = torch.log_softmax(teacher.float(), -1)
    return (t.exp() * (t - logp)).sum(-1).mean(1)  # KL(teacher || student), (B,)


def assign(model: nn.Module, bank: torch.Tensor, ids: torch.Tensor, cfg: PromptTrainConfig,
           step: int) -> torch.Tensor:
    """The prompt each window of the step trains, (B,); for `all`, every window is repeated M times."""
    b = ids.shape[0]
    if cfg.assign == "all" or cfg.prompts == 1:
        return torch.arange(cfg.prompts).repeat(b) if cfg.assign == "all" else torch.zeros(b, dtype=torch.long)
    if cfg.assign == "random":
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return torch.randint(0, cfg.prompts, (b,), generator=g)
    scores = attention_scores(model, bank_kv(model, bank.detach()), ids, torch.ones_like(ids), cfg.route_layers)
    return scores.argmax(1).cpu()


def train_prompts(model: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, cfg: PromptTrainConfig,
                  state: TrainState, on_step: Callable[[StepLog, TrainState], None] | None = None) -> TrainState:
    """Train state.bank from step state.step to cfg.steps on windows (N, T), batch i being windows
    [i*B, (i+1)*B) (wrapping around). `model` and `teacher` stay frozen."""
    import time

    device = model.get_input_embeddings().weight.device
    for p in model.parameters():
        p.requires_grad_(False)
    bank = nn.Parameter(state.bank.to(device))
    opt = torch.optim.AdamW([bank], lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state.adam:
        opt.state[bank] = {"step": torch.tensor(float(state.step)), **{k: v.to(device) for k, v in state.adam.items()}}
    for step in range(state.step, cfg.steps):
        t0 = time.perf_counter()
        ids = _batch(windows, step, cfg.batch).to(device)  # (B, T)
        rows = assign(model, bank, ids, cfg, step).to(device)  # (B,) or (B*M,)
        ids = ids.repeat_interleave(len(rows) // len(ids), 0)  # (len(rows), T)
        teacher_logits = _teacher_logits(teacher, ids) if cfg.objective == "kd" else None
        loss = token_loss(cfg.objective, _student_logits(model, bank[rows], ids), ids, teacher_logits).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        counts = torch.bincount(rows.cpu(), minlength=cfg.prompts).tolist()
        state = TrainState(bank.detach().cpu().clone(), step + 1,
                           {k: opt.state[bank][k].detach().cpu().clone() for k in ("exp_avg", "exp_avg_sq")},
                           [a + b for a, b in zip(state.counts or [0] * cfg.prompts, counts, strict=True)])
        if on_step:
            on_step(StepLog(step + 1, loss.item(), counts, time.perf_counter() - t0), state)
    return state


def _batch(windows: torch.Tensor, step: int, size: int) -> torch.Tensor:
    idx = (torch.arange(size) + step * size) % len(windows)
    return windows[idx]


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = teacher.get_input_embeddings().weight.device
    return teacher(input_ids=ids.to(device), use_cache=False).logits.to(ids.device)

