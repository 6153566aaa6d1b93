"""The packed format of a quantized matrix: integer codes, their grids, and the bit layout on disk.

A weight is stored as the code q in [0, 2^bits) of its (row, group) grid and read back as
scale * (q - zero); scales are float16, zero points uint8. The codes of one output row form a
little-endian bit stream (code k occupies bits k*bits .. k*bits + bits - 1; bit i of the stream is bit
i % 8 of byte i // 8), padded to a whole byte: two 4-bit codes per byte, four 2-bit codes, eight 3-bit
codes per three bytes. How the codes are chosen (RTN, GPTQ) is ops/compress; this is what they produce
and what every loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Codes in the original column order, with the grid of each (row, group)."""

    codes: torch.Tensor  # (R, C) uint8
    scales: torch.Tensor  # (R, G) float16
    zeros: torch.Tensor  # (R, G) uint8
    g_idx: torch.Tensor | None  # (C,) int32: the group of each column; None = column // group width
    bits: int
    group_width: int  # columns per group when g_idx is None

    def group_index(self) -> torch.Tensor:
        """(C,) int64: which group's scale and zero each input column uses."""
        if self.g_idx is not None:
            return self.g_idx.long()
        cols = self.codes.shape[1]
        return torch.arange(cols, device=self.codes.device) // self.group_width

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the file stands for, computed in float32 then cast. (R, C)"""
        g = self.group_index()
        scale = self.scales.float()[:, g]
        zero = self.zeros.float()[:, g]
        return (scale * (self.codes.float() - zero)).to(dtype)


def packed_width(cols: int, bits: int) -> int:
    """Bytes per packed row."""
    return (cols * bits + 7) // 8


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) uint8 codes < 2**bits -> (R, packed_width(C, bits)) uint8, one bit stream per row.

    Eight codes fill exactly `bits` bytes, so the row is cut into runs of eight, each run's codes are
    OR-ed into one 64-bit word, and the word's low `bits` bytes are the run's bytes."""
    rows, cols = codes.shape
    runs = -(-cols // 8)
    padded = torch.nn.functional.pad(codes, (0, runs * 8 - cols)).to(torch.int64).view(rows, runs, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (padded << shifts).sum(-1, keepdim=True)  # (R, runs, 1): disjoint bits, so the sum is an OR
    out = (word >> torch.arange(0, 8 * bits, 8, device=codes.device)) & 0xFF  # (R, runs, bits)
    return out.to(torch.uint8).view(rows, runs * bits)[:, :packed_width(cols, bits)]


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of pack_rows: (R, bytes) uint8 -> (R, cols) uint8."""
    rows = packed.shape[0]
    runs = -(-cols // 8)
    padded = torch.nn.functional.pad(packed, (0, runs * bits - packed.shape[1])).to(torch.int64)
    shifts = torch.arange(0, 8 * bits, 8, device=packed.device)
    word = (padded.view(rows, runs, bits) << shifts).sum(-1, keepdim=True)  # (R, runs, 1)
    codes = (word >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)  # (R, runs, 8)
    return codes.to(torch.uint8).view(rows, runs * 8)[:, :cols]
