"""carzero_fast: exact and fast CARZero cross-attention alignment.

The public names load on first use (PEP 562), so that commands which need no torch
(`carzero-fast evaluate`, `align-prompts --help`) start without importing it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aligner import CrossAttentionAligner
    from .backends import BACKENDS
    from .config import AlignerConfig
    from .loss import alignment_logits, carzero_loss, zero_shot_scores
    from .model import CARZeroModel, read_state_dict

# public name → the module that defines it
_EXPORTS = {
    "BACKENDS": ".backends",
    "AlignerConfig": ".config",
    "CARZeroModel": ".model",
    "CrossAttentionAligner": ".aligner",
    "alignment_logits": ".loss",
    "carzero_loss": ".loss",
    "read_state_dict": ".model",
    "zero_shot_scores": ".loss",
}
__all__ = [
    "BACKENDS",
    "AlignerConfig",
    "CARZeroModel",
    "CrossAttentionAligner",
    "alignment_logits",
    "carzero_loss",
    "read_state_dict",
    "zero_shot_scores",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
