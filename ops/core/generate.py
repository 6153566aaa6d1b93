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


def context_length(config: Any) -> int | None:
    """The longest sequence the model was built for, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token covers: its vocabulary string's length (a byte-level BPE
    token holds one character per byte, and a text character is at least one byte)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


def check_prompt_lengths(tokenizer: Any, config: Any, prompts: Sequence[str], max_new_tokens: int,
                         names: Sequence[str]) -> None:
    """Refuse an empty prompt, and one that with the new tokens would not fit the model's context, before any
    forward pass; a text too long by its character count alone is refused without tokenizing it at all."""
    from .errors import UserError

    ctx = context_length(config)
    room = None if ctx is None else ctx - max_new_tokens
    if room is not None and room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{ctx} tokens")
    widest = longest_token_chars(tokenizer)
    for name, text in zip(names, prompts, strict=True):
        if room is not None and len(text) > (room + 1) * widest:  # at least room + 1 tokens, whatever they are
            raise UserError(f"{name}: {len(text):,} characters, more than the {room} tokens the model's context "
                            f"of {ctx} leaves after --max-new-tokens {max_new_tokens}")
        n = len(tokenizer(text)["input_ids"])
        if n == 0:
            raise UserError(f"{name}: the prompt is empty: nothing to complete")
        if room is not None and n > room:
            raise UserError(f"{name}: {n} tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's "
                            f"context of {ctx} tokens")


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
