"""The one stderr console every command logs through, and progress bars that never touch stdout.

rich's Progress swaps sys.stdout for a proxy while a bar is live unless told not to, which would send
records meant for stdout to the terminal's stderr; every bar here is made with redirect_stdout=False.
Bars and info lines appear only when stderr is a terminal; warnings always do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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

from ..ops.core.progress import Progress as ProgressFn


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


@contextmanager
def bars() -> Iterator[ProgressFn]:
    """A Progress callback drawing one transient bar per stage on stderr (nothing when nobody watches)."""
    with progress() as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, advance: int = 0, total: int | None = None, note: str | None = None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            elif total is not None or (not advance and note is None):  # a stage announced again starts over
                bar.reset(tasks[stage], total=total)
            if advance:
                bar.advance(tasks[stage], advance)
            if note is not None:
                bar.update(tasks[stage], description=f"{stage}  {note}")

        yield report


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
