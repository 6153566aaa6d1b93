"""Run one task of each kind and turn its scores into per-example records and aggregate metrics.

`evaluate` (api.py) picks the tasks, loads the model, and hands out the records and the results document;
the work of each kind is here. A `Conditioning` says what is put in front of every example: nothing, or a
row of a soft-prompt bank chosen per example by a router.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from .formats import ChoiceExample, QAExample
from .loglik import ScoreUnit, encode_pair, score_units, share_prefix
from .metrics import choice_metrics, mean_stderr, qa_metrics

Advance = Callable[[int], None]  # told how much work (examples, score units) each batch did


@dataclass
class Conditioning:
    """The soft prompts (K, P, d) in front of each example, and which one each example gets."""

    prompts: torch.Tensor | None = None
    route: Callable[[Sequence[str], str], list[int | None]] = field(default=lambda texts, task: [None] * len(texts))
    from_records: bool = False  # take each example's row from its record (`rechannel route` output)
    task: str = ""  # the task being run (the oracle route picks its designated source's prompt)
    row_sources: list[str] | None = None  # (M,) the source each bank row was trained on, if the bank says

    def rows(self, texts: Sequence[str], examples: Sequence[Any]) -> list[int | None]:
        """The bank row in front of each example (whose routed text is texts[i]), all routed together
        (in batches); None without a bank."""
        if self.prompts is None:
            return [None] * len(texts)
        if not self.from_records:
            return self.route(texts, self.task)
        return [self._recorded(ex) for ex in examples]

    def _recorded(self, example: Any) -> int:
        if example.routed is None:
            raise UserError(f"--route record: example {example.id} has no 'route' (run `rechannel route` on the file)")
        if example.routed >= len(self.prompts):
            raise UserError(f"--route record: example {example.id} names prompt {example.routed}; the bank has "
                            f"{len(self.prompts)}")
        return example.routed


@dataclass(frozen=True)
class Scoring:
    """How the log-likelihood loop runs besides its batch size: at most `max_tokens` padded tokens per forward
    batch (on a CPU, long sequences run faster in small batches), and who is told each batch's score units."""

    max_tokens: int | None = None
    on_progress: Advance | None = None


@dataclass
class TaskRun:
    records: list[dict[str, Any]]
    metrics: dict[str, float | None]
    tokens: int  # tokens put through the model (contexts once, continuations, generated tokens)
    seconds: float


METRICS = {"mc": ["acc", "acc_norm"], "partial": ["acc"], "lastword": ["acc"], "qa": ["exact_match", "f1"]}


def _aggregate(records: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in names:
        values = [r[name] for r in records]
        out[f"{name},none"] = sum(values) / len(values)
        out[f"{name}_stderr,none"] = mean_stderr(values)
    return out


def task_metrics(kind: str, records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """A task's metrics from its per-example records alone (so that shards run apart aggregate as one run):
    mean and standard error of each per-example score, and LAMBADA's perplexity of the last word."""
    metrics = _aggregate(records, METRICS[kind])
    if kind == "lastword":
        mean_ll = sum(r["loglik"] for r in records) / len(records)
        metrics["perplexity,none"] = math.exp(-mean_ll) if -mean_ll < 700 else math.inf
    return metrics


def _refuse_nonfinite(task: str, logliks: Sequence[Sequence[float]]) -> None:
    """An accuracy taken over NaN log-likelihoods is an argmax of noise: stop instead of reporting it."""
    bad = sum(not all(math.isfinite(v) for v in row) for row in logliks)
    if bad:
        raise UserError(f"{task}: {bad} of {len(logliks)} examples have non-finite log-likelihoods (NaN or inf); "
                        "the model's outputs are not numbers (damaged weights, or float16 overflow: try "
                        "--dtype float32), so no metric is reported")


def _units(tokenizer: Any, examples: Sequence[ChoiceExample], cond: Conditioning
           ) -> tuple[list[ScoreUnit], list[list[tuple[int, int]]]]:
    """The score units of all examples (what an example's choices share runs once), and for every choice
    the (unit, row) that scores it."""
    units: list[ScoreUnit] = []
    where: list[list[tuple[int, int]]] = []
    prompts = cond.rows([ex.contexts[0] for ex in examples], examples)
    for ex, prompt in zip(examples, prompts, strict=True):
        pairs = [encode_pair(tokenizer, c, k) for c, k in zip(ex.contexts, ex.continuations, strict=True)]
        made, slots = share_prefix(pairs, prompt)
        where.append([(len(units) + u, r) for u, r in slots])
        units.extend(made)
    return units, where


def run_choice_task(model: nn.Module, tokenizer: Any, task: str, kind: str, examples: Sequence[ChoiceExample],
                    batch_size: int, cond: Conditioning, scoring: Scoring = Scoring()) -> TaskRun:
    """mc (acc, acc_norm), partial (acc) and lastword (acc = greedy, perplexity) tasks."""
    t0 = time.perf_counter()
    units, where = _units(tokenizer, examples, cond)
    scores = score_units(model, units, batch_size, cond.prompts, tokenizer.pad_token_id or 0,
                         on_batch=scoring.on_progress, max_tokens=scoring.max_tokens)
    _refuse_nonfinite(task, [[scores[u][j].loglik for u, j in slots] for slots in where])
    records = []
    for ex, slots in zip(examples, where, strict=True):
        picked = [scores[u][j] for u, j in slots]
        rec: dict[str, Any] = {"task": task, "id": ex.id}
        if kind == "lastword":
            rec.update(loglik=picked[0].loglik, greedy=picked[0].greedy, gold=ex.choices[0],
                       acc=float(picked[0].greedy), correct=picked[0].greedy)
        else:
            m = choice_metrics([s.loglik for s in picked], ex.choices, ex.gold)
            rec.update(loglik=[s.loglik for s in picked], pred=m["pred"], gold=ex.gold, correct=bool(m["acc"]),
                       acc=m["acc"])
            if kind == "mc":
                rec.update(pred_norm=m["pred_norm"], acc_norm=m["acc_norm"])
        if cond.prompts is not None:
            rec["prompt"] = units[slots[0][0]].prompt
        records.append(rec)
    metrics = task_metrics(kind, records)
    tokens = sum(len(u.prefix) + sum(map(len, u.suffixes)) for u in units)
    return TaskRun(records, metrics, tokens, time.perf_counter() - t0)


QA_STOP = "\n"
QA_MAX_NEW_TOKENS = 32


@torch.inference_mode()
def _generate_batch(model: nn.Module, tokenizer: Any, prompts_text: Sequence[str], cond: Conditioning,
                    rows: Sequence[int | None]) -> tuple[list[str], int]:
    """Greedy completions of a left-padded batch, cut at the first newline; (texts, prompt and generated
    tokens)."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens line up at the right edge
    try:
        enc = tokenizer(list(prompts_text), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    kwargs: dict[str, Any] = {"attention_mask": enc.attention_mask}
    if cond.prompts is not None:
        soft = cond.prompts[list(rows)].to(device, embed.weight.dtype)  # (B, P, d)
        kwargs["inputs_embeds"] = torch.cat([soft, embed(enc.input_ids)], 1)
        kwargs["attention_mask"] = torch.cat([torch.ones(soft.shape[:2], dtype=torch.long, device=device),
                                              enc.attention_mask], 1)
    else:
        kwargs["input_ids"] = enc.input_ids
    out = model.generate(**kwargs, max_new_tokens=QA_MAX_NEW_TOKENS, do_sample=False, top_p=None, top_k=None,
                         temperature=None, pad_token_id=tokenizer.pad_token_id, stop_strings=[QA_STOP],
                         tokenizer=tokenizer)
    new = out if cond.prompts is not None else out[:, enc.input_ids.shape[1]:]  # embeds: only new tokens come back
    texts, generated = [], int(enc.attention_mask.sum())
    for row in new.tolist():
        ids = [t for t in row if t != tokenizer.pad_token_id]
        generated += len(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).split(QA_STOP)[0].strip())
    return texts, generated


def run_qa_task(model: nn.Module, tokenizer: Any, task: str, examples: Sequence[QAExample], batch_size: int,
                cond: Conditioning, on_progress: Advance | None = None) -> TaskRun:
    """Closed-book QA: greedy generation until a newline, exact match and F1 against every alias."""
    t0 = time.perf_counter()
    routes = cond.rows([ex.prompt for ex in examples], examples)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))
    answers: list[str] = [""] * len(examples)
    tokens = 0
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        texts, generated = _generate_batch(model, tokenizer, [examples[i].prompt for i in chunk], cond,
                                           [routes[i] for i in chunk])
        for i, text in zip(chunk, texts, strict=True):
            answers[i] = text
        tokens += generated
        if on_progress:
            on_progress(len(chunk))
    records = []
    for ex, answer in zip(examples, answers, strict=True):
        m = qa_metrics(answer, ex.answers)
        records.append({"task": task, "id": ex.id, "prediction": answer, "correct": bool(m["exact_match"]), **m})
        if cond.prompts is not None:
            records[-1]["prompt"] = routes[len(records) - 1]
    return TaskRun(records, task_metrics("qa", records), tokens, time.perf_counter() - t0)


def attention_profile(model: nn.Module, tokenizer: Any, examples: Sequence[ChoiceExample],
                      cond: Conditioning) -> list[float]:
    """Per layer, the attention mass the examples' contexts put on what is in front of them (their prompt,
    or without one their first token), averaged over the examples: where each way of recovering sends
    attention."""
    from ..recover.routing import prefix_attention

    total = None
    rows = cond.rows([ex.contexts[0] for ex in examples], examples)
    for ex, row in zip(examples, rows, strict=True):
        ids = torch.tensor([encode_pair(tokenizer, ex.contexts[0], ex.continuations[0])[0]])  # (1, T)
        soft = cond.prompts[[row]] if row is not None else None  # (1, P, d)
        mass = prefix_attention(model, ids, torch.ones_like(ids), soft)
        total = mass if total is None else total + mass
    return [round(v, 6) for v in (total / len(examples)).tolist()]
