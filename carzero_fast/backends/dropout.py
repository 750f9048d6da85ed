"""Dropout for recomputing backends: masks are a pure function of (seed, chunk)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Dropout:
    """Dropout whose masks are a pure function of (seed, chunk): identical on recomputation.

    Masks come from 16-bit uniform integers, three per 64-bit random word (half the cost of
    one float per element on CPU), so the drop probability is quantised to 1/65536
    (0.1 → 0.1000061); the kept values are scaled by 1/(1 − that), which keeps the expectation
    exact.
    """

    def __init__(self, p: float, seed: int | None, chunk: tuple[int, int], device: torch.device):
        self.threshold = round((p if seed is not None else 0.0) * 65536)
        self.p = self.threshold / 65536  # the probability actually applied
        self.gen: torch.Generator | None = None
        if self.active:
            self.gen = torch.Generator(device=device)
            # Distinct, well-mixed stream per chunk (SplitMix-style odd multipliers).
            mix = seed ^ (chunk[0] * 0x9E3779B97F4A7C15) ^ (chunk[1] * 0xBF58476D1CE4E5B9)
            self.gen.manual_seed(mix % (2**63 - 1))

    @property
    def active(self) -> bool:
        return self.threshold > 0

    def mask(self, shape: torch.Size, device: torch.device) -> Tensor:
        """bool `shape`, True = dropped."""
        numel = math.prod(shape)
        words = torch.empty(-(-numel // 3), dtype=torch.int64, device=device)
        words.random_(generator=self.gen)  # 63 uniform bits: the low 48 give three 16-bit fields
        fields = words.view(torch.int16).view(-1, 4)[:, :3]  # [words, 3], each in [-2^15, 2^15)
        dropped = fields < self.threshold - 32768  # [words, 3]
        return dropped.view(-1)[:numel].view(shape)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        # masked_fill keeps a bool mask for backward (a float mask would be 4× the bytes)
        return x.masked_fill(self.mask(x.shape, x.device), 0.0).mul_(1.0 / (1.0 - self.p))
