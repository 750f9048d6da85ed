"""Counter-based dropout masks without state: the pieces shared by the Triton kernels
(`kernels/dropout.py`) and PyTorch, importable without Triton.

Every mask bit is a pure function of (seed, pair, layer, site, column): Philox4x32-10 on the
counters c0 = column // 4 (column: a feature, or a key for the attention weights),
c1 = query index m, c2 = memory item index n, c3 = tag(site, layer, head), with m and n the
pair's global indices in its direction; of the call's four 32-bit outputs, column c takes
output c % 4 (one call draws four neighbouring columns). An element is dropped where its
output is below `threshold` = round(p·2³²), and kept elements are scaled by
1/(1 − threshold/2³²) (the expectation stays exact for the probability actually applied).
`keep_torch` computes the same bits as `tl.philox` in PyTorch integer arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# sites (DESIGN.md §1): the attention weights, the attention's residual branch, the FFN hidden
# units, the FFN's residual branch, the decoder_norm'ed features (SimR), each hidden MLP layer
SITE_ATTENTION, SITE_ATTN_BRANCH, SITE_FFN_HIDDEN, SITE_FFN_BRANCH, SITE_SIMR, SITE_HEAD = range(6)


def tag(site: int, layer: int, head: int = 0) -> int:
    """The fourth Philox counter: site, layer (or head layer) and attention head."""
    return (site << 24) | (layer << 16) | head


class DropoutSpec(NamedTuple):
    """One direction's dropout: seed (< 2⁶³), threshold (drop iff draw < threshold), scale."""

    seed: int
    threshold: int
    scale: float

    @staticmethod
    def make(p: float, seed: int) -> DropoutSpec:
        threshold = min(max(round(p * 2**32), 0), 2**32 - 1)
        return DropoutSpec(int(seed), threshold, 1.0 / (1.0 - threshold / 2**32))


class ChunkPos(NamedTuple):
    """Where a chunk sits in its direction: rows are (item n0 + r // cols, query m0 + r % cols)."""

    n0: int
    m0: int
    cols: int


# ---------------------------------------------------------------------------------------------
# The same masks in PyTorch
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32 bits of a·b for a 32-bit constant a and uint32 values b (in int64)."""
    t = a * (b >> 16)  # < 2⁴⁸
    u = a * (b & 0xFFFF)  # < 2⁴⁸
    low = (((t & 0xFFFF) << 16) + u) & _M32
    high = (t + (u >> 16)) >> 16
    return high & _M32, low


def philox_torch(
    seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four outputs of Philox4x32-10 as `tl.philox` computes them (int64 tensors holding
    uint32 values, broadcast together)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    c0, c1, c2, c3 = (c & _M32 for c in (c0, c1, c2, c3))
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def keep_torch(
    spec: DropoutSpec, items: Tensor, queries: Tensor, cols: Tensor, tag_: int
) -> Tensor:
    """bool mask, True where kept, for broadcastable int64 index tensors (global item and
    query indices, column indices)."""
    tag_t = torch.tensor(tag_, dtype=torch.int64, device=cols.device)
    r0, r1, r2, r3 = philox_torch(spec.seed, cols // 4, queries, items, tag_t)
    t = torch.broadcast_to(cols % 4, r0.shape)
    r = torch.where(t == 0, r0, torch.where(t == 1, r1, torch.where(t == 2, r2, r3)))
    return r >= spec.threshold


def chunk_dropout_torch(
    x: Tensor, spec: DropoutSpec, pos: ChunkPos, tag_: int, dtype: torch.dtype | None = None
) -> Tensor:
    """x `(R, C)`, one row per pair of the chunk at `pos` → x ∘ keep · scale (fp32 arithmetic,
    rounded once to `dtype`, x's by default): what the kernels do to a dropped tensor, or to
    its gradient in the backward."""
    r = torch.arange(x.shape[0], device=x.device)
    keep = keep_torch(spec, (pos.n0 + r // pos.cols)[:, None], (pos.m0 + r % pos.cols)[:, None],
                      torch.arange(x.shape[1], device=x.device)[None, :], tag_)  # fmt: skip
    return torch.where(keep, x.float() * spec.scale, 0.0).to(dtype or x.dtype)
