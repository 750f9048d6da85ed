"""The aligner's parameters as plain tensors, in the layout every backend consumes.

Backends never touch `nn.Module`s: they receive an `AlignerWeights`, already cast to the
compute dtype, so one backend can be swapped for another (and a stage kernel for the PyTorch
stage it replaces) without any module plumbing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LayerWeights(NamedTuple):
    """One pre-norm cross-attention decoder layer (D = d_model, F = d_ffn)."""

    norm2_w: Tensor  # [D]
    norm2_b: Tensor  # [D]
    in_proj_w: Tensor  # [3D, D], rows q, k, v
    in_proj_b: Tensor  # [3D]
    out_proj_w: Tensor  # [D, D]
    out_proj_b: Tensor  # [D]
    norm3_w: Tensor  # [D]
    norm3_b: Tensor  # [D]
    linear1_w: Tensor  # [F, D]
    linear1_b: Tensor  # [F]
    linear2_w: Tensor  # [D, F]
    linear2_b: Tensor  # [D]


class AlignerWeights(NamedTuple):
    """All tensors of the fusion module that take part in the computation."""

    norm0_w: Tensor  # [D] decoder_norm, used on entry and on exit
    norm0_b: Tensor  # [D]
    layers: tuple[LayerWeights, ...]
    head: tuple[tuple[Tensor, Tensor], ...]  # (weight [out, in], bias [out]) per Linear

    def flatten(self) -> list[Tensor]:
        """All tensors in a fixed order (the inverse of `unflatten`)."""
        flat = [self.norm0_w, self.norm0_b]
        for layer in self.layers:
            flat.extend(layer)
        for w, b in self.head:
            flat.extend((w, b))
        return flat

    @staticmethod
    def unflatten(flat: list[Tensor] | tuple[Tensor, ...], n_layers: int) -> AlignerWeights:
        n_lw = len(LayerWeights._fields)
        layers = tuple(
            LayerWeights(*flat[2 + i * n_lw : 2 + (i + 1) * n_lw]) for i in range(n_layers)
        )
        rest = flat[2 + n_layers * n_lw :]
        head = tuple((rest[i], rest[i + 1]) for i in range(0, len(rest), 2))
        return AlignerWeights(flat[0], flat[1], layers, head)

    def contiguous(self) -> AlignerWeights:
        """Every tensor contiguous (differentiably; a no-op for those already so): the
        kernels index vectors with unit stride and matrices by rows."""
        return AlignerWeights.unflatten([t.contiguous() for t in self.flatten()],
                                        len(self.layers))  # fmt: skip

    def to(self, dtype: torch.dtype) -> AlignerWeights:
        """Cast every tensor (differentiably; a no-op where the dtype already matches)."""
        n_layers = len(self.layers)
        return AlignerWeights.unflatten([t.to(dtype) for t in self.flatten()], n_layers)
