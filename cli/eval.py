"""`rechannel eval`: measure a model on the registered tasks (perplexity today)."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import typer

from rechannel.cli import options


def _stderr(ppl: float, nlls: list[float]) -> float | None:
    """Standard error of the perplexity by the delta method over windows: ppl * sd(nll) / sqrt(n)."""
    n = len(nlls)
    if n < 2:
        return None
    mean = sum(nlls) / n
    var = sum((x - mean) ** 2 for x in nlls) / (n - 1)
    return ppl * (var / n) ** 0.5


def eval_command(
    tasks: Annotated[str, typer.Option(help="Comma-separated: wikitext2, c4.")] = "wikitext2",
    data_dir: Annotated[str, typer.Option(help="Where the benchmark files are ($RECHANNEL_DATA).")] =
        os.environ.get("RECHANNEL_DATA", "../shared/data"),
    seqlen: Annotated[int, typer.Option(min=2, help="Perplexity window length in tokens.")] = 2048,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N windows per task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward batch.")] = 1,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Results JSON (lm-evaluation-harness layout).")] = None,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Evaluate a model; per-window records on stdout, results (lm-evaluation-harness layout) to -o.

    [bold]Examples[/bold]

      rechannel eval --tasks wikitext2 --seqlen 2048 -o dense.json > windows.jsonl
      rechannel eval --model out/wanda50 --tasks wikitext2,c4 --limit 40 -o wanda50.json
      jq '.results.wikitext2["ppl,none"]' wanda50.json

    Perplexity is exp(mean window NLL) over non-overlapping windows of --seqlen tokens, as GPTQ, SparseGPT and Wanda compute it; the window length and the text joining are recorded with each number.
    """
    from rechannel import __version__
    from rechannel.cli.console import progress
    from rechannel.cli.jsonl import STDIO, JsonlWriter, write_json
    from rechannel.ops.perplexity import perplexity
    from rechannel.ops.tasks import get_tasks

    chosen = get_tasks(tasks)
    paths = {t.name: t.path(data_dir) for t in chosen}
    lm = options.load(model, device, dtype, trust_remote_code)
    results: dict[str, Any] = {}
    with JsonlWriter(STDIO) as out, progress() as bar:
        for task in chosen:
            t0 = time.perf_counter()
            stream = lm.tokenizer(task.read(str(paths[task.name])), return_tensors="pt").input_ids[0]
            n = min(stream.numel() // seqlen, limit or 10**9)
            job = bar.add_task(task.name, total=n)
            nlls: list[float] = []

            def record(batch_nll, task=task, nlls=nlls, job=job):
                for v in batch_nll.tolist():
                    out.write({"task": task.name, "window": len(nlls), "nll": v, "tokens": seqlen - 1})
                    nlls.append(v)
                bar.advance(job, len(batch_nll))

            res = perplexity(lm.model, stream, seqlen, limit, batch_size, on_windows=record)
            results[task.name] = {"alias": task.name, "ppl,none": res.perplexity,
                                  "ppl_stderr,none": _stderr(res.perplexity, nlls), "nll,none": res.mean_nll,
                                  "windows": res.windows, "seqlen": seqlen, "tokens_scored": res.tokens_scored,
                                  "text_tokens": stream.numel(), "joining": task.joining,
                                  "seconds": round(time.perf_counter() - t0, 2)}
    doc = {"results": results,
           "n-samples": {k: {"original": v["text_tokens"] // seqlen, "effective": v["windows"]} for k, v in results.items()},
           "config": {"model": model, "model_path": str(lm.path), "fingerprint": lm.fingerprint,
                      "rechannel": __version__, "tasks": tasks, "data_dir": data_dir, "seqlen": seqlen,
                      "limit": limit, "batch_size": batch_size, "device": str(lm.model.device),
                      "dtype": str(lm.model.dtype).removeprefix("torch."),
                      "compression": getattr(lm.model.config, "rechannel", None)}}
    if output:
        write_json(output, doc)
