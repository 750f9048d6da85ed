"""Input checks shared by every entry point: clear errors naming what is wrong."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import AlignerConfig

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_tensor(name: str, t: object, dims: int, shape: str, d: int) -> None:
    """`t` is a tensor of a supported dtype with `dims` dimensions (`shape` describes them for
    the error, e.g. "(N, P, D)") and the aligner's D last."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        supported = "float32, float64, bfloat16, float16"
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {supported}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {shape}, got shape {tuple(t.shape)}")
    if t.shape[-1] != d:
        raise ValueError(f"{name} has D = {t.shape[-1]}, the aligner's d_model is {d}")


def check_inputs(
    cfg: AlignerConfig,
    memory: Tensor,
    queries: Tensor,
    memory_mask: Tensor | None,
    param: Tensor | None = None,
    mask_names: tuple[str, str] = ("memory_mask", "memory"),
) -> None:
    """Raise `TypeError`/`ValueError` if the inputs do not fit the aligner.

    memory `(N, P, D)` and queries `(M, D)` share a floating dtype and a device (that of the
    parameters); memory_mask is bool `(N, P)` and leaves at least one token of every item.
    `mask_names`: what the mask errors call the mask and its tokens (the caller's names).
    """
    d = cfg.d_model
    _check_tensor("memory", memory, 3, "(N, P, D)", d)
    _check_tensor("queries", queries, 2, "(M, D)", d)
    if memory.shape[1] == 0:
        raise ValueError("memory has P = 0 tokens per item; attention needs at least one")
    if memory.dtype != queries.dtype:
        raise TypeError(f"memory is {memory.dtype} but queries are {queries.dtype}; use one dtype")
    if memory.device != queries.device:
        raise ValueError(f"memory is on {memory.device} but queries are on {queries.device}")
    if param is not None and param.device != memory.device:
        raise ValueError(
            f"inputs are on {memory.device} but the aligner's parameters are on {param.device}"
        )
    if memory_mask is None:
        return
    mask, tokens = mask_names
    if not isinstance(memory_mask, Tensor) or memory_mask.dtype != torch.bool:
        what = memory_mask.dtype if isinstance(memory_mask, Tensor) else type(memory_mask).__name__
        raise TypeError(f"{mask} must be a bool tensor (True = ignore the token), got {what}")
    if tuple(memory_mask.shape) != tuple(memory.shape[:2]):
        raise ValueError(
            f"{mask} must be (N, P) = {tuple(memory.shape[:2])}, got {tuple(memory_mask.shape)}"
        )
    if memory_mask.device != memory.device:
        raise ValueError(f"{mask} is on {memory_mask.device} but {tokens} is on {memory.device}")
    if memory_mask.shape[0]:
        # One host read per call (not per chunk), and only when a mask is given.
        hidden = memory_mask.all(dim=1)
        if bool(hidden.any()):
            items = hidden.nonzero().flatten()[:10].tolist()
            raise ValueError(f"{mask} hides every token of item(s) {items}")


def check_first_order(backend: str, instead: str) -> None:
    """Raise inside a recomputing backward asked for a graph (`create_graph=True`, as a
    gradient penalty does): its gradients would be constants, their own gradients silently
    zero."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend {backend!r} has no double backward (its backward recomputes the forward "
            f"without a graph); for create_graph=True, e.g. a gradient penalty, use "
            f"backend={instead!r}"
        )


def raise_for_functorch(e: RuntimeError, backend: str) -> None:
    """Re-raise PyTorch's error for an autograd.Function under a torch.func transform with
    the backend's name and what to use instead (returns for any other error)."""
    if "setup_context" in str(e):
        raise RuntimeError(f"backend {backend!r} does not run under torch.func transforms "
                           "(grad, vmap, jacrev, ...): its autograd.Function recomputes in "
                           "backward; use backend='reference'") from e  # fmt: skip


def check_token_pair(cfg: AlignerConfig, img_tokens: Tensor, txt_tokens: Tensor) -> None:
    """Raise `TypeError`/`ValueError` naming `img_tokens` or `txt_tokens` if either is not an
    `(items, tokens, D)` tensor of a supported dtype with the global in row 0 (so at least one
    token) and the aligner's D, or if the two differ in dtype or device.

    Both directions take each tensor's row 0 as the other's queries: checked here first, the
    errors name the caller's tensors instead of the "memory"/"queries" of one direction.
    """
    for name, t in (("img_tokens", img_tokens), ("txt_tokens", txt_tokens)):
        _check_tensor(name, t, 3, "(items, tokens, D) with the global in row 0", cfg.d_model)
        if t.shape[1] == 0:
            raise ValueError(f"{name} has 0 tokens per item; row 0 must hold the global")
    if img_tokens.dtype != txt_tokens.dtype:
        raise TypeError(f"img_tokens are {img_tokens.dtype} but txt_tokens are "
                        f"{txt_tokens.dtype}; use one dtype")  # fmt: skip
    if img_tokens.device != txt_tokens.device:
        raise ValueError(f"img_tokens are on {img_tokens.device} but txt_tokens are on "
                         f"{txt_tokens.device}")  # fmt: skip
