"""Batched text completion: greedy by default, seeded sampling with a temperature."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 is greedy
    seed: int = 0
    batch_size: int = 8
    stop: tuple[str, ...] = ()  # cut the completion at the first of these strings


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def complete(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: GenerateConfig) -> Iterator[tuple[str, int]]:
    """Yield (completion text, number of new tokens) for each prompt, in order."""
    import torch

    torch.manual_seed(cfg.seed)
    tokenizer.padding_side = "left"  # new tokens line up at the right edge of every row
    device = next(model.parameters()).device
    for batch in _batches(prompts, cfg.batch_size):
        enc = tokenizer(list(batch), return_tensors="pt", padding=True).to(device)
        sampling = {"do_sample": True, "temperature": cfg.temperature} if cfg.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 top_p=None, top_k=None, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]  # (B, new)
        for row in new:
            ids = [t for t in row.tolist() if t != tokenizer.pad_token_id]
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            yield _cut(tokenizer.decode(ids, skip_special_tokens=True), cfg.stop), len(ids)
