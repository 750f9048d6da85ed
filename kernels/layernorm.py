"""LayerNorm row statistics: the prologue data of every normalised GEMM.

A pre-norm GEMM `LN(x)·Wᵀ` needs each row's mean and 1/std before any of its column tiles can
start. One pass over `x` computes them once per row (instead of once per column tile of every
consumer); `linear` then normalises its A tiles in registers as it loads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

STATS_BLOCK_ROWS = 8


@triton.jit
def row_stats_kernel(
    p_x,  # [R, D] rows to normalise
    p_mean,  # [R] fp32
    p_rstd,  # [R] fp32
    n_rows,
    stride_x,
    eps,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_r = o_r < n_rows
    m_x = m_r[:, None] & (o_d[None, :] < D)
    b_x = tl.load(p_x + o_r[:, None] * stride_x + o_d[None, :], mask=m_x, other=0.0)
    b_x = b_x.to(tl.float32)  # [BLOCK_R, BLOCK_D]
    # two passes over the registers (mean, then centred variance), as torch's layer_norm:
    # E[x²] − E[x]² would cancel on rows with a large mean
    b_mean = tl.sum(b_x, axis=1) / D  # [BLOCK_R]
    b_c = tl.where(m_x, b_x - b_mean[:, None], 0.0)
    b_var = tl.sum(b_c * b_c, axis=1) / D
    tl.store(p_mean + o_r, b_mean, mask=m_r)
    tl.store(p_rstd + o_r, 1.0 / tl.sqrt(b_var + eps), mask=m_r)


def row_stats(
    x: Tensor, eps: float, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """x `(R, D)` (rows contiguous) → (mean `(R,)`, rstd `(R,)`), fp32."""
    n_rows, d = x.shape
    if x.stride(1) != 1:
        raise ValueError("row_stats needs rows with unit stride")
    mean, rstd = (
        out
        if out is not None
        else (
            torch.empty(n_rows, dtype=torch.float32, device=x.device),
            torch.empty(n_rows, dtype=torch.float32, device=x.device),
        )
    )
    grid = (triton.cdiv(n_rows, STATS_BLOCK_ROWS),)
    block_d = triton.next_power_of_2(d)
    row_stats_kernel[grid](
        x, mean, rstd, n_rows, x.stride(0), eps,
        D=d, BLOCK_R=STATS_BLOCK_ROWS, BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8,
    )  # fmt: skip
    return mean, rstd


def row_stats_torch(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The PyTorch stage `row_stats` replaces."""
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)
