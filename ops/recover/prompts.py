"""Soft-prompt banks: K learned prompts of P embedding vectors each, and how an example picks one.

A bank is a rechannel artefact of kind `prompt-bank` holding `prompts` (K, P, d), made by `train-prompts`
for one model (its fingerprint) and refused on any other: prompts are trained against one set of weights.

Routes: `none` (no prompt), `fixed:K` (prompt K for every example), `attention` (IDP: the prompt the
example's tokens attend to most), `entropy` (the prompt under which the model is least uncertain; see
routing.py for these two) and `record` (the prompt a record's `route` field names, as `route` writes it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import UserError, unknown_choice

BANK_KIND = "prompt-bank"
ROUTES = ("none", "fixed:K", "attention", "entropy", "record")


@dataclass(frozen=True)
class Route:
    kind: str  # none | fixed | attention | entropy | record
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_route(text: str) -> Route:
    if text == "none":
        return Route("none")
    if text in ("attention", "entropy", "record"):
        return Route(text)
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


def peft_prompt_config(prompt: torch.Tensor, config, base: str) -> dict:
    """adapter_config.json of a PEFT prompt-tuning adapter holding `prompt` (P, d) for a model `config`."""
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "inference_mode": True, "num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1],
            "num_transformer_submodules": 1, "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "revision": None,
            "modules_to_save": None}


def router(route: Route, model=None, tokenizer=None, bank: torch.Tensor | None = None,
           layers: tuple[int, ...] = (0,)) -> Callable[[Sequence[str]], list[int | None]]:
    """Example texts -> their bank rows. attention and entropy run the model on the texts (their tokens as
    `encode_pair` makes them, no special tokens), in batches, with the bank's keys and values cached once."""
    if route.kind == "fixed":
        return lambda texts: [route.index] * len(texts)
    if route.kind in ("attention", "entropy"):
        from .routing import bank_kv, route_rows, routing_ids

        kv = bank_kv(model, bank)
        pad = tokenizer.pad_token_id or 0
        return lambda texts: [k for k, _ in route_rows(model, kv, routing_ids(tokenizer, texts), route.kind, layers,
                                                       pad_id=pad)]
    return lambda texts: [None] * len(texts)


def load_prompt_bank(path: str, lm: Any, route: Any = None) -> Any:
    """A bank's prompts (M, P, d) for the loaded model `lm`: refused when trained for another model, when
    its width is not the model's, or when `route` (fixed:K) names a row it does not have."""
    from ..core.artifacts import load_artifact

    tensors, _ = load_artifact(path, kind=BANK_KIND, fingerprint=lm.fingerprint, model=lm.spec, names=["prompts"])
    check_bank(tensors["prompts"], lm.model.get_input_embeddings().weight.shape[1], route or Route("none"), path)
    return tensors["prompts"]
