"""Triton kernels of the `triton` backend.

One op family per module, each with its kernel, launcher and the PyTorch stage it replaces:
`layernorm` (residual add + LayerNorm), `linear` (GEMM with bias/ReLU/MLP-head epilogues),
`attention` (a query block over one item's keys, online softmax), `attention_backward` and
`relu_backward` (a ReLU's backward with the column sums of its result).
`report` compiles every shipped configuration without a GPU (`python -m carzero_fast.kernels`).
Like every Triton launch, the launchers run on the current CUDA device: callers with tensors
on another GPU make theirs current first (the backend does, `backends.fused.launch_device`),
rather than each launch paying for a device switch.
"""

from .attention import attention, attention_torch
from .attention_backward import attention_backward, attention_backward_torch
from .common import fix_interpreter_rounding, interpreting
from .configs import dot_precision, library_attention, residual_in_gemm
from .layernorm import (
    add_layer_norm,
    add_layer_norm_torch,
    layer_norm_backward,
    layer_norm_backward_torch,
)
from .linear import linear, linear_torch
from .relu_backward import relu_backward, relu_backward_torch

if interpreting():
    fix_interpreter_rounding()

__all__ = ["add_layer_norm", "add_layer_norm_torch", "attention", "attention_backward",
           "attention_backward_torch", "attention_torch", "dot_precision",
           "layer_norm_backward", "layer_norm_backward_torch", "library_attention",
           "linear", "linear_torch", "relu_backward", "relu_backward_torch",
           "residual_in_gemm"]  # fmt: skip
