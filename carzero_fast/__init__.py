"""carzero_fast: exact and fast CARZero cross-attention alignment."""

from .aligner import CrossAttentionAligner
from .backends import BACKENDS
from .config import AlignerConfig
from .loss import alignment_logits, carzero_loss, zero_shot_scores
from .model import CARZeroModel, read_state_dict

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
