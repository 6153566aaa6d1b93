"""Soft-prompt banks: K learned prompts of P embedding vectors each, and how an example picks one.

A bank is a rechannel artefact of kind `prompt-bank` holding `prompts` (K, P, d), made by `train-prompts`
for one model (its fingerprint) and refused on any other: prompts are trained against one set of weights.

Routes: `none` (no prompt), `fixed:K` (prompt K for every example), `attention` (IDP: the prompt the
example's tokens attend to most, calibrated as route_calibration.py says), `entropy` (the prompt under
which the model is least uncertain; see routing.py for these two), `oracle` (the prompt trained on the task's
designated source: the upper bound of routing), `random` (a uniformly drawn prompt: the lower bound) and
`record` (the prompt a record's `route` field names, as `route` writes it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import UserError, unknown_choice

BANK_KIND = "prompt-bank"
RANDOM_ROUTE_SEED = 0  # --route random: each example's draw is seeded with this and its text
ROUTES = ("none", "fixed:K", "attention", "entropy", "oracle", "random", "record")


@dataclass(frozen=True)
class Route:
    kind: str  # none | fixed | attention | entropy | oracle | random | record
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_route(text: str) -> Route:
    if text == "none":
        return Route("none")
    if text in ("attention", "entropy", "oracle", "random", "record"):
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


@dataclass
class Bank:
    """A loaded prompt bank: its prompts and what it knows of its rows (absent in banks without names)."""

    prompts: torch.Tensor  # (M, P, d)
    row_sources: list[str] | None = None  # (M,) the source each row was trained on
    score_sources: list[str] = field(default_factory=list)  # (S,) the sources the statistics were taken over
    score_mean: torch.Tensor | None = None  # (S, M) each row's mean attention score on each source's texts
    score_std: torch.Tensor | None = None  # (S, M)
    layers: list[int] | None = None  # the layers the bank's router read in training (and the statistics)

    def rows_of(self) -> list[list[int]]:
        """For each statistics source, the rows trained on it."""
        from .route_calibration import own_rows

        return own_rows(self.row_sources or [], self.score_sources)

    def source_rows(self, name: str) -> list[int]:
        """The rows trained on source `name` (the oracle's candidates)."""
        if not self.row_sources:
            raise UserError("--route oracle: the bank records no source names (train it with several --data "
                            "NAME=FILE sources)")
        rows = [m for m, s in enumerate(self.row_sources) if s == name]
        if not rows:
            raise UserError(f"--route oracle: no prompt of the bank was trained on source {name!r} "
                            f"(it has {', '.join(dict.fromkeys(self.row_sources))})")
        return rows


Router = Callable[[Sequence[str], str], list[int | None]]  # (texts, task name) -> bank rows


def router(route: Route, model=None, tokenizer=None, bank: Bank | None = None, layers: tuple[int, ...] = (0,),
           calibration: str = "none", with_scores: bool = False, task_source: Mapping[str, str] | None = None
           ) -> Router:
    """(example texts, task) -> their bank rows. attention and entropy run the model on the texts (their
    tokens as `encode_pair` makes them, no special tokens), in batches, with the bank's keys and values
    cached once; attention scores go through `calibration` (route_calibration.py). oracle picks the rows
    trained on the task's own source (`task_source` maps task names to source names; the best of the rows by
    attention when there are several), random a uniformly drawn row (random_row: a function of the text, so
    the draw is reproducible and does not depend on batching or on how ranks share the examples). `with_scores` (attention, entropy): each text's (row, raw scores (M,)) instead of its row."""
    if route.kind == "fixed":
        return lambda texts, task: [route.index] * len(texts)
    if route.kind == "random":
        return lambda texts, task: [random_row(t, task, len(bank.prompts)) for t in texts]
    if route.kind in ("attention", "entropy", "oracle"):
        return _model_router(route, model, tokenizer, bank, layers, calibration, with_scores, task_source or {})
    return lambda texts, task: [None] * len(texts)


def random_row(text: str, task: str, rows: int) -> int:
    """A uniformly drawn bank row for one example, seeded by RANDOM_ROUTE_SEED, the task and the text."""
    import zlib

    seed = zlib.crc32(f"{RANDOM_ROUTE_SEED}\0{task}\0{text}".encode())
    return int(torch.randint(0, rows, (1,), generator=torch.Generator().manual_seed(seed)))


def _model_router(route: Route, model, tokenizer, bank: Bank, layers: tuple[int, ...], calibration: str,
                  with_scores: bool, task_source: Mapping[str, str]) -> Router:
    from .route_calibration import choose, resolve_calibration
    from .routing import bank_kv, route_rows, routing_ids

    if route.kind == "attention":
        calibration = resolve_calibration(calibration, bank.score_mean, bank.layers, layers)
    kv = bank_kv(model, bank.prompts)
    pad = tokenizer.pad_token_id or 0
    by = "entropy" if route.kind == "entropy" else "attention"

    def rows(texts: Sequence[str], task: str) -> list[int | None]:
        if not texts:
            return []
        if route.kind == "oracle":
            if task not in task_source:
                raise UserError(f"--route oracle: task {task} has no source of its own to route to")
            candidates = bank.source_rows(task_source[task])
            if len(candidates) == 1:
                return [candidates[0]] * len(texts)
        routed = route_rows(model, kv, routing_ids(tokenizer, texts), by, layers, pad_id=pad)
        scores = torch.tensor([sc for _, sc in routed])  # (B, M)
        if route.kind == "oracle":
            return [candidates[int(row[candidates].argmax())] for row in scores]
        if route.kind == "entropy":
            chosen = [k for k, _ in routed]
        else:
            chosen = choose(scores, calibration, bank.score_mean, bank.score_std, bank.rows_of()).tolist()
        return list(zip(chosen, scores.tolist(), strict=True)) if with_scores else chosen
    return rows


def load_prompt_bank(path: str, lm: Any, route: Any = None) -> Bank:
    """A bank for the loaded model `lm`: refused when trained for another model, when its width is not the
    model's, or when `route` (fixed:K) names a row it does not have. A bank written before banks recorded
    their sources loads with none (attention routing uncalibrated, no oracle)."""
    from ..core.artifacts import load_artifact

    tensors, meta = load_artifact(path, kind=BANK_KIND, fingerprint=lm.fingerprint, model=lm.spec)
    if "prompts" not in tensors:
        raise UserError(f"{path}: has no tensor 'prompts'")
    prompts = tensors["prompts"]
    check_bank(prompts, lm.model.get_input_embeddings().weight.shape[1], route or Route("none"), path)
    names = meta.get("sources")
    if names is not None and len(names) != prompts.shape[0]:
        raise UserError(f"{path}: names {len(names)} sources for {prompts.shape[0]} prompts")
    return Bank(prompts, names, meta.get("score_sources", []), tensors.get("score_mean"), tensors.get("score_std"),
                meta.get("args", {}).get("layers"))
