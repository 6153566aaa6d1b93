"""`rechannel calibrate`: draw calibration windows and collect per-layer input statistics."""

from __future__ import annotations

from typing import Annotated

import typer

from ..ops.core.records import load_texts, parse_range
from . import options

__all__ = ["BatchSize", "Data", "Docs", "Field", "Samples", "Seed", "Seqlen", "Stream", "Targets", "calibrate_command",
           "load_texts", "parse_range"]

Data = Annotated[str, typer.Option("--data", "-d", help="JSONL of documents ('-' = stdin).")]
Field = Annotated[str, typer.Option(help="The record field holding the text.")]
Docs = Annotated[str, typer.Option(help="Documents to use, START:END (e.g. 0:500 keeps 500:1000 held out).")]
Samples = Annotated[int, typer.Option(min=1, help="Calibration windows.")]
Seqlen = Annotated[int, typer.Option(min=2, help="Tokens per window.")]
Seed = Annotated[int, typer.Option(help="Seed of the window draw (Python's random, as the reference code).")]
Targets = Annotated[str, typer.Option(help="Regex over Linear names inside a block, e.g. 'mlp\\.'.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Windows per forward batch (1 is fastest on a CPU; more can help a GPU).")]
Output = Annotated[str, typer.Option("--output", "-o", help="The statistics file (.safetensors).")]
Stream = Annotated[bool, typer.Option("--stream", help="For models larger than memory: the weights stay in their safetensors shards and one decoder block at a time is read, used and dropped. The same output as without.")]
Hessian = Annotated[bool, typer.Option("--hessian", help="Also store H = (2/n) sum x x^T, n windows (for SparseGPT and GPTQ).")]


def calibrate_command(
    data: Data,
    output: Output,
    field: Field = "text",
    docs: Docs = "",
    samples: Samples = 128,
    seqlen: Seqlen = 2048,
    seed: Seed = 0,
    targets: Targets = r"(self_attn|mlp)\.",
    hessian: Hessian = False,
    batch_size: BatchSize = 1,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
    stream: Stream = False,
) -> None:
    """Draw calibration windows (as the GPTQ/SparseGPT/Wanda code does) and store per-layer input statistics.

    [bold]Examples[/bold]

      rechannel calibrate --data ../shared/data/calibration/c4_en_train00000_first1000.jsonl --docs 0:500 -o stats.safetensors
      rechannel calibrate -d c4.jsonl --samples 32 --seqlen 512 --hessian -o stats-h.safetensors
      rechannel inspect stats.safetensors --no-tensors

    The output holds the token windows (so compress reuses exactly these samples), each Linear's per-input-channel squared norms, and with --hessian its H, both float32 running means over windows as the reference code keeps them. Stdout: one JSON summary line.
    """
    from ..ops.compress.api import CalibrateConfig, calibrate
    from .console import bars
    from .jsonl import STDIO, JsonlWriter

    config = CalibrateConfig(data=data, output=output, field=field, docs=docs, samples=samples, seqlen=seqlen,
                             seed=seed, targets=targets, hessian=hessian, batch_size=batch_size, model=model,
                             device=device, dtype=dtype, trust_remote_code=trust_remote_code, stream=stream)
    with bars() as report:
        summary = calibrate(config, progress=report, load=options.load)
    with JsonlWriter(STDIO) as out:
        out.write(summary)
