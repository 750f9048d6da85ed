"""Dropout for recomputing backends: masks are a pure function of (seed, chunk)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Dropout:
    """Dropout whose masks are a pure function of (seed, chunk): identical on recomputation.

    Masks come from 16-bit uniform integers, four per 64-bit random word (less than half the
    cost of one float per element on CPU), so the drop probability is quantised to 1/65536
    (0.1 → 0.1000061); the kept values are scaled by 1/(1 − that), which keeps the expectation
    exact.
    """

    def __init__(self, p: float, seed: int | None, chunk: tuple[int, int], device: torch.device):
        self.threshold = round((p if seed is not None else 0.0) * 65536)
        self.p = self.threshold / 65536  # the probability actually applied
        self.scale = 1.0 / (1.0 - self.p)  # 1 when inactive
        self.gen: torch.Generator | None = None
        if self.active:
            self.gen = torch.Generator(device=device)
            # Distinct, well-mixed stream per chunk (SplitMix-style odd multipliers). The CPU
            # generator (mt19937) keeps the seed's low 32 bits: two of a call's k chunks draw
            # the same masks with probability ~k²/2^33 (birthday bound; 1e-6 at k = 100).
            mix = seed ^ (chunk[0] * 0x9E3779B97F4A7C15) ^ (chunk[1] * 0xBF58476D1CE4E5B9)
            self.gen.manual_seed(mix % (2**63 - 1))

    @property
    def active(self) -> bool:
        return self.threshold > 0

    def keep(self, shape: torch.Size, device: torch.device) -> Tensor:
        """int16 `shape`, 1 = kept, 0 = dropped: the draw every mask of this chunk comes from.

        Integer, not bool: PyTorch's CPU kernels multiply by a float far faster than by a
        bool, and a bool → float conversion is a scalar loop; int16 → float is vectorised
        (a bool mask cost ~6× a float product per application in a profile).
        """
        numel = math.prod(shape)
        words = torch.empty(-(-numel // 4), dtype=torch.int64, device=device)
        words.random_(-(2**63), None, generator=self.gen)  # all 64 bits uniform
        fields = words.view(torch.int16)[:numel]  # contiguous, each uniform in [-2^15, 2^15)
        t = self.threshold - 32768  # kept iff field >= t; clamp to {t − 1, t}, shift to {0, 1}
        return fields.clamp(t - 1, t).sub_(t - 1).view(shape)

    def __call__(self, x: Tensor) -> Tensor:
        """Dropout: x·mask/(1 − p)."""
        if not self.active:
            return x
        return self.kept(x).mul_(self.scale)  # under autograd the int16 mask is what is kept

    def kept(self, x: Tensor) -> Tensor:
        """x where kept, 0 elsewhere, without the 1/(1 − p): the caller folds `scale` into
        the next GEMM (alpha / beta), which saves a pass over the activations."""
        if not self.active:
            return x
        keep = self.keep(x.shape, x.device)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Kept.apply(x, keep)
        return x * keep.to(x.dtype)

    def relu_kept(self, x: Tensor) -> Tensor:
        """relu(x) where kept, 0 elsewhere, unscaled as `kept`; may overwrite x. Under
        autograd it saves only its output (which the next GEMM saves anyway)."""
        if not self.active:
            return torch.relu_(x)
        return _ReluKept.apply(x, self.keep(x.shape, x.device))


class _Kept(torch.autograd.Function):
    """x·keep that saves the 2-byte int16 mask for its backward, not a float copy of it."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(keep)
        return x * keep.to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        (keep,) = ctx.saved_tensors
        return g * keep.to(g.dtype), None


class _ReluKept(torch.autograd.Function):
    """relu(x)·keep, saving only its output: the gradient is nonzero exactly where the output
    is > 0 (one `threshold_backward` pass, no mask kept)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor) -> Tensor:  # noqa: ANN001
        out = (x * keep.to(x.dtype)).relu_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(g, out, 0), None
