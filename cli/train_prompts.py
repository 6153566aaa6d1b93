"""`rechannel train-prompts`: learn a bank of soft prompts in front of a frozen (compressed) model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..ops.core.errors import UserError
from . import options
from .calibrate import Data, Docs, Field, load_texts

CKPT_KIND = "training-checkpoint"
RESUME_FREE = ("steps", "save_every", "log")  # may change on --resume


def checkpoint_path(output: str) -> Path:
    return Path(output).with_name(Path(output).name + ".ckpt")


def default_teacher(lm: Any) -> str:
    """The dense model a compressed one was made from (its config's `rechannel.source`)."""
    source = (getattr(lm.model.config, "rechannel", None) or {}).get("source", {})
    if not source.get("model"):
        raise UserError("--objective kd needs a teacher: --teacher DENSE_MODEL (this model records no source)")
    return source["model"]


def _resume(output: str, args: dict[str, Any], fingerprint: str) -> Any:
    """The checkpoint's training state, after checking it belongs to this very run."""
    from ..ops.core.artifacts import load_artifact
    from ..ops.recover.training import ADAM_KEYS, TrainState

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


def _save_checkpoint(output: str, state: Any, provenance: Any) -> None:
    from dataclasses import replace

    from ..ops.core.artifacts import save_artifact

    save_artifact(checkpoint_path(output), {**state.params, **state.adam},
                  replace(provenance, kind=CKPT_KIND, extra={"step": state.step, "counts": state.counts}))


def _trim_log(path: str, step: int) -> None:
    """Keep the loss-curve records up to `step` (a run that died after its last checkpoint logged more)."""
    import orjson

    from ..ops.core.atomic import atomic_open

    lines = Path(path).read_bytes().splitlines() if Path(path).exists() else []
    with atomic_open(path) as f:
        for line in lines:
            if line.strip() and orjson.loads(line)["step"] <= step:
                f.write(line + b"\n")


def write_peft(out_dir: str, config: dict[str, Any], tensors: dict[str, Any]) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), atomically."""
    import json

    from safetensors.torch import save_file

    from ..ops.core.atomic import atomic_path

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"))


def train_prompts_command(
    data: Data,
    output: Annotated[str, typer.Option("--output", "-o", help="The prompt bank (.safetensors), or with --method lora the PEFT adapter directory.")],
    method: Annotated[str, typer.Option(help="prompts (a bank of soft prompts) or lora (the re-training baseline).")] = "prompts",
    teacher: Annotated[str | None, typer.Option(help="The dense model for --objective kd \\[default: the model this one was compressed from].", show_default=False)] = None,
    field: Field = "text",
    docs: Docs = "",
    num_prompts: Annotated[int, typer.Option(min=1, help="Prompts in the bank (M); 1 is the single-prompt baseline.")] = 4,
    prompt_len: Annotated[int, typer.Option(min=1, help="Virtual tokens per prompt (P).")] = 16,
    objective: Annotated[str, typer.Option(help="kd: KL(teacher || student) per token; lm: next-token cross-entropy.")] = "kd",
    assign: Annotated[str, typer.Option(help="Which prompt a window trains: router (as `route` picks), balanced (router scores, each prompt at most ceil(batch/M) windows per step), random, all.")] = "router",
    layers: Annotated[str, typer.Option(help="Layers the router reads: first (the first 1/8), all, A:B or i,j,k.")] = "first",
    rank: Annotated[int, typer.Option(min=1, help="lora: rank r of each adapter.")] = 8,
    alpha: Annotated[float, typer.Option(min=0.0, help="lora: scale numerator (the update is alpha/r * B A).")] = 16.0,
    targets: Annotated[str, typer.Option(help="lora: the projections to adapt, by name.")] = "q_proj,v_proj",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    lr: Annotated[float | None, typer.Option(min=0.0, help="AdamW learning rate \\[default: 3e-2 for prompts, 1e-3 for lora].", show_default=False)] = None,
    batch: Annotated[int, typer.Option(min=1, help="Windows per step.")] = 8,
    seqlen: Annotated[int, typer.Option(min=2, help="Tokens per training window.")] = 256,
    init: Annotated[str, typer.Option(help='prompts: vocab (embeddings of random frequent tokens) or text:"some words".')] = "vocab",
    seed: Annotated[int, typer.Option(help="Seed of the window draw, the init and random assignment.")] = 0,
    save_every: Annotated[int, typer.Option(min=0, help="Write a checkpoint (OUTPUT.ckpt) every N steps; 0: never.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.ckpt (same settings; --steps may grow).")] = False,
    log: Annotated[str | None, typer.Option(help="Loss curve, one JSON record per step.")] = None,
    export_peft_dir: Annotated[str | None, typer.Option("--export-peft", help="prompts: also write prompt --member as a PEFT prompt-tuning adapter directory.")] = None,
    member: Annotated[int, typer.Option(min=0, help="The bank row --export-peft writes.")] = 0,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Train a bank of soft prompts (or a LoRA adapter) on a frozen model; only they learn.

    [bold]Examples[/bold]

      rechannel train-prompts --model out/wanda50 --data c4.jsonl --docs 500:1000 --num-prompts 4 -o bank.safetensors
      rechannel train-prompts --model out/gptq3 --data c4.jsonl --num-prompts 1 --objective lm --steps 100 -o one.safetensors
      rechannel train-prompts --model out/wanda50 --data c4.jsonl --method lora --rank 8 -o lora-wanda50
      rechannel train-prompts --model out/wanda50 --data c4.jsonl -o bank.safetensors --resume --steps 600

    Windows of --seqlen tokens are drawn from the documents (seeded, as calibration draws them). With --objective kd the teacher is the dense model the compressed one was made from, unless --teacher names another (same tokenizer required). Each window trains the prompt the router picks (--assign router), so the prompts specialise. --method lora trains the re-training baseline on the same windows and objective and writes a PEFT adapter directory (eval --adapter). Stdout: one JSON summary line.
    """
    from ..ops.core.windows import draw_windows
    from .console import progress
    from .jsonl import STDIO, JsonlWriter

    if method not in ("prompts", "lora"):
        raise UserError(f"--method {method!r}: expected prompts or lora")
    _check_outputs(output, method, log, export_peft_dir, save_every, data, model, teacher)
    t0 = time.perf_counter()
    texts = load_texts(data, field, docs)  # every record checked before the model loads
    lm = options.load(model, device, dtype, trust_remote_code)
    lr = lr if lr is not None else (3e-2 if method == "prompts" else 1e-3)
    args = {"method": method, "data": data, "field": field, "docs": docs, "objective": objective, "steps": steps,
            "lr": lr, "batch": batch, "seqlen": seqlen, "seed": seed, "save_every": save_every, "log": log}
    if method == "prompts":
        job = _bank_job(lm, args, output, num_prompts, prompt_len, assign, layers, init, member, export_peft_dir)
    else:
        job = _lora_job(lm, args, output, rank, alpha, targets)
    teacher_lm = None
    if objective == "kd":
        args["teacher"] = teacher = teacher or default_teacher(lm)
        teacher_lm = options.load_teacher(teacher, lm, device, dtype, trust_remote_code)
    provenance = _provenance(lm, model, args)
    state = _start(output, args, lm, job["init"], resume, log)
    windows = draw_windows(texts, lm.tokenizer, steps * batch, seqlen, seed)
    state, loss = _run(job["train"], teacher_lm, windows, state, output, provenance, log, save_every, steps,
                       job["label"], progress)
    extra = job["save"](state, loss, provenance)
    with JsonlWriter(STDIO) as out:
        out.write({"output": output, "model": model, "fingerprint": lm.fingerprint, **extra,
                   "seconds": round(time.perf_counter() - t0, 2)})


def _check_outputs(output: str, method: str, log: str | None, export_dir: str | None, save_every: int, data: str,
                   model: str, teacher: str | None) -> None:
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input, Output, check_outputs

    outs = [Output("-o", output, "dir" if method == "lora" else "file"), Output("--log", log or ""),
            Output("--export-peft", export_dir or "", "dir")]
    if save_every:
        outs.append(Output("-o (its checkpoint)", str(checkpoint_path(output))))
    ins = [Input("--data", data), *(Input("--model", p) for p in model_paths(model)),
           *(Input("--teacher", p) for p in (model_paths(teacher) if teacher else []))]
    check_outputs(outs, ins)


def _provenance(lm: Any, model: str, args: dict[str, Any]) -> Any:
    from ..ops.core.artifacts import Provenance

    return Provenance("prompt-bank", model, lm.fingerprint, args)


def _start(output: str, args: dict[str, Any], lm: Any, init: Any, resume: bool, log: str | None) -> Any:
    """The state to train from: the checkpoint's with --resume, else a fresh one; the log trimmed to it."""
    from ..ops.recover.training import TrainState

    state = _resume(output, args, lm.fingerprint) if resume else TrainState(init())
    if state.step >= args["steps"]:
        raise UserError(f"--resume: the checkpoint is at step {state.step}, nothing left to do with --steps {args['steps']}")
    if log:
        _trim_log(log, state.step)
    return state


def _bank_job(lm: Any, args: dict[str, Any], output: str, num_prompts: int, prompt_len: int, assign: str, layers: str,
              init: str, member: int, export_dir: str | None) -> dict[str, Any]:
    """What a prompt bank run initialises, trains and writes."""
    from ..ops.core.artifacts import Provenance, save_artifact
    from ..ops.core.blocks import decoder_blocks
    from ..ops.recover.prompt_training import PromptTrainConfig, init_bank, train_prompts
    from ..ops.recover.prompts import peft_prompt_config
    from ..ops.recover.routing import parse_layers

    picked = tuple(parse_layers(layers, len(decoder_blocks(lm.model))))
    cfg = PromptTrainConfig(num_prompts, prompt_len, args["objective"], assign, args["steps"], args["lr"],
                            args["batch"], route_layers=picked, seed=args["seed"])
    cfg.check()
    if member >= num_prompts:
        raise UserError(f"--member {member}: the bank has {num_prompts} prompts (0..{num_prompts - 1})")
    args.update(num_prompts=num_prompts, prompt_len=prompt_len, assign=assign, layers=list(picked), init=init)

    def save(state: Any, loss: float, prov: Any) -> dict[str, Any]:
        bank = state.params["prompts"]
        shares = [round(c / max(sum(state.counts), 1), 4) for c in state.counts]
        extra = {"method": "prompts", "prompts": num_prompts, "length": prompt_len, "objective": cfg.objective,
                 "init": init, "steps": cfg.steps, "final_loss": loss, "assignment": shares, "parameters": bank.numel()}
        save_artifact(output, {"prompts": bank}, Provenance(prov.kind, prov.model, prov.fingerprint, args, extra))
        if export_dir:
            write_peft(export_dir, peft_prompt_config(bank[member], lm.model.config, prov.model),
                       {"prompt_embeddings": bank[member]})
        return {**extra, "peft": export_dir}

    return {"label": f"{num_prompts}x{prompt_len} prompts", "save": save,
            "init": lambda: {"prompts": init_bank(lm.model, lm.tokenizer, num_prompts, prompt_len, init, args["seed"])},
            "train": lambda teacher, windows, state, on_step: train_prompts(lm.model, teacher, windows, cfg, state, on_step)}


def _lora_job(lm: Any, args: dict[str, Any], output: str, rank: int, alpha: float, targets: str) -> dict[str, Any]:
    """What a LoRA run initialises, trains and writes (a PEFT adapter directory)."""
    from ..ops.recover.lora import lora_parameters, peft_lora_config
    from ..ops.recover.lora_training import LoraTrainConfig, init_lora, train_lora

    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    cfg = LoraTrainConfig(rank, alpha, names, args["objective"], args["steps"], args["lr"], args["batch"], args["seed"])
    cfg.check()
    wrapped = init_lora(lm.model, cfg)
    args.update(rank=rank, alpha=alpha, targets=list(names))

    def save(state: Any, loss: float, prov: Any) -> dict[str, Any]:
        write_peft(output, peft_lora_config(rank, alpha, list(names), prov.model), state.params)
        return {"method": "lora", "rank": rank, "alpha": alpha, "targets": list(names), "modules": len(wrapped),
                "objective": cfg.objective, "steps": cfg.steps, "final_loss": loss,
                "parameters": sum(t.numel() for t in state.params.values())}

    return {"label": f"LoRA r={rank}", "save": save,
            "init": lambda: {k: p.detach().float().cpu().clone() for k, p in lora_parameters(wrapped).items()},
            "train": lambda teacher, windows, state, on_step: train_lora(lm.model, wrapped, teacher, windows, cfg,
                                                                         state, on_step)}


def _run(train, teacher_lm, windows, state, output, provenance, log, save_every, steps, label,
         progress) -> tuple[Any, float]:
    """The training loop with its progress bar, loss log and checkpoints: (final state, last step's loss)."""
    from .jsonl import dumps

    last = {"loss": float("nan")}
    log_file = open(log, "ab") if log else None  # noqa: SIM115 -- appended per step, closed below
    try:
        with progress() as bar:
            task = bar.add_task(f"training {label}", total=steps, completed=state.step)

            def on_step(rec, st):
                last["loss"] = rec.loss
                if log_file:
                    counts = {"assignment": rec.counts} if rec.counts else {}
                    log_file.write(dumps({"step": rec.step, "loss": rec.loss, **counts, "seconds": round(rec.seconds, 3)}))
                    log_file.flush()
                if save_every and (rec.step % save_every == 0 or rec.step == steps):
                    _save_checkpoint(output, st, provenance)
                bar.update(task, completed=rec.step, description=f"training {label}  loss {rec.loss:.4f}")

            state = train(teacher_lm.model if teacher_lm else None, windows, state, on_step)
    finally:
        if log_file:
            log_file.close()
    return state, last["loss"]
