"""`rechannel calibrate`: draw calibration windows and collect per-layer input statistics."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from . import options

Data = Annotated[str, typer.Option("--data", "-d", help="JSONL of documents ('-' = stdin).")]
Field = Annotated[str, typer.Option(help="The record field holding the text.")]
Docs = Annotated[str, typer.Option(help="Documents to use, START:END (e.g. 0:500 keeps 500:1000 held out).")]
Samples = Annotated[int, typer.Option(min=1, help="Calibration windows.")]
Seqlen = Annotated[int, typer.Option(min=2, help="Tokens per window.")]
Seed = Annotated[int, typer.Option(help="Seed of the window draw (Python's random, as the reference code).")]
Targets = Annotated[str, typer.Option(help="Regex over Linear names inside a block, e.g. 'mlp\\.'.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Windows per forward batch (1 is fastest on a CPU; more can help a GPU).")]


def parse_range(text: str) -> slice:
    """'500:1000' -> slice(500, 1000); '' -> everything. Half-open, like a Python slice."""
    from ..ops.core.errors import UserError

    if not text:
        return slice(None)
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise UserError(f"--docs {text!r}: expected START:END, e.g. 0:500") from None


def load_texts(data: str, field: str, docs: str) -> list[str]:
    """The texts of `data` (JSONL) in the range `docs`; every record checked before any work starts."""
    from ..ops.core.errors import UserError
    from ..ops.core.records import read_jsonl

    records = read_jsonl(data, require=(field,))
    texts = [r.field(field, str) for r in records][parse_range(docs)]
    if not texts:
        raise UserError(f"{data}: no documents in range --docs {docs}")
    return texts


def calibrate_command(
    data: Data,
    output: Annotated[str, typer.Option("--output", "-o", help="The statistics file (.safetensors).")],
    field: Field = "text",
    docs: Docs = "",
    samples: Samples = 128,
    seqlen: Seqlen = 2048,
    seed: Seed = 0,
    targets: Targets = r"(self_attn|mlp)\.",
    hessian: Annotated[bool, typer.Option("--hessian", help="Also store H = (2/n) sum x x^T, n windows (for SparseGPT and GPTQ).")] = False,
    batch_size: BatchSize = 1,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Draw calibration windows (as the GPTQ/SparseGPT/Wanda code does) and store per-layer input statistics.

    [bold]Examples[/bold]

      rechannel calibrate --data ../shared/data/calibration/c4_en_train00000_first1000.jsonl --docs 0:500 -o stats.safetensors
      rechannel calibrate -d c4.jsonl --samples 32 --seqlen 512 --hessian -o stats-h.safetensors
      rechannel inspect stats.safetensors --no-tensors

    The output holds the token windows (so compress reuses exactly these samples), each Linear's per-input-channel squared norms, and with --hessian its H, both float32 running means over windows as the reference code keeps them. Stdout: one JSON summary line.
    """
    from ..ops.compress.calibration import calibrate, stats_to_tensors
    from ..ops.core.artifacts import Provenance, save_artifact
    from ..ops.core.blocks import decoder_blocks
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input, Output, check_outputs
    from ..ops.core.windows import draw_windows
    from .console import progress
    from .jsonl import STDIO, JsonlWriter

    t0 = time.perf_counter()
    check_outputs([Output("-o", output)], [Input("--data", data), *(Input("--model", p) for p in model_paths(model))])
    texts = load_texts(data, field, docs)
    lm = options.load(model, device, dtype, trust_remote_code)
    windows = draw_windows(texts, lm.tokenizer, samples, seqlen, seed)
    with progress() as bar:
        task = bar.add_task("calibrating", total=len(decoder_blocks(lm.model)))
        result = calibrate(lm.model, windows, targets, hessian, batch_size, on_block=lambda i: bar.advance(task))
    args = {"data": data, "field": field, "docs": docs, "samples": samples, "seqlen": seqlen, "seed": seed,
            "targets": targets, "hessian": hessian}
    tensors, aliases = stats_to_tensors(result, windows)
    save_artifact(output, tensors, Provenance("calibration-stats", model, lm.fingerprint, args,
                                              {"tokens": result.tokens, "aliases": aliases}))
    summary = {"output": output, "model": model, "fingerprint": lm.fingerprint, "windows": samples,
               "seqlen": seqlen, "tokens": result.tokens, "layers": len(result.stats), "hessian": hessian,
               "seconds": round(time.perf_counter() - t0, 2)}
    with JsonlWriter(STDIO) as out:
        out.write(summary)
