"""Configuration of the CARZero fusion module (the cross-attention aligner)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class AlignerConfig:
    """Shape of CARZero's fusion module; the defaults are CARZero's own.

    Attributes:
        d_model: width D of tokens, queries and the decoder.
        n_heads: attention heads H (head dim D / H).
        n_layers: decoder layers L (pre-norm, cross-attention + FFN, no self-attention).
        d_ffn: hidden width F of each layer's FFN.
        head_dims: hidden widths of the MLP head; its last layer maps to one logit.
        dropout: dropout probability used in training mode at every site of the original.
        layer_norm_eps: epsilon of every LayerNorm.
    """

    d_model: int = 768
    n_heads: int = 4
    n_layers: int = 4
    d_ffn: int = 1024
    head_dims: tuple[int, ...] = (1024, 512, 256)
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        # sizes as Python ints (a numpy integer is taken; a float, str or bool is refused: it
        # would fail far from here, or be truncated silently)
        for name in ("d_model", "n_heads", "n_layers", "d_ffn"):
            object.__setattr__(self, name, _size(f"AlignerConfig.{name}", getattr(self, name)))
        if isinstance(self.head_dims, (str, bytes)) or not hasattr(self.head_dims, "__iter__"):
            raise TypeError(f"AlignerConfig.head_dims must be a sequence of widths, got "
                            f"{self.head_dims!r}")  # fmt: skip
        object.__setattr__(self, "head_dims", tuple(_size("AlignerConfig.head_dims", h)
                                                    for h in self.head_dims))  # fmt: skip
        for name in ("dropout", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"AlignerConfig.{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("d_model", "n_heads", "n_layers", "d_ffn"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"AlignerConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"AlignerConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if not self.head_dims or any(h <= 0 for h in self.head_dims):
            raise ValueError(
                f"AlignerConfig.head_dims must be positive widths, got {self.head_dims}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AlignerConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.layer_norm_eps < math.inf:  # NaN fails too
            raise ValueError(
                f"AlignerConfig.layer_norm_eps must be positive and finite, got "
                f"{self.layer_norm_eps}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def flops_per_pair(self, n_tokens: int) -> int:
        """Multiply-add FLOPs of one (memory item, query) pair, DESIGN.md §2 cost model.

        Counts the per-pair work only (Q projection, attention, output projection, FFN per
        layer, then the MLP head); per-item K/V projections are `kv_flops_per_item`.
        """
        d, p = self.d_model, n_tokens
        per_layer = 2 * d * d + 4 * p * d + 2 * d * d + 4 * d * self.d_ffn
        widths = (d, *self.head_dims, 1)
        head = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
        return self.n_layers * per_layer + head

    def kv_flops_per_item(self, n_tokens: int) -> int:
        """FLOPs of the K and V projections of one memory item over all layers."""
        return self.n_layers * 4 * n_tokens * self.d_model * self.d_model


def _size(what: str, value: object) -> int:
    """`value` as a Python int, or TypeError naming `what` (bool is not a size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)
