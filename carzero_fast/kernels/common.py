"""Helpers shared by the kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# FMA contraction (a·b + c in one rounding) in the compiled kernels. Triton 3.9 enables it by
# default with a warning that 3.10 will not; the kernels were tuned and measured with it (an
# FFMA per softmax weight, per LayerNorm element), so every launch asks for it explicitly.
FP_FUSION = True

# exp(x) = exp2(x·LOG2E), ln(x) = log2(x)·LN2: the softmax kernels work in log2 units
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INDEX_LIMIT = 2**31  # the kernels' element offsets are int32


def check_matrices(fn: str, **tensors: Tensor | None) -> None:
    """Each given tensor (None: skipped) is 2-D with unit stride along its rows: the kernels
    index element (r, c) at `r·stride(0) + c` (a single column may have any stride), in int32,
    so its last element must lie within `INDEX_LIMIT` of its first (the backends' chunk plans
    keep every buffer under half that). Runs before every launch: a forward at N = M = 1024
    makes ~570 calls, so it reads each tensor's shape and strides once, without loops."""
    for name, t in tensors.items():
        if t is None:
            continue
        shape, strides = t.shape, t.stride()
        if len(shape) != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(shape)}")
        rows, cols = shape
        if strides[1] != 1 and cols > 1:
            raise ValueError(f"{fn}: {name} needs unit stride along its rows, got strides "
                             f"{strides}")  # fmt: skip
        span = (rows - 1) * abs(strides[0]) + (cols - 1) * abs(strides[1]) + 1
        if span > INDEX_LIMIT and rows and cols:
            raise ValueError(f"{fn}: {name} of shape {tuple(shape)} and strides {strides} "
                             f"spans {span} elements; the kernels index in int32 (at most "
                             f"{INDEX_LIMIT}): split it")  # fmt: skip


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for the launchers' grids. `triton.cdiv` computes the same, but in Triton 3.6
    and 3.9 it is a `constexpr_function` whose host call unwraps its arguments first: several
    times the cost of this division, at every launch (`benchmarks/host_time.py`)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 ≥ n for n ≥ 1 (0 for 0), as `triton.next_power_of_2`, without
    its wrapper's cost (see `cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether `mma` must widen its operands: Triton's interpreter (≤ 3.9) keeps bf16 as raw
    uint16 bits and multiplies those as integers. A bf16 product is exact in fp32 and the
    accumulator is fp32 either way, so widening computes what the tensor cores compute."""
    return interpreting() and dtype == torch.bfloat16


def fix_interpreter_rounding() -> None:
    """Make Triton's interpreter round fp32 → bf16 to nearest-even, as the GPU does.

    The interpreter (≤ 3.9) truncates those conversions (round toward zero), which biases
    every bf16 result and would double the error the kernels are judged by. Applied only under
    `TRITON_INTERPRET=1`; idempotent.
    """
    import numpy as np
    import triton.language as tl_
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_carzero_rtne", False):
        return

    def convert(data, input_dtype, output_dtype, rounding_mode):  # noqa: ANN001, ANN202
        if input_dtype == tl_.float32 and output_dtype == tl_.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(data, input_dtype, output_dtype, rounding_mode)

    convert._carzero_rtne = True
    interpreter._convert_float = convert


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b on the tensor cores (fp32 accumulator)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)
