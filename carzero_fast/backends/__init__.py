"""Backend registry: one executor interface, several implementations."""

from __future__ import annotations

from torch import Tensor

from ..config import AlignerConfig
from ..weights import AlignerWeights
from .chunked import chunked_both_directions, chunked_forward
from .reference import reference_forward

BACKENDS = ("auto", "reference", "chunked")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device_type: str) -> str:
    """The concrete backend `name` stands for on a device of this type. Today "auto" is
    "chunked" everywhere; the device type is where a fused GPU backend will be chosen."""
    check_backend_name(name)
    return "chunked" if name == "auto" else name


def run_backend(
    name: str,
    w: AlignerWeights,
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    *,
    training: bool,
    chunk_budget_bytes: int | None = None,
) -> Tensor:
    """Dispatch to a backend; every backend returns `(N, M)` logits in the inputs' dtype."""
    name = resolve_backend(name, memory.device.type)
    if name == "reference":
        return reference_forward(w, cfg, memory, queries, memory_mask, training)
    return chunked_forward(w, cfg, memory, queries, memory_mask, training, chunk_budget_bytes)


def run_backend_both(
    name: str,
    w: AlignerWeights,
    cfg: AlignerConfig,
    img_tokens: Tensor,
    txt_tokens: Tensor,
    img_mask: Tensor | None,
    txt_mask: Tensor | None,
    *,
    training: bool,
    chunk_budget_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Both directions, globals from row 0 → (i2t `(N, M)`, t2i `(M, N)`)."""
    name = resolve_backend(name, img_tokens.device.type)
    if name == "reference":
        return (
            reference_forward(w, cfg, img_tokens, txt_tokens[:, 0], img_mask, training),
            reference_forward(w, cfg, txt_tokens, img_tokens[:, 0], txt_mask, training),
        )
    return chunked_both_directions(
        w, cfg, img_tokens, txt_tokens, img_mask, txt_mask, training, chunk_budget_bytes
    )
