"""One callback type for progress: every driver reports through it, and the CLI draws bars from it.

A driver calls `progress(stage, total=N)` when a stage starts (again: it starts over, as a retry at a smaller
batch does), `progress(stage, advance=k)` as work gets done, and may add a short `note` (a loss, say).
Library callers pass their own function, or nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, advance: int = 0, total: int | None = None, note: str | None = None) -> None:
        ...


def silent(stage: str, advance: int = 0, total: int | None = None, note: str | None = None) -> None:
    """The default: report nothing."""
