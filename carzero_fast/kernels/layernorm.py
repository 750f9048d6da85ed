"""Residual add + LayerNorm: the memory-bound pass between the pair stage's GEMMs.

Every residual add of the pre-norm decoder is followed by a LayerNorm (LN3 after attention,
the next layer's LN2 — or decoder_norm after the last layer — after the FFN), so one pass does
both: `x ← x + delta` on the residual stream (fp32, or the GEMM dtype when the caller keeps
a 16-bit stream: 8 bytes per element per pass instead of 12), then `y = LN(x)·γ + β` written
in the next GEMM's operand dtype; the sum and the statistics are fp32 in registers either
way. The GEMMs then run plain 16-bit main loops (`linear`).

Layer 1 reads its stream from the per-query `x0` broadcast over a chunk's items (row
`r % res_rows`); LN0 of the memory tokens is the same pass without an add.

A forward without a backward stores less: the pass after the attention (LN3) writes only its
LayerNorm, and the pass after the FFN adds both branches onto the layer's input stream again
(`delta2`: x + attention branch + FFN branch, the same fp32 sums in the same order) and
writes the stream only where a later layer reads it. With an fp32 stream that is 76 bytes
per element of a pair's four layers instead of 92 (the x0 broadcast of layer 1 is read from
L2), the same results bit for bit. When PyTorch's GEMMs add their products to a stream of
their own dtype (`backends/fused.py`), a pass only reads the stream and adds a constant row
(`shift`: the biases those GEMMs left out).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from carzero_fast.backends.philox import ChunkPos, DropoutSpec

from .common import FP_FUSION, cdiv, check_matrices, next_power_of_2
from .configs import multiprocessors
from .dropout import chunk_keep

BLOCK_ROWS = 8
# the backward's rows per program and warps (`benchmarks.tune_gpu --only layer_norm_bwd`):
# on an H200, 32768 × 768 rows took 143 µs with 4 rows on 4 warps (2.46 TB/s, 130
# registers), 168 with 2 on 4, 190 with 8 on 8 and 271–452 with 16 warps or 4 rows on 8
# (cee02cd, before the kernel also wrote the 16-bit dx of the residual branch)
LN_BWD_ROWS = 4
LN_BWD_WARPS = 4
# programs per SM when each program loops over row blocks and writes one row of dγ/dβ
# partials (0: one program per row block, whose partials at 32768 rows are 50 MB written
# and summed again). Untimed on a GPU: `tune_gpu --only layer_norm_bwd` has the candidates.
LN_BWD_PROGRAMS_PER_SM = 0


@triton.jit
def add_layer_norm_kernel(
    p_x,  # [res_rows, D] stream in (row r % res_rows); any float dtype
    p_delta,  # [R, D] branch output to add, HAS_DELTA
    p_delta2,  # [R, D] a second branch added after it, HAS_DELTA2 (the FFN's, inference)
    p_shift,  # [D] fp32 added to every row last, HAS_SHIFT (biases a GEMM left out)
    p_x_out,  # [R, D] stream out (fp32 or 16-bit), WRITE_X (may be p_x itself)
    p_w,  # [D] γ
    p_b,  # [D] β
    p_y,  # [R, D] LN(x + delta), the next GEMM's operand dtype
    n_rows,
    res_rows,
    stride_x,
    stride_delta,
    stride_delta2,
    stride_x_out,
    stride_y,
    eps,
    seed,  # dropout (kernels/dropout.py): counters of row r = pair (n0 + r // cols, m0 + r % cols)
    threshold,
    drop_scale,
    n0,
    m0,
    cols,
    tag_delta,
    tag_y,
    D: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DELTA2: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    WRITE_X: tl.constexpr,
    DROP_DELTA: tl.constexpr,  # dropout on the residual branch before the add
    DROP_Y: tl.constexpr,  # dropout on the LayerNorm's output (SimR, after decoder_norm)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_d = o_d < D
    m_x = (o_r < n_rows)[:, None] & m_d[None, :]  # [BLOCK_R, BLOCK_D]
    b_x = tl.load(p_x + (o_r % res_rows)[:, None] * stride_x + o_d[None, :], mask=m_x,
                  other=0.0).to(tl.float32)  # fmt: skip
    if HAS_DELTA:
        b_delta = tl.load(p_delta + o_r[:, None] * stride_delta + o_d[None, :], mask=m_x,
                          other=0.0).to(tl.float32)  # fmt: skip
        if DROP_DELTA:
            b_keep = chunk_keep(seed, threshold, o_r, 0, n0, m0, cols, tag_delta, BLOCK_D)
            b_delta = tl.where(b_keep, b_delta * drop_scale, 0.0)
        b_x += b_delta
    if HAS_DELTA2:
        b_x += tl.load(p_delta2 + o_r[:, None] * stride_delta2 + o_d[None, :], mask=m_x,
                       other=0.0).to(tl.float32)  # fmt: skip
    if HAS_SHIFT:
        b_x += tl.load(p_shift + o_d, mask=m_d, other=0.0)[None, :]
    if WRITE_X:
        tl.store(p_x_out + o_r[:, None] * stride_x_out + o_d[None, :], b_x, mask=m_x)
    # two passes over the registers (mean, then centred variance), as torch's layer_norm:
    # E[x²] − E[x]² would cancel on rows with a large mean
    b_mean = tl.sum(b_x, axis=1) / D  # [BLOCK_R]
    b_c = tl.where(m_x, b_x - b_mean[:, None], 0.0)  # [BLOCK_R, BLOCK_D] centred, 0 past D
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_c * b_c, axis=1) / D + eps)  # [BLOCK_R]
    b_w = tl.load(p_w + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    b_b = tl.load(p_b + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_y = b_c * b_rstd[:, None] * b_w[None, :] + b_b[None, :]  # [BLOCK_R, BLOCK_D]
    if DROP_Y:
        b_keep = chunk_keep(seed, threshold, o_r, 0, n0, m0, cols, tag_y, BLOCK_D)
        b_y = tl.where(b_keep, b_y * drop_scale, 0.0)
    tl.store(p_y + o_r[:, None] * stride_y + o_d[None, :], b_y.to(p_y.dtype.element_ty),
             mask=m_x)  # fmt: skip


def add_layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    y: Tensor,
    *,
    delta: Tensor | None = None,
    delta2: Tensor | None = None,
    shift: Tensor | None = None,
    x_out: Tensor | None = None,
    dropout: tuple[DropoutSpec, ChunkPos] | None = None,
    delta_tag: int | None = None,
    y_tag: int | None = None,
) -> Tensor:
    """`y` `(R, D)` = LN(x[r % res_rows] + delta[r] + delta2[r] + shift) in y's dtype (fp32
    sums, left to right); with `x_out` (`(R, D)`, fp32 or y's dtype, may be `x` itself) the sum is
    stored there too, rounded to its dtype.

    x `(res_rows, D)` with res_rows dividing R = y.shape[0]; delta, delta2 `(R, D)` or None
    (delta2 only after delta, and without dropout: the forward without a backward); shift
    `(D,)` fp32 or None: a constant row, the biases of GEMMs that added their products to the
    stream without them (`backends/fused.py`, residual adds in the GEMM).
    dropout = (spec, the chunk's position): with `delta_tag` the branch is dropped before the
    add, with `y_tag` the output after the LayerNorm (rows are the chunk's pairs).
    """
    check_matrices("add_layer_norm", x=x, delta=delta, delta2=delta2, x_out=x_out, y=y)
    n_rows, d = y.shape
    for name, t in (("delta", delta), ("delta2", delta2), ("x_out", x_out)):
        if t is not None and t.shape != y.shape:
            raise ValueError(f"add_layer_norm: {name} must be {tuple(y.shape)} like y, got "
                             f"{tuple(t.shape)}")  # fmt: skip
    if x.shape[1] != d or (n_rows and (not x.shape[0] or n_rows % x.shape[0])):
        raise ValueError(f"add_layer_norm: x must be (rows dividing {n_rows}, {d}), got "
                         f"{tuple(x.shape)}")  # fmt: skip
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"add_layer_norm: weight and bias must be ({d},), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")  # fmt: skip
    if delta2 is not None and (delta is None or dropout is not None):
        raise ValueError("add_layer_norm: delta2 comes after delta, and without dropout")
    if shift is not None and (shift.shape != (d,) or shift.dtype != torch.float32
                              or shift.stride(0) != 1):  # fmt: skip
        raise ValueError(f"add_layer_norm: shift must be a contiguous fp32 ({d},) vector, "
                         f"got {shift.dtype} {tuple(shift.shape)}")  # fmt: skip
    if x_out is not None and x_out.dtype not in (torch.float32, y.dtype):
        raise TypeError(f"add_layer_norm: the residual stream is fp32 or {y.dtype} (the "
                        f"output's dtype), got {x_out.dtype}")  # fmt: skip
    block_d = max(4, next_power_of_2(d))  # dropout draws columns four at a time
    spec, pos = dropout if dropout is not None else (DropoutSpec(0, 0, 1.0), ChunkPos(0, 0, 1))
    drop_delta = dropout is not None and delta_tag is not None and delta is not None
    drop_y = dropout is not None and y_tag is not None
    add_layer_norm_kernel[(cdiv(n_rows, BLOCK_ROWS),)](
        x, delta, delta2, shift, x_out, weight, bias, y, n_rows, x.shape[0], x.stride(0),
        delta.stride(0) if delta is not None else 0,
        delta2.stride(0) if delta2 is not None else 0,
        x_out.stride(0) if x_out is not None else 0, y.stride(0), eps, spec.seed,
        spec.threshold, spec.scale, pos.n0, pos.m0, pos.cols, delta_tag or 0, y_tag or 0,
        D=d, HAS_DELTA=delta is not None, HAS_DELTA2=delta2 is not None,
        HAS_SHIFT=shift is not None, WRITE_X=x_out is not None, DROP_DELTA=drop_delta,
        DROP_Y=drop_y, BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d,
        num_warps=8 if drop_delta or drop_y or block_d > 1024 else 4, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return y


@triton.jit
def _ln_bwd_rows(p_x, b_w, p_dy, p_dres, p_dx, p_dx16, o_r, o_d, m_d, n_rows, stride_x,
                 stride_dy, stride_dres, stride_dx, stride_dx16, eps, seed, threshold,
                 drop_scale, n0, m0, cols, tag_dx16, tag_dy, D: tl.constexpr,
                 HAS_DRES: tl.constexpr, WRITE_DX16: tl.constexpr, DROP_DX16: tl.constexpr,
                 DROP_DY: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """dx of rows `o_r` `[BLOCK_R]` stored (and its copy in the GEMM dtype, dropped with
    DROP_DX16); returns their column sums of dy·x̂, of dy and of that copy (`[BLOCK_D]` each;
    the last is dy's when unused). DROP_DY: dy is the gradient of the dropped output."""
    m_x = (o_r < n_rows)[:, None] & m_d[None, :]
    b_x = tl.load(p_x + o_r[:, None] * stride_x + o_d[None, :], mask=m_x, other=0.0)
    b_x = b_x.to(tl.float32)  # [BLOCK_R, BLOCK_D]
    b_mean = tl.sum(b_x, axis=1) / D
    b_c = tl.where(m_x, b_x - b_mean[:, None], 0.0)  # [BLOCK_R, BLOCK_D] centred, 0 past D
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_c * b_c, axis=1) / D + eps)  # [BLOCK_R]
    b_xhat = b_c * b_rstd[:, None]
    b_dy = tl.load(p_dy + o_r[:, None] * stride_dy + o_d[None, :], mask=m_x, other=0.0)
    if DROP_DY:  # the output was dropped after the LayerNorm (SimR): back through its mask,
        # rounded to dy's dtype as the dropped output's gradient was
        b_keep = chunk_keep(seed, threshold, o_r, 0, n0, m0, cols, tag_dy, BLOCK_D)
        b_dy = tl.where(b_keep, b_dy.to(tl.float32) * drop_scale, 0.0).to(b_dy.dtype)
    b_dy = b_dy.to(tl.float32)
    b_g = b_dy * b_w[None, :]  # gradient of x̂
    # dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), the LayerNorm Jacobian applied to g
    b_dx = (b_g - (tl.sum(b_g, axis=1) / D)[:, None]
            - b_xhat * (tl.sum(b_g * b_xhat, axis=1) / D)[:, None]) * b_rstd[:, None]  # fmt: skip
    if HAS_DRES:
        b_dx += tl.load(p_dres + o_r[:, None] * stride_dres + o_d[None, :], mask=m_x,
                        other=0.0).to(tl.float32)  # fmt: skip
    tl.store(p_dx + o_r[:, None] * stride_dx + o_d[None, :], b_dx, mask=m_x)
    b_db = tl.sum(b_dy, axis=0)
    b_ds = b_db
    if WRITE_DX16:  # the branch's linear layer takes dx in its GEMM dtype, and its bias Σ dx
        b_dx16 = b_dx
        if DROP_DX16:  # the branch was dropped before its add: its gradient goes through the mask
            b_keep = chunk_keep(seed, threshold, o_r, 0, n0, m0, cols, tag_dx16, BLOCK_D)
            b_dx16 = tl.where(b_keep, b_dx * drop_scale, 0.0)
        b_dx16 = b_dx16.to(p_dx16.dtype.element_ty)
        tl.store(p_dx16 + o_r[:, None] * stride_dx16 + o_d[None, :], b_dx16, mask=m_x)
        b_ds = tl.sum(tl.where(m_x, b_dx16.to(tl.float32), 0.0), axis=0)
    return tl.sum(b_dy * b_xhat, axis=0), b_db, b_ds


@triton.jit
def layer_norm_backward_kernel(
    p_x,  # [R, D] fp32 stream rows the LayerNorm saw (x + delta, recomputed)
    p_w,  # [D] γ
    p_dy,  # [R, D] gradient of the LayerNorm's output
    p_dres,  # [R, D] fp32 gradient reaching the stream from later layers, HAS_DRES
    p_dx,  # [R, D] fp32 gradient of the stream (= of delta, and of x)
    p_dx16,  # [R, D] dx in the GEMM dtype (dropped with DROP_DX16), WRITE_DX16
    p_dw_part,  # [programs, D] fp32 partial dγ of this program's rows
    p_db_part,  # [programs, D] fp32 partial dβ
    p_ds_part,  # [programs, D] fp32 partial column sums of dx16, WRITE_DX16
    n_rows,
    stride_x,
    stride_dy,
    stride_dres,
    stride_dx,
    stride_dx16,
    eps,
    seed,  # DROP_DX16 / DROP_DY: kernels/dropout.py's counters; rows are the chunk's pairs
    threshold,
    drop_scale,
    n0,
    m0,
    cols,
    tag_dx16,
    tag_dy,
    D: tl.constexpr,
    HAS_DRES: tl.constexpr,
    WRITE_DX16: tl.constexpr,
    DROP_DX16: tl.constexpr,  # dx16 through the mask of a branch dropped before its add
    DROP_DY: tl.constexpr,  # dy through the mask of the dropped output
    LOOP: tl.constexpr,  # fewer programs than row blocks: each takes blocks pid, pid + programs, …
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_d = o_d < D
    b_w = tl.load(p_w + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    if LOOP:
        b_dw = tl.zeros((BLOCK_D,), dtype=tl.float32)  # [BLOCK_D] Σ dy·x̂ of its rows
        b_db = tl.zeros((BLOCK_D,), dtype=tl.float32)  # Σ dy
        b_ds = tl.zeros((BLOCK_D,), dtype=tl.float32)  # Σ dx16 as stored (Σ dy without it)
        for r0 in range(pid * BLOCK_R, n_rows, tl.num_programs(0) * BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
            b_dw_r, b_db_r, b_ds_r = _ln_bwd_rows(
                p_x, b_w, p_dy, p_dres, p_dx, p_dx16, o_r, o_d, m_d, n_rows, stride_x,
                stride_dy, stride_dres, stride_dx, stride_dx16, eps, seed, threshold,
                drop_scale, n0, m0, cols, tag_dx16, tag_dy, D, HAS_DRES, WRITE_DX16, DROP_DX16,
                DROP_DY, BLOCK_D)  # fmt: skip
            b_dw += b_dw_r
            b_db += b_db_r
            b_ds += b_ds_r
    else:
        o_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        b_dw, b_db, b_ds = _ln_bwd_rows(
            p_x, b_w, p_dy, p_dres, p_dx, p_dx16, o_r, o_d, m_d, n_rows, stride_x, stride_dy,
            stride_dres, stride_dx, stride_dx16, eps, seed, threshold, drop_scale, n0, m0,
            cols, tag_dx16, tag_dy, D, HAS_DRES, WRITE_DX16, DROP_DX16, DROP_DY,
            BLOCK_D)  # fmt: skip
    # per-program partial sums (no atomics, a fixed order): the caller adds the rows of partials
    tl.store(p_dw_part + pid * D + o_d, b_dw, mask=m_d)
    tl.store(p_db_part + pid * D + o_d, b_db, mask=m_d)
    if WRITE_DX16:
        tl.store(p_ds_part + pid * D + o_d, b_ds, mask=m_d)


class LayerNormGrads(NamedTuple):
    dx: Tensor  # [R, D] fp32 gradient of the stream
    dw: Tensor  # [D] fp32 dγ
    db: Tensor  # [D] fp32 dβ
    dx16_sum: Tensor | None  # [D] fp32 column sums of `dx16` (when one was given)


def layer_norm_backward(
    x: Tensor,
    weight: Tensor,
    dy: Tensor,
    eps: float,
    dres: Tensor | None = None,
    dx16: Tensor | None = None,
    dropout: tuple[DropoutSpec, ChunkPos] | None = None,
    dx16_tag: int | None = None,
    dy_tag: int | None = None,
) -> LayerNormGrads:
    """Backward of `add_layer_norm`'s LayerNorm (and of its add: the stream's gradient is
    the gradient of delta and of the stream before it).

    x `(R, D)` the rows the LayerNorm saw, dy `(R, D)` its output's gradient, dres `(R, D)`
    the gradient the stream receives from later (residual) uses → dx `(R, D)`, dγ, dβ `(D,)`,
    fp32, deterministic (partials reduced in a fixed order). With `dx16` (`(R, D)`, 16-bit)
    dx is also written there rounded, and `dx16_sum` is its column sums: what the linear
    layer of the residual branch needs (its GEMM operand and its bias gradient), without a
    cast and a reduction over the rows afterwards. dropout = (spec, the chunk's position),
    training mode: with `dx16_tag`, the site of a branch the forward dropped before its add,
    `dx16` is dx through that mask (the branch's gradient) and `dx16_sum` its sums; with
    `dy_tag` the LayerNorm's output was dropped (SimR) and dy is the gradient of the dropped
    output, taken back through the mask here.
    """
    check_matrices("layer_norm_backward", x=x, dy=dy, dres=dres, dx16=dx16)
    n_rows, d = x.shape
    for name, t in (("dy", dy), ("dres", dres), ("dx16", dx16)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"layer_norm_backward: {name} must be {tuple(x.shape)} like x, "
                             f"got {tuple(t.shape)}")  # fmt: skip
    if weight.shape != (d,):
        raise ValueError(f"layer_norm_backward: weight must be ({d},), got "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if dx16_tag is not None and (dx16 is None or dropout is None):
        raise ValueError("layer_norm_backward: dx16_tag drops dx16; give dx16 and dropout")
    if dy_tag is not None and dropout is None:
        raise ValueError("layer_norm_backward: dy_tag needs dropout = (spec, position)")
    block_d = max(4, next_power_of_2(d))  # dropout draws columns four at a time
    blocks = cdiv(n_rows, LN_BWD_ROWS)
    programs = blocks
    if LN_BWD_PROGRAMS_PER_SM:
        programs = min(blocks, LN_BWD_PROGRAMS_PER_SM * multiprocessors(x.device))
    dx = torch.empty((n_rows, d), dtype=torch.float32, device=x.device)
    # every program writes its row of partials: no zero-fill unless there is no row at all
    alloc = torch.empty if programs else torch.zeros
    parts = alloc((3 if dx16 is not None else 2, max(programs, 1), d), dtype=torch.float32,
                  device=x.device)  # fmt: skip
    spec, pos = dropout or (DropoutSpec(0, 0, 1.0), ChunkPos(0, 0, 1))
    if n_rows:
        layer_norm_backward_kernel[(programs,)](
            x, weight, dy, dres, dx, dx16, parts[0], parts[1], parts[-1], n_rows, x.stride(0),
            dy.stride(0), dres.stride(0) if dres is not None else 0, dx.stride(0),
            dx16.stride(0) if dx16 is not None else 0, eps, spec.seed, spec.threshold,
            spec.scale, pos.n0, pos.m0, pos.cols, dx16_tag or 0, dy_tag or 0, D=d,
            HAS_DRES=dres is not None, WRITE_DX16=dx16 is not None,
            DROP_DX16=dx16_tag is not None, DROP_DY=dy_tag is not None, LOOP=programs < blocks,
            BLOCK_R=LN_BWD_ROWS, BLOCK_D=block_d, num_warps=LN_BWD_WARPS, num_stages=1,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    sums = parts.sum(dim=1)
    return LayerNormGrads(dx, sums[0], sums[1], sums[2] if dx16 is not None else None)


def add_layer_norm_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    dtype: torch.dtype,
    rows: int,
    delta: Tensor | None = None,
    delta2: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The PyTorch stages `add_layer_norm` replaces → (x + delta + delta2 + shift in fp32, LN
    of it in dtype)."""
    s = x.float().repeat(rows // x.shape[0], 1)
    for branch in (delta, delta2, shift):
        if branch is not None:
            s = s + branch.float()
    y = F.layer_norm(s, (x.shape[-1],), weight.float(), bias.float(), eps)
    return s, y.to(dtype)


def layer_norm_backward_torch(
    x: Tensor, weight: Tensor, dy: Tensor, eps: float, dres: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """What `layer_norm_backward` computes, written out in PyTorch (fp32, no dropout, no
    16-bit copy): x `(R, D)`, dy `(R, D)`, dres `(R, D)` → (dx `(R, D)`, dγ, dβ `(D,)`)."""
    x, dy = x.float(), dy.float()
    x_c = x - x.mean(-1, keepdim=True)  # two passes, as the kernel and torch's layer_norm
    rstd = torch.rsqrt((x_c * x_c).mean(-1, keepdim=True) + eps)
    x_hat = x_c * rstd
    g = dy * weight.float()  # gradient of x̂
    dx = rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    if dres is not None:
        dx = dx + dres.float()
    return dx, (dy * x_hat).sum(0), dy.sum(0)
