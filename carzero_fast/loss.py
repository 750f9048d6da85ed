"""CARZero's training loss and zero-shot scores (DESIGN.md §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .aligner import CrossAttentionAligner


def _symmetric_ce(s: Tensor) -> Tensor:
    """(CE(S, diag) + CE(Sᵀ, diag)) / 2 for a square logit matrix S `(B, B)`."""
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"CARZero's loss needs square (B, B) logits, got {tuple(s.shape)}")
    if s.shape[0] == 0:
        raise ValueError("CARZero's loss needs at least one pair, got (0, 0) logits")
    target = torch.arange(s.shape[0], device=s.device)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()  # the softmax of 16-bit logits in fp32; fp32 and fp64 kept
    return (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)) / 2


def carzero_loss(i2t: Tensor, t2i: Tensor) -> Tensor:
    """CARZero's symmetric InfoNCE (`DQNCOSLoss` on each matrix, summed).

    Args:
        i2t: `(B, B)` logits, images as memory, text globals as queries; pair b ↔ b matches.
        t2i: `(B, B)` logits, texts as memory, image globals as queries.

    Returns:
        scalar loss `sym(i2t) + sym(t2i)`: fp32 for 16-bit logits, else the logits' dtype.
    """
    for name, s in (("i2t", i2t), ("t2i", t2i)):
        if not isinstance(s, Tensor) or not s.is_floating_point():
            what = s.dtype if isinstance(s, Tensor) else type(s).__name__
            raise TypeError(f"CARZero's loss needs floating-point logits, got {name} {what}")
        if s.dim() != 2 or s.shape[0] != s.shape[1]:
            raise ValueError(f"CARZero's loss needs square (B, B) logits (as many texts as "
                             f"images, text b describing image b), got {name} "
                             f"{tuple(s.shape)}")  # fmt: skip
    if i2t.shape != t2i.shape:
        raise ValueError(f"i2t {tuple(i2t.shape)} and t2i {tuple(t2i.shape)} differ in shape")
    return _symmetric_ce(i2t) + _symmetric_ce(t2i)


def _check_aligner(aligner: object, what: str) -> None:
    """A clear error for a module wrapper (DistributedDataParallel, ...) in place of the
    aligner: these functions call its `both_directions`, which a wrapper does not have."""
    if hasattr(aligner, "both_directions"):
        return
    inner = getattr(aligner, "module", None)
    hint = ""
    if hasattr(inner, "both_directions"):
        hint = (": a wrapper such as DistributedDataParallel; passing its .module would skip "
                "the wrapper's forward (DDP's gradient all-reduce): for training wrap "
                "carzero_fast.distributed.DistributedCARZeroLoss(aligner) in DDP instead")
        if what == "zero_shot_scores":
            hint = ": a wrapper such as DistributedDataParallel; pass its .module (no gradients)"
    raise TypeError(f"{what} takes a CrossAttentionAligner, got {type(aligner).__name__}{hint}")


def alignment_logits(
    aligner: CrossAttentionAligner,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None = None,
    txt_mask: Tensor | None = None,
    *,
    backend: str | None = None,
    chunk_budget_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Both directions as CARZero computes them; the globals are row 0 of each token tensor.

    img_tokens `(N, Pi, D)`, txt_tokens `(M, Pt, D)` → (i2t `(N, M)`, t2i `(M, N)`).
    `backend` and `chunk_budget_bytes` override the aligner's for this call.
    """
    _check_aligner(aligner, "alignment_logits")
    return aligner.both_directions(img_tokens, txt_tokens, img_mask, txt_mask, backend=backend,
                                   chunk_budget_bytes=chunk_budget_bytes)  # fmt: skip


def zero_shot_scores(
    aligner: CrossAttentionAligner,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None = None,
    txt_mask: Tensor | None = None,
    *,
    backend: str | None = None,
    chunk_budget_bytes: int | None = None,
) -> Tensor:
    """CARZero's zero-shot score `(i2t + t2iᵀ) / 2` of every image for every prompt.

    img_tokens `(N_img, Pi, D)`, txt_tokens `(M_txt, Pt, D)` (globals in row 0), optional
    bool masks `(N_img, Pi)`, `(M_txt, Pt)` → logits `(N_img, M_txt)`; `sigmoid` gives
    probabilities. `backend` and `chunk_budget_bytes` override the aligner's for this call.
    """
    _check_aligner(aligner, "zero_shot_scores")
    i2t, t2i = aligner.both_directions(img_tokens, txt_tokens, img_mask, txt_mask,
                                       backend=backend,
                                       chunk_budget_bytes=chunk_budget_bytes)  # fmt: skip
    return (i2t + t2i.t()) / 2
