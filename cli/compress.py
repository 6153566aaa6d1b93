"""`rechannel compress`: prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from rechannel.cli import options
from rechannel.cli.calibrate import BatchSize, Docs, Field, Samples, Seed, Seqlen, Targets
from rechannel.ops.errors import UserError


def _config(method: str, sparsity: float, pattern: str, targets: str, blocksize: int, percdamp: float,
            batch_size: int, error_tokens: int) -> Any:
    """Validate every option before the model loads: a bad one is a one-line error and nothing is written."""
    from rechannel.ops.compress import PruneConfig
    from rechannel.ops.errors import unknown_choice
    from rechannel.ops.prune import METHODS, parse_pattern

    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    pat = parse_pattern(pattern)
    if pat.structured:
        sparsity = pat.n / pat.m
    elif not 0 < sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be strictly between 0 and 1")
    return PruneConfig(method, sparsity, pat, targets, blocksize, percdamp, batch_size, error_tokens)


def _windows_and_stats(calib: str | None, stats: str | None, sequential: bool, lm: Any, calib_args: dict) -> tuple:
    """(windows or None, one-shot statistics or None, description of the calibration for the report)."""
    from rechannel.cli.artifacts import load_artifact
    from rechannel.cli.calibrate import load_texts
    from rechannel.ops.calibration import draw_windows, stats_from_tensors

    if calib:
        texts = load_texts(calib, calib_args["field"], calib_args["docs"])
        windows = draw_windows(texts, lm.tokenizer, calib_args["samples"], calib_args["seqlen"], calib_args["seed"])
        return windows, None, {"source": calib, **calib_args}
    if stats:
        names = ["windows"] if sequential else None  # the sequential protocol needs only the windows
        tensors, meta = load_artifact(stats, kind="calibration-stats", fingerprint=lm.fingerprint, model=lm.spec,
                                      names=names)
        windows = tensors.pop("windows").long()
        desc = {"source": stats, **{k: meta["args"].get(k) for k in ("data", "docs", "samples", "seqlen", "seed")}}
        one_shot = None if sequential else stats_from_tensors(tensors, meta["tokens"], meta.get("aliases"))
        return windows, one_shot, desc
    return None, None, None


def _check_stats(stats: dict, lm: Any, cfg: Any, path: str) -> None:
    from rechannel.ops.blocks import decoder_blocks
    from rechannel.ops.calibration import select_targets

    for i, block in enumerate(decoder_blocks(lm.model)):
        for name in select_targets(block, cfg.targets):
            s = stats.get(f"layers.{i}.{name}")
            if s is None:
                raise UserError(f"{path} has no statistics for layers.{i}.{name}; calibrate with matching --targets")
            if cfg.method == "sparsegpt" and s.hessian is None:
                raise UserError(f"{path} has no Hessians: SparseGPT needs `rechannel calibrate --hessian`")


def compress_command(
    output: Annotated[str, typer.Option("--output", "-o", help="The compressed model directory.")],
    method: Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt.")] = "wanda",
    sparsity: Annotated[float, typer.Option(help="Fraction of each layer's weights to prune (unstructured).")] = 0.5,
    pattern: Annotated[str, typer.Option(help="unstructured, or N:M such as 2:4 or 4:8 (N pruned of every M).")] = "unstructured",
    calib: Annotated[str | None, typer.Option(help="Calibration JSONL: windows drawn here, sequential protocol.")] = None,
    stats: Annotated[str | None, typer.Option(help="A `calibrate` output: one-shot from its dense statistics.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="With --stats: rerun the sequential protocol on its stored windows.")] = False,
    field: Field = "text",
    docs: Docs = "",
    samples: Samples = 128,
    seqlen: Seqlen = 2048,
    seed: Seed = 0,
    targets: Targets = r"(self_attn|mlp)\.",
    blocksize: Annotated[int, typer.Option(min=1, help="SparseGPT: columns per block.")] = 128,
    percdamp: Annotated[float, typer.Option(min=0.0, help="SparseGPT: damping, a fraction of mean diag(H).")] = 0.01,
    batch_size: BatchSize = 1,
    error_tokens: Annotated[int, typer.Option(min=1, help="Calibration tokens each layer's output error is measured on.")] = 4096,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Prune every Linear in the decoder blocks and write a Hugging Face model directory; report on stdout.

    [bold]Examples[/bold]

      rechannel compress --method wanda --sparsity 0.5 --calib c4.jsonl --docs 0:500 -o out/wanda50
      rechannel compress --method sparsegpt --pattern 2:4 --stats stats-h.safetensors -o out/sgpt24
      rechannel compress --method magnitude --sparsity 0.5 -o out/mag50 | jq .totals

    wanda and sparsegpt use the reference sequential protocol with --calib (or --stats --sequential): each block is calibrated on the outputs of the already-pruned blocks before it. --stats alone prunes one-shot from dense statistics. Embeddings and lm_head are never pruned.
    """
    from rechannel.cli.console import progress
    from rechannel.cli.jsonl import STDIO, JsonlWriter
    from rechannel.ops.blocks import decoder_blocks
    from rechannel.ops.compress import prune_one_shot, prune_sequential
    from rechannel.ops.models import save_model

    t0 = time.perf_counter()
    cfg = _config(method, sparsity, pattern, targets, blocksize, percdamp, batch_size, error_tokens)
    if calib and stats:
        raise UserError("give --calib or --stats, not both")
    if method != "magnitude" and not (calib or stats):
        raise UserError(f"--method {method} needs calibration data: --calib FILE.jsonl or --stats FILE.safetensors")
    lm = options.load(model, device, dtype, trust_remote_code)
    calib_args = {"field": field, "docs": docs, "samples": samples, "seqlen": seqlen, "seed": seed}
    windows, one_shot_stats, calib_desc = _windows_and_stats(calib, stats, sequential, lm, calib_args)
    run_sequential = calib is not None or (stats is not None and sequential)
    if one_shot_stats is not None and not run_sequential:
        _check_stats(one_shot_stats, lm, cfg, stats)
    t_prune = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"{method} {cfg.pattern}", total=len(decoder_blocks(lm.model)))
        tick = lambda i: bar.advance(task)  # noqa: E731
        if run_sequential:
            report = prune_sequential(lm.model, windows, cfg, on_block=tick)
        else:
            report = prune_one_shot(lm.model, one_shot_stats or {}, cfg, on_block=tick)
    entry = {"method": method, "sparsity": cfg.sparsity, "pattern": str(cfg.pattern),
             "protocol": "sequential" if run_sequential else "one-shot", "targets": targets,
             "calibration": calib_desc, "source": {"model": model, "fingerprint": lm.fingerprint}}
    if method == "sparsegpt":
        entry.update(blocksize=blocksize, percdamp=percdamp)
    t_save = time.perf_counter()
    save_model(lm.model, lm.tokenizer, output, entry)
    end = time.perf_counter()
    timing = {"load": round(t_prune - t0, 2), "prune": round(t_save - t_prune, 2), "save": round(end - t_save, 2)}
    totals = {**report.totals(), "error_tokens": min(error_tokens, windows.numel()) if run_sequential else None}
    doc = {"output": output, **entry, "totals": totals, "seconds": round(end - t0, 2), "timing": timing,
           "layers": [vars(r) for r in report.layers]}
    with JsonlWriter(STDIO) as out:
        out.write(doc)
