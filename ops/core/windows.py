"""Token windows drawn from documents, as the GPTQ / SparseGPT / Wanda reference code draws C4 samples:
with Python's `random` seeded, pick a random document until one has more than `seqlen` tokens, then a random
start inside it; repeat for each sample. Calibration, compression and prompt training all draw this way.
Documents are tokenized once (at most their first DOC_CHARS characters), which changes nothing in the
sequence of draws for documents shorter than that.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import UserError

DOC_CHARS = 1_000_000  # characters of a document tokenized at most (C4 documents are under 40,000)
_TOKENIZE_BATCH = 64  # documents tokenized together


def document_ids(texts: Sequence[str], tokenizer: Any) -> list[np.ndarray]:
    """Each document's token ids (int32), from at most its first DOC_CHARS characters, tokenized in small
    batches: a single 50 MB document costs a bounded tokenization, not gigabytes of encodings."""
    out: list[np.ndarray] = []
    for i in range(0, len(texts), _TOKENIZE_BATCH):
        batch = [t[:DOC_CHARS] for t in texts[i:i + _TOKENIZE_BATCH]]
        out += [np.asarray(ids, dtype=np.int32) for ids in tokenizer(batch)["input_ids"]]
    return out


def draw_windows(texts: Sequence[str], tokenizer: Any, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(samples, seqlen) token windows, drawn exactly as the reference calibration loaders draw them
    (a document beyond DOC_CHARS characters is drawn from as if it ended there)."""
    docs = document_ids(texts, tokenizer)
    lengths = [len(ids) for ids in docs]
    if not any(n > seqlen for n in lengths):
        raise UserError(f"no calibration document is longer than --seqlen {seqlen} tokens "
                        f"(longest: {max(lengths, default=0)}); lower --seqlen or give longer texts")
    rng = random.Random(seed)
    windows = np.empty((samples, seqlen), dtype=np.int64)
    for k in range(samples):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if lengths[i] > seqlen:
                break
        start = rng.randint(0, lengths[i] - seqlen - 1)
        windows[k] = docs[i][start:start + seqlen]
    return torch.from_numpy(windows)
