"""The `eval` driver as a Python API: knowledge tasks and perplexity, in lm-evaluation-harness's result layout.

    from rechannel.ops.evaluation.api import EvalConfig, evaluate
    doc = evaluate(EvalConfig(tasks="arc_easy,wikitext2", limit=100, model="out/wanda50"))
    doc["results"]["arc_easy"]["acc,none"], doc["samples"]["arc_easy"][0]

`evaluate` returns the document `rechannel eval -o` writes (results, n-samples, configs, config, and
attention_profile when asked). Each task's records (one per example, one per window for perplexity) go to
`on_record` once the task is done, in the order the CLI prints them; without `on_record` they are kept in
the document under "samples" (task -> records), as lm-evaluation-harness's log_samples keeps them.
Every option, the output path and every task file are checked before the model loads (a bad one is a
one-line UserError). Progress goes through one `Progress` callback: one stage per task, named after it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.errors import UserError
from ..core.progress import Progress, silent

AUTO_START = {"cuda": 64, "cpu": 32}  # batch size auto: first try (halved on out-of-memory on a GPU)
CPU_TOKENS = 1024  # batch size auto on a CPU: also at most this many padded tokens per forward batch

Record = dict[str, Any]
Loader = Callable[..., Any]  # (spec, *, device, dtype, trust_remote_code) -> LoadedModel, as ops.core.models.load_model


@dataclass(frozen=True)
class EvalConfig:
    """Every option of `rechannel eval`, with the same defaults."""

    tasks: str | None = None  # comma-separated built-in tasks; None: wikitext2, or none when `data` is given
    data: str | None = None  # your own task file in the canonical schema of `kind`
    kind: str = "mc"  # `data`'s kind: mc {id,context,choices,gold}, qa {id,question,answers}, ppl {text}
    data_dir: str = field(default_factory=lambda: os.environ.get("RECHANNEL_DATA", "../shared/data"))  # benchmarks
    limit: int | None = None  # only the first N examples (windows for perplexity)
    windows: int | None = None  # perplexity: only the first N windows (None: `limit`)
    batch_size: int | str = "auto"  # examples (or windows) per forward batch, or "auto" (recorded as given)
    seqlen: int = 2048  # perplexity window length in tokens
    stride: int | None = None  # perplexity: slide windows by this many tokens (None: non-overlapping windows)
    prompts: str | None = None  # a prompt bank (.safetensors) whose soft prompt goes in front of every example
    route: str = "none"  # which prompt each example gets: attention, entropy, oracle, random, record, fixed:K, none
    calibration: str = "auto"  # attention routing: auto, none, ratio, zscore, centroid (route_calibration.py)
    layers: str = "first"  # the layers `route` attention reads: first, all, A:B or i,j,k
    adapter: str | None = None  # a PEFT LoRA adapter directory, merged before evaluating
    attention_profile: int = 0  # also profile the attention the first N contexts of the first example task
    output: str | None = None  # where the caller writes the document: only checked not to be an input
    model: str = "smollm2-135m"  # built-in alias, .gguf file or model directory
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1 ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16
    trust_remote_code: bool = False  # allow code shipped with the model
    loader: str = "rechannel"  # rechannel (QuantLinear for quantized layers) or transformers (from_pretrained)


def _ppl_stderr(ppl: float, nlls: list[float]) -> float | None:
    """Standard error of the perplexity by the delta method over windows: ppl * sd(nll) / sqrt(n)."""
    from .metrics import mean_stderr

    se = mean_stderr(nlls)
    return None if se is None else ppl * se


def _parse_batch_size(text: int | str) -> int | None:
    """An int, or None for auto."""
    text = str(text)
    if text == "auto":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"--batch-size {text!r}: give a positive integer or 'auto'")


def _with_batch_size(run: Callable[[int], Any], requested: int | None, device: str) -> tuple[Any, int]:
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


@dataclass(frozen=True)
class _Plan:
    """What is known before the model loads: the tasks, their data, and the batch size asked for."""

    tasks: list[Any]  # tasks.Task, in the order given (a user's file last)
    data: dict[str, Any]  # task name -> its examples, or its text for perplexity
    batch_size: int | None  # None: auto


def _check_outputs(config: EvalConfig, task_files: list[str]) -> None:
    """The output is none of the inputs (the model, the task files, the bank, the adapter)."""
    from pathlib import Path

    from ..core.models import model_paths
    from ..core.outputs import Input, Output, check_outputs

    ins = [*(Input("--model", p) for p in model_paths(config.model)), Input("--data", config.data or ""),
           Input("--prompts", config.prompts or ""), Input("--adapter", config.adapter or ""),
           *(Input("--tasks", str(Path(config.data_dir) / f)) for f in task_files)]
    check_outputs([Output("-o", config.output or "")], ins)


def _plan(config: EvalConfig) -> _Plan:
    """Check every option and read every task file, so that nothing wrong surfaces after the model loads."""
    from .tasks import get_tasks, user_task

    if config.tasks is not None and not config.tasks.strip(","):
        raise UserError("--tasks is empty: name at least one task, e.g. --tasks arc_easy,wikitext2")
    named = config.tasks is not None or not config.data
    chosen = get_tasks(config.tasks if config.tasks is not None else "wikitext2") if named else []
    if config.data:
        chosen.append(user_task(config.data, config.kind))
    requested = _parse_batch_size(config.batch_size)
    if config.stride and config.prompts:
        raise UserError("--stride with --prompts is not supported: prompted perplexity uses whole windows")
    if config.route == "record" and any(t.kind == "ppl" for t in chosen):
        raise UserError("--route record takes each example's prompt from its record; perplexity windows have none")
    _check_outputs(config, [p for t in chosen for p in t.files])
    return _Plan(chosen, {t.name: t.load(config.data_dir) for t in chosen}, requested)


def _conditioning(lm: Any, prompts: str | None, route: str, layers: str,
                  calibration: str = "none") -> tuple[Any, dict[str, Any] | None]:
    """The soft-prompt bank and route, and what they cost in parameters. A bank trained for another model
    is refused (load_artifact checks its fingerprint)."""
    from ..core.blocks import decoder_blocks
    from ..recover.prompts import load_prompt_bank, parse_route, router
    from ..recover.route_calibration import resolve_calibration
    from ..recover.routing import parse_layers
    from .evaluator import Conditioning
    from .sources import TASK_SOURCE

    r = parse_route(route)
    if prompts is None:
        if r.kind != "none":
            raise UserError(f"--route {route} needs a prompt bank: --prompts BANK.safetensors")
        return Conditioning(), None
    bank = load_prompt_bank(prompts, lm, r)
    if r.kind == "none":
        return Conditioning(), {"path": prompts, "route": "none", "parameters": 0}
    picked = tuple(parse_layers(layers, len(decoder_blocks(lm.model))))
    if r.kind == "attention":
        calibration = resolve_calibration(calibration, bank.score_mean, bank.layers, picked)
    m, p, _ = bank.prompts.shape
    info = {"path": prompts, "route": str(r), "prompts": m, "length": p, "parameters": bank.prompts.numel(),
            "sources": bank.row_sources,
            **({"layers": list(picked), "calibration": calibration} if r.kind == "attention" else {})}
    route_fn = router(r, lm.model, lm.tokenizer, bank, picked, calibration, task_source=TASK_SOURCE)
    return Conditioning(bank.prompts, route_fn, r.kind == "record", row_sources=bank.row_sources), info


@dataclass(frozen=True)
class _Session:
    """What every task of one evaluation shares."""

    lm: Any  # ops.core.models.LoadedModel
    cond: Any  # evaluator.Conditioning: what goes in front of every example
    config: EvalConfig
    token_budget: int | None  # at most this many padded tokens per forward batch (auto batch size on a CPU)
    world: Any = None  # ops.core.distributed.World: which shard of each task is this process's


@dataclass(frozen=True)
class _Shard:
    """One rank's part of one task (the whole task in a single process): its records in input order, the
    tokens it put through the model and its wall time; for perplexity also the windows and their NLL sums."""

    records: list[Record]
    tokens: int
    seconds: float
    original: int  # the task's size before --limit (windows for perplexity)
    windows: list[Any] = field(default_factory=list)  # perplexity.Window, this shard's
    sums: list[float] = field(default_factory=list)  # perplexity: summed NLL of each of them
    text_tokens: int = 0  # perplexity: the tokens of the whole text


@dataclass(frozen=True)
class _Done:
    """One finished task: its entry under "results" (less its alias), its n-samples, and its records."""

    result: dict[str, Any]
    n_samples: dict[str, int]
    records: list[Record]


def _window_prompts(lm: Any, cond: Any) -> Callable[[Any], Any] | None:
    """windows (B, T) -> their soft prompts (B, P, d): each window routed on its own text."""
    if cond.prompts is None:
        return None
    return lambda ids: cond.prompts[cond.rows([lm.tokenizer.decode(w) for w in ids.tolist()], [])]


def _run_ppl(s: _Session, task: Any, text: str, batch_size: int, advance: Callable[[int], None]) -> _Shard:
    """This shard's windows of `text` (non-overlapping, or with a stride sliding); one record per window, made
    once the shard is done, so a retry at a smaller batch repeats no window."""
    from ..core.distributed import sharded
    from .perplexity import plain_windows, sliding_windows, window_means, window_nll_sums

    lm, seqlen, stride = s.lm, s.config.seqlen, s.config.stride
    limit = s.config.windows if s.config.windows is not None else s.config.limit
    t0 = time.perf_counter()
    stream = lm.tokenizer(text, return_tensors="pt").input_ids[0]  # (N,)
    every = sliding_windows(stream.numel(), seqlen, stride, limit) if stride else plain_windows(stream.numel(), seqlen, limit)
    first = s.world.shard(len(every)).start
    mine = sharded(every, s.world, f"{task.name} windows")
    sums = window_nll_sums(lm.model, stream, mine, 1 if stride else batch_size, lambda nll: advance(len(nll)),
                           None if stride else _window_prompts(lm, replace(s.cond, task=task.name)))
    nlls = window_means(sums, mine, bool(stride))
    if any(v != v for v in nlls):  # NaN: exp would report it as a perplexity
        raise UserError(f"{task.name}: {sum(v != v for v in nlls)} of {len(nlls)} windows have a NaN loss; the "
                        "model's outputs are not numbers (damaged weights, or float16 overflow: try --dtype float32)")
    records = [{"task": task.name, "window": first + i, "nll": v} for i, v in enumerate(nlls)]
    return _Shard(records, sum(w.end - w.begin for w in mine), time.perf_counter() - t0, stream.numel() // seqlen,
                  mine, sums, stream.numel())


def _finish_ppl(config: EvalConfig, shards: list[_Shard]) -> _Done:
    """The perplexity of all shards' windows together, as one process would have computed it."""
    from ..core.distributed import concat
    from .perplexity import summarize

    windows, records = concat([p.windows for p in shards]), concat([p.records for p in shards])
    res = summarize(concat([p.sums for p in shards]), windows, config.seqlen, bool(config.stride))
    seconds = max(p.seconds for p in shards)
    result = {"ppl,none": res.perplexity,
              "ppl_stderr,none": None if config.stride else _ppl_stderr(res.perplexity, [r["nll"] for r in records]),
              "nll,none": res.mean_nll, "windows": res.windows, "seqlen": config.seqlen, "stride": config.stride,
              "tokens_scored": res.tokens_scored, "text_tokens": shards[0].text_tokens,
              "seconds": round(seconds, 2), "tokens_per_s": round(res.tokens_scored / seconds, 1)}
    return _Done(result, {"original": shards[0].original, "effective": res.windows}, records)


def chance_level(kind: str, records: list[Record]) -> float:
    """The accuracy of guessing: the mean of 1 / choices for multiple choice, 0 for generated answers."""
    if kind in ("mc", "partial"):
        return sum(1 / len(r["loglik"]) for r in records) / len(records)
    return 0.0


def example_score(record: Record) -> float:
    """An example's headline score: acc (multiple choice, LAMBADA) or exact match (QA)."""
    return float(record["acc"] if "acc" in record else record["exact_match"])


def _run_examples(s: _Session, task: Any, examples: list, batch_size: int, advance: Callable[[int], None]) -> _Shard:
    """This shard of a task scored per example (multiple choice, partial, last word, QA; of the first `limit`
    examples)."""
    from ..core.distributed import sharded
    from .evaluator import Scoring, run_choice_task, run_qa_task

    lm = s.lm
    picked = sharded(examples[:s.config.limit] if s.config.limit else examples, s.world, f"{task.name} examples")
    cond = replace(s.cond, task=task.name)
    if task.kind == "qa":
        run = run_qa_task(lm.model, lm.tokenizer, task.name, picked, batch_size, cond, advance)
    else:
        run = run_choice_task(lm.model, lm.tokenizer, task.name, task.kind, picked, batch_size, cond,
                              Scoring(s.token_budget, advance))
    return _Shard(run.records, run.tokens, run.seconds, len(examples))


def _finish_examples(task: Any, shards: list[_Shard], routing: tuple[int, list[str] | None] | None) -> _Done:
    """A per-example task's metrics over all shards' records, its throughput (wall time: the slowest shard) and,
    with a prompt bank (`routing` = (prompts, their sources)), which prompts the examples were routed to."""
    from ..core.distributed import concat
    from .evaluator import task_metrics

    records = concat([p.records for p in shards])
    n, seconds, tokens = len(records), max(p.seconds for p in shards), sum(p.tokens for p in shards)
    result = {**task_metrics(task.kind, records), "samples": n, "seconds": round(seconds, 2),
              "examples_per_s": round(n / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
              "seconds_per_example": round(seconds / n, 4)}
    result["chance"] = chance_level(task.kind, records)
    if routing is not None:
        from ..recover.routing_report import routing_report
        from .sources import TASK_SOURCE

        result["routing"] = routing_report([r["prompt"] for r in records], routing[0], routing[1],
                                           TASK_SOURCE.get(task.name))
    return _Done(result, {"original": shards[0].original, "effective": n}, records)


def _run_task(s: _Session, task: Any, data: Any, requested: int | None, progress: Progress) -> tuple[_Shard, int]:
    """This rank's shard of one task at the requested batch size (auto: the largest that fits); (the shard,
    batch used)."""

    def run(b: int) -> _Shard:
        progress(task.name, total=None)  # a retry at a smaller batch starts over
        advance = lambda n: progress(task.name, advance=n)  # noqa: E731
        if task.kind == "ppl":
            batch = max(1, min(b, s.token_budget // s.config.seqlen)) if s.token_budget else b
            return _run_ppl(s, task, data, batch, advance)
        return _run_examples(s, task, data, b, advance)

    return _with_batch_size(run, requested, str(s.lm.model.device))


def _load(config: EvalConfig, load: Loader | None, world: Any) -> Any:
    """The model the config names on this rank's device, through the caller's loader (the CLI's tames the
    libraries' logging first)."""
    from ..core.distributed import rank_device

    if load is None:
        from ..core.models import load_model as load
    loader = {} if config.loader == "rechannel" else {"loader": config.loader}  # a caller's loader may not take it
    return load(config.model, device=rank_device(config.device, world), dtype=config.dtype,
                trust_remote_code=config.trust_remote_code, **loader)


def _model_meta(lm: Any) -> dict[str, Any]:
    """What the results document says about the model that ran."""
    return {"model_path": str(lm.path), "fingerprint": lm.fingerprint,
            "model_bytes": sum(f.stat().st_size for f in lm.path.glob("*.safetensors")),
            "device": str(lm.model.device), "dtype": str(lm.model.dtype).removeprefix("torch."),
            "compression": getattr(lm.model.config, "rechannel", None)}


def _document(config: EvalConfig, plan: _Plan, local: _Local, done: dict[str, _Done], world_size: int
              ) -> dict[str, Any]:
    """The results document in lm-evaluation-harness's layout: results, n-samples, configs, config (rank 0's
    model, device and batch sizes; `world_size` processes shared the examples)."""
    from ..core.version import __version__

    chosen, meta, extra = plan.tasks, local.meta, local.extra
    per_example = {name: {"id": [r["id"] for r in d.records], "score": [example_score(r) for r in d.records]}
                   for name, d in done.items() if "samples" in d.result}
    return {"results": {name: {"alias": name, **d.result} for name, d in done.items()},
            "n-samples": {name: d.n_samples for name, d in done.items()},
            "configs": {t.name: {"task": t.name, "kind": t.kind, "files": list(t.files), "template": t.template,
                                 "num_fewshot": 0} for t in chosen},
            "config": {"model": config.model, "model_path": meta["model_path"], "fingerprint": meta["fingerprint"],
                       "model_bytes": meta["model_bytes"], "rechannel": __version__, "tasks": [t.name for t in chosen],
                       "data": config.data, "data_dir": config.data_dir, "limit": config.limit,
                       "windows": config.windows if config.windows is not None else config.limit,
                       "batch_size": config.batch_size, "batch_size_used": local.used_batch,
                       "seqlen": config.seqlen, "stride": config.stride, "device": meta["device"],
                       "world_size": world_size, "dtype": meta["dtype"], "loader": config.loader,
                       "compression": meta["compression"], **extra,
                       "extra_parameters": sum(v.get("parameters", 0) for v in extra.values())},
            "per_example": per_example}


def _attention_profile(config: EvalConfig, plan: _Plan, lm: Any, cond: Any) -> dict[str, Any] | None:
    """Per layer, the attention mass the first contexts of the first example task put on their prompt (or
    their first token without one); None when not asked or no task has contexts to profile."""
    task = next((t for t in plan.tasks if t.kind not in ("ppl", "qa")), None)
    if not config.attention_profile or task is None:
        return None
    from .evaluator import attention_profile

    examples = plan.data[task.name][:config.attention_profile]
    return {"task": task.name, "examples": len(examples),
            "prefix": "prompt" if cond.prompts is not None else "first token",
            "mass": attention_profile(lm.model, lm.tokenizer, examples, cond)}


def _prepare(config: EvalConfig, lm: Any) -> tuple[Any, dict[str, Any]]:
    """Merge the adapter and load the prompt bank: (the Conditioning, what they add to the config record)."""
    extra: dict[str, Any] = {}
    if config.adapter:
        from ..recover.lora import merge_adapter

        extra["adapter"] = vars(merge_adapter(lm.model, config.adapter))
    cond, bank_info = _conditioning(lm, config.prompts, config.route, config.layers, config.calibration)
    if bank_info:
        extra["prompts"] = bank_info
    return cond, extra


@dataclass(frozen=True)
class _Local:
    """What one rank brings back: its shard of every task, and (rank 0's are used) the batch sizes, the model's
    description, the bank's rows and sources, and the attention profile."""

    shards: dict[str, _Shard]
    used_batch: dict[str, int]
    meta: dict[str, Any]
    extra: dict[str, Any]  # what the adapter and the prompt bank add to the config record
    routing: tuple[int, list[str] | None] | None  # with a bank: (its prompts, their sources)
    profile: dict[str, Any] | None


def _run_local(config: EvalConfig, plan: _Plan, load: Loader | None, progress: Progress,
               stream: Callable[[Record], None] | None, world: Any) -> _Local:
    """Load the model on this rank's device and run this rank's shard of every task; with `stream` (a single
    process), each task's records go to it as soon as the task is done."""
    lm = _load(config, load, world)
    cond, extra = _prepare(config, lm)
    budget = CPU_TOKENS if plan.batch_size is None and lm.model.device.type == "cpu" else None
    session = _Session(lm, cond, config, budget, world)
    shards: dict[str, _Shard] = {}
    used: dict[str, int] = {}
    for task in plan.tasks:
        shards[task.name], used[task.name] = _run_task(session, task, plan.data[task.name], plan.batch_size, progress)
        for r in shards[task.name].records if stream else ():
            stream(r)
    routing = (len(cond.prompts), cond.row_sources) if cond.prompts is not None else None
    profile = _attention_profile(config, plan, lm, cond) if world.main else None
    return _Local(shards, used, _model_meta(lm), extra, routing, profile)


def _finish(config: EvalConfig, task: Any, parts: list[_Local]) -> _Done:
    shards = [p.shards[task.name] for p in parts]
    return _finish_ppl(config, shards) if task.kind == "ppl" else _finish_examples(task, shards, parts[0].routing)


def evaluate(config: EvalConfig, progress: Progress = silent, on_record: Callable[[Record], None] | None = None,
             load: Loader | None = None, world: Any = None) -> dict[str, Any]:
    """Evaluate the model on the configured tasks and return the results document `rechannel eval -o` writes.

    Records reach `on_record` task by task, each task's once it is done (a retry at a smaller batch after a
    GPU out-of-memory error repeats none); without `on_record` they are returned under "samples". `load`
    replaces ops.core.models.load_model (same keywords).

    With `world` (ops.core.distributed.world() under torchrun, as the CLI passes it) each rank checks the
    inputs, runs its contiguous shard of every task (World.shard) on its own device, and every rank gets back
    all records in input order and returns the same document; the records reach `on_record` once all ranks
    are done, and a failure on any rank is raised on every rank. Without it the call is a single process,
    whatever the environment says."""
    from ..core.distributed import World, gather, global_progress, join, together

    world = join(world or World())
    plan = together(lambda: _plan(config), world)  # every input is read and checked before the model loads
    stream = on_record if world.size == 1 else None
    parts = gather(lambda: _run_local(config, plan, load, global_progress(progress, world), stream, world), world)
    done = {task.name: _finish(config, task, parts) for task in plan.tasks}
    for r in (r for d in done.values() for r in d.records) if on_record and not stream else ():
        on_record(r)
    doc = _document(config, plan, parts[0], done, world.size)
    if parts[0].profile is not None:
        doc["attention_profile"] = parts[0].profile
    if on_record is None:
        doc["samples"] = {name: d.records for name, d in done.items()}
    return doc
