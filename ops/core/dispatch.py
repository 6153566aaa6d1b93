"""Kernel dispatch: whether a tensor's computation goes to a Triton kernel or stays in plain torch.

The one place that decides, so every ops/ function asks the same question the same way, and the one place
that imports triton_kernels (lazily: rechannel imports and runs without a GPU or without triton).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

MAX_KERNEL_BLOCK = 256  # the fused column-loop kernels hold a block in registers; wider blocks run in torch


def use_triton(t: torch.Tensor) -> bool:
    """RECHANNEL_KERNELS=auto (default): Triton for CUDA tensors, torch elsewhere; =torch: never Triton;
    =triton: always (on the CPU that needs TRITON_INTERPRET=1: how the tests run the kernels here)."""
    choice = os.environ.get("RECHANNEL_KERNELS", "auto")
    return choice == "triton" or (choice == "auto" and t.is_cuda)


def kernels(name: str) -> ModuleType:
    """The Triton module `rechannel.triton_kernels.<name>`, imported on first use."""
    return importlib.import_module(f"{__package__.rsplit('.', 2)[0]}.triton_kernels.{name}")
