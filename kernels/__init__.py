"""Triton kernels of the `triton` backend (installed as `carzero_fast.kernels`).

One op family per module, each with its kernel, launcher and the PyTorch stage it replaces:
`layernorm` (row statistics), `linear` (GEMM with LayerNorm prologue and bias/ReLU/residual/
MLP-head epilogues), `attention` (a query block over one item's keys, online softmax).
`report` compiles every shipped configuration without a GPU (`python -m carzero_fast.kernels`).
"""

from .attention import attention, attention_torch
from .common import fix_interpreter_rounding, interpreting
from .configs import dot_precision
from .layernorm import row_stats, row_stats_torch
from .linear import linear, linear_torch

if interpreting():
    fix_interpreter_rounding()

__all__ = ["attention", "attention_torch", "dot_precision", "linear", "linear_torch",
           "row_stats", "row_stats_torch"]  # fmt: skip
