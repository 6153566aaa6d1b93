"""`rechannel train-prompts`: learn a bank of soft prompts in front of a frozen (compressed) model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from rechannel.cli import options
from rechannel.cli.calibrate import Data, Docs, Field, load_texts
from rechannel.ops.errors import UserError

CKPT_KIND = "prompt-bank-checkpoint"
RESUME_FREE = ("steps", "save_every", "log", "export_peft", "member", "resume")  # may change on --resume


def checkpoint_path(output: str) -> Path:
    return Path(output).with_name(Path(output).name + ".ckpt")


def default_teacher(lm: Any) -> str:
    """The dense model a compressed one was made from (its config's `rechannel.source`)."""
    source = (getattr(lm.model.config, "rechannel", None) or {}).get("source", {})
    if not source.get("model"):
        raise UserError("--objective kd needs a teacher: --teacher DENSE_MODEL (this model records no source)")
    return source["model"]


def load_teacher(spec: str, lm: Any, device: str, dtype: str, trust_remote_code: bool) -> Any:
    teacher = options.load(spec, device, dtype, trust_remote_code)
    if teacher.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise UserError(f"the teacher {spec!r} has another vocabulary than the model; kd compares distributions "
                        "token by token, so both must share one tokenizer")
    recorded = (getattr(lm.model.config, "rechannel", None) or {}).get("source", {})
    if recorded.get("model") == spec and recorded.get("fingerprint") not in (None, teacher.fingerprint):
        raise UserError(f"the model was compressed from {spec!r} with fingerprint {recorded['fingerprint']}, "
                        f"but {spec!r} now has fingerprint {teacher.fingerprint}")
    return teacher


def _resume(output: str, args: dict[str, Any], fingerprint: str) -> Any:
    """The checkpoint's training state, after checking it belongs to this very run."""
    from rechannel.cli.artifacts import load_artifact
    from rechannel.ops.prompt_training import TrainState

    path = checkpoint_path(output)
    if not path.exists():
        raise UserError(f"--resume: no checkpoint at {path}")
    tensors, meta = load_artifact(path, kind=CKPT_KIND, fingerprint=fingerprint)
    fixed = {k: v for k, v in args.items() if k not in RESUME_FREE}
    was = {k: v for k, v in meta["args"].items() if k not in RESUME_FREE}
    if was != fixed:
        diff = sorted(k for k in set(was) | set(fixed) if was.get(k) != fixed.get(k))
        raise UserError(f"--resume: {path} was made with other settings ({', '.join(diff)})")
    return TrainState(tensors["prompts"], meta["step"], {k: tensors[k] for k in ("exp_avg", "exp_avg_sq")},
                      meta["counts"])


def _save_checkpoint(output: str, state: Any, provenance: Any) -> None:
    from dataclasses import replace

    from rechannel.cli.artifacts import save_artifact

    save_artifact(checkpoint_path(output), {"prompts": state.bank, **state.adam},
                  replace(provenance, kind=CKPT_KIND, extra={"step": state.step, "counts": state.counts}))


def _trim_log(path: str, step: int) -> None:
    """Keep the loss-curve records up to `step` (a run that died after its last checkpoint logged more)."""
    import orjson

    from rechannel.ops.atomic import atomic_open

    lines = Path(path).read_bytes().splitlines() if Path(path).exists() else []
    with atomic_open(path) as f:
        for line in lines:
            if line.strip() and orjson.loads(line)["step"] <= step:
                f.write(line + b"\n")


def export_peft(out_dir: str, prompt: Any, model: Any, base: str) -> None:
    """One prompt (P, d) as a PEFT prompt-tuning adapter (adapter_config.json + adapter_model.safetensors)."""
    import json

    from safetensors.torch import save_file

    from rechannel.ops.atomic import atomic_path
    from rechannel.ops.prompts import peft_prompt_config

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "adapter_config.json").write_text(json.dumps(peft_prompt_config(prompt, model.config, base), indent=2))
        save_file({"prompt_embeddings": prompt.contiguous()}, str(tmp / "adapter_model.safetensors"))


def train_prompts_command(
    data: Data,
    output: Annotated[str, typer.Option("--output", "-o", help="The prompt bank (.safetensors).")],
    teacher: Annotated[str | None, typer.Option(help="The dense model for --objective kd [default: the model this one was compressed from].", show_default=False)] = None,
    field: Field = "text",
    docs: Docs = "",
    num_prompts: Annotated[int, typer.Option(min=1, help="Prompts in the bank (M); 1 is the single-prompt baseline.")] = 4,
    prompt_len: Annotated[int, typer.Option(min=1, help="Virtual tokens per prompt (P).")] = 16,
    objective: Annotated[str, typer.Option(help="kd: KL(teacher || student) per token; lm: next-token cross-entropy.")] = "kd",
    assign: Annotated[str, typer.Option(help="Which prompt a window trains: router (as `route` picks), random, all.")] = "router",
    layers: Annotated[str, typer.Option(help="Layers the router reads: first (the first 1/8), all, A:B or i,j,k.")] = "first",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 3e-2,
    batch: Annotated[int, typer.Option(min=1, help="Windows per step.")] = 8,
    seqlen: Annotated[int, typer.Option(min=2, help="Tokens per training window.")] = 256,
    init: Annotated[str, typer.Option(help='vocab (embeddings of random frequent tokens) or text:"some words".')] = "vocab",
    seed: Annotated[int, typer.Option(help="Seed of the window draw, the init and random assignment.")] = 0,
    save_every: Annotated[int, typer.Option(min=0, help="Write a checkpoint (OUTPUT.ckpt) every N steps; 0: never.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.ckpt (same settings; --steps may grow).")] = False,
    log: Annotated[str | None, typer.Option(help="Loss curve, one JSON record per step.")] = None,
    export_peft_dir: Annotated[str | None, typer.Option("--export-peft", help="Also write prompt --member as a PEFT prompt-tuning adapter directory.")] = None,
    member: Annotated[int, typer.Option(min=0, help="The bank row --export-peft writes.")] = 0,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Train a bank of soft prompts on a frozen model; only the prompts learn.

    [bold]Examples[/bold]

      rechannel train-prompts --model out/wanda50 --data c4.jsonl --docs 500:1000 --num-prompts 4 -o bank.safetensors
      rechannel train-prompts --model out/gptq3 --data c4.jsonl --num-prompts 1 --objective lm --steps 100 -o one.safetensors
      rechannel train-prompts --model out/wanda50 --data c4.jsonl -o bank.safetensors --resume --steps 600

    Windows of --seqlen tokens are drawn from the documents (seeded, as calibration draws them). With --objective kd the teacher is the dense model the compressed one was made from, unless --teacher names another (same tokenizer required). Each window trains the prompt the router picks (--assign router), so the prompts specialise. Stdout: one JSON summary line.
    """
    from rechannel.cli.artifacts import Provenance, save_artifact
    from rechannel.cli.console import progress
    from rechannel.cli.jsonl import STDIO, JsonlWriter
    from rechannel.ops.blocks import decoder_blocks
    from rechannel.ops.calibration import draw_windows
    from rechannel.ops.prompt_training import PromptTrainConfig, TrainState, init_bank
    from rechannel.ops.routing import parse_layers

    t0 = time.perf_counter()
    lm = options.load(model, device, dtype, trust_remote_code)
    cfg = PromptTrainConfig(num_prompts, prompt_len, objective, assign, steps, lr, batch,
                            route_layers=tuple(parse_layers(layers, len(decoder_blocks(lm.model)))), seed=seed)
    cfg.check()
    if member >= num_prompts:
        raise UserError(f"--member {member}: the bank has {num_prompts} prompts (0..{num_prompts - 1})")
    texts = load_texts(data, field, docs)
    teacher_lm = None
    if objective == "kd":
        teacher = teacher or default_teacher(lm)
        teacher_lm = load_teacher(teacher, lm, device, dtype, trust_remote_code)
    args = {"data": data, "field": field, "docs": docs, "num_prompts": num_prompts, "prompt_len": prompt_len,
            "objective": objective, "assign": assign, "layers": list(cfg.route_layers), "steps": steps, "lr": lr,
            "batch": batch, "seqlen": seqlen, "init": init, "seed": seed, "teacher": teacher if objective == "kd" else None,
            "save_every": save_every, "log": log}
    provenance = Provenance("prompt-bank", model, lm.fingerprint, args)
    if resume:
        state = _resume(output, args, lm.fingerprint)
        if log:
            _trim_log(log, state.step)
    else:
        state = TrainState(init_bank(lm.model, lm.tokenizer, num_prompts, prompt_len, init, seed))
        if log:
            _trim_log(log, 0)
    if state.step >= steps:
        raise UserError(f"--resume: the checkpoint is at step {state.step}, nothing left to do with --steps {steps}")
    windows = draw_windows(texts, lm.tokenizer, steps * batch, seqlen, seed)
    state, loss = _run(lm, teacher_lm, windows, cfg, state, output, provenance, log, save_every, progress)
    extra = {"prompts": num_prompts, "length": prompt_len, "objective": objective, "init": init, "steps": steps,
             "final_loss": loss, "assignment": [round(c / max(sum(state.counts), 1), 4) for c in state.counts],
             "parameters": state.bank.numel()}
    save_artifact(output, {"prompts": state.bank}, Provenance("prompt-bank", model, lm.fingerprint, args, extra))
    if export_peft_dir:
        export_peft(export_peft_dir, state.bank[member], lm.model, model)
    with JsonlWriter(STDIO) as out:
        out.write({"output": output, "model": model, "fingerprint": lm.fingerprint, **extra,
                   "peft": export_peft_dir, "seconds": round(time.perf_counter() - t0, 2)})


def _run(lm, teacher_lm, windows, cfg, state, output, provenance, log, save_every, progress) -> tuple[Any, float]:
    """The training loop with its progress bar, loss log and checkpoints: (final state, last step's loss)."""
    from rechannel.cli.jsonl import dumps
    from rechannel.ops.prompt_training import train_prompts

    last = {"loss": float("nan")}
    log_file = open(log, "ab") if log else None  # noqa: SIM115 -- appended per step, closed below
    try:
        with progress() as bar:
            task = bar.add_task(f"training {cfg.prompts}x{cfg.length} prompts", total=cfg.steps, completed=state.step)

            def on_step(rec, st):
                last["loss"] = rec.loss
                if log_file:
                    log_file.write(dumps({"step": rec.step, "loss": rec.loss, "assignment": rec.counts,
                                          "seconds": round(rec.seconds, 3)}))
                    log_file.flush()
                if save_every and (rec.step % save_every == 0 or rec.step == cfg.steps):
                    _save_checkpoint(output, st, provenance)
                bar.update(task, completed=rec.step, description=f"training  loss {rec.loss:.4f}")

            state = train_prompts(lm.model, teacher_lm.model if teacher_lm else None, windows, cfg, state, on_step)
    finally:
        if log_file:
            log_file.close()
    return state, last["loss"]
