"""The one exception type for failures the user can fix.

Anything raised as `UserError` reaches the user as a single line `error: <message>` with exit
status 1; every other exception is a bug and shows its traceback under `--debug`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A bad file, field, option value or model: the message says what and, where it can, how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_choice(what: str, word: str, choices: Iterable[str]) -> UserError:
    """The error for a name that is not in a registry: lists the valid names and suggests the closest."""
    choices = sorted(choices)
    return UserError(f"unknown {what} {word!r}{did_you_mean(word, choices)}; choose from: {', '.join(choices)}")
