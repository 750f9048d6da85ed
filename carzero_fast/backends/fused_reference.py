"""The `triton` backend's training-mode function in plain PyTorch: every pair materialised
(like `reference`), with dropout masks drawn from the same counters as the kernels
(`philox.keep_torch`). The oracle of the dropout tests (memory O(N·M·(D + H·P)): small
sizes only); gradients come from PyTorch autograd.
"""

from __future__ import annotations

import math

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
    DropoutSpec,
    keep_torch,
    tag,
)


def dropout_reference_forward(
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    spec: DropoutSpec,
) -> Tensor:
    """memory `(N, P, D)`, queries `(M, D)`, mask `(N, P)` → logits `(N, M)` with the dropout
    of `spec` at every site (DESIGN.md §1), the masks of pair (n, m) at its global indices."""
    n, p, d = memory.shape
    m, h, eps = queries.shape[0], cfg.n_heads, cfg.layer_norm_eps
    dh = d // h
    items = torch.arange(n, device=memory.device)[:, None, None]  # [N, 1, 1]
    qidx = torch.arange(m, device=memory.device)[None, :, None]  # [1, M, 1]

    def drop(x: Tensor, site: int, layer: int, head: int = 0) -> Tensor:
        """x `(N, M, C)` (columns: features, or keys for the attention weights)."""
        cols = torch.arange(x.shape[-1], device=x.device)[None, None, :]
        keep = keep_torch(spec, items, qidx, cols, tag(site, layer, head))
        return x * keep.to(x.dtype) * spec.scale

    mem = F.layer_norm(memory, (d,), w.norm0_w, w.norm0_b, eps)  # [N, P, D]
    x = F.layer_norm(queries, (d,), w.norm0_w, w.norm0_b, eps).expand(n, m, d)
    bias = None
    if memory_mask is not None:
        bias = torch.zeros(memory_mask.shape, dtype=memory.dtype, device=memory.device)
        bias = bias.masked_fill(memory_mask, float("-inf"))[:, None, :]  # [N, 1, P]
    for li, lw in enumerate(w.layers):
        y = F.layer_norm(x, (d,), lw.norm2_w, lw.norm2_b, eps)
        q = F.linear(y, lw.in_proj_w[:d], lw.in_proj_b[:d])  # [N, M, D]
        k = F.linear(mem, lw.in_proj_w[d : 2 * d], lw.in_proj_b[d : 2 * d])  # [N, P, D]
        v = F.linear(mem, lw.in_proj_w[2 * d :], lw.in_proj_b[2 * d :])
        heads = []
        for hi in range(h):
            cols = slice(hi * dh, (hi + 1) * dh)
            s = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(dh)  # [N, M, P]
            if bias is not None:
                s = s + bias
            a = drop(torch.softmax(s, dim=-1), SITE_ATTENTION, li, hi)
            heads.append(a @ v[..., cols])  # [N, M, dh]
        o = F.linear(torch.cat(heads, dim=-1), lw.out_proj_w, lw.out_proj_b)
        x = x + drop(o, SITE_ATTN_BRANCH, li)
        y = F.layer_norm(x, (d,), lw.norm3_w, lw.norm3_b, eps)
        hid = drop(torch.relu(F.linear(y, lw.linear1_w, lw.linear1_b)), SITE_FFN_HIDDEN, li)
        x = x + drop(F.linear(hid, lw.linear2_w, lw.linear2_b), SITE_FFN_BRANCH, li)
    a = drop(F.layer_norm(x, (d,), w.norm0_w, w.norm0_b, eps), SITE_SIMR, 0)
    for i, (hw, hb) in enumerate(w.head[:-1]):
        a = drop(torch.relu(F.linear(a, hw, hb)), SITE_HEAD, i)
    lw_, lb_ = w.head[-1]
    return F.linear(a, lw_, lb_).squeeze(-1)
