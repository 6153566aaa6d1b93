"""The `train-prompts` driver as a Python API: train a bank of soft prompts (or the LoRA baseline) in front of
a frozen, usually compressed, model and write it, with checkpoints, a loss curve and exact resumption.

    from rechannel.ops.recover.api import TrainConfig, train_prompts
    summary = train_prompts(TrainConfig(data="c4.jsonl", output="bank.safetensors", model="out/wanda50"))

The CLI (`rechannel train-prompts`) is this function plus option parsing and one JSON summary line. The two
methods share the driver and differ in a `Job`: what they initialise, train and write (`BankJob`,
`LoraJob`). Everything heavy (torch, transformers) is imported inside the functions, so importing this
module costs nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from ..core.errors import UserError
from ..core.progress import Progress, silent

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..core.artifacts import Provenance
    from ..core.distributed import World
    from ..core.models import LoadedModel
    from .sources import Source
    from .training import StepLog, TrainState

CKPT_KIND = "training-checkpoint"
RESUME_FREE = ("steps", "save_every", "log")  # settings that may change on --resume
METHODS = ("prompts", "lora")
DEFAULT_LR = {"prompts": 3e-2, "lora": 1e-3}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `rechannel train-prompts`, with the same defaults."""

    data: str | tuple[str, ...]  # JSONL of documents ('-' = stdin); several NAME=FILE: one source each
    output: str  # the prompt bank (.safetensors), or with method "lora" the PEFT adapter directory
    method: str = "prompts"  # prompts (a bank of soft prompts) or lora (the re-training baseline)
    teacher: str | None = None  # the dense model for objective kd; None: the model this one was compressed from
    field: str = "text"  # the record field holding the text
    docs: str = ""  # documents to use, START:END ('' = all)
    source_field: str | None = None  # split the one data file into sources by this record field
    input_field: str | None = None  # the record field routing reads (score statistics); None: `field`
    pool: bool = False  # several sources: train on all of them as one (the one-prompt baseline, same windows)
    num_prompts: int = 4  # prompts per source (K; the bank has sources x K); 1 with one source: one prompt
    prompt_len: int = 16  # virtual tokens per prompt (P)
    objective: str = "kd"  # kd: KL(teacher || student) per token; lm: next-token cross-entropy
    assign: str = "router"  # which prompt a window trains: router, balanced, random, all
    layers: str = "first"  # layers the router reads: first (the first 1/8), all, A:B or i,j,k
    rank: int = 8  # lora: rank r of each adapter
    alpha: float = 16.0  # lora: scale numerator (the update is alpha/r * B A)
    targets: str = "q_proj,v_proj"  # lora: the projections to adapt, comma-separated names
    steps: int = 300  # optimizer steps
    lr: float | None = None  # AdamW learning rate; None: 3e-2 for prompts, 1e-3 for lora
    batch: int = 8  # windows per step from each source
    seqlen: int = 256  # tokens per training window
    init: str = "vocab"  # prompts: vocab (embeddings of random frequent tokens) or text:"some words"
    seed: int = 0  # seed of the window draw, the init and random assignment
    save_every: int = 50  # write a checkpoint (OUTPUT.ckpt) every N steps; 0: never
    resume: bool = False  # continue from OUTPUT.ckpt (same settings; steps may grow)
    log: str | None = None  # loss curve file, one JSON record per step
    export_peft: str | None = None  # prompts: also write prompt `member` as a PEFT prompt-tuning adapter dir
    member: int = 0  # the bank row export_peft writes
    model: str = "smollm2-135m"  # built-in alias, .gguf file or model directory
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1 ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16
    trust_remote_code: bool = False  # allow code shipped with the model

    @property
    def learning_rate(self) -> float:
        """lr, or the method's default when none was given."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def check(self) -> None:
        """What can be refused before anything is read: an unknown method, outputs that clash or overwrite
        an input."""
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: expected prompts or lora")
        check_train_outputs(self)


def checkpoint_path(output: str) -> Path:
    """Where a run writing `output` keeps its checkpoint: OUTPUT.ckpt beside it."""
    return Path(output).with_name(Path(output).name + ".ckpt")


def check_train_outputs(config: TrainConfig) -> None:
    """Refuse outputs that clash with each other or would overwrite the data or a model, before any work."""
    from ..core.models import model_paths
    from ..core.outputs import Input, Output, check_outputs

    outs = [Output("-o", config.output, "dir" if config.method == "lora" else "file"),
            Output("--log", config.log or ""), Output("--export-peft", config.export_peft or "", "dir")]
    if config.save_every:
        outs.append(Output("-o (its checkpoint)", str(checkpoint_path(config.output))))
    from .sources import parse_source_spec

    specs = [config.data] if isinstance(config.data, str) else list(config.data)
    ins = [*(Input("--data", parse_source_spec(d)[1]) for d in specs),
           *(Input("--model", p) for p in model_paths(config.model)),
           *(Input("--teacher", p) for p in (model_paths(config.teacher) if config.teacher else []))]
    check_outputs(outs, ins)


def default_teacher(lm: LoadedModel) -> str:
    """The dense model a compressed one was made from (its config's `rechannel.source`)."""
    source = (getattr(lm.model.config, "rechannel", None) or {}).get("source", {})
    if not source.get("model"):
        raise UserError("--objective kd needs a teacher: --teacher DENSE_MODEL (this model records no source)")
    return source["model"]


def check_teacher(teacher: LoadedModel, lm: LoadedModel, spec: str) -> None:
    """Refuse a teacher for `lm` unless it shares its vocabulary (distributions are compared token by token),
    outputs a logit for every token, and, when `lm` records it as its source, still has the recorded
    fingerprint (the dense model changed since the compression)."""
    if teacher.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise UserError(f"the teacher {spec!r} has another vocabulary than the model; teacher and student "
                        "distributions are compared token by token, so both must share one tokenizer")
    from ..core.models import logit_width

    widths = [logit_width(m) for m in (lm.model, teacher.model)]
    if min(widths) < len(lm.tokenizer):
        raise UserError(f"the teacher {spec!r} outputs {widths[1]} logits and the model {widths[0]}, fewer than "
                        f"the tokenizer's {len(lm.tokenizer)} tokens")
    recorded = (getattr(lm.model.config, "rechannel", None) or {}).get("source", {})
    if recorded.get("model") == spec and recorded.get("fingerprint") not in (None, teacher.fingerprint):
        raise UserError(f"the model was compressed from {spec!r} with fingerprint {recorded['fingerprint']}, "
                        f"but {spec!r} now has fingerprint {teacher.fingerprint}")


def write_peft(out_dir: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), atomically."""
    import json

    from safetensors.torch import save_file

    from ..core.atomic import atomic_path

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"))


OnStep = Callable[["StepLog", "TrainState"], None]


class Job(Protocol):
    """What one training method initialises, trains and writes; the driver does the rest."""

    label: str  # shown on the progress bar, e.g. "4x16 prompts"
    args: dict[str, Any]  # the method's own settings, recorded in the provenance (and checked on resume)

    def init(self) -> dict[str, torch.Tensor]:
        """The fresh trainable tensors by name, float32 on the host."""
        ...

    def train(self, teacher: nn.Module | None, windows: list[torch.Tensor], state: TrainState,
              on_step: OnStep, world: World) -> TrainState:
        """Train from state.step to the configured steps on windows, (N, T) per source (this rank's share of
        each step's batch under torchrun)."""
        ...

    def save(self, state: TrainState, loss: float, provenance: Provenance) -> dict[str, Any]:
        """Write the result at config.output; the summary's method-specific fields."""
        ...


class BankJob:
    """A bank of M soft prompts of P virtual tokens each, written as one .safetensors artefact (and, with
    export_peft, one row of it as a PEFT prompt-tuning adapter)."""

    def __init__(self, lm: LoadedModel, config: TrainConfig, sources: list[Source]) -> None:
        from ..core.blocks import decoder_blocks
        from .prompt_training import PromptTrainConfig
        from .routing import parse_layers

        picked = tuple(parse_layers(config.layers, len(decoder_blocks(lm.model))))
        self.separate = len(sources) > 1 and not config.pool  # one set of K prompts per source
        groups = [s.name for s in sources] if self.separate else ["+".join(s.name for s in sources)]
        batch = config.batch if self.separate else config.batch * len(sources)
        self.cfg = PromptTrainConfig(config.num_prompts, config.prompt_len, config.objective, config.assign,
                                     config.steps, config.learning_rate, batch, route_layers=picked,
                                     seed=config.seed)
        self.cfg.check()
        self.rows = len(groups) * config.num_prompts  # M
        self.row_sources = [g for g in groups for _ in range(config.num_prompts)]  # (M,) each row's source
        if config.member >= self.rows:
            raise UserError(f"--member {config.member}: the bank has {self.rows} prompts (0..{self.rows - 1})")
        self.lm, self.config, self.sources = lm, config, sources
        self.label = f"{self.rows}x{config.prompt_len} prompts"
        self.args = {"num_prompts": config.num_prompts, "prompt_len": config.prompt_len, "assign": config.assign,
                     "layers": list(picked), "init": config.init,
                     **({"sources": [s.name for s in sources], "pool": config.pool} if len(sources) > 1 else {})}

    def init(self) -> dict[str, torch.Tensor]:
        from .prompt_training import init_bank

        c = self.config
        return {"prompts": init_bank(self.lm.model, self.lm.tokenizer, self.rows, c.prompt_len, c.init, c.seed)}

    def train(self, teacher: nn.Module | None, windows: list[torch.Tensor], state: TrainState,
              on_step: OnStep, world: World) -> TrainState:
        from .prompt_training import train_prompts as train_bank

        per_source = windows if self.separate else [pooled(windows, self.config.batch)]
        return train_bank(self.lm.model, teacher, per_source, self.cfg, state, on_step, world)

    def save(self, state: TrainState, loss: float, provenance: Provenance) -> dict[str, Any]:
        from ..core.artifacts import save_artifact
        from .prompts import peft_prompt_config

        c, bank = self.config, state.params["prompts"]  # (M, P, d)
        shares = [round(n / max(sum(state.counts), 1), 4) for n in state.counts]
        extra = {"method": "prompts", "prompts": self.rows, "length": c.prompt_len, "objective": c.objective,
                 "init": c.init, "steps": c.steps, "final_loss": loss, "assignment": shares,
                 "sources": self.row_sources, "score_sources": [s.name for s in self.sources],
                 "parameters": bank.numel()}
        tensors = {"prompts": bank, **self._routing_stats(bank)}
        save_artifact(c.output, tensors, replace(provenance, extra=extra))
        if c.export_peft:
            write_peft(c.export_peft, peft_prompt_config(bank[c.member], self.lm.model.config, provenance.model),
                       {"prompt_embeddings": bank[c.member]})  # (P, d)
        return {**extra, "peft": c.export_peft}

    def _routing_stats(self, bank: torch.Tensor) -> dict[str, torch.Tensor]:
        """For calibrated routing: the mean and standard deviation of each row's attention score over each
        source's texts, `score_mean` and `score_std` (S, M), read on the layers the bank was trained with."""
        if self.rows < 2:
            return {}
        from .route_calibration import source_score_stats
        from .routing import bank_kv

        texts = [s.inputs for s in self.sources]
        mean, std = source_score_stats(self.lm.model, self.lm.tokenizer, bank_kv(self.lm.model, bank), texts,
                                       self.cfg.route_layers, self.config.seed)
        return {"score_mean": mean, "score_std": std}


def pooled(windows: list[torch.Tensor], batch: int) -> torch.Tensor:
    """The sources' windows (N, T) each as one (S*N, T) tensor whose step-s batch of S*batch windows is the
    sources' step-s batches side by side: a pooled run trains on exactly the windows a per-source run does."""
    import torch

    if len(windows) == 1:
        return windows[0]
    n, t = windows[0].shape
    return torch.stack([w[: n // batch * batch].view(-1, batch, t) for w in windows], 1).reshape(-1, t)


class LoraJob:
    """The re-training baseline: rank-r adapters beside the targeted projections (wrapped into the model
    now), written as a PEFT LoRA adapter directory."""

    def __init__(self, lm: LoadedModel, config: TrainConfig, sources: list[Source]) -> None:
        from .lora_training import LoraTrainConfig, init_lora

        names = tuple(t.strip() for t in config.targets.split(",") if t.strip())
        self.cfg = LoraTrainConfig(config.rank, config.alpha, names, config.objective, config.steps,
                                   config.learning_rate, config.batch * len(sources), config.seed)
        self.cfg.check()
        self.lm, self.config = lm, config
        self.wrapped = init_lora(lm.model, self.cfg)
        self.label = f"LoRA r={config.rank}"
        self.args = {"rank": config.rank, "alpha": config.alpha, "targets": list(names)}

    def init(self) -> dict[str, torch.Tensor]:
        from .lora import lora_parameters

        return {k: p.detach().float().cpu().clone() for k, p in lora_parameters(self.wrapped).items()}

    def train(self, teacher: nn.Module | None, windows: list[torch.Tensor], state: TrainState,
              on_step: OnStep, world: World) -> TrainState:
        from .lora_training import train_lora

        return train_lora(self.lm.model, self.wrapped, teacher, pooled(windows, self.config.batch), self.cfg, state,
                          on_step)

    def save(self, state: TrainState, loss: float, provenance: Provenance) -> dict[str, Any]:
        from .lora import peft_lora_config

        c, names = self.cfg, list(self.cfg.targets)
        write_peft(self.config.output, peft_lora_config(c.rank, c.alpha, names, provenance.model), state.params)
        return {"method": "lora", "rank": c.rank, "alpha": c.alpha, "targets": names, "modules": len(self.wrapped),
                "objective": c.objective, "steps": c.steps, "final_loss": loss,
                "parameters": sum(t.numel() for t in state.params.values())}


def _resume(output: str, args: dict[str, Any], fingerprint: str) -> TrainState:
    """The checkpoint's training state, after checking it belongs to this very run."""
    from ..core.artifacts import load_artifact
    from .training import ADAM_KEYS, TrainState

    path = checkpoint_path(output)
    if not path.exists():
        raise UserError(f"--resume: no checkpoint at {path}")
    tensors, meta = load_artifact(path, kind=CKPT_KIND, fingerprint=fingerprint)
    fixed = {k: v for k, v in args.items() if k not in RESUME_FREE}
    was = {k: v for k, v in meta["args"].items() if k not in RESUME_FREE}
    if was != fixed:
        diff = sorted(k for k in set(was) | set(fixed) if was.get(k) != fixed.get(k))
        raise UserError(f"--resume: {path} was made with other settings ({', '.join(diff)})")
    adam = {k: v for k, v in tensors.items() if k.endswith(ADAM_KEYS)}
    return TrainState({k: v for k, v in tensors.items() if k not in adam}, meta["step"], adam, meta["counts"])


def _save_checkpoint(output: str, state: TrainState, provenance: Provenance) -> None:
    """The trained tensors and AdamW moments at state.step, enough to continue exactly."""
    from ..core.artifacts import save_artifact

    save_artifact(checkpoint_path(output), {**state.params, **state.adam},
                  replace(provenance, kind=CKPT_KIND, extra={"step": state.step, "counts": state.counts}))


def _trim_log(path: str, step: int) -> None:
    """Keep the loss-curve records up to `step` (a run that died after its last checkpoint logged more)."""
    import orjson

    from ..core.atomic import atomic_open

    lines = Path(path).read_bytes().splitlines() if Path(path).exists() else []
    with atomic_open(path) as f:
        for line in lines:
            if line.strip() and orjson.loads(line)["step"] <= step:
                f.write(line + b"\n")


def _start(config: TrainConfig, args: dict[str, Any], lm: LoadedModel, job: Job) -> TrainState:
    """The state to train from: the checkpoint's with resume, else a fresh one; the log trimmed to it."""
    from .training import TrainState

    state = _resume(config.output, args, lm.fingerprint) if config.resume else TrainState(job.init())
    if state.step >= config.steps:
        raise UserError(f"--resume: the checkpoint is at step {state.step}, nothing left to do with --steps "
                        f"{config.steps}")
    if config.log:
        _trim_log(config.log, state.step)
    return state


class _StepRecorder:
    """The per-step callback of a run: loss log, checkpoints every save_every steps (and at the last), and
    progress; remembers the last step's loss. A context manager that owns the log file."""

    def __init__(self, config: TrainConfig, provenance: Provenance, stage: str, progress: Progress) -> None:
        self.config, self.provenance, self.stage, self.progress = config, provenance, stage, progress
        self.loss = math.nan
        self._log: IO[bytes] | None = None

    def __enter__(self) -> _StepRecorder:
        self._log = open(self.config.log, "ab") if self.config.log else None  # noqa: SIM115 -- closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        if self._log:
            self._log.close()

    def __call__(self, rec: StepLog, state: TrainState) -> None:
        import orjson

        self.loss = rec.loss
        if self._log:
            counts = {"assignment": rec.counts} if rec.counts else {}
            record = {"step": rec.step, "loss": rec.loss, **counts, "seconds": round(rec.seconds, 3)}
            self._log.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            self._log.flush()
        every, steps = self.config.save_every, self.config.steps
        if every and (rec.step % every == 0 or rec.step == steps):
            _save_checkpoint(self.config.output, state, self.provenance)
        self.progress(self.stage, advance=1, note=f"loss {rec.loss:.4f}")


def _run(job: Job, teacher: LoadedModel | None, windows: list[torch.Tensor], state: TrainState,
         recorder: _StepRecorder, world: World) -> tuple[TrainState, float]:
    """The training loop under the recorder: (final state, last step's loss)."""
    recorder.progress(recorder.stage, total=recorder.config.steps)
    if state.step:
        recorder.progress(recorder.stage, advance=state.step)
    with recorder:
        state = job.train(teacher.model if teacher else None, windows, state, recorder, world)
    return state, recorder.loss


def _job(lm: LoadedModel, config: TrainConfig, sources: list[Source]) -> Job:
    return BankJob(lm, config, sources) if config.method == "prompts" else LoraJob(lm, config, sources)


def _load(spec: str, config: TrainConfig, world: World) -> LoadedModel:
    from ..core.distributed import rank_device
    from ..core.models import load_model

    return load_model(spec, dtype=config.dtype, device=rank_device(config.device, world),
                      trust_remote_code=config.trust_remote_code)


@dataclass(frozen=True)
class _Prepared:
    """Everything a run needs before its first step, read and checked on every rank."""

    lm: LoadedModel
    job: Job
    teacher: LoadedModel | None
    provenance: Any  # core.artifacts.Provenance
    state: TrainState
    windows: list[torch.Tensor]  # (N, T) per source


def _prepare(config: TrainConfig, world: World) -> _Prepared:
    """Options, data, models, teacher and the starting state (the checkpoint's with --resume), in the order
    errors are reported; the loss log is trimmed to the checkpoint by rank 0 only."""
    from ..core.artifacts import Provenance
    from ..core.distributed import local_rows, refuse_stdin
    from ..core.windows import draw_windows
    from .sources import load_sources, pack_texts

    config.check()
    for spec in [config.data] if isinstance(config.data, str) else config.data:
        refuse_stdin("--data", spec.rpartition("=")[2], world)  # NAME=FILE or FILE
    sources = load_sources(config.data, config.field, config.docs, config.source_field, config.input_field)
    curated = len(sources) > 1 or bool(config.source_field)
    local_rows(config.batch * len(sources), "training windows", world)  # under torchrun: every rank gets a share
    lm = _load(config.model, config, world)
    data = config.data if isinstance(config.data, str) else list(config.data)
    args = {"method": config.method, "data": data, "field": config.field, "docs": config.docs,
            **({"source_field": config.source_field} if config.source_field else {}),
            **({"input_field": config.input_field} if config.input_field else {}),
            "objective": config.objective, "steps": config.steps, "lr": config.learning_rate, "batch": config.batch,
            "seqlen": config.seqlen, "seed": config.seed, "save_every": config.save_every, "log": config.log}
    job = _job(lm, config, sources)
    args.update(job.args)
    teacher = None
    if config.objective == "kd":
        args["teacher"] = spec = config.teacher or default_teacher(lm)
        teacher = _load(spec, config, world)
        check_teacher(teacher, lm, spec)
    state = _start(replace(config, log=config.log if world.main else None), args, lm, job)
    n = config.steps * config.batch
    windows = [draw_windows(pack_texts(s.texts, config.seqlen) if curated else s.texts, lm.tokenizer, n,
                            config.seqlen, config.seed) for s in sources]  # (N, T) per source
    return _Prepared(lm, job, teacher, Provenance("prompt-bank", config.model, lm.fingerprint, args), state, windows)


def train_prompts(config: TrainConfig, progress: Progress = silent, world: World | None = None) -> dict[str, Any]:
    """Train what `config` asks for and write it (config.output, the export_peft directory, the OUTPUT.ckpt
    checkpoints, the log); the summary the CLI prints: output, model, fingerprint, the method's fields
    (final_loss, parameters, ...) and seconds. Bad options and data are refused (UserError) before the
    model loads; a resume with other settings before any training.

    With `world` (ops.core.distributed.world() under torchrun, as the CLI passes it) every rank prepares the
    same run (a failure on one stops all), each step's global batch (--batch windows per source) is split
    across the ranks and their gradients summed, and rank 0 alone writes the checkpoints, the log and the
    output. Without it the call is a single process, whatever the environment says."""
    from ..core.distributed import World, join, together

    t0 = time.perf_counter()
    world = join(world or World())
    run = together(lambda: _prepare(config, world), world)
    writer = config if world.main else replace(config, log=None, save_every=0)
    recorder = _StepRecorder(writer, run.provenance, f"training {run.job.label}", progress if world.main else silent)
    state, loss = _run(run.job, run.teacher, run.windows, run.state, recorder, world)
    extra = run.job.save(state, loss, run.provenance) if world.main else {}
    return {"output": config.output, "model": config.model, "fingerprint": run.lm.fingerprint, **extra,
            "seconds": round(time.perf_counter() - t0, 2)}
