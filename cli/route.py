"""`rechannel route`: pick a bank's prompt for every input record (IDP), JSONL in and out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from ..ops.core.errors import UserError, unknown_choice
from . import options

Prompts = Annotated[str, typer.Option("--prompts", "-p", help="The prompt bank (.safetensors) from train-prompts.")]
By = Annotated[str, typer.Option(help="attention (IDP: the prompt the input attends to most) or entropy (the prompt under "
                                      "which the model is least uncertain; M passes).")]
Calibration = Annotated[str, typer.Option(help="attention: auto (centroid where the bank has statistics for these "
                                               "--layers, else none), none (raw argmax), ratio, zscore or centroid "
                                               "(the bank's per-source score statistics).")]
Field = Annotated[str, typer.Option(help="The record field holding the text to route.")]
SourceField = Annotated[str | None, typer.Option(help="The record field naming each input's source: routing accuracy "
                                                      "against it goes in --summary.")]
Layers = Annotated[str, typer.Option(help="Layers attention routing reads: first (the first 1/8: cheap), all, A:B or i,j,k.")]
Summary = Annotated[str | None, typer.Option(help="Also write the histogram of chosen prompts (and the routing "
                                                  "accuracy) as JSON here.")]
Input = Annotated[str, typer.Option("--input", "-i", help="JSONL records ('-' = stdin).")]
Output = Annotated[str, typer.Option("--output", "-o", help="Where the records go ('-' = stdout).")]
BatchSize = Annotated[int, typer.Option(min=1, help="Inputs per forward batch.")]


def route_command(
    prompts: Prompts,
    by: By = "attention",
    calibration: Calibration = "auto",
    field: Field = "text",
    source_field: SourceField = None,
    layers: Layers = "first",
    summary: Summary = None,
    input: Input = "-",
    output: Output = "-",
    batch_size: BatchSize = 8,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Choose a prompt of the bank for every record; each record gains "route".

    [bold]Examples[/bold]

      rechannel route --model out/wanda50 --prompts bank.safetensors < questions.jsonl > routed.jsonl
      rechannel sources --split heldout | rechannel route -m out/wanda50 -p bank.safetensors --field input --source-field source --summary routing.json > /dev/null
      rechannel route -m out/gptq3 -p bank.safetensors --field question --by entropy -i q.jsonl | jq .route.prompt

    The prompts' keys and values are computed once; each input then runs once with every prompt in front of it (each at the positions it was trained at) and each prompt is scored by the attention the input's tokens pay it (mean over heads, tokens and --layers). --calibration turns the scores into a choice using the statistics the bank stored in training: none takes the raw argmax (one loud prompt tends to win everything), centroid the source whose score pattern the input's is closest to. The record gains "route": {"prompt", "source", "scores", "by", "layers", "calibration"}; a summary of the routing (chosen prompts, accuracy against --source-field) goes to stderr and --summary.
    """
    from ..ops.core.distributed import concat, gather, join, refuse_stdin, together
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input as In
    from ..ops.core.outputs import Output as Out
    from ..ops.core.outputs import check_outputs
    from ..ops.core.records import read_jsonl
    from ..ops.recover.routing import BY
    from .jsonl import write_json

    if by not in BY:
        raise unknown_choice("by", by, BY)
    world = join()

    def read() -> list:
        refuse_stdin("--input", input, world)
        check_outputs([Out("-o", output), Out("--summary", summary or "")],
                      [In("--input", input), In("--prompts", prompts), *(In("--model", p) for p in model_paths(model))])
        return read_jsonl(input, require=(field,) + ((source_field,) if source_field else ()))

    records = together(read, world)  # every rank reads the input; a bad line stops them all
    job = _Job(prompts, by, calibration, layers, batch_size, (model, device, dtype, trust_remote_code))
    parts = gather(lambda: _route_shard(job, [r.field(field, str) for r in records], source_field, world), world)
    if not world.main:  # under torchrun, rank 0 writes
        return
    routes, (how, sources, n_prompts) = concat([p[0] for p in parts]), parts[0][1]
    _write_records(output, records, routes, sources, how)
    truth = [r.field(source_field) for r in records] if source_field else None
    report = _summary([k for k, _ in routes], n_prompts, sources, truth)
    _print_summary(report)
    if summary:
        write_json(summary, report)


@dataclass(frozen=True)
class _Job:
    """What routing one shard needs besides its texts."""

    prompts: str
    by: str
    calibration: str
    layers: str
    batch_size: int
    model: tuple  # (spec, device, dtype, trust_remote_code) for options.load


def _route_shard(job: _Job, texts: list[str], source_field: str | None, world) -> tuple[list, tuple]:
    """Load the model and the bank on this rank's device and route this rank's share of the texts:
    ((row, scores) per text, (how they were chosen, the bank's sources, its prompts))."""
    from ..ops.core.blocks import decoder_blocks
    from ..ops.core.distributed import global_progress, rank_device, sharded
    from ..ops.recover.prompts import Route, load_prompt_bank, router
    from ..ops.recover.route_calibration import resolve_calibration
    from ..ops.recover.routing import parse_layers
    from .console import bars

    mine = sharded(texts, world, "inputs")
    spec, device, dtype, trust_remote_code = job.model
    lm = options.load(spec, rank_device(device, world), dtype, trust_remote_code)
    bank = load_prompt_bank(job.prompts, lm)
    picked = tuple(parse_layers(job.layers, len(decoder_blocks(lm.model))))
    calibration = job.calibration
    if job.by == "attention":
        calibration = resolve_calibration(calibration, bank.score_mean, bank.layers, picked)
    if source_field and not bank.row_sources:
        raise UserError("--source-field: the bank records no source names to compare with")
    choose = router(Route(job.by), lm.model, lm.tokenizer, bank, picked, calibration, with_scores=True)
    with bars() as report:
        stage, progress = f"routing by {job.by}", global_progress(report, world)
        progress(stage, total=len(texts))  # rank 0 counts every rank's inputs
        routes = _route_all(choose, mine, job.batch_size, stage, progress)
    how = {"by": job.by, **({"layers": list(picked), "calibration": calibration} if job.by == "attention" else {})}
    return routes, (how, bank.row_sources, len(bank.prompts))


def _route_all(choose, texts: list[str], batch_size: int, stage: str, progress) -> list:
    """(row, scores) for every text, `batch_size` texts per forward, each batch told to `progress`."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of alike lengths: little padding
    routes: list = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, r in zip(chunk, choose([texts[i] for i in chunk], ""), strict=True):
            routes[i] = r
        progress(stage, advance=len(chunk))
    return routes


def _write_records(output: str, records: list, routes: list, names: list[str] | None, how: dict) -> None:
    """Each record with its "route": the chosen prompt, its source, the raw scores and how it was chosen."""
    from .jsonl import JsonlWriter

    with JsonlWriter(output) as out:
        for rec, (k, scores) in zip(records, routes, strict=True):
            source = {"source": names[k]} if names else {}
            out.write({**rec.data, "route": {"prompt": k, **source, "scores": [round(v, 6) for v in scores], **how}})


def _summary(rows: list[int], n_prompts: int, sources: list[str] | None, truth: list | None) -> dict:
    """The histogram of chosen prompts and, with the inputs' sources, the routing accuracy against them."""
    from ..ops.recover.routing_report import routing_accuracy, routing_report

    report = routing_report(rows, n_prompts, sources)
    if truth is not None:
        report["against_source"] = routing_accuracy([sources[k] for k in rows], [str(t) for t in truth])
    return report


def _print_summary(report: dict) -> None:
    from .console import console

    shares = ", ".join(f"{i}: {s:.1%}" for i, s in enumerate(report["shares"]))
    console().print(f"routed {report['examples']} inputs; prompts chosen {shares}", soft_wrap=True, markup=False)
    acc = report.get("against_source")
    if acc:
        per = ", ".join(f"{s} {a:.1%}" for s, a in acc["per_source"].items())
        console().print(f"routing accuracy against the source: {acc['accuracy']:.1%} (chance {acc['chance']:.1%}); "
                        f"{per}", soft_wrap=True, markup=False)
