"""The `reference` backend: CARZero's fusion module computed as the original computes it.

It lays the pairs out the way the original does (queries repeated for every memory item,
`(M, N, D)` targets over `(P, N, D)` memory, `nn.MultiheadAttention` semantics with the
head-averaged attention weights it returns), so it materialises O(N·M·(D + H·P)) activations
per layer. It is the oracle every other backend is tested against and the baseline every
speed-up is measured against; it is not meant to be fast.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights


def reference_forward(
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    training: bool,
) -> Tensor:
    """memory `(N, P, D)`, queries `(M, D)`, mask `(N, P)` → logits `(N, M)`."""
    n, _, d = memory.shape
    p = cfg.dropout if training else 0.0
    eps = cfg.layer_norm_eps
    mem = memory.transpose(0, 1)  # [P, N, D]
    tgt = queries.unsqueeze(1).repeat(1, n, 1)  # [M, N, D]
    mem = F.layer_norm(mem, (d,), w.norm0_w, w.norm0_b, eps)
    tgt = F.layer_norm(tgt, (d,), w.norm0_w, w.norm0_b, eps)
    for lw in w.layers:
        y = F.layer_norm(tgt, (d,), lw.norm2_w, lw.norm2_b, eps)
        y, _ = F.multi_head_attention_forward(
            y, mem, mem, d, cfg.n_heads,
            lw.in_proj_w, lw.in_proj_b, None, None, False, p,
            lw.out_proj_w, lw.out_proj_b,
            training=training, key_padding_mask=memory_mask, need_weights=True,
        )  # fmt: skip
        tgt = tgt + F.dropout(y, p, training)
        y = F.layer_norm(tgt, (d,), lw.norm3_w, lw.norm3_b, eps)
        y = F.linear(F.dropout(F.relu(F.linear(y, lw.linear1_w, lw.linear1_b)), p, training),
                     lw.linear2_w, lw.linear2_b)  # fmt: skip
        tgt = tgt + F.dropout(y, p, training)
    tgt = F.layer_norm(tgt, (d,), w.norm0_w, w.norm0_b, eps)  # the decoder's final norm
    x = F.dropout(tgt, p, training).transpose(0, 1)  # [N, M, D] (SimR features)
    for i, (hw, hb) in enumerate(w.head):
        x = F.linear(x, hw, hb)
        if i < len(w.head) - 1:
            x = F.dropout(F.relu(x), p, training)
    return x.squeeze(-1)  # [N, M]
