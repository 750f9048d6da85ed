"""The `triton` backend: the streaming executor's pair stages on fused Triton kernels.

Same split of work as `chunked` (DESIGN.md §3), in the "kv" form (on a GPU the per-item K/V
projections are cheap next to the pairs at the batch sizes this backend is for):

- per query (plain PyTorch, O(M·D²)): `x0 = LN0(q)` and layer 1's query projection;
- per block of memory items: `LN0(memory)` (`add_layer_norm` without an add), then the K and
  V of every layer in one GEMM into a `(items·P, L·2D)` buffer;
- per chunk of pairs (those items × a block of queries, item-major rows), for each layer:
  Q projection → `attention` → output projection → `add_layer_norm` (residual add, LN3) →
  linear1 (ReLU) → linear2 → `add_layer_norm` (residual add, the next LN2 or decoder_norm);
  then the MLP head, whose last hidden layer reduces each row to its logit and writes it
  straight into the `(N, M)` scores. Without dropout the stream after LN3's add is not
  stored: the second pass adds both branches to the layer's input again (the same fp32 sums),
  and the last layer's stream, which nothing reads, is not stored either: 76 instead of 92
  bytes of add + LayerNorm traffic per element of a pair with an fp32 stream. Where the
  plain GEMMs run on PyTorch (16-bit on CUDA) and the stream has their dtype, layers 2… add
  out_proj's and linear2's products to the stream in place inside those GEMMs (cuBLAS reads
  it as C) without their biases, and each pass reads the stream plus the biases left out so
  far (`residual_offsets`): 8 bytes of pass traffic per element and layer instead of 14–16
  with a 16-bit stream (`CARZERO_FAST_TRITON_RESIDUAL=pass` keeps the adds in the passes).
  `CARZERO_FAST_TRITON_ATTENTION=library` runs the attention on PyTorch's SDPA instead.

The residual stream of the backend's calls without gradients has the inputs' dtype by
default (16-bit inputs: a third less traffic in every add + LayerNorm pass, and the residual
adds inside the GEMMs above; its error is a plain 16-bit PyTorch forward's, chunked's);
`CARZERO_FAST_TRITON_STREAM=fp32`, or `triton_forward(stream_dtype=torch.float32)`, keeps it
fp32 (16-bit inputs then round only GEMM operands, as autocast does: ~20% lower error;
benchmarks.gpu_check times both). Training always keeps it fp32. Chunk buffers are
allocated once per call and reused, so memory is `rows·(D + max(2·D, B) + A)` elements
(LayerNorm outputs; q and the attention's output, whose space the head's odd layers reuse,
B their widest; the FFN and the head's even layers, A the widest) + `rows·D` in the
stream's dtype + `items·P·(L·2D + D)` elements (LN0(memory), K/V) + the scores, never O(N·M·D).
Nothing reads back to the host inside the loop. The plan (`fit_plan`) also keeps each buffer
under `INDEX_LIMIT` elements, whatever the budget: the kernels index with int32.

The layer loop (`pair_layers`) is shared with training (`fused_train.py`), which runs it with
one set of buffers per layer and keeps them for the chunk's backward. In training mode every
dropout site draws its mask from counters (kernels/dropout.py: seed, pair, layer, site), so
a recomputation, or another chunk plan, sees the same masks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights
from .philox import (
    SITE_ATTENTION,
    SITE_ATTN_BRANCH,
    SITE_FFN_BRANCH,
    SITE_FFN_HIDDEN,
    SITE_HEAD,
    SITE_SIMR,
    ChunkPos,
    DropoutSpec,
    tag,
)
from .plan import check_budget, fit_plan, kv_width, pieces, widest_row

Drop = tuple[DropoutSpec, ChunkPos]  # a chunk's dropout: the direction's spec, its position

# Default memory for one chunk's buffers (plus one item block's K/V). Large chunks keep each
# GEMM large (~45k rows at CARZero dims) and the launches few (~38 per chunk): at 256 MiB an
# H200 waited on kernel launches (BENCHMARKS.md).
DEFAULT_FUSED_BUDGET_BYTES = 512 * 2**20
STREAMS = ("input", "fp32")


def inference_stream_dtype(dtype: torch.dtype) -> torch.dtype:
    """The residual stream's dtype for a forward without gradients, from
    `CARZERO_FAST_TRITON_STREAM`: "input" (the inputs' dtype, the default) or "fp32". On an
    H200 at N = M = 1024, bf16, d8928c3 (before the residual adds moved into the GEMMs): 71.7
    against 76.5 ms a call, relative error 1.34e-2 against 1.10e-2 (chunked's own bf16:
    1.36e-2; BENCHMARKS.md). On CPU at CARZero dims, with the adds in the GEMMs: 1.28–1.81e-2
    against fp32's 1.06–1.54e-2 and chunked's 1.39–1.82e-2 (three seeds)."""
    route = os.environ.get("CARZERO_FAST_TRITON_STREAM", "input")
    if route not in STREAMS:
        raise ValueError(f"CARZERO_FAST_TRITON_STREAM={route!r}; choose one of "
                         f"{', '.join(STREAMS)}")  # fmt: skip
    return dtype if route == "input" else torch.float32


# The oldest Triton whose kernels build: `triton.tools.tensor_descriptor` (the linear kernels'
# TMA descriptors) arrived in 3.4. The compile report (sm_90, sm_80) is spill-free from 3.6 on;
# 3.4 spills in 5 sm_90 builds (fp32) and 9 sm_80 ones, 3.5 in one sm_80 fp32 build (README).
# setup.py does not pin it: PyTorch's CUDA wheels pin their own Triton.
MIN_TRITON = (3, 4)
MIN_ARCH = 80  # bf16 tensor cores, and the 99 KB of shared memory Ampere's table fits
# what the kernels compute in (float64 has no tensor-core path: "auto" runs it on chunked)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _runtime_unavailable() -> str | None:
    """The process-wide part of `kernels_unavailable` (checked once)."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed (`pip install triton`, Linux only)"
    found = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
    if found < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"Triton {triton.__version__} is installed; its kernels need Triton >= {need}"
    try:
        from .. import kernels  # noqa: F401
    except ImportError as e:
        return f"carzero_fast.kernels failed to import: {e}"
    return None


def kernels_unavailable(device: torch.device | None = None) -> str | None:
    """Why the `triton` backend cannot run here, or on `device`, or None when it can: Triton
    missing or too old, the kernels failing to import; on a GPU, a ROCm build of PyTorch
    (the kernels and their tables are written and compile-checked for NVIDIA GPUs only) or a
    GPU older than sm_80."""
    reason = _runtime_unavailable()
    if reason is not None or device is None or device.type != "cuda":
        return reason
    if torch.version.hip is not None:
        return ("this PyTorch is a ROCm build; the kernels are written and compile-checked "
                "for NVIDIA GPUs (sm_80 and later) only")  # fmt: skip
    from ..kernels.configs import arch_of

    arch = arch_of(device)
    if arch < MIN_ARCH:
        return (f"the GPU is sm_{arch}; the kernels need sm_{MIN_ARCH} or later (bf16 tensor "
                "cores, 99 KB of shared memory a block)")  # fmt: skip
    return None


def check_device(t: Tensor) -> None:
    """The `triton` backend can run on `t`: its kernels import, `t` is on CUDA (or the
    kernels run under Triton's CPU interpreter) and has one of `KERNEL_DTYPES`."""
    reason = kernels_unavailable(t.device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' is unavailable: {reason}; use 'chunked' "
                           "(or 'auto', which falls back to it)")  # fmt: skip
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend 'triton' runs float32, bfloat16 and float16 inputs, got "
                        f"{t.dtype}; use 'chunked' (or 'auto', which picks it for "
                        f"{t.dtype})")  # fmt: skip
    from ..kernels.common import interpreting

    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors, got {t.device.type} ones; use 'chunked' "
            "(or 'auto') there, or set TRITON_INTERPRET=1 to run the kernels through "
            "Triton's CPU interpreter"
        )


def kernel_mask(mask: Tensor | None) -> Tensor | None:
    """A bool mask `(N, P)` as the kernels read it: int8 (1 = ignore) with contiguous rows,
    whatever the caller's strides (e.g. a transposed `(P, N)` mask)."""
    if mask is None:
        return None
    return mask.to(torch.int8, memory_format=torch.contiguous_format)


def launch_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Make `t`'s GPU the current one while the kernels run: Triton launches on the current
    device and its stream, not on its arguments' (tensors on cuda:1 with cuda:0 current would
    run there, racing PyTorch's own ops on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def plan_fused(
    cfg: AlignerConfig, n: int, m: int, p: int, itemsize: int, budget: int,
    stream_itemsize: int = 4,
) -> tuple[int, int]:  # fmt: skip
    """(items per block, queries per chunk) for a memory budget in bytes (`itemsize`: the
    inputs', `stream_itemsize`: the residual stream's)."""
    widest_a, widest_b = pool_widths(cfg)
    per_pair = itemsize * (cfg.d_model + max(2 * cfg.d_model, widest_b) + widest_a)
    per_pair += stream_itemsize * cfg.d_model
    per_item = p * itemsize * (2 * cfg.n_layers + 1) * cfg.d_model
    return fit_plan(n, m, per_pair, per_item, budget, widest_row(cfg), kv_width(cfg, p))


def pool_widths(cfg: AlignerConfig) -> tuple[int, int]:
    """Widest rows of the two buffers the FFN and the MLP head alternate between: (the FFN
    and head layers 0, 2, …; head layers 1, 3, … or 0 when there are none)."""
    return max(cfg.d_ffn, *cfg.head_dims[0::2]), max(cfg.head_dims[1::2], default=0)


class CallPlan(NamedTuple):
    """Per-call state shared by every chunk: the query stage's results and the weights laid
    out for the kernels."""

    x0: Tensor  # [M, D] fp32 LN0(queries): each pair's initial residual stream
    q1: Tensor  # [M, D] layer 1's projected queries (shared by every item)
    kv_w: Tensor  # [L·2D, D] every layer's K and V projections, stacked
    kv_b: Tensor  # [L·2D]
    q_w: tuple[Tensor, ...]  # L × [D, D]
    q_b: tuple[Tensor, ...]  # L × [D]
    next_norm: tuple[tuple[Tensor, Tensor], ...]  # L × the LayerNorm after the FFN add
    head: tuple[tuple[Tensor, Tensor], ...]


def query_stage(w: AlignerWeights, cfg: AlignerConfig, queries: Tensor) -> tuple[Tensor, Tensor]:
    """queries `(M, D)` → (x0 fp32, q1 in the queries' dtype), differentiable.

    The residual stream stays fp32 in every dtype: 16-bit inputs then round only GEMM
    operands, as autocast would (half the error of a 16-bit stream, for D·4 bytes a row)."""
    d, eps, l0 = cfg.d_model, cfg.layer_norm_eps, w.layers[0]
    x0 = F.layer_norm(queries.float(), (d,), w.norm0_w.float(), w.norm0_b.float(), eps)
    y0 = F.layer_norm(x0, (d,), l0.norm2_w.float(), l0.norm2_b.float(), eps).to(queries.dtype)
    return x0, F.linear(y0, l0.in_proj_w[:d], l0.in_proj_b[:d])


def call_plan(w: AlignerWeights, cfg: AlignerConfig, x0: Tensor, q1: Tensor) -> CallPlan:
    d = cfg.d_model
    return CallPlan(
        x0=x0.detach(),
        q1=q1.detach().contiguous(),
        kv_w=torch.cat([lw.in_proj_w[d:] for lw in w.layers]).contiguous(),
        kv_b=torch.cat([lw.in_proj_b[d:] for lw in w.layers]).contiguous(),
        q_w=tuple(lw.in_proj_w[:d].contiguous() for lw in w.layers),
        q_b=tuple(lw.in_proj_b[:d].contiguous() for lw in w.layers),
        next_norm=tuple((lw.norm2_w, lw.norm2_b) for lw in w.layers[1:])
        + ((w.norm0_w, w.norm0_b),),
        head=tuple((hw.contiguous(), hb.contiguous()) for hw, hb in w.head),
    )


class LayerBuffers(NamedTuple):
    """Where one layer of a chunk writes, `r` pair rows each (item-major).

    Inference aliases every layer onto one set (a stream, an LN output, …); training gives
    each layer its own and keeps them for the backward.
    """

    q: Tensor  # [r, D] projected queries (layers after the first)
    o: Tensor  # [r, D] attention output
    lse: Tensor | None  # [r, H] fp32 softmax log-sum-exp (training)
    x_mid: Tensor | None  # [r, D] fp32 stream after the attention's residual add; None:
    #   not stored, the FFN's pass adds both branches onto the layer's input (no backward)
    y3: Tensor  # [r, D] LN3(x_mid)
    h: Tensor  # [r, F] relu(linear1(y3))
    x_out: Tensor | None  # [r, D] fp32 stream after the FFN's residual add (None: unread)
    y_next: Tensor  # [r, D] the next LayerNorm of x_out (the next LN2, or decoder_norm)
    branch: Tensor  # [r, D] out_proj's output before its add
    ffn_branch: Tensor  # [r, D] linear2's output before its add (may be `branch` itself
    #   when x_mid is stored)

    def rows(self, r: int) -> LayerBuffers:
        return LayerBuffers(*(t[:r] if t is not None else None for t in self))


def pair_layers(
    linear: Callable[..., Tensor],
    w: AlignerWeights,
    cfg: AlignerConfig,
    cp: CallPlan,
    kv: Tensor,
    mask: Tensor | None,
    n_items: int,
    queries: slice,
    bufs: list[LayerBuffers],
    drop: Drop | None = None,
    sdpa: bool = False,
    offsets: list[tuple[Tensor, Tensor] | None] | None = None,
) -> Tensor:
    """Every layer for `n_items` items (their K/V rows `kv` `(n_items·P, L·2D)`, int8 mask)
    × the queries `queries` → the decoder_norm'ed rows `(r, D)` the MLP head takes (SimR
    dropped when `drop` is given: training mode, the chunk's dropout and position).

    Buffers without `x_mid` (a forward without a backward, no dropout) store no stream after
    the attention's add; their FFN pass adds both branches to the layer's input instead, and
    `x_out` None skips the last stream nobody reads (kernels/layernorm.py). `sdpa`: the
    attention of layers without a log-sum-exp buffer or dropout on PyTorch's SDPA.
    `offsets` (`residual_offsets`; lean buffers only): layers after the first add their
    out_proj and linear2 products to layer 1's stream in place inside PyTorch's GEMM, without
    the biases, which the passes add back from there (`stream + offset`).
    """
    from ..kernels import add_layer_norm, attention
    from ..kernels.attention import attention_torch

    d, eps, n_heads = cfg.d_model, cfg.layer_norm_eps, cfg.n_heads
    mc = cp.x0[queries].shape[0]
    last = cfg.n_layers - 1
    if offsets is not None and (drop is not None or bufs[0].x_out is None):
        raise ValueError("pair_layers: residual adds in the GEMMs need layer 1's stream "
                         "stored and no dropout")  # fmt: skip
    stream = cp.x0[queries]  # the stream starts as x0, broadcast over the chunk's items
    for li, lw in enumerate(w.layers):
        a_drop = (*drop, tag(SITE_ATTENTION, li)) if drop else None
        h_drop = (*drop, tag(SITE_FFN_HIDDEN, li)) if drop else None
        simr = tag(SITE_SIMR, 0) if li == last else None
        b = bufs[li]
        k_l = kv[:, 2 * li * d : (2 * li + 1) * d]  # [n_items·P, D] strided views
        v_l = kv[:, (2 * li + 1) * d : (2 * li + 2) * d]
        if li == 0:  # layer 1's projected queries, shared by the items
            q, shared = cp.q1[queries], True
        else:  # the previous layer's y_next is this layer's LN2(x)
            q = linear(bufs[li - 1].y_next, cp.q_w[li], cp.q_b[li], out=b.q)
            shared = False
        o_linear = linear
        if sdpa and b.lse is None and drop is None:
            o = attention_torch(q, k_l, v_l, n_heads, n_items, mc, shared_queries=shared,
                                mask=mask)  # fmt: skip
            # a new tensor every chunk: a descriptor cached for the call would keep it alive
            o_linear = functools.partial(linear, descriptors=None)
        else:
            o = attention(q, k_l, v_l, n_heads, n_items, mc, shared_queries=shared, mask=mask,
                          out=b.o, lse=b.lse, dropout=a_drop)  # fmt: skip
        if offsets is not None and li > 0:  # stream = x − offset before, in place
            stream.addmm_(o, lw.out_proj_w.t())
            mid, out = offsets[li]
            add_layer_norm(stream, lw.norm3_w, lw.norm3_b, eps, b.y3, shift=mid)
            linear(b.y3, lw.linear1_w, lw.linear1_b, relu=True, out=b.h)
            stream.addmm_(b.h, lw.linear2_w.t())
            add_layer_norm(stream, *cp.next_norm[li], eps, b.y_next, shift=out)
            continue
        o_linear(o, lw.out_proj_w, lw.out_proj_b, out=b.branch)
        add_layer_norm(stream, lw.norm3_w, lw.norm3_b, eps, b.y3, delta=b.branch, x_out=b.x_mid,
                       dropout=drop, delta_tag=tag(SITE_ATTN_BRANCH, li))  # fmt: skip
        linear(b.y3, lw.linear1_w, lw.linear1_b, relu=True, out=b.h, dropout=h_drop)
        linear(b.h, lw.linear2_w, lw.linear2_b, out=b.ffn_branch)
        if b.x_mid is None:  # x_mid = stream + branch again, then + ffn_branch
            add_layer_norm(stream, *cp.next_norm[li], eps, b.y_next, delta=b.branch,
                           delta2=b.ffn_branch, x_out=b.x_out)  # fmt: skip
        else:
            add_layer_norm(b.x_mid, *cp.next_norm[li], eps, b.y_next, delta=b.ffn_branch,
                           x_out=b.x_out, dropout=drop, delta_tag=tag(SITE_FFN_BRANCH, li),
                           y_tag=simr)  # fmt: skip
        stream = b.x_out
    return bufs[-1].y_next


def residual_offsets(w: AlignerWeights) -> list[tuple[Tensor, Tensor] | None]:
    """What a stream whose GEMMs add their products without biases lacks, per layer: None for
    layer 1 (its passes store the true stream), then (after the attention's add, after the
    FFN's), fp32 `(D,)` each: every out_proj and linear2 bias left out so far."""
    offsets: list[tuple[Tensor, Tensor] | None] = [None]
    out = None
    for lw in w.layers[1:]:
        mid = lw.out_proj_b.float() if out is None else out + lw.out_proj_b.float()
        out = mid + lw.linear2_b.float()
        offsets.append((mid, out))
    return offsets


def item_stage(
    linear: Callable[..., Tensor],
    w: AlignerWeights,
    cfg: AlignerConfig,
    cp: CallPlan,
    mem: Tensor,
    y_mem: Tensor,
    kv: Tensor,
) -> None:
    """memory rows `(items·P, D)` → `y_mem` = LN0(memory) and `kv`, every layer's K and V."""
    from ..kernels import add_layer_norm

    add_layer_norm(mem, w.norm0_w, w.norm0_b, cfg.layer_norm_eps, y_mem)
    linear(y_mem, cp.kv_w, cp.kv_b, out=kv)


@torch.compiler.disable  # host-side launchers: run eagerly under torch.compile
def triton_forward(
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    chunk_budget_bytes: int | None = None,
    dropout: DropoutSpec | None = None,
    stream_dtype: torch.dtype | None = None,
    item_offset: int = 0,
    sdpa: bool | None = None,
) -> Tensor:
    """memory `(N, P, D)`, queries `(M, D)`, mask `(N, P)` bool → logits `(N, M)`, streamed
    through the fused kernels (no autograd; dropout with its spec, training mode).

    stream_dtype: the residual stream's dtype, fp32 or the inputs' dtype;
        None: `inference_stream_dtype` (training passes fp32: its backward recomputes so).
    item_offset: index of memory's first item in its direction, when it is a slice of it
    (dropout masks are keyed by the pair's place in the direction).
    sdpa: the attention on PyTorch's SDPA instead of the kernel (without dropout); None:
        `CARZERO_FAST_TRITON_ATTENTION` (`kernels.configs.library_attention`). Training
        passes False: its backward recomputes with the kernel.
    """
    from ..kernels import library_attention, residual_in_gemm
    from ..kernels import linear as linear_kernel

    # one TMA descriptor per (buffer, block) for the whole call: the buffers are reused
    linear = functools.partial(linear_kernel, descriptors={})

    check_device(memory)
    w = w.contiguous()  # the kernels read vectors with unit stride (no-op when they are)
    if stream_dtype is None:
        stream_dtype = inference_stream_dtype(memory.dtype)
    if sdpa is None:
        sdpa = library_attention()
    if stream_dtype not in (torch.float32, memory.dtype):
        raise TypeError(f"stream_dtype must be torch.float32 or the inputs' {memory.dtype}, "
                        f"got {stream_dtype}")  # fmt: skip
    n, p, d = memory.shape
    m = queries.shape[0]
    out = memory.new_zeros((n, m))
    if n == 0 or m == 0:
        return out
    budget = check_budget(chunk_budget_bytes, DEFAULT_FUSED_BUDGET_BYTES)
    items, block_q = plan_fused(cfg, n, m, p, memory.element_size(), budget,
                                stream_dtype.itemsize)  # fmt: skip
    cp = call_plan(w, cfg, *query_stage(w, cfg, queries))
    mask8 = kernel_mask(memory_mask)

    rows = items * block_q
    kw = dict(dtype=memory.dtype, device=memory.device)
    x = torch.empty((rows, d), dtype=stream_dtype, device=memory.device)  # residual stream
    y = torch.empty((rows, d), **kw)  # LayerNorm outputs
    widest_a, widest_b = pool_widths(cfg)
    pool_a = torch.empty(rows * widest_a, **kw)  # FFN, head layers 0, 2, …
    # q and the attention's output (or the branches), dead once the head runs, whose space
    # its layers 1, 3, … reuse
    pool_b = torch.empty(rows * max(2 * d, widest_b), **kw)
    q, o = _buffer(pool_b, rows, d), pool_b[rows * d : 2 * rows * d].view(rows, d)
    y_mem = torch.empty((items * p, d), **kw)
    kv = torch.empty((items * p, 2 * cfg.n_layers * d), **kw)
    # every layer aliases one set of buffers: nothing is kept for a backward. Without dropout
    # the stream after the attention's add is not stored (the FFN's pass adds both branches:
    # out_proj's output in q, linear2's in o, each dead by then), nor the last layer's stream
    lean = dropout is None
    shared = LayerBuffers(q, o, None, None if lean else x, y, _buffer(pool_a, rows, cfg.d_ffn),
                          x, y, branch=q, ffn_branch=o if lean else q)  # fmt: skip
    last_layer = shared._replace(x_out=None) if lean else shared
    # layers 2… add their branches inside PyTorch's GEMMs where the stream has their dtype
    in_gemm = lean and cfg.n_layers > 1 and residual_in_gemm(y, stream_dtype)
    offsets = residual_offsets(w) if in_gemm else None

    with launch_device(memory):
        for n0, n1 in pieces(n, items):  # near-equal blocks: no small tail
            ni = n1 - n0
            mem = memory[n0 : n0 + ni].reshape(ni * p, d)
            if mem.stride(-1) != 1:
                mem = mem.contiguous()
            item_stage(linear, w, cfg, cp, mem, y_mem[: ni * p], kv[: ni * p])
            mask_i = mask8[n0 : n0 + ni] if mask8 is not None else None
            for m0, m1 in pieces(m, block_q):
                mc = m1 - m0
                bufs = [shared.rows(ni * mc)] * (cfg.n_layers - 1) + [last_layer.rows(ni * mc)]
                pos = ChunkPos(item_offset + n0, m0, mc)
                drop = (dropout, pos) if dropout is not None else None
                yc = pair_layers(linear, w, cfg, cp, kv[: ni * p], mask_i, ni,
                                 slice(m0, m0 + mc), bufs, drop, sdpa, offsets)  # fmt: skip
                scores = out[n0 : n0 + ni, m0 : m0 + mc]
                _head(linear, cp.head, yc, pool_a, pool_b, scores, drop)
    return out


def _buffer(pool: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous `(rows, cols)` view at the start of a flat pool."""
    return pool[: rows * cols].view(rows, cols)


def _head(
    linear: Callable[..., Tensor],
    head: tuple[tuple[Tensor, Tensor], ...],
    y: Tensor,
    pool_a: Tensor,
    pool_b: Tensor,
    scores: Tensor,
    drop: Drop | None = None,
) -> None:
    """The MLP head over a chunk's decoder_norm'ed rows `(r, D)` → `scores` `(ni, mc)` (a view
    of the output), with the last hidden layer and the logit fused when narrow enough (and
    no dropout: its Philox in that epilogue would spill)."""
    from ..kernels.configs import HEAD_MAX_WIDTH

    r, last = y.shape[0], len(head) - 2  # head[last] is the last hidden layer
    a = y
    for i in range(last):
        out = _buffer(pool_a if i % 2 == 0 else pool_b, r, head[i][0].shape[0])
        a = linear(a, *head[i], relu=True, out=out,
                   dropout=(*drop, tag(SITE_HEAD, i)) if drop else None)  # fmt: skip
    (hw, hb), (lw, lb) = head[last], head[last + 1]
    if hw.shape[0] <= HEAD_MAX_WIDTH and drop is None:
        linear(a, hw, hb, relu=True, head=(lw[0], lb), out=scores, logit_cols=scores.shape[1])
    else:
        out = _buffer(pool_a if last % 2 == 0 else pool_b, r, hw.shape[0])
        a = linear(a, hw, hb, relu=True, out=out,
                   dropout=(*drop, tag(SITE_HEAD, last)) if drop else None)  # fmt: skip
        scores.copy_(F.linear(a, lw, lb).view(scores.shape))


def draw_dropout(cfg: AlignerConfig, training: bool) -> DropoutSpec | None:
    """A direction's dropout in training mode: the seed from torch's default CPU generator
    (reproducible under `torch.manual_seed`, no device sync)."""
    if not training or cfg.dropout <= 0.0:
        return None
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return DropoutSpec.make(cfg.dropout, seed)


@torch.compiler.disable  # host-side launchers: run eagerly under torch.compile
def triton_both_directions(
    w: AlignerWeights,
    cfg: AlignerConfig,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None,
    txt_mask: Tensor | None,
    chunk_budget_bytes: int | None = None,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """Both directions, globals from row 0 → (i2t `(N, M)`, t2i `(M, N)`)."""
    i2t = triton_forward(w, cfg, img_tokens, txt_tokens[:, 0], img_mask, chunk_budget_bytes,
                         draw_dropout(cfg, training))  # fmt: skip
    t2i = triton_forward(w, cfg, txt_tokens, img_tokens[:, 0], txt_mask, chunk_budget_bytes,
                         draw_dropout(cfg, training))  # fmt: skip
    return i2t, t2i
