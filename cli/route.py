"""`rechannel route`: pick a bank's prompt for every input record (IDP), JSONL in and out."""

from __future__ import annotations

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
    from ..ops.core.blocks import decoder_blocks
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input as In
    from ..ops.core.outputs import Output as Out
    from ..ops.core.outputs import check_outputs
    from ..ops.core.records import read_jsonl
    from ..ops.recover.prompts import Route, load_prompt_bank, router
    from ..ops.recover.route_calibration import resolve_calibration
    from ..ops.recover.routing import BY, parse_layers
    from .jsonl import write_json

    if by not in BY:
        raise unknown_choice("by", by, BY)
    check_outputs([Out("-o", output), Out("--summary", summary or "")],
                  [In("--input", input), In("--prompts", prompts), *(In("--model", p) for p in model_paths(model))])
    records = read_jsonl(input, require=(field,) + ((source_field,) if source_field else ()))
    texts = [r.field(field, str) for r in records]
    lm = options.load(model, device, dtype, trust_remote_code)
    bank = load_prompt_bank(prompts, lm)
    picked = tuple(parse_layers(layers, len(decoder_blocks(lm.model))))
    if by == "attention":
        calibration = resolve_calibration(calibration, bank.score_mean, bank.layers, picked)
    if source_field and not bank.row_sources:
        raise UserError("--source-field: the bank records no source names to compare with")
    choose = router(Route(by), lm.model, lm.tokenizer, bank, picked, calibration, with_scores=True)
    routes = _route_all(choose, texts, batch_size, by)
    how = {"by": by, **({"layers": list(picked), "calibration": calibration} if by == "attention" else {})}
    _write_records(output, records, routes, bank.row_sources, how)
    report = _summary([k for k, _ in routes], bank, [r.field(source_field) for r in records] if source_field else None)
    _print_summary(report)
    if summary:
        write_json(summary, report)


def _route_all(choose, texts: list[str], batch_size: int, by: str) -> list:
    """(row, scores) for every text, `batch_size` texts per forward, with a progress bar."""
    from .console import progress

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of alike lengths: little padding
    routes: list = [None] * len(texts)
    with progress() as bar:
        task = bar.add_task(f"routing by {by}", total=len(texts))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, r in zip(chunk, choose([texts[i] for i in chunk], ""), strict=True):
                routes[i] = r
            bar.advance(task, len(chunk))
    return routes


def _write_records(output: str, records: list, routes: list, names: list[str] | None, how: dict) -> None:
    """Each record with its "route": the chosen prompt, its source, the raw scores and how it was chosen."""
    from .jsonl import JsonlWriter

    with JsonlWriter(output) as out:
        for rec, (k, scores) in zip(records, routes, strict=True):
            source = {"source": names[k]} if names else {}
            out.write({**rec.data, "route": {"prompt": k, **source, "scores": [round(v, 6) for v in scores], **how}})


def _summary(rows: list[int], bank, truth: list | None) -> dict:
    """The histogram of chosen prompts and, with the inputs' sources, the routing accuracy against them."""
    from ..ops.recover.routing_report import routing_accuracy, routing_report

    report = routing_report(rows, len(bank.prompts), bank.row_sources)
    if truth is not None:
        report["against_source"] = routing_accuracy([bank.row_sources[k] for k in rows], [str(t) for t in truth])
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
