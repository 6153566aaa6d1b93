"""Soft-prompt banks: K learned prompts of P embedding vectors each, and how an example picks one.

A bank is a rechannel artefact of kind `prompt-bank` holding `prompts` (K, P, d). Because rechannel never
compresses the embeddings, a bank trained on a compressed model lives in the same embedding space as its
dense original; using it with another model of the same width is allowed, with a warning.

Routes: `none` (no prompt), `fixed:K` (prompt K for every example). Per-example routing by attention over
the bank's keys belongs to `route`, which writes banks that carry those keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rechannel.ops.errors import UserError, unknown_choice

BANK_KIND = "prompt-bank"
ROUTES = ("none", "fixed:K")


@dataclass(frozen=True)
class Route:
    kind: str  # none | fixed
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_route(text: str) -> Route:
    if text == "none":
        return Route("none")
    if text.startswith("fixed:") and text[6:].isdigit():
        return Route("fixed", int(text[6:]))
    raise unknown_choice("route", text, ROUTES)


def check_bank(prompts: torch.Tensor, hidden_size: int, route: Route, path: str) -> None:
    """The bank's shape fits the model and the route names one of its prompts."""
    if prompts.dim() != 3 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
        raise UserError(f"{path}: 'prompts' should be (K, P, d) with K, P > 0, got {tuple(prompts.shape)}")
    if prompts.shape[2] != hidden_size:
        raise UserError(f"{path}: prompts have width {prompts.shape[2]}, the model's embeddings {hidden_size}")
    if route.kind == "fixed" and route.index >= prompts.shape[0]:
        raise UserError(f"--route {route}: the bank has {prompts.shape[0]} prompts (0..{prompts.shape[0] - 1})")


def router(route: Route) -> Callable[[str], int | None]:
    """Example text -> bank row."""
    if route.kind == "fixed":
        return lambda text: route.index
    return lambda text: None
