"""The `chunked` backend: all N×M pairs streamed through plain PyTorch ops in bounded chunks.

Work is split by what it depends on (DESIGN.md §3):

- per query (shared by all N items): `x0 = LN0(q)` and layer 1's query projection
  `q1 = LN2(x0)·Wq + bq`, computed once;
- per memory item: `LN0(memory)` and every layer's K and V, computed once per item block;
- per pair: everything else, for one chunk `(items n0:n1) × (queries m0:m1)` at a time.

Only a chunk of pairs is alive at any moment, so memory is O(chunk + N·M) (the logits), never
O(N·M·D). Training goes through `_ChunkedAlign`, an `autograd.Function` that saves the inputs
only and recomputes each chunk in backward; dropout masks come from a generator seeded per
chunk, so recomputation sees the same masks as the forward.

Why not fold Wq into K and Wo into V per item (turning each layer into two GEMMs per item)?
Each fold saves ~0.27 MFLOP per pair and layer but costs 2·P·D² (232 MFLOP) per item and
layer, so it only pays beyond ~860 queries per memory item at CARZero dims (D=768, P=197);
the unfolded form below is cheaper at every batch CARZero trains or scores with.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights, LayerWeights

DEFAULT_CHUNK_BUDGET_BYTES = 32 * 2**20


class ChunkPlan(NamedTuple):
    items: int  # memory items per chunk
    queries: int  # queries per chunk


def plan_chunks(
    cfg: AlignerConfig, n: int, m: int, p: int, itemsize: int, budget: int, training: bool
) -> ChunkPlan:
    """Chunk shape from a memory budget (bytes), never from N·M.

    A pair alive in a chunk holds a few D-wide rows, one FFN row, the head's widest row and
    its attention scores; in training, autograd also keeps those of every layer for the
    chunk's backward. An item holds its normalised tokens and every layer's K and V.
    """
    d, f, h = cfg.d_model, cfg.d_ffn, cfg.n_heads
    per_layer = 6 * d + f + 2 * h * p
    widest = max(cfg.head_dims)
    per_pair = (cfg.n_layers * per_layer + 2 * sum(cfg.head_dims) if training else
                4 * d + f + widest + 2 * h * p) * itemsize  # fmt: skip
    per_item = (2 * cfg.n_layers + 2) * p * d * itemsize
    queries = max(1, min(m, budget // (2 * per_pair)))
    items = max(1, min(n, budget // (queries * per_pair + per_item)))
    return ChunkPlan(items, queries)


class Dropout:
    """Dropout whose masks are a pure function of (seed, chunk): identical on recomputation."""

    def __init__(self, p: float, seed: int | None, chunk: tuple[int, int], device: torch.device):
        self.p = p if seed is not None else 0.0
        self.gen: torch.Generator | None = None
        if self.p > 0.0:
            self.gen = torch.Generator(device=device)
            # Distinct, well-mixed stream per chunk (SplitMix-style odd multipliers).
            mix = (seed ^ (chunk[0] * 0x9E3779B97F4A7C15) ^ (chunk[1] * 0xBF58476D1CE4E5B9))
            self.gen.manual_seed(mix % (2**63 - 1))

    @property
    def active(self) -> bool:
        return self.p > 0.0

    def __call__(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        keep = torch.rand(x.shape, generator=self.gen, device=x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


# ---------------------------------------------------------------------------------------------
# Stages (plain PyTorch; each fused kernel replaces one of these and is tested against it)
# ---------------------------------------------------------------------------------------------


def query_stage(w: AlignerWeights, cfg: AlignerConfig, queries: Tensor) -> tuple[Tensor, Tensor]:
    """queries `(M, D)` → (`x0 = LN0(q)`, layer-1 query projection `q1`), both `(M, D)`."""
    d, eps = cfg.d_model, cfg.layer_norm_eps
    x0 = F.layer_norm(queries, (d,), w.norm0_w, w.norm0_b, eps)
    lw = w.layers[0]
    y = F.layer_norm(x0, (d,), lw.norm2_w, lw.norm2_b, eps)
    return x0, F.linear(y, lw.in_proj_w[:d], lw.in_proj_b[:d])


def kv_stage(w: AlignerWeights, cfg: AlignerConfig, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
    """memory `(n, P, D)` → per layer (K, V), each `(n, P, D)`, from `LN0(memory)`."""
    d = cfg.d_model
    normed = F.layer_norm(memory, (d,), w.norm0_w, w.norm0_b, cfg.layer_norm_eps)
    kvs = []
    for lw in w.layers:
        kv = F.linear(normed, lw.in_proj_w[d:], lw.in_proj_b[d:])  # [n, P, 2D]
        kvs.append((kv[..., :d], kv[..., d:]))
    return kvs


def attention_stage(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, n_heads: int, drop: Dropout
) -> Tensor:
    """Multi-head attention of each pair's query over its item's tokens (no projections).

    q `(n, m, D)`, k/v `(n, P, D)`, keep bool `(n, 1, 1, P)` (True = attend) → `(n, m, D)`.
    """
    n, m, d = q.shape
    dh = d // n_heads
    qh = q.view(n, m, n_heads, dh).transpose(1, 2)  # [n, H, m, dh]
    kh = k.view(n, -1, n_heads, dh).transpose(1, 2)  # [n, H, P, dh]
    vh = v.view(n, -1, n_heads, dh).transpose(1, 2)  # [n, H, P, dh]
    if not drop.active:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep)
    else:  # explicit form: the dropout mask must come from the chunk's generator
        s = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # [n, H, m, P]
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        o = torch.matmul(drop(torch.softmax(s, dim=-1)), vh)
    return o.transpose(1, 2).reshape(n, m, d)


def layer_stage(
    lw: LayerWeights,
    cfg: AlignerConfig,
    x: Tensor,
    q: Tensor | None,
    kv: tuple[Tensor, Tensor],
    keep: Tensor | None,
    drop: Dropout,
) -> Tensor:
    """One decoder layer for a chunk of pairs: x `(n, m, D)` → `(n, m, D)`.

    q, when given, is the layer's already projected query (layer 1 shares it across items).
    """
    d, eps = cfg.d_model, cfg.layer_norm_eps
    if q is None:
        y = F.layer_norm(x, (d,), lw.norm2_w, lw.norm2_b, eps)
        q = F.linear(y, lw.in_proj_w[:d], lw.in_proj_b[:d])
    o = attention_stage(q, kv[0], kv[1], keep, cfg.n_heads, drop)
    x = x + drop(F.linear(o, lw.out_proj_w, lw.out_proj_b))
    y = F.layer_norm(x, (d,), lw.norm3_w, lw.norm3_b, eps)
    h = drop(torch.relu(F.linear(y, lw.linear1_w, lw.linear1_b)))
    return x + drop(F.linear(h, lw.linear2_w, lw.linear2_b))


def head_stage(w: AlignerWeights, cfg: AlignerConfig, x: Tensor, drop: Dropout) -> Tensor:
    """decoder_norm then the MLP head: x `(..., D)` → logits `(...)`."""
    x = drop(F.layer_norm(x, (cfg.d_model,), w.norm0_w, w.norm0_b, cfg.layer_norm_eps))
    last = len(w.head) - 1
    for i, (hw, hb) in enumerate(w.head):
        x = F.linear(x, hw, hb)
        if i < last:
            x = drop(torch.relu(x))
    return x.squeeze(-1)


def pair_chunk_forward(
    w: AlignerWeights,
    cfg: AlignerConfig,
    x0: Tensor,
    q1: Tensor,
    kvs: list[tuple[Tensor, Tensor]],
    keep: Tensor | None,
    drop: Dropout,
) -> Tensor:
    """All layers and the head for `n` items × `m` queries: x0, q1 `(m, D)` → `(n, m)`."""
    n = kvs[0][0].shape[0]
    x = x0.expand(n, *x0.shape)
    for i, lw in enumerate(w.layers):
        x = layer_stage(lw, cfg, x, q1.expand(n, *q1.shape) if i == 0 else None, kvs[i], keep,
                        drop)  # fmt: skip
    return head_stage(w, cfg, x, drop)


# ---------------------------------------------------------------------------------------------
# Executor
# ---------------------------------------------------------------------------------------------


def _chunks(total: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(total, i + step)) for i in range(0, total, step)]


def _keep_mask(mask: Tensor | None, n0: int, n1: int) -> Tensor | None:
    return None if mask is None else (~mask[n0:n1])[:, None, None, :]


class _ChunkedAlign(torch.autograd.Function):
    """Forward saves only inputs; backward recomputes chunk by chunk (no per-pair activations)."""

    @staticmethod
    def forward(ctx, memory, queries, mask, cfg, plan, seed, training, *flat):  # noqa: ANN001
        w = AlignerWeights.unflatten(flat, cfg.n_layers)
        n, m = memory.shape[0], queries.shape[0]
        out = memory.new_empty((n, m))
        x0, q1 = query_stage(w, cfg, queries)
        for n0, n1 in _chunks(n, plan.items):
            kvs = kv_stage(w, cfg, memory[n0:n1])
            keep = _keep_mask(mask, n0, n1)
            for m0, m1 in _chunks(m, plan.queries):
                drop = Dropout(cfg.dropout if training else 0.0, seed, (n0, m0), memory.device)
                out[n0:n1, m0:m1] = pair_chunk_forward(w, cfg, x0[m0:m1], q1[m0:m1], kvs, keep,
                                                       drop)  # fmt: skip
        ctx.save_for_backward(memory, queries, *flat)
        ctx.mask, ctx.cfg, ctx.plan, ctx.seed, ctx.training = mask, cfg, plan, seed, training
        return out

    @staticmethod
    def backward(ctx, g_out):  # noqa: ANN001
        memory, queries, *flat = ctx.saved_tensors
        cfg, plan, mask = ctx.cfg, ctx.plan, ctx.mask
        n, m = memory.shape[0], queries.shape[0]
        with torch.enable_grad():
            mem_leaf = memory.detach().requires_grad_(ctx.needs_input_grad[0])
            q_leaf = queries.detach().requires_grad_(ctx.needs_input_grad[1])
            flat_leaf = [t.detach().requires_grad_(True) for t in flat]
            w = AlignerWeights.unflatten(flat_leaf, cfg.n_layers)
            x0, q1 = query_stage(w, cfg, q_leaf)
            x0_d = x0.detach().requires_grad_(True)
            q1_d = q1.detach().requires_grad_(True)
            for n0, n1 in _chunks(n, plan.items):
                kvs = kv_stage(w, cfg, mem_leaf[n0:n1])
                kvs_d = [(k.detach().requires_grad_(True), v.detach().requires_grad_(True))
                         for k, v in kvs]  # fmt: skip
                keep = _keep_mask(mask, n0, n1)
                for m0, m1 in _chunks(m, plan.queries):
                    drop = Dropout(cfg.dropout if ctx.training else 0.0, ctx.seed, (n0, m0),
                                   memory.device)  # fmt: skip
                    s = pair_chunk_forward(w, cfg, x0_d[m0:m1], q1_d[m0:m1], kvs_d, keep, drop)
                    torch.autograd.backward(s, g_out[n0:n1, m0:m1])
                # Back through this block's K/V projections into memory and weights.
                torch.autograd.backward(
                    [t for kv in kvs for t in kv], [t.grad for kv in kvs_d for t in kv]
                )
            torch.autograd.backward([x0, q1], [x0_d.grad, q1_d.grad])
        grads_flat = [t.grad for t in flat_leaf]
        return (mem_leaf.grad if ctx.needs_input_grad[0] else None,
                q_leaf.grad if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, *grads_flat)  # fmt: skip


def chunked_forward(
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    training: bool,
    chunk_budget_bytes: int | None = None,
) -> Tensor:
    """memory `(N, P, D)`, queries `(M, D)`, mask `(N, P)` → logits `(N, M)`, streamed."""
    n, p, _ = memory.shape
    m = queries.shape[0]
    budget = DEFAULT_CHUNK_BUDGET_BYTES if chunk_budget_bytes is None else int(chunk_budget_bytes)
    if budget <= 0:
        raise ValueError(f"chunk_budget_bytes must be positive, got {budget}")
    flat = w.flatten()
    grad = torch.is_grad_enabled() and (
        memory.requires_grad or queries.requires_grad or any(t.requires_grad for t in flat)
    )
    plan = plan_chunks(cfg, n, m, p, memory.element_size(), budget, training=grad)
    seed = None
    if training and cfg.dropout > 0.0:
        # Drawn from torch's default CPU generator: reproducible under torch.manual_seed and
        # no device sync.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    if n == 0 or m == 0:
        return memory.new_zeros((n, m)) + 0.0 * queries.sum() + 0.0 * memory.sum()
    return _ChunkedAlign.apply(memory, queries, memory_mask, cfg, plan, seed, training, *flat)
