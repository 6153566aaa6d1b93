"""`rechannel align`: where, token by token, a teacher's distillation signal points toward success.

The options become an AlignRunConfig; ops/align/api.align does the work; cli/align_run.py reads the node file
back for --resume, writes it question by question, and writes the summary, the table and the figures."""

from __future__ import annotations

from typing import Annotated

import typer

from ..ops.core.errors import UserError
from . import options

Data = Annotated[str, typer.Option("--data", "-d", help="JSONL questions ('-' = stdin).")]
Output = Annotated[str, typer.Option("--output", "-o", help="The summary JSON ('-' = stdout).")]
Student = Annotated[str, typer.Option(help="The student: alias, .gguf or model directory.", rich_help_panel="Model")]
Teacher = Annotated[list[str] | None, typer.Option(help="A teacher model with the student's tokenizer, or "
                                                   "'self' (repeatable; default self).")]
Context = Annotated[list[str] | None, typer.Option(help="What each teacher sees before the rollout: none, "
                                                   "reference or template:FILE (repeatable; default reference).")]
Field = Annotated[str, typer.Option(help="The record field holding the question.")]
Prompt = Annotated[str, typer.Option(help="What the student sees: none (the question field) or "
                                     "template:FILE ({field} placeholders filled from the record).")]
IdField = Annotated[str, typer.Option(help="The record field naming the question (else its index).")]
Verifier = Annotated[str, typer.Option(help="gsm8k, mc, exact or regex:PATTERN (reads the 'answer' field).")]
Rollouts = Annotated[int, typer.Option(min=1, help="Student rollouts per question.")]
Continuations = Annotated[int, typer.Option(min=1, help="Student continuations per candidate (S_k).")]
Candidates = Annotated[int, typer.Option(min=1, help="Top tokens of the student and of each teacher in K.")]
Budget = Annotated[int, typer.Option(help="Nodes per question.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="Sampling temperature of rollouts and continuations "
                                            "(p and q stay the models' own distributions).")]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Rollout length at most.")]
Beta = Annotated[float, typer.Option(help="β of JSD(β), in (0, 1): the teacher's weight in the mixture, as in "
                                     "GKD and TRL.")]
Seed = Annotated[int, typer.Option(help="Seed of rollouts, nodes and continuations.")]
MaxBatch = Annotated[int | None, typer.Option(min=1, help="Continuations decoded together at most (default: all "
                                              "of a node's); lower it if a large model runs out of memory.")]
SelectPassRate = Annotated[str | None, typer.Option(help="LOW:HIGH: analyse only questions whose rollouts pass at "
                                                    "a rate in this range, e.g. 0.1:0.9.")]
MaxQuestions = Annotated[int | None, typer.Option(min=1, help="Stop after this many analysed questions.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Read only the first N questions.")]
Nodes = Annotated[str, typer.Option(help="Where node records go ('-' = stdout), question by question.")]
Resume = Annotated[bool, typer.Option("--resume", help="Skip questions already in --nodes FILE.")]
Plot = Annotated[str | None, typer.Option(help="Write PNG figures into this directory.")]


def align_command(
    data: Data,
    output: Output,
    student: Student = "smollm2-135m",
    teacher: Teacher = None,
    context: Context = None,
    field: Field = "question",
    prompt: Prompt = "none",
    id_field: IdField = "id",
    verifier: Verifier = "gsm8k",
    rollouts: Rollouts = 8,
    continuations: Continuations = 8,
    candidates: Candidates = 4,
    budget: Budget = 64,
    temperature: Temperature = 1.0,
    max_new_tokens: MaxNewTokens = 256,
    beta: Beta = 0.5,
    seed: Seed = 0,
    max_batch: MaxBatch = None,
    select_pass_rate: SelectPassRate = None,
    max_questions: MaxQuestions = None,
    limit: Limit = None,
    nodes: Nodes = "-",
    resume: Resume = False,
    plot: Plot = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Diagnose distillation per token: does a teacher's gradient point where the student's success rises?

    Node records go to stdout (or --nodes), the summary to -o, a table to stderr.

    [bold]Examples[/bold]

      rechannel align --data gsm8k.jsonl --context reference -o summary.json > nodes.jsonl
      rechannel align --student out/gptq-4 --teacher smollm2-135m --teacher self \\
          --context none --context reference --data gsm8k.jsonl --select-pass-rate 0.1:0.9 -o s.json
      jq 'select(.kind == "node") | .teachers["self+reference"].align.rkl' nodes.jsonl
    """
    from ..ops.align.api import SELF, AlignRunConfig
    from .align_run import run

    if output == "-" and nodes == "-":
        raise UserError("the node records already go to stdout: write the summary to a file (-o FILE) or the "
                        "records elsewhere (--nodes FILE)")
    run(AlignRunConfig(
        data=data, output=output, student=student, teacher=tuple(teacher or [SELF]),
        context=tuple(context or ["reference"]), field=field, prompt=prompt, id_field=id_field, verifier=verifier,
        rollouts=rollouts, continuations=continuations, candidates=candidates, budget=budget,
        temperature=temperature, max_new_tokens=max_new_tokens, beta=beta, seed=seed, max_batch=max_batch,
        select_pass_rate=select_pass_rate, max_questions=max_questions, limit=limit, nodes=nodes, resume=resume,
        plot=plot, device=device, dtype=dtype, trust_remote_code=trust_remote_code))
