"""The one stderr console every command logs through, and progress bars that never touch stdout.

rich's Progress swaps sys.stdout for a proxy while a bar is live unless told not to, which would send
records meant for stdout to the terminal's stderr; every bar here is made with redirect_stdout=False.
Bars and info lines appear only when stderr is a terminal; warnings always do.
"""

from __future__ import annotations

import os
from functools import cache

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@cache
def console() -> Console:
    return Console(stderr=True, highlight=False)


def interactive() -> bool:
    """True when a person is watching stderr (and not under CI)."""
    return console().is_terminal and not os.environ.get("CI")


def info(message: str) -> None:
    """A progress note for a person at a terminal; silent in pipelines and logs."""
    if interactive():
        console().print(message)


def warn(message: str) -> None:
    """Something the user should know even in a pipeline (never stops the run)."""
    console().print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def progress() -> Progress:
    """A transient progress bar on stderr, disabled when nobody watches."""
    return Progress(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console(), transient=True, redirect_stdout=False, redirect_stderr=False,
        disable=not interactive(),
    )


def tame_libraries() -> None:
    """transformers' own warnings and tqdm bars: errors only, and no bars when nobody watches."""
    from ..ops.core.models import go_offline

    go_offline()
    if not interactive():
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; transformers' GGUF bar uses it
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not interactive():
        hf_logging.disable_progress_bar()
