"""`rechannel train-prompts`: learn a bank of soft prompts in front of a frozen (compressed) model."""

from __future__ import annotations

from typing import Annotated

import typer

from . import options
from .calibrate import Docs, Field

# The options, in the order --help lists them (Data, Field, Docs and the model options are shared).
Data = Annotated[list[str], typer.Option("--data", "-d", help="JSONL of documents ('-' = stdin); repeated as NAME=FILE, one source each: one set of prompts per source, trained on its text only.")]
SourceField = Annotated[str | None, typer.Option(help="Split the one --data file into sources by this record field (as `rechannel sources` writes them).")]
InputField = Annotated[str | None, typer.Option(help="The record field routing reads (the question without its answer); the bank's routing statistics are taken over it \\[default: --field].", show_default=False)]
Pool = Annotated[bool, typer.Option("--pool", help="Several sources: train --num-prompts prompts on all of them together, on the very windows the per-source bank trains on (the one-prompt baseline).")]
Output = Annotated[str, typer.Option("--output", "-o", help="The prompt bank (.safetensors), or with --method lora the PEFT adapter directory.")]
Method = Annotated[str, typer.Option(help="prompts (a bank of soft prompts) or lora (the re-training baseline).")]
Teacher = Annotated[str | None, typer.Option(help="The dense model for --objective kd \\[default: the model this one was compressed from].", show_default=False)]
NumPrompts = Annotated[int, typer.Option(min=1, help="Prompts per source (K); the bank has sources x K (M). One source and 1: the single-prompt baseline.")]
PromptLen = Annotated[int, typer.Option(min=1, help="Virtual tokens per prompt (P).")]
Objective = Annotated[str, typer.Option(help="kd: KL(teacher || student) per token; lm: next-token cross-entropy.")]
Assign = Annotated[str, typer.Option(help="Which prompt a window trains: router (as `route` picks), balanced (router scores, each prompt at most ceil(batch/M) windows per step), random, all.")]
Layers = Annotated[str, typer.Option(help="Layers the router reads: first (the first 1/8), all, A:B or i,j,k.")]
Rank = Annotated[int, typer.Option(min=1, help="lora: rank r of each adapter.")]
Alpha = Annotated[float, typer.Option(min=0.0, help="lora: scale numerator (the update is alpha/r * B A).")]
Targets = Annotated[str, typer.Option(help="lora: the projections to adapt, by name.")]
Steps = Annotated[int, typer.Option(min=1, help="Optimizer steps.")]
Lr = Annotated[float | None, typer.Option(min=0.0, help="AdamW learning rate \\[default: 3e-2 for prompts, 1e-3 for lora].", show_default=False)]
Batch = Annotated[int, typer.Option(min=1, help="Windows per step from each source.")]
Seqlen = Annotated[int, typer.Option(min=2, help="Tokens per training window.")]
Init = Annotated[str, typer.Option(help='prompts: vocab (embeddings of random frequent tokens) or text:"some words".')]
Seed = Annotated[int, typer.Option(help="Seed of the window draw, the init and random assignment.")]
SaveEvery = Annotated[int, typer.Option(min=0, help="Write a checkpoint (OUTPUT.ckpt) every N steps; 0: never.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.ckpt (same settings; --steps may grow).")]
Log = Annotated[str | None, typer.Option(help="Loss curve, one JSON record per step.")]
ExportPeft = Annotated[str | None, typer.Option("--export-peft", help="prompts: also write prompt --member as a PEFT prompt-tuning adapter directory.")]
Member = Annotated[int, typer.Option(min=0, help="The bank row --export-peft writes.")]


def train_prompts_command(
    data: Data,
    output: Output,
    method: Method = "prompts",
    teacher: Teacher = None,
    field: Field = "text",
    docs: Docs = "",
    source_field: SourceField = None,
    input_field: InputField = None,
    pool: Pool = False,
    num_prompts: NumPrompts = 4,
    prompt_len: PromptLen = 16,
    objective: Objective = "kd",
    assign: Assign = "router",
    layers: Layers = "first",
    rank: Rank = 8,
    alpha: Alpha = 16.0,
    targets: Targets = "q_proj,v_proj",
    steps: Steps = 300,
    lr: Lr = None,
    batch: Batch = 8,
    seqlen: Seqlen = 256,
    init: Init = "vocab",
    seed: Seed = 0,
    save_every: SaveEvery = 50,
    resume: Resume = False,
    log: Log = None,
    export_peft: ExportPeft = None,
    member: Member = 0,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Train a bank of soft prompts (or a LoRA adapter) on a frozen model; only they learn.

    [bold]Examples[/bold]

      rechannel train-prompts --model out/wanda50 --data c4.jsonl --docs 500:1000 --num-prompts 4 -o bank.safetensors
      rechannel sources -o s.jsonl && rechannel train-prompts -m out/wanda50 --data s.jsonl --source-field source --input-field input --num-prompts 1 -o curated.safetensors
      rechannel train-prompts --model out/wanda50 --data c4.jsonl --method lora --rank 8 -o lora-wanda50
      rechannel train-prompts --model out/wanda50 --data c4.jsonl -o bank.safetensors --resume --steps 600
      torchrun --nproc-per-node 4 --no-python rechannel train-prompts -m out/wanda50 --data c4.jsonl --batch 16 -o bank.safetensors

    Windows of --seqlen tokens are drawn from the documents (seeded, as calibration draws them). With several sources (--data NAME=FILE repeated, or --source-field), each source's rows are packed into documents and drawn from apart, and each step trains every source's prompts on --batch windows of that source only; the bank records each prompt's source and the statistics calibrated routing needs. With --objective kd the teacher is the dense model the compressed one was made from, unless --teacher names another (same tokenizer required). Each window trains the prompt the router picks (--assign router), so the prompts specialise. --method lora trains the re-training baseline on the same windows and objective and writes a PEFT adapter directory (eval --adapter). Under torchrun each step's --batch is split across the ranks and their gradients summed: the same training as one process. Stdout: one JSON summary line.
    """
    from ..ops.recover.api import TrainConfig

    _train(TrainConfig(
        data[0] if len(data) == 1 else tuple(data), output, method=method, teacher=teacher, field=field, docs=docs,
        source_field=source_field, input_field=input_field, pool=pool, num_prompts=num_prompts, prompt_len=prompt_len, objective=objective,
        assign=assign, layers=layers, rank=rank, alpha=alpha, targets=targets, steps=steps, lr=lr, batch=batch,
        seqlen=seqlen, init=init, seed=seed, save_every=save_every, resume=resume, log=log, export_peft=export_peft,
        member=member, model=model, device=device, dtype=dtype, trust_remote_code=trust_remote_code))


def _train(config) -> None:
    """Train with bars on stderr; the summary line on stdout (under torchrun, rank 0's)."""
    from ..ops.core.distributed import world
    from ..ops.recover.api import train_prompts
    from .console import bars, tame_libraries
    from .jsonl import STDIO, JsonlWriter

    tame_libraries()
    with bars() as report:
        summary = train_prompts(config, progress=report, world=world())
    if world().main:
        with JsonlWriter(STDIO) as out:
            out.write(summary)
