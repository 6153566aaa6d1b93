"""Options shared by every command that loads a model, so they read the same everywhere."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Built-in alias, .gguf file or model directory.",
                                     rich_help_panel="Model")]
DataDir = Annotated[str, typer.Option(help="Where the benchmark files are ($RECHANNEL_DATA).")]
DATA_DIR = os.environ.get("RECHANNEL_DATA", "../shared/data")
Device = Annotated[str, typer.Option(help="auto (cuda when present), cpu, cuda, cuda:1 ...", rich_help_panel="Model")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16.",
                                     rich_help_panel="Model")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code shipped with the model.",
                                                rich_help_panel="Model")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout instead of a table.")]


def load(model: str, device: str, dtype: str, trust_remote_code: bool, loader: str = "rechannel"):
    """The model the shared options name (a rechannel.ops.core.models.LoadedModel), with the libraries' own
    logging tamed first."""
    from ..ops.core.models import load_model
    from .console import tame_libraries

    tame_libraries()
    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, loader=loader)


def load_teacher(spec: str, lm: Any, device: str, dtype: str, trust_remote_code: bool) -> Any:
    """A teacher for `lm`: refused unless it shares its vocabulary (distributions are compared token by token)
    and, when `lm` records it as its source, unless its fingerprint is still the recorded one."""
    from ..ops.recover.api import check_teacher

    teacher = load(spec, device, dtype, trust_remote_code)
    check_teacher(teacher, lm, spec)
    return teacher
