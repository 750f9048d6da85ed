"""Block sizes per GPU generation and dot kind: the configurations the kernels ship with.

Dot kinds: "half" (bf16/fp16 operands), "tf32" (fp32 operands, TF32 allowed by the user) and
"ieee" (fp32 without TF32: FMA code, exact fp32). Hopper (sm_90) first: 128×128 tiles with
8 warps (two warpgroups for wgmma), 3 stages; Ampere (sm_80): 4-stage cp.async pipelines with
4 warps (mma.sync). `table_arch` says which GPUs run which table (the datacenter Blackwells
Hopper's, Ada and the consumer Blackwells Ampere's). Every entry compiles without spills and
within its GPUs' shared memory (`python -m carzero_fast.kernels --arch 90`, checked by
tests/test_kernel_report.py for sm_90, sm_80 and sm_120).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

KINDS = ("half", "tf32", "ieee")


class LinearConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class AttentionConfig(NamedTuple):
    block_m: int  # queries of one item per program
    block_p: int  # keys per step of the online softmax
    num_warps: int
    num_stages: int
    # rescale the accumulators only when a row's running max grew by more than this (log2
    # units; 0: at every key block, the textbook online softmax, with no branch)
    rescale_log2: float = 8.0


class AttentionBwdConfig(NamedTuple):
    """Tiles of the two attention backward kernels."""

    dq_block_m: int  # queries per program of the dQ kernel
    dq_block_p: int  # keys per step of its loop
    dkdv_block_m: int  # queries per step of the dK/dV kernel's loop
    dkdv_block_p: int  # keys per program of the dK/dV kernel
    num_warps: int
    dq_stages: int
    dkdv_stages: int
    block_c: int = 64  # head-dim slice width (192 = 3 × 64); 256: one padded tile


# (table, dot kind) → config; `table_arch` says which GPUs run which table
_LINEAR = {
    (9, "half"): LinearConfig(128, 128, 64, 8, 3),
    (9, "tf32"): LinearConfig(128, 128, 32, 8, 3),
    (9, "ieee"): LinearConfig(128, 128, 32, 8, 3),
    (8, "half"): LinearConfig(128, 128, 32, 4, 4),
    (8, "tf32"): LinearConfig(128, 64, 32, 4, 3),
    (8, "ieee"): LinearConfig(64, 64, 32, 4, 3),
}
# the MLP head's fused last layer: a whole row (≤ HEAD_MAX_WIDTH wide) per program
_HEAD = {
    (9, "half"): LinearConfig(64, 256, 64, 8, 3),
    (9, "tf32"): LinearConfig(64, 256, 32, 8, 2),
    (9, "ieee"): LinearConfig(64, 256, 32, 8, 2),
    (8, "half"): LinearConfig(64, 256, 32, 8, 3),
    (8, "tf32"): LinearConfig(64, 256, 32, 8, 2),
    (8, "ieee"): LinearConfig(32, 256, 32, 8, 2),
}
# fp32 rescales at every key block (rescale_log2 = 0, no branch): with the branch, Triton
# 3.6 (the GPU image's) spilled 8–16 bytes in three of its fp32 builds (3.9 did not)
_ATTENTION = {
    (9, "half"): AttentionConfig(64, 32, 4, 3),
    (9, "tf32"): AttentionConfig(64, 32, 4, 2, rescale_log2=0.0),
    (9, "ieee"): AttentionConfig(32, 32, 4, 2, rescale_log2=0.0),
    (8, "half"): AttentionConfig(32, 64, 4, 2),
    (8, "tf32"): AttentionConfig(64, 32, 4, 2, rescale_log2=0.0),
    (8, "ieee"): AttentionConfig(32, 32, 4, 2, rescale_log2=0.0),
}
# Backward: the head as 64-wide slices; 64-query dQ programs and the dK/dV kernel's
# transposed [64, keys] accumulators reach wgmma on Hopper in 16-bit (the first padded 32×16
# tiles ran mma.sync: 20 ms of an H200 training step at N = M = 256, BENCHMARKS.md); fp32
# keeps small tiles, the largest without spills (compile report), and exact fp32 (FMA code)
# an unpipelined dK/dV loop (pipelined, it spills).
_ATTENTION_BWD = {
    # dQ in 128-row tiles: 309 us against 331 for 64 rows on an H200 (tune_gpu, 955750c)
    (9, "half"): AttentionBwdConfig(128, 32, 64, 32, 8, 2, 2),
    (9, "tf32"): AttentionBwdConfig(32, 16, 32, 16, 8, 2, 2),
    (9, "ieee"): AttentionBwdConfig(32, 16, 32, 16, 8, 2, 1),
    (8, "half"): AttentionBwdConfig(32, 16, 32, 16, 8, 2, 2),
    # one dK/dV stage: with two, Triton 3.6 (the GPU image's) spilled 32 bytes at 255
    # registers on sm_80 (Triton 3.9 did not)
    (8, "tf32"): AttentionBwdConfig(32, 16, 32, 16, 8, 2, 1),
    # one dQ stage: with two, the dQ kernel's column sums (dropout on) spilled 8 bytes at 80
    # registers on sm_80 (Triton 3.9); FMA code gains little from the pipeline
    (8, "ieee"): AttentionBwdConfig(32, 16, 32, 16, 8, 1, 1),
}
HEAD_MAX_WIDTH = 256  # wider last hidden layers use the plain linear kernel and a GEMV


def dot_kind(dtype: torch.dtype) -> str:
    """Which table a matrix kernel of this operand dtype uses: "half", "tf32" or "ieee"."""
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    if dtype != torch.float32:  # e.g. float64: tl.dot would not accumulate in fp32
        raise TypeError(f"the kernels take float32, bfloat16 or float16 operands, got {dtype}")
    return "tf32" if tf32_allowed() else "ieee"


def tf32_allowed() -> bool:
    """Whether PyTorch's fp32 matmuls may use TF32, set by any of its switches:
    `torch.backends.cuda.matmul.fp32_precision = "tf32"` (or the global
    `torch.backends.fp32_precision`, which it inherits), the legacy `allow_tf32 = True` or
    `torch.set_float32_matmul_precision("high")`. `fp32_precision` reflects all of them, while
    reading `allow_tf32` raises once the new switches were used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # PyTorch >= 2.9
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's `input_precision` for operands of this dtype: IEEE fp32 unless the user
    allowed TF32 in PyTorch (`tf32_allowed`); 16-bit ignore it."""
    return "tf32" if dot_kind(dtype) == "tf32" else "ieee"


def arch_of(device: torch.device) -> int:
    """Compute capability as major·10 + minor (90, 80, 86, 100, 120); CPU tensors (the
    interpreter) use the Hopper tables (90)."""
    if device.type != "cuda":
        return 90
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> int:
    # cached: asked once per kernel launch, and the driver query costs microseconds
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def table_arch(arch: int) -> int:
    """The table (9: Hopper's, 8: Ampere's) a compute capability (90, 86, 120, …) runs.

    Hopper's tiles need up to 227 KB of shared memory a block and its 16-bit path feeds
    wgmma through TMA: sm_90 and the datacenter Blackwells (sm_100, sm_103, sm_110), which
    have as much. Everything else runs Ampere's mma.sync tiles, which fit the 99 KB of
    sm_86, sm_89 and the consumer Blackwells (sm_120, sm_121): there Hopper's tiles spilled
    in 13 builds and needed up to 136 KB (compile report for sm_120, Triton 3.9).
    """
    if arch < 10:
        raise ValueError(f"arch {arch}: give a compute capability such as 90 or 80")
    return 9 if 90 <= arch < 120 else 8


# The most shared memory one block may use on the GPUs that run each table (the opt-in
# maximum): sm_90/sm_100 227 KB; sm_86/sm_89/sm_120 99 KB (sm_80's own is 163 KB).
SHARED_LIMIT = {9: 227 * 1024, 8: 99 * 1024}


def uses_tma(arch: int) -> bool:
    """16-bit linear layers run the TMA-fed kernel (Hopper's table), the pointer one else."""
    return table_arch(arch) == 9


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the interpreter counts 2 (a few programs
    that each loop over several row blocks)."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _key(arch: int, kind: str) -> tuple[int, str]:
    """arch: a compute capability (90, 80, 120, …)."""
    return (table_arch(arch), kind)


def linear_config(device: torch.device, dtype: torch.dtype, head: bool = False) -> LinearConfig:
    return (_HEAD if head else _LINEAR)[_key(arch_of(device), dot_kind(dtype))]


def attention_config(device: torch.device, dtype: torch.dtype,
                     dropout: bool = False) -> AttentionConfig:  # fmt: skip
    """The forward's tiles; with dropout, exact fp32 (FMA code) runs 8 warps: on 4, its 32×32
    tile and the mask's registers spilled on sm_90 (compile report)."""
    kind, arch = dot_kind(dtype), arch_of(device)
    cfg = _ATTENTION[_key(arch, kind)]
    return shipped_with_dropout(cfg, kind, arch) if dropout else cfg


def attention_bwd_config(device: torch.device, dtype: torch.dtype,
                         dropout: bool = False) -> AttentionBwdConfig:  # fmt: skip
    """The backward tiles; with dropout, fp32 runs the dK/dV loop unpipelined (the Philox
    registers would make the pipelined one spill on sm_80, compile report), and exact fp32
    on 16-query steps (32 spilled on sm_90)."""
    kind, arch = dot_kind(dtype), arch_of(device)
    cfg = _ATTENTION_BWD[_key(arch, kind)]
    return shipped_with_dropout(cfg, kind, arch) if dropout else cfg


def shipped_with_dropout(cfg: NamedTuple, kind: str, arch: int) -> NamedTuple:
    """An attention forward or backward configuration as the kernels run it with dropout."""
    if kind == "half":
        return cfg
    if isinstance(cfg, AttentionConfig):
        if kind == "ieee":
            return cfg._replace(num_warps=8)
        # Ampere's TF32 tiles with the mask's and Philox's buffers need 104 KB, over the 99 KB
        # of the sm_86/89/120 GPUs that run that table: 16-key steps need 74 KB and 196
        # registers, spill-free on sm_80/86/120 (one stage spilled 72 bytes on sm_120)
        return cfg._replace(block_p=16) if table_arch(arch) == 8 else cfg
    cfg = cfg._replace(dkdv_stages=1)
    return cfg._replace(dkdv_block_m=16) if kind == "ieee" else cfg


def override(kernel: str, arch: int, kind: str, config: NamedTuple) -> NamedTuple:
    """Replace one shipped configuration (for tuning sweeps); returns the previous one."""
    table = {"linear": _LINEAR, "head": _HEAD, "attention": _ATTENTION,
             "attention_bwd": _ATTENTION_BWD}[kernel]  # fmt: skip
    key = _key(arch, kind)
    previous, table[key] = table[key], config
    return previous


def shipped(arch: int, kind: str) -> dict[str, NamedTuple]:
    """The configurations shipped for one architecture and dot kind, by kernel."""
    key = _key(arch, kind)
    return {"linear": _LINEAR[key], "head": _HEAD[key], "attention": _ATTENTION[key],
            "attention_bwd": _ATTENTION_BWD[key]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Which GEMM runs a linear layer whose epilogue is only bias (and ReLU)
# ---------------------------------------------------------------------------------------------

GEMM_ROUTES = ("auto", "triton", "library")


def gemm_route() -> str:
    """`CARZERO_FAST_TRITON_GEMM`: who runs the linear layers with a plain epilogue (bias,
    optionally ReLU; no dropout, no fused logit): "triton" (`linear`'s own kernel), "library"
    (PyTorch's GEMM: cuBLAS/cuBLASLt with its bias and ReLU epilogues on CUDA) or "auto"
    (library for 16-bit operands on CUDA, triton elsewhere). Read at every call, so that a
    benchmark can time both in one process.

    Why "auto" picks the library on CUDA: on an H200 the same bf16 products (32768-row chunks
    of the pair stage) ran at 636–677 TFLOP/s in cuBLAS against 504–589 for this package's
    TMA kernel (`tune_gpu`, BENCHMARKS.md); the fusions that kernel existed for (LayerNorm
    prologue, residual epilogue) halved its rate and moved to `add_layer_norm`."""
    return env_choice("CARZERO_FAST_TRITON_GEMM", GEMM_ROUTES)


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable `name`, one of `choices` (the first when unset); any
    other value is an error naming the variable."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(choices)}")
    return value


def use_library_gemm(a: torch.Tensor) -> bool:
    """Whether a plain-epilogue linear layer on activations `a` runs PyTorch's GEMM."""
    route = gemm_route()
    if route == "auto":
        return a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
    return route == "library"


ATTENTION_ROUTES = ("triton", "library")


def library_attention() -> bool:
    """`CARZERO_FAST_TRITON_ATTENTION`: who runs the forward's attention when nothing is kept
    for a backward (no log-sum-exp, no dropout): "triton" (`attention`, the default) or
    "library" (PyTorch's `scaled_dot_product_attention` on the same strided views: flash or
    cuDNN kernels on CUDA without a mask, memory-efficient ones with it). The library's flash
    kernel was ~19% faster than `attention` on contiguous K/V in `tune_gpu` (BENCHMARKS.md);
    on the backend's strided K/V, with its output in a fresh tensor, it is untimed until a
    GPU run of `benchmarks.gpu_check` ("triton, SDPA attention") says which is faster. Read
    at every call, so that a benchmark can time both in one process."""
    return env_choice("CARZERO_FAST_TRITON_ATTENTION", ATTENTION_ROUTES) == "library"


RESIDUAL_ROUTES = ("gemm", "pass")


def residual_in_gemm(activations: torch.Tensor, stream_dtype: torch.dtype) -> bool:
    """`CARZERO_FAST_TRITON_RESIDUAL`: where a forward without a backward adds the attention
    and FFN branches of layers 2… to the residual stream. "gemm" (the default): inside the
    output projection's and linear2's GEMMs (`stream += a·Wᵀ`, cuBLAS reading the stream as
    its C matrix), where those GEMMs run on PyTorch (`use_library_gemm`) and the stream has
    their dtype; the add + LayerNorm passes then only read the stream (4 bytes per element
    each, instead of 6 and 10 with a 16-bit stream, 8 in the last layer). "pass": always in
    the passes, after GEMMs that write each branch apart. Untimed on a GPU until
    `benchmarks.gpu_check` runs the row "triton, adds in passes" beside the default."""
    route = env_choice("CARZERO_FAST_TRITON_RESIDUAL", RESIDUAL_ROUTES)
    return route == "gemm" and stream_dtype == activations.dtype and use_library_gemm(activations)
