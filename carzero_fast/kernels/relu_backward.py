"""ReLU's backward with the column sums of its result, in one pass.

A training step's backward multiplies a layer's output gradient by its weight (cuBLAS), then
passes the result back through the ReLU before it: that gradient is the earlier layer's dy,
whose column sums are its bias gradient. `relu_backward` writes the masked gradient and the
sums together, where `threshold_backward` and a column reduction over the 16-bit rows ran
apart (PyTorch's reduction over rows ran at ~1.3 TB/s on an H200, BENCHMARKS.md). The sums
are per-program partials added in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import FP_FUSION, cdiv
from .configs import multiprocessors

BLOCK_R, BLOCK_C = 32, 128  # rows per step of a program's loop, columns per program
PROGRAMS_PER_SM = 4


@triton.jit
def relu_backward_kernel(
    p_dy,  # [R, C] gradient of the ReLU's output
    p_act,  # [R, C] the ReLU's output (> 0 exactly where it passed its input)
    p_dx,  # [R, C] gradient of its input, p_dy's dtype
    p_part,  # [row programs, C] fp32 partial column sums of dx
    n_rows,
    n_cols,
    stride_dy,
    stride_act,
    stride_dx,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c, pid_r = tl.program_id(0), tl.program_id(1)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    m_c = o_c < n_cols
    b_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # this program's row blocks: pid_r, pid_r + row programs, …
    for r0 in range(pid_r * BLOCK_R, n_rows, tl.num_programs(1) * BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        m_x = (o_r < n_rows)[:, None] & m_c[None, :]
        b_dy = tl.load(p_dy + o_r[:, None] * stride_dy + o_c[None, :], mask=m_x, other=0.0)
        b_act = tl.load(p_act + o_r[:, None] * stride_act + o_c[None, :], mask=m_x, other=0.0)
        # compared in fp32: the interpreter holds 16-bit floats as raw bits
        b_dx = tl.where(b_act.to(tl.float32) > 0, b_dy, 0.0).to(p_dx.dtype.element_ty)
        tl.store(p_dx + o_r[:, None] * stride_dx + o_c[None, :], b_dx, mask=m_x)
        b_sum += tl.sum(b_dx.to(tl.float32), axis=0)
    tl.store(p_part + pid_r * n_cols + o_c, b_sum, mask=m_c)


def relu_backward(dy: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
    """dy, act `(R, C)` (act: the ReLU's output) → (dx `(R, C)` in dy's dtype, dx where act
    > 0 and 0 elsewhere; its column sums `(C,)` fp32)."""
    if dy.shape != act.shape or dy.dim() != 2:
        raise ValueError(f"relu_backward: dy {tuple(dy.shape)} and act {tuple(act.shape)} "
                         "must be one 2-D shape")  # fmt: skip
    if dy.stride(-1) != 1 or act.stride(-1) != 1:
        raise ValueError("relu_backward: dy and act need unit stride along their rows")
    n_rows, n_cols = dy.shape
    dx = torch.empty((n_rows, n_cols), dtype=dy.dtype, device=dy.device)
    col_programs = cdiv(n_cols, BLOCK_C)
    row_programs = cdiv(n_rows, BLOCK_R)
    row_programs = max(1, min(row_programs, PROGRAMS_PER_SM * multiprocessors(dy.device)
                              // max(col_programs, 1)))  # fmt: skip
    # every program writes its row of partials: no zero-fill unless nothing is launched
    alloc = torch.empty if n_rows and n_cols else torch.zeros
    part = alloc((row_programs, n_cols), dtype=torch.float32, device=dy.device)
    if n_rows and n_cols:
        relu_backward_kernel[(col_programs, row_programs)](
            dy, act, dx, part, n_rows, n_cols, dy.stride(0), act.stride(0), dx.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return dx, part.sum(0)


def relu_backward_torch(dy: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
    """The PyTorch stages `relu_backward` replaces (same arguments)."""
    dx = torch.ops.aten.threshold_backward(dy, act, 0)
    return dx, dx.sum(0, dtype=torch.float32)
