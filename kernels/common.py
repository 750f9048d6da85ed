"""Helpers shared by the kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether `mma` must widen its operands: Triton's interpreter (≤ 3.9) keeps bf16 as raw
    uint16 bits and multiplies those as integers. A bf16 product is exact in fp32 and the
    accumulator is fp32 either way, so widening computes what the tensor cores compute."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b on the tensor cores (fp32 accumulator)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)
