"""`rechannel eval`: knowledge tasks and perplexity, in lm-evaluation-harness's result layout."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import typer

from ..ops.core.errors import UserError
from . import options

AUTO_START = {"cuda": 64, "cpu": 32}  # --batch-size auto: first try (halved on out-of-memory on a GPU)
CPU_TOKENS = 1024  # --batch-size auto on a CPU: also at most this many padded tokens per forward batch


def _ppl_stderr(ppl: float, nlls: list[float]) -> float | None:
    """Standard error of the perplexity by the delta method over windows: ppl * sd(nll) / sqrt(n)."""
    from ..ops.evaluation.metrics import mean_stderr

    se = mean_stderr(nlls)
    return None if se is None else ppl * se


def _parse_batch_size(text: str) -> int | None:
    """An int, or None for auto."""
    if text == "auto":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"--batch-size {text!r}: give a positive integer or 'auto'")


def _with_batch_size(run, requested: int | None, device: str):
    """Run `run(batch_size)`; with auto, halve the batch on a GPU out-of-memory error and try again
    (batches go longest first, so an oversized batch fails at once). Returns (result, batch size used)."""
    import torch

    size = requested or AUTO_START["cuda" if device.startswith("cuda") else "cpu"]
    while True:
        try:
            return run(size), size
        except torch.cuda.OutOfMemoryError:
            if requested is not None or size == 1:
                raise UserError(f"out of GPU memory at --batch-size {size}; try a smaller one") from None
            torch.cuda.empty_cache()
            size //= 2


def _conditioning(lm: Any, prompts: str | None, route: str, layers: str) -> tuple[Any, dict[str, Any] | None]:
    """The soft-prompt bank and route, and what they cost in parameters. A bank trained for another model
    is refused (load_artifact checks its fingerprint)."""
    from ..ops.core.artifacts import load_prompt_bank
    from ..ops.core.blocks import decoder_blocks
    from ..ops.evaluation.evaluator import Conditioning
    from ..ops.recover.prompts import parse_route, router
    from ..ops.recover.routing import parse_layers

    r = parse_route(route)
    if prompts is None:
        if r.kind != "none":
            raise UserError(f"--route {route} needs a prompt bank: --prompts BANK.safetensors")
        return Conditioning(), None
    bank = load_prompt_bank(prompts, lm, r)
    if r.kind == "none":
        return Conditioning(), {"path": prompts, "route": "none", "parameters": 0}
    picked = tuple(parse_layers(layers, len(decoder_blocks(lm.model))))
    info = {"path": prompts, "route": str(r), "prompts": bank.shape[0], "length": bank.shape[1],
            "parameters": bank.numel(), **({"layers": list(picked)} if r.kind == "attention" else {})}
    return Conditioning(bank, router(r, lm.model, lm.tokenizer, bank, picked), r.kind == "record"), info


def _window_prompts(lm: Any, cond: Any):
    """windows (B, T) -> their soft prompts (B, P, d): each window routed on its own text."""
    if cond.prompts is None:
        return None
    return lambda ids: cond.prompts[cond.rows([lm.tokenizer.decode(w) for w in ids.tolist()], [])]


def _run_ppl(lm: Any, task: Any, text: str, seqlen: int, stride: int | None, limit: int | None, batch_size: int,
             cond: Any, out: Any, advance) -> tuple[dict[str, Any], int]:
    from ..ops.evaluation.perplexity import perplexity, sliding_perplexity

    t0 = time.perf_counter()
    stream = lm.tokenizer(text, return_tensors="pt").input_ids[0]
    nlls: list[float] = []

    def record(batch_nll):
        nlls.extend(batch_nll.tolist())
        advance(len(batch_nll))

    if stride:
        res = sliding_perplexity(lm.model, stream, seqlen, stride, limit, on_windows=record)
    else:
        res = perplexity(lm.model, stream, seqlen, limit, batch_size, on_windows=record,
                         prompts=_window_prompts(lm, cond))
    seconds = time.perf_counter() - t0
    if any(v != v for v in nlls):  # NaN: exp would report it as a perplexity
        raise UserError(f"{task.name}: {sum(v != v for v in nlls)} of {len(nlls)} windows have a NaN loss; the "
                        "model's outputs are not numbers (damaged weights, or float16 overflow: try --dtype float32)")
    for i, v in enumerate(nlls):  # written once the task is done: a retry at a smaller batch writes no window twice
        out.write({"task": task.name, "window": i, "nll": v})
    return {"ppl,none": res.perplexity, "ppl_stderr,none": None if stride else _ppl_stderr(res.perplexity, nlls),
            "nll,none": res.mean_nll, "windows": res.windows, "seqlen": seqlen, "stride": stride,
            "tokens_scored": res.tokens_scored, "text_tokens": stream.numel(), "seconds": round(seconds, 2),
            "tokens_per_s": round(res.tokens_scored / seconds, 1)}, stream.numel() // seqlen


def _run_examples(lm: Any, task: Any, examples: list, batch_size: int, cond: Any, out: Any, advance,
                  max_tokens: int | None) -> dict[str, Any]:
    from ..ops.evaluation.evaluator import run_choice_task, run_qa_task

    if task.kind == "qa":
        run = run_qa_task(lm.model, lm.tokenizer, task.name, examples, batch_size, cond, advance)
    else:
        run = run_choice_task(lm.model, lm.tokenizer, task.name, task.kind, examples, batch_size, cond, advance,
                              max_tokens)
    out.write_all(run.records)
    n = len(run.records)
    return {**run.metrics, "samples": n, "seconds": round(run.seconds, 2),
            "examples_per_s": round(n / run.seconds, 2), "tokens_per_s": round(run.tokens / run.seconds, 1),
            "seconds_per_example": round(run.seconds / n, 4)}


def _check_outputs(output: str | None, model: str, data: str | None, prompts: str | None, adapter: str | None,
                   task_files: list[str], data_dir: str) -> None:
    from pathlib import Path

    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input, Output, check_outputs

    ins = [*(Input("--model", p) for p in model_paths(model)), Input("--data", data or ""),
           Input("--prompts", prompts or ""), Input("--adapter", adapter or ""),
           *(Input("--tasks", str(Path(data_dir) / f)) for f in task_files)]
    check_outputs([Output("-o", output or "")], ins)


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
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated: arc_easy, arc_challenge, boolq, piqa, openbookqa, winogrande, commonsenseqa, "
             "lambada, triviaqa, wikitext2, c4. Default wikitext2 (none when --data is given).")] = None,
    data: Annotated[str | None, typer.Option(help="Your own task file in the canonical schema of --kind.")] = None,
    kind: Annotated[str, typer.Option(help="--data's kind: mc {id,context,choices,gold}, qa {id,question,answers}, "
                                           "ppl {text}.")] = "mc",
    data_dir: Annotated[str, typer.Option(help="Where the benchmark files are ($RECHANNEL_DATA).")] =
        os.environ.get("RECHANNEL_DATA", "../shared/data"),
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N examples (windows for perplexity).")] = None,
    windows: Annotated[int | None, typer.Option(min=1, help="Perplexity: only the first N windows \\[default: --limit].",
                                                show_default=False)] = None,
    batch_size: Annotated[str, typer.Option(help="Examples (or windows) per forward batch, or 'auto'.")] = "auto",
    seqlen: Annotated[int, typer.Option(min=2, help="Perplexity window length in tokens.")] = 2048,
    stride: Annotated[int | None, typer.Option(min=1, help="Perplexity: slide windows by this many tokens, scoring "
                                                           "only new ones (default: non-overlapping).")] = None,
    prompts: Annotated[str | None, typer.Option(help="A prompt bank (.safetensors): its soft prompt goes in front "
                                                     "of every example.")] = None,
    route: Annotated[str, typer.Option(help="Which prompt each example gets: attention (IDP: the one its tokens "
                                            "attend to most), entropy, record (the prompt each record's 'route' names, "
                                            "from `rechannel route`), fixed:K or none.")] = "none",
    layers: Annotated[str, typer.Option(help="--route attention reads these layers: first (the first 1/8), all, "
                                             "A:B or i,j,k.")] = "first",
    adapter: Annotated[str | None, typer.Option(help="A PEFT LoRA adapter directory, merged before evaluating.")] = None,
    attention_profile: Annotated[int, typer.Option(min=0, help="Also record, per layer, the attention mass the first N "
                                                          "contexts of the first example task put on their prompt "
                                                          "(or their first token without one).")] = 0,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Results JSON (lm-evaluation-harness layout).")] = None,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Evaluate a model: one JSON record per example on stdout, results to -o, a summary on stderr.

    [bold]Examples[/bold]

      rechannel eval --tasks arc_easy,boolq,piqa,winogrande --limit 500 -o dense.json > samples.jsonl
      rechannel eval --model out/wanda50 --tasks wikitext2 --seqlen 2048 -o wanda50.json
      rechannel eval --data my_mc.jsonl --kind mc -o mine.json
      jq '.results.arc_easy["acc,none"]' dense.json

    Multiple choice is scored by the log-likelihood of each choice after the context (acc, and acc_norm dividing by the choice's length), with the context computed once per example; templates follow lm-evaluation-harness. Perplexity is exp(mean window NLL) over non-overlapping windows of --seqlen tokens, as GPTQ, SparseGPT and Wanda compute it.
    """
    from ..ops.core.version import __version__
    from ..ops.evaluation.tasks import get_tasks, user_task
    from .console import progress
    from .jsonl import STDIO, JsonlWriter, write_json

    if tasks is not None and not tasks.strip(","):
        raise UserError("--tasks is empty: name at least one task, e.g. --tasks arc_easy,wikitext2")
    chosen = get_tasks(tasks if tasks is not None else "wikitext2") if tasks is not None or not data else []
    if data:
        chosen.append(user_task(data, kind))
    requested = _parse_batch_size(batch_size)
    if stride and prompts:
        raise UserError("--stride with --prompts is not supported: prompted perplexity uses whole windows")
    if route == "record" and any(t.kind == "ppl" for t in chosen):
        raise UserError("--route record takes each example's prompt from its record; perplexity windows have none")
    ppl_limit = windows if windows is not None else limit
    _check_outputs(output, model, data, prompts, adapter, [p for t in chosen for p in t.files], data_dir)
    everything = {t.name: t.load(data_dir) for t in chosen}  # every input is read and checked before the model loads
    lm = options.load(model, device, dtype, trust_remote_code)
    extra: dict[str, Any] = {}
    if adapter:
        from ..ops.recover.lora import merge_adapter

        extra["adapter"] = vars(merge_adapter(lm.model, adapter))
    cond, bank_info = _conditioning(lm, prompts, route, layers)
    if bank_info:
        extra["prompts"] = bank_info
    token_budget = CPU_TOKENS if requested is None and lm.model.device.type == "cpu" else None
    results: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    used_batch: dict[str, int] = {}
    with JsonlWriter(STDIO) as out, progress() as bar:
        for task in chosen:
            job = bar.add_task(task.name, total=None)
            data_in = everything[task.name]

            def run(b, task=task, data_in=data_in, job=job):
                bar.reset(job, total=None)  # a retry at a smaller batch starts over
                advance = lambda n: bar.advance(job, n)  # noqa: E731
                if task.kind == "ppl":
                    batch = max(1, min(b, token_budget // seqlen)) if token_budget else b
                    return _run_ppl(lm, task, data_in, seqlen, stride, ppl_limit, batch, cond, out, advance)
                return _run_examples(lm, task, data_in[:limit] if limit else data_in, b, cond, out, advance,
                                     token_budget)

            res, used_batch[task.name] = _with_batch_size(run, requested, str(lm.model.device))
            if task.kind == "ppl":
                res, original = res
                n_samples[task.name] = {"original": original, "effective": res["windows"]}
            else:
                n_samples[task.name] = {"original": len(data_in), "effective": res["samples"]}
            results[task.name] = {"alias": task.name, **res}
    doc = {"results": results, "n-samples": n_samples,
           "configs": {t.name: {"task": t.name, "kind": t.kind, "files": list(t.files), "template": t.template,
                                "num_fewshot": 0} for t in chosen},
           "config": {"model": model, "model_path": str(lm.path), "fingerprint": lm.fingerprint,
                      "model_bytes": sum(f.stat().st_size for f in lm.path.glob("*.safetensors")),
                      "rechannel": __version__, "tasks": [t.name for t in chosen], "data": data,
                      "data_dir": data_dir, "limit": limit, "windows": ppl_limit, "batch_size": batch_size, "batch_size_used": used_batch,
                      "seqlen": seqlen, "stride": stride, "device": str(lm.model.device),
                      "dtype": str(lm.model.dtype).removeprefix("torch."),
                      "compression": getattr(lm.model.config, "rechannel", None), **extra,
                      "extra_parameters": sum(v.get("parameters", 0) for v in extra.values())}}
    profile_task = next((t for t in chosen if t.kind not in ("ppl", "qa")), None)
    if attention_profile and profile_task is not None:
        from ..ops.evaluation.evaluator import attention_profile as profile

        examples = everything[profile_task.name][:attention_profile]
        doc["attention_profile"] = {"task": profile_task.name, "examples": len(examples),
                                    "prefix": "prompt" if cond.prompts is not None else "first token",
                                    "mass": profile(lm.model, lm.tokenizer, examples, cond)}
    _summary(results)
    if output:
        write_json(output, doc)
