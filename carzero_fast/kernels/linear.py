"""Fused linear layer: `epilogue(A·Wᵀ + b)` for every GEMM of the pair stage.

A plain 16-bit main loop (operands straight from memory through shared memory to the tensor
cores) with the epilogue specialised at compile time:

- RELU after the bias (FFN and MLP-head hidden layers);
- HEAD: the MLP head's last hidden layer with the final `width → 1` layer in the epilogue:
  one program holds a whole row block, reduces `relu(acc + b)·w_last + b_last` to one logit
  per row, and writes it straight into the `(N, M)` score matrix.

LayerNorms and residual adds are not in here: on an H200 a LayerNorm prologue (A through
registers) and an fp32 residual epilogue each halved this kernel's rate (BENCHMARKS.md), so
they live in `add_layer_norm`, one memory-bound pass per residual add.

Accumulation is fp32; A and W are the activations' dtype (bf16/fp16/fp32). fp32 dots run in
IEEE fp32 unless the caller allows TF32 in PyTorch (`configs.tf32_allowed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from carzero_fast.backends.philox import ChunkPos, DropoutSpec

from .common import FP_FUSION, cdiv, check_matrices, mma, next_power_of_2, upcast_dots
from .configs import arch_of, dot_precision, linear_config, use_library_gemm, uses_tma
from .dropout import chunk_keep

# The dropout epilogue's tiles are half as wide: drawing Philox for every element, the full
# tile spilled (compile report). With four columns per draw it no longer does, but at 173
# registers on sm_90 (one program per SM, against two for the plain epilogue's 106) where the
# half tile takes 74: kept until a GPU times both.
DROPOUT_BLOCK_N = 64


@triton.jit
def _tile(pid, n_rows, n_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          GROUP_M: tl.constexpr):  # fmt: skip
    """Program id → (row block, column block) in grouped order: GROUP_M row blocks share
    each W column tile while it is in L2."""
    n_pid_m = tl.cdiv(n_rows, BLOCK_M)
    n_pid_n = tl.cdiv(n_out, BLOCK_N)
    group = pid // (GROUP_M * n_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * n_pid_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _epilogue(b_acc, o_m, col0, n_rows, n_out, p_bias, p_out, p_head_w, p_head_b, stride_out,
              logit_cols, seed, threshold, drop_scale, n0, m0, drop_tag, RELU: tl.constexpr,
              HEAD: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """bias, ReLU, dropout, then either the tile (columns col0 …) or (HEAD) one logit per row,
    stored."""
    o_n = col0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_m = o_m < n_rows  # [BLOCK_M]
    m_n = o_n < n_out  # [BLOCK_N]
    b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if RELU:  # not tl.maximum: that drops a NaN (maxnum), where torch.relu keeps it
        b_acc = tl.where(b_acc < 0.0, 0.0, b_acc)
    if DROPOUT:  # row r is pair (n0 + r // logit_cols, m0 + r % logit_cols) of the direction
        b_keep = chunk_keep(seed, threshold, o_m, col0, n0, m0, logit_cols, drop_tag,
                            BLOCK_N)  # fmt: skip
        b_acc = tl.where(b_keep, b_acc * drop_scale, 0.0)
    if HEAD:
        b_hw = tl.load(p_head_w + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        # the hidden row is rounded to the activations' dtype first, as the unfused head's is
        b_h = b_acc.to(p_head_w.dtype.element_ty).to(tl.float32)
        b_hb = tl.load(p_head_b).to(tl.float32)
        b_logit = tl.sum(b_h * b_hw[None, :], axis=1) + b_hb  # [BLOCK_M]
        o_pair = (o_m // logit_cols) * stride_out + (o_m % logit_cols)
        tl.store(p_out + o_pair, b_logit.to(p_out.dtype.element_ty), mask=m_m)
    else:
        tl.store(p_out + o_m[:, None] * stride_out + o_n[None, :],
                 b_acc.to(p_out.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])  # fmt: skip


@triton.jit
def linear_kernel(
    p_a,  # [R, K]
    p_w,  # [N_OUT, K] (torch Linear layout)
    p_bias,  # [N_OUT]
    p_out,  # [R, N_OUT]; HEAD: the (N, M) logits
    p_head_w,  # [N_OUT], HEAD: the final layer's weight row
    p_head_b,  # [1], HEAD: the final layer's bias (a pointer: no host read of it)
    n_rows,
    n_out,
    K,
    stride_a,
    stride_w,
    stride_out,
    logit_cols,  # HEAD/DROPOUT: row r is pair (r // logit_cols, r % logit_cols) of the chunk
    seed,  # DROPOUT: kernels/dropout.py's counters, with the chunk's first item and query
    threshold,
    drop_scale,
    n0,
    m0,
    drop_tag,
    RELU: tl.constexpr,
    HEAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), n_rows, n_out, BLOCK_M, BLOCK_N, GROUP_M)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_m = o_m < n_rows
    m_n = o_n < n_out

    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        m_k = o_k < K
        b_a = tl.load(
            p_a + o_m[:, None] * stride_a + o_k[None, :],
            mask=m_m[:, None] & m_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        b_w = tl.load(
            p_w + o_n[None, :] * stride_w + o_k[:, None],
            mask=m_n[None, :] & m_k[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        b_acc = mma(b_a, b_w, b_acc, PRECISION, UPCAST)
    _epilogue(b_acc, o_m, pid_n * BLOCK_N, n_rows, n_out, p_bias, p_out, p_head_w, p_head_b,
              stride_out, logit_cols, seed, threshold, drop_scale, n0, m0, drop_tag, RELU, HEAD,
              DROPOUT, BLOCK_N)  # fmt: skip


@triton.jit
def linear_tma_kernel(
    d_a,  # descriptor of A [R, K], blocks [BLOCK_M, BLOCK_K]
    d_w,  # descriptor of W [N_OUT, K], blocks [BLOCK_N, BLOCK_K]
    p_bias,
    p_out,
    p_head_w,
    p_head_b,
    n_rows,
    n_out,
    K,
    stride_out,
    logit_cols,
    seed,
    threshold,
    drop_scale,
    n0,
    m0,
    drop_tag,
    RELU: tl.constexpr,
    HEAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Hopper: the copy engine (TMA) moves A and W tiles into shared memory, where wgmma reads
    # them: no per-element addresses in registers, out-of-bounds rows filled with zeros.
    pid_m, pid_n = _tile(tl.program_id(0), n_rows, n_out, BLOCK_M, BLOCK_N, GROUP_M)
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        b_a = d_a.load([pid_m * BLOCK_M, k0])  # [BLOCK_M, BLOCK_K]
        b_w = d_w.load([pid_n * BLOCK_N, k0])  # [BLOCK_N, BLOCK_K]
        b_acc = mma(b_a, b_w.T, b_acc, PRECISION, UPCAST)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    _epilogue(b_acc, o_m, pid_n * BLOCK_N, n_rows, n_out, p_bias, p_out, p_head_w, p_head_b,
              stride_out, logit_cols, seed, threshold, drop_scale, n0, m0, drop_tag, RELU, HEAD,
              DROPOUT, BLOCK_N)  # fmt: skip


def _tma_ok(*tensors: Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides (and unit inner stride)."""
    return all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in tensors)  # fmt: skip


def _descriptor(t: Tensor, block: list[int], cache: dict | None) -> TensorDescriptor:
    """A TMA descriptor of `t` in `block` tiles; with `cache` (a dict the caller keeps while
    its buffers live), built once per buffer instead of once per launch."""
    if cache is None:
        return TensorDescriptor.from_tensor(t, block)
    key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, tuple(block))
    if key not in cache:
        cache[key] = TensorDescriptor.from_tensor(t, block)
    return cache[key]


def use_tma(a: Tensor, w: Tensor) -> bool:
    """The TMA kernel for 16-bit operands on Hopper-table GPUs (and under the interpreter,
    which runs both kernels), the pointer kernel elsewhere (Ampere's table, fp32)."""
    if a.dtype not in (torch.bfloat16, torch.float16) or not uses_tma(arch_of(a.device)):
        return False
    return _tma_ok(a, w)


def linear(
    a: Tensor,
    w: Tensor,
    bias: Tensor,
    *,
    out: Tensor | None = None,
    relu: bool = False,
    head: tuple[Tensor, Tensor] | None = None,
    logit_cols: int = 1,
    tma: bool | None = None,
    descriptors: dict | None = None,
    dropout: tuple[DropoutSpec, ChunkPos, int] | None = None,
) -> Tensor:
    """Fused `epilogue(a·wᵀ + bias)`.

    a `(R, K)`, w `(N_OUT, K)`, bias `(N_OUT,)`, all one dtype. head = (w_last `(N_OUT,)`,
    b_last `(1,)`) reduces each row to a logit written at `out[r // logit_cols, r %
    logit_cols]` (out is then the score block, row stride `out.stride(0)`, N_OUT ≤ 256).
    Returns `out` `(R, N_OUT)` (or the score block). A plain epilogue (no head, no dropout)
    runs PyTorch's GEMM instead where `configs.gemm_route` says so (16-bit on CUDA by
    default). tma: force (True) or forbid (False) the TMA kernel; None picks it where it
    applies (`use_tma`). descriptors: a dict the caller keeps for the life of its buffers
    (e.g. one call of the backend), so that the TMA descriptors of reused buffers are built
    once, not at every launch.
    """
    check_matrices("linear", a=a, w=w, out=out)
    n_rows, k = a.shape
    n_out = w.shape[0]
    if w.shape[1] != k or bias.shape != (n_out,):
        raise ValueError(f"linear: a {tuple(a.shape)}, w {tuple(w.shape)} and bias "
                         f"{tuple(bias.shape)} do not fit a·wᵀ + bias")  # fmt: skip
    if a.dtype != w.dtype:
        raise TypeError(f"linear: a is {a.dtype} but w is {w.dtype}")
    want = (n_rows // logit_cols, logit_cols) if head is not None else (n_rows, n_out)
    if head is not None and n_rows % logit_cols:
        raise ValueError(f"linear: {n_rows} rows are not whole rows of {logit_cols} logits")
    if out is None:
        out = a.new_empty(want)
    if out.shape != want:
        raise ValueError(f"linear: out must be {want}, got {tuple(out.shape)}")
    if head is None and dropout is None and use_library_gemm(a):
        # a plain epilogue: PyTorch's GEMM (cuBLASLt fuses bias and ReLU) where it is faster
        if relu:
            return torch._addmm_activation(bias, a, w.t(), out=out)
        return torch.addmm(bias, a, w.t(), out=out)
    cfg = linear_config(a.device, a.dtype, head=head is not None)
    block_n = cfg.block_n
    if dropout is not None:
        if head is not None:
            raise ValueError("linear: dropout is not fused with the head's logit (run the "
                             "last hidden layer and the logit apart)")
        block_n = min(block_n, DROPOUT_BLOCK_N)
    if head is not None:
        block_n = max(16, next_power_of_2(n_out))  # one program holds the whole row
        if block_n > cfg.block_n:
            raise ValueError(f"linear: a fused head needs N_OUT ≤ {cfg.block_n}, got {n_out}")
    grid = (cdiv(n_rows, cfg.block_m) * cdiv(n_out, block_n),)
    head_w, head_b = head if head is not None else (None, None)
    no_drop = (DropoutSpec(0, 0, 1.0), ChunkPos(0, 0, logit_cols), 0)
    spec, pos, drop_tag = dropout if dropout is not None else no_drop
    drop_args = (pos.cols, spec.seed, spec.threshold, spec.scale, pos.n0, pos.m0, drop_tag)
    flags = dict(RELU=relu, HEAD=head is not None, DROPOUT=dropout is not None,
                 PRECISION=dot_precision(a.dtype),
                 UPCAST=upcast_dots(a.dtype), BLOCK_M=cfg.block_m, BLOCK_N=block_n,
                 BLOCK_K=cfg.block_k, GROUP_M=8, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)  # fmt: skip
    if tma is None:
        tma = use_tma(a, w)
    if tma:
        if not _tma_ok(a, w):
            raise ValueError("linear: TMA needs 16-byte aligned rows of a and w")
        d_a = _descriptor(a, [cfg.block_m, cfg.block_k], descriptors)
        d_w = _descriptor(w, [block_n, cfg.block_k], descriptors)
        linear_tma_kernel[grid](d_a, d_w, bias, out, head_w, head_b, n_rows, n_out, k,
                                out.stride(0), *drop_args, **flags)  # fmt: skip
    else:
        linear_kernel[grid](a, w, bias, out, head_w, head_b, n_rows, n_out, k, a.stride(0),
                            w.stride(0), out.stride(0), *drop_args, **flags)  # fmt: skip
    return out


def linear_torch(
    a: Tensor,
    w: Tensor,
    bias: Tensor,
    *,
    relu: bool = False,
    head: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The PyTorch stages `linear` replaces (same arguments; HEAD returns the logits `(R,)`)."""
    y = F.linear(a, w, bias)
    if relu:
        y = torch.relu(y)
    if head is not None:
        return F.linear(y, head[0][None], head[1]).squeeze(-1)
    return y
