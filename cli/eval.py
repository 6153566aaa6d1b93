"""`rechannel eval`: knowledge tasks and perplexity, in lm-evaluation-harness's result layout.

The work is ops/evaluation/api.py's `evaluate`; this module parses the options, streams the records to
stdout as JSON Lines, draws the summary on stderr and writes the results document to -o.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from . import options

Tasks = Annotated[str | None, typer.Option(
    help="Comma-separated: arc_easy, arc_challenge, boolq, piqa, openbookqa, winogrande, commonsenseqa, "
         "lambada, triviaqa, wikitext2, c4. Default wikitext2 (none when --data is given).")]
Data = Annotated[str | None, typer.Option(help="Your own task file in the canonical schema of --kind.")]
Kind = Annotated[str, typer.Option(help="--data's kind: mc {id,context,choices,gold}, qa {id,question,answers}, "
                                        "ppl {text}.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Only the first N examples (windows for perplexity).")]
Windows = Annotated[int | None, typer.Option(min=1, help="Perplexity: only the first N windows \\[default: --limit].",
                                             show_default=False)]
BatchSize = Annotated[str, typer.Option(help="Examples (or windows) per forward batch, or 'auto'.")]
Seqlen = Annotated[int, typer.Option(min=2, help="Perplexity window length in tokens.")]
Stride = Annotated[int | None, typer.Option(min=1, help="Perplexity: slide windows by this many tokens, scoring "
                                                        "only new ones (default: non-overlapping).")]
Prompts = Annotated[str | None, typer.Option(help="A prompt bank (.safetensors): its soft prompt goes in front "
                                                  "of every example.")]
Route = Annotated[str, typer.Option(help="Which prompt each example gets: attention (IDP: the one its tokens "
                                         "attend to most, after --calibration), entropy, oracle (the prompt trained on "
                                         "the task's own source: the upper bound), random (the lower bound), record "
                                         "(the prompt each record's 'route' names, from `rechannel route`), fixed:K or none.")]
Calibration = Annotated[str, typer.Option(help="--route attention: auto (centroid where the bank has statistics for "
                                               "these --layers, else none), none (raw argmax), ratio (score over the prompt's "
                                               "mean on its own source), zscore (per prompt), centroid (the source "
                                               "whose score pattern is closest).")]
Layers = Annotated[str, typer.Option(help="--route attention reads these layers: first (the first 1/8), all, "
                                          "A:B or i,j,k.")]
Adapter = Annotated[str | None, typer.Option(help="A PEFT LoRA adapter directory, merged before evaluating.")]
AttentionProfile = Annotated[int, typer.Option(min=0, help="Also record, per layer, the attention mass the first N "
                                                       "contexts of the first example task put on their prompt "
                                                       "(or their first token without one).")]
Output = Annotated[str | None, typer.Option("--output", "-o", help="Results JSON (lm-evaluation-harness layout).")]
Loader = Annotated[str, typer.Option(help="rechannel (quantized layers run packed, as every rechannel command runs them) "
                                          "or transformers (plain from_pretrained, compressed-tensors through "
                                          "transformers' own integration: what serving elsewhere gives).",
                                     rich_help_panel="Model")]


def _summary(results: dict[str, Any]) -> None:
    """The results as a table on stderr, for the person watching."""
    from rich.table import Table

    from .console import console

    t = Table(title="eval")
    for col, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("± stderr", "right"),
                         ("n", "right"), ("examples/s", "right")):
        t.add_column(col, justify=justify)
    for task, res in results.items():
        for key, value in res.items():
            if not key.endswith(",none") or "_stderr" in key or key == "nll,none":
                continue
            name = key.split(",")[0]
            se = res.get(f"{name}_stderr,none")
            t.add_row(task, name, f"{value:.4f}", "" if se is None else f"{se:.4f}",
                      str(res.get("samples", res.get("windows", ""))), str(res.get("examples_per_s", "")))
    console().print(t)


def eval_command(
    tasks: Tasks = None,
    data: Data = None,
    kind: Kind = "mc",
    data_dir: options.DataDir = options.DATA_DIR,
    limit: Limit = None,
    windows: Windows = None,
    batch_size: BatchSize = "auto",
    seqlen: Seqlen = 2048,
    stride: Stride = None,
    prompts: Prompts = None,
    route: Route = "none",
    calibration: Calibration = "auto",
    layers: Layers = "first",
    adapter: Adapter = None,
    attention_profile: AttentionProfile = 0,
    output: Output = None,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
    loader: Loader = "rechannel",
) -> None:
    """Evaluate a model: one JSON record per example on stdout, results to -o, a summary on stderr.

    [bold]Examples[/bold]

      rechannel eval --tasks arc_easy,boolq,piqa,winogrande --limit 500 -o dense.json > samples.jsonl
      rechannel eval --model out/wanda50 --tasks wikitext2 --seqlen 2048 -o wanda50.json
      rechannel eval --data my_mc.jsonl --kind mc -o mine.json
      rechannel eval --model out/gptq4 --loader transformers --tasks wikitext2 -o gptq4.hf.json
      jq '.results.arc_easy["acc,none"]' dense.json
      torchrun --nproc-per-node 8 --no-python rechannel eval -m out/gptq4 --tasks arc_easy -o a.json > a.jsonl

    Multiple choice is scored by the log-likelihood of each choice after the context (acc, and acc_norm dividing by the choice's length), with the context computed once per example; templates follow lm-evaluation-harness. Perplexity is exp(mean window NLL) over non-overlapping windows of --seqlen tokens, as GPTQ, SparseGPT and Wanda compute it. Under torchrun each rank scores a contiguous share of every task on its own device and rank 0 writes everything in input order (README: Scaling out).
    """
    from ..ops.core.distributed import world
    from ..ops.evaluation.api import EvalConfig, evaluate
    from .console import bars
    from .jsonl import STDIO, JsonlWriter, write_json

    config = EvalConfig(tasks=tasks, data=data, kind=kind, data_dir=data_dir, limit=limit, windows=windows,
                        batch_size=batch_size, seqlen=seqlen, stride=stride, prompts=prompts, route=route,
                        calibration=calibration, layers=layers, adapter=adapter, attention_profile=attention_profile, output=output,
                        model=model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, loader=loader)
    if not world().main:  # under torchrun, rank 0 writes the records, the document and the summary
        evaluate(config, on_record=lambda r: None, load=options.load, world=world())
        return
    with JsonlWriter(STDIO) as out, bars() as report:  # records on stdout as each task finishes
        doc = evaluate(config, report, on_record=out.write, load=options.load, world=world())
    _summary(doc["results"])
    if output:
        write_json(output, doc)
