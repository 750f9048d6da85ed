"""The chunked backend's dense products `x·Wᵀ`: oneDNN for fp32 on CPU, and a linear layer
whose backward adds dW straight into the backend's gradient buffers.

Why oneDNN: PyTorch runs fp32 `mm`/`addmm` on CPU through MKL. On the 2-core AMD EPYC (Zen 4)
these benchmarks run on, oneDNN's JIT kernels (`torch.ops.mkldnn._linear_pointwise`, the op
PyTorch's CPU compiler emits for linear layers) ran the chunk-sized products 5–23% faster
than MKL, measured interleaved in one process (384 × 768 × 768: 209 against 195 GFLOP/s;
384 × 192 × 768: 179 against 170; the `g·W` of a backward with W as a transposed view: 200
against 163). MKL stays for the weight gradients `gᵀ·x` (187 against 160 for oneDNN with
transposed views), where it also accumulates in place. bf16 products already go through
oneDNN inside PyTorch, and other devices keep PyTorch's own GEMMs and autograd
(`python_backward`).

On a 2-core AVX2-only AMD EPYC (no AVX-512) the order is the other way round: MKL ran
those products 10–20% faster than oneDNN and the backward's `g·W` 10–45% faster (interleaved
in one process, 384 rows), and the chunked backend's forward and training step at CARZero
dims 9–10% faster (5 alternating rounds each: 1.21 against 1.33 s, 5.95 against 6.54 s). So
`auto` takes oneDNN where PyTorch dispatches AVX-512 code or more (`cpu_capability` not
`AVX2`), and PyTorch's products on AVX2 CPUs.

Both routes compute the same fp32 products (different summation order only: ~1e-7
relative); tests compare the chunked backend against the reference either way. On other CPUs
(MKL is at home on Intel's) compare both with `python -m benchmarks` and set
`CARZERO_FAST_CPU_GEMM`: `auto` (default: oneDNN when this PyTorch build has it and the CPU
is not AVX2-only), `onednn` (required; an error when missing) or `torch` (PyTorch's own
products everywhere).

16-bit products on CPUs without native 16-bit GEMMs: PyTorch runs bf16 products through
oneDNN only where the CPU has AVX-512 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), fp16
only with AVX-512-FP16 or AMX; elsewhere it falls back to a generic loop. On a 2-core AVX2
AMD EPYC (one thread, 256 × 768 × 768): bf16 `mm` 1.1 GFLOP/s, `F.linear` 10, `bmm` 2.6,
against 85 for fp32 and 73 for the same bf16 product computed in fp32 and rounded to bf16.
So there the chunked backend's 16-bit products (`mm_t`, `mm`, `bmm`, `matmul`, `addmm_`)
convert their operands to fp32 and round the result once to the operands' dtype: what a
native 16-bit GEMM computes (fp32 accumulation, one rounding), in a different summation
order. `CARZERO_FAST_CPU_GEMM16`: `auto` (default: fp32 where PyTorch has no native kernel),
`fp32` (always) or `native` (PyTorch's 16-bit products everywhere).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

ROUTES = ("auto", "onednn", "torch")


def _probe_onednn() -> object | None:
    """oneDNN's fp32 linear when this PyTorch build has it and it gives the right answer
    (also with a transposed weight). Fixed inputs: the probe draws no random numbers."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x = torch.arange(15.0).view(5, 3) / 7
        w, b = torch.arange(12.0).view(4, 3) / 5 - 1, torch.arange(4.0)
        w_t = w.t().contiguous().t()  # the same values, column-major
        for weight, bias in ((w, b), (w_t, None)):
            want = x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
            if not torch.allclose(op(x, weight, bias, "none", [], ""), want, atol=1e-5):
                return None
        return op
    except (AttributeError, RuntimeError):
        return None


def onednn_by_default() -> bool:
    """Whether `auto` takes oneDNN on this CPU: everywhere but on AVX2-only x86 CPUs, where
    MKL's products were the faster ones (see above)."""
    return torch.backends.cpu.get_cpu_capability() != "AVX2"


def _select(route: str) -> object | None:
    """The oneDNN op the route asks for (None: PyTorch's products)."""
    if route not in ROUTES:
        raise ValueError(f"CARZERO_FAST_CPU_GEMM={route!r}: choose one of {', '.join(ROUTES)}")
    if route == "torch" or route == "auto" and not onednn_by_default():
        return None
    op = _probe_onednn()
    if op is None and route == "onednn":
        raise RuntimeError("CARZERO_FAST_CPU_GEMM=onednn, but this PyTorch build has no working "
                           "oneDNN linear (torch.ops.mkldnn._linear_pointwise)")  # fmt: skip
    return op


_ONEDNN_LINEAR = _select(os.environ.get("CARZERO_FAST_CPU_GEMM", "auto"))


ROUTES16 = ("auto", "fp32", "native")


def has_native_cpu_products(dtype: torch.dtype) -> bool:
    """Whether PyTorch runs `dtype`'s CPU products on oneDNN's native kernels."""
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


def _select16(route: str) -> frozenset[torch.dtype]:
    """The 16-bit dtypes whose CPU products run in fp32."""
    if route not in ROUTES16:
        raise ValueError(f"CARZERO_FAST_CPU_GEMM16={route!r}: choose one of {', '.join(ROUTES16)}")
    wide = (torch.bfloat16, torch.float16)
    if route == "native":
        return frozenset()
    return frozenset(t for t in wide if route == "fp32" or not has_native_cpu_products(t))


_FP32_PRODUCTS = _select16(os.environ.get("CARZERO_FAST_CPU_GEMM16", "auto"))


def fp32_products(x: Tensor) -> bool:
    """Whether x's products run in fp32 and are rounded to x's dtype (16-bit CPU tensors
    where this PyTorch has no native 16-bit kernel; see the module docstring)."""
    return x.dtype in _FP32_PRODUCTS and x.device.type == "cpu"


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """`a·b` (2-D), into `out` when given."""
    if not fp32_products(a):
        return torch.mm(a, b, out=out)
    y = torch.mm(a.float(), b.float())
    return y.to(a.dtype) if out is None else out.copy_(y)


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched `a·b` (3-D)."""
    if not fp32_products(a):
        return torch.bmm(a, b)
    return torch.bmm(a.float(), b.float()).to(a.dtype)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """`torch.matmul`, differentiable (the conversions are autograd ops)."""
    if not fp32_products(a):
        return torch.matmul(a, b)
    return torch.matmul(a.float(), b.float()).to(a.dtype)


def addmm_(c: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """`c += alpha·a·b` in place (one rounding of the sum, as a 16-bit `addmm_`)."""
    if not fp32_products(c):
        return c.addmm_(a, b, alpha=alpha)
    return c.copy_(torch.addmm(c.float(), a.float(), b.float(), alpha=alpha))


def onednn_enabled(x: Tensor) -> bool:
    """Whether `mm_t` runs `x`'s products through oneDNN (fp32 CPU tensors, when available)."""
    return _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32


# Below this many multiply-adds oneDNN's fixed cost per call (~20 µs: it builds the primitive
# and reorders the weight) outweighs its faster kernel (break-even ~1.6M on the 2-core CPU).
_ONEDNN_MIN_MACS = 2**21


def mm_t(x: Tensor, w: Tensor, b: Tensor | None = None, alpha: float = 1.0,
         beta: float = 1.0) -> Tensor:  # fmt: skip
    """`beta·b + alpha·x·wᵀ`: x `(r, k)`, w `(n, k)` with any strides (a transposed view is
    free), b `(n,)` → `(r, n)`. No autograd."""
    if fp32_products(x):
        b32 = None if b is None else b.float()
        return mm_t(x.float(), w.float(), b32, alpha, beta).to(x.dtype)
    if onednn_enabled(x) and x.shape[0] * w.shape[0] * w.shape[1] >= _ONEDNN_MIN_MACS:
        # oneDNN's linear has no alpha: one pass over the output (dropout's 1/(1 − p))
        b_in = b if b is None or alpha == beta == 1.0 else b * (beta / alpha)
        y = _ONEDNN_LINEAR(x, w, b_in, "none", [], "")
        return y if alpha == 1.0 else y.mul_(alpha)
    if b is None:
        return x @ w.t() if alpha == 1.0 else torch.mm(x, w.t()).mul_(alpha)
    return torch.addmm(b, x, w.t(), beta=beta, alpha=alpha)


def _buffer(t: Tensor | None) -> Tensor | None:
    """The gradient buffer a backward may add into directly. Only the chunked backend calls
    `linear` under autograd, and only on its own leaves, whose `.grad` it presets (views of
    the weights' gradients: `chunked._leaf`, `_ChunkedAlign.backward`); adding into a leaf's
    existing `.grad` is what autograd's accumulation would do, without the temporary."""
    if t is None or not t.is_leaf or not t.requires_grad:
        return None
    return t.grad


class _Linear(torch.autograd.Function):
    """`beta·b + alpha·x·Wᵀ` (W `(out, in)`) or `beta·b + alpha·x·W` (`w_in_out`, W `(in, out)`).

    Backward: dx = alpha·g·W (`mm_t`: oneDNN for fp32 on CPU); dW and db added in place into
    the leaves' gradient buffers when they have one (one GEMM with beta = 1, no dW-sized
    temporary), else returned.
    """

    @staticmethod
    def forward(ctx, x, w, b, alpha, beta, w_in_out):  # noqa: ANN001
        # x is 2-D: an output that is a view would forbid in-place ops on it
        ctx.save_for_backward(x, w)
        ctx.b = b if b is not None and b.is_leaf else None  # a leaf: nothing to save
        ctx.alpha, ctx.beta, ctx.w_in_out, ctx.has_b = alpha, beta, w_in_out, b is not None
        return mm_t(x, w.t() if w_in_out else w, b, alpha, beta)  # [r, out]

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, w = ctx.saved_tensors
        alpha, beta = ctx.alpha, ctx.beta
        w_t = w.t() if ctx.w_in_out else w  # [out, in]
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = mm_t(g, w_t.t(), alpha=alpha)  # g·W: W as a transposed view
        if ctx.needs_input_grad[1]:
            buf = _buffer(w)
            if buf is None:
                g_w = mm(g.t(), x)  # [out, in]
                g_w = g_w if alpha == 1.0 else g_w.mul_(alpha)
                g_w = g_w.t() if ctx.w_in_out else g_w
            elif ctx.w_in_out:  # [in, out]
                addmm_(buf, x.t(), g, alpha=alpha)
            else:
                addmm_(buf, g.t(), x, alpha=alpha)
        if ctx.has_b and ctx.needs_input_grad[2]:
            g_b = g.sum(0).mul_(beta)
            buf = _buffer(ctx.b)
            if buf is not None:
                buf.add_(g_b)
                g_b = None
        return g_x, g_w, g_b, None, None, None


def python_backward(x: Tensor) -> bool:
    """Whether `linear` runs `_Linear` for x: on the CPU only. Elsewhere PyTorch's own ops,
    whose backward runs in C++: `_Linear`'s Python backward costs ~50 µs of host time per
    layer, and on a GPU the chunked training step is host-bound (on an H200, a step at
    N = M = 256 took 181–191 ms with `_Linear`, of which 67 ms CUDA time, and 126.6 ms
    without it; BENCHMARKS.md, cee02cd)."""
    return x.device.type == "cpu"


def linear(
    x: Tensor,
    w: Tensor,
    b: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    w_in_out: bool = False,
) -> Tensor:
    """`beta·b + alpha·x·Wᵀ` over x's last dimension (`x·W` with `w_in_out`, W `(in, out)`).

    x `(..., in)` → `(..., out)`. The chunked backend's dropout scales ride on alpha/beta.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if not python_backward(x):
        w_t = w if w_in_out else w.t()  # [in, out]
        if b is None:
            y = torch.mm(x2, w_t) if alpha == 1.0 else torch.mm(x2, w_t) * alpha
        else:
            y = torch.addmm(b, x2, w_t, beta=beta, alpha=alpha)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
        y = _Linear.apply(x2, w, b, alpha, beta, w_in_out)
    else:
        y = mm_t(x2, w.t() if w_in_out else w, b, alpha, beta)
    return y.view(*x.shape[:-1], y.shape[-1])
