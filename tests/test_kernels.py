"""Each Triton kernel against the PyTorch stage it replaces, under Triton's CPU interpreter.

fp32 must agree with the PyTorch stage to 1e-5. bf16/fp16 are judged by error, not by a fixed
tolerance: against the stage evaluated in float64 on the same rounded inputs, the kernel's
relative RMS error may be at most twice that of the PyTorch stage run in the same dtype.
Output buffers start as NaN so that an element a kernel fails to write fails the comparison.
Shapes are derived from the shipped block sizes (the interpreter uses the sm_90 tables), so
that every kernel runs several blocks with a ragged last one.
"""

from __future__ import annotations

import os
import re
import sys

# The interpreter must be chosen before Triton is first imported: `triton.language`'s own
# jitted helpers (tl.sum, tl.max, …) are built at import time, and a kernel interpreted with
# compiled helpers fails. No test module collected before this one imports Triton.
_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import rel_err  # noqa: E402

from carzero_fast.backends.philox import ChunkPos, DropoutSpec  # noqa: E402
from carzero_fast.kernels import (  # noqa: E402
    add_layer_norm,
    add_layer_norm_torch,
    attention,
    attention_torch,
    linear,
    linear_torch,
)
from carzero_fast.kernels.configs import attention_config, linear_config  # noqa: E402
from carzero_fast.kernels.layernorm import BLOCK_ROWS  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5
NAN = float("nan")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_active():
    if _TRITON_PRELOADED:
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (see this module's top)")


def _double(x):
    """Every floating tensor of a (nested) argument in float64; the rest as is."""
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_double(t) for t in x)
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x


def _check(out, ref, exact, dtype):
    """The kernel's `out` against the PyTorch stage's `ref` (fp32) or, in 16 bits, both
    against `exact`, the stage in float64 on the same rounded inputs."""
    if dtype == torch.float32:
        assert rel_err(out, ref) < 1e-5
        return
    kernel_err, torch_err = rel_err(out, exact), rel_err(ref, exact)
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _ids(x):
    return str(x)[6:] if isinstance(x, torch.dtype) else str(x)


# ----------------------------------------------------------------------- add_layer_norm


def _add_ln_exact(x, weight, bias, rows, delta=None, delta2=None, shift=None):
    """`add_layer_norm_torch` in float64 (the stage's own fp32 sum would cap the reference)."""
    s = x.double().repeat(rows // x.shape[0], 1)
    for branch in (delta, delta2, shift):
        if branch is not None:
            s = s + branch.double()
    return s, F.layer_norm(s, (x.shape[-1],), weight.double(), bias.double(), EPS)


# How the backend calls it: LN0 of memory tokens (16-bit rows in, no add, no stream out);
# layer 1's add onto x0 broadcast over a chunk's items (fp32 stream written to x_out); every
# later add in place on the fp32 stream (x_out is x); the same in place on a 16-bit stream
# (`triton_forward(stream_dtype=...)`; fp32 rows make it the previous case).
# A forward without a backward (no dropout) also runs: the add after the attention with no
# stream written; the add of both branches after the FFN onto the layer's input (x0
# broadcast, or the stream in place, fp32 or 16-bit), and the last layer's without a stream
# written. When the GEMMs add their products to the stream themselves, a pass only reads the
# stream (fp32 or 16-bit) and adds the biases those GEMMs left out (`shift`).
LN_VARIANTS = [
    "ln",
    "add_broadcast",
    "add_in_place",
    "add_in_place_16bit_stream",
    "add_no_store",
    "add2_broadcast",
    "add2_in_place",
    "add2_in_place_16bit_stream",
    "add2_no_store",
    "shift",
    "shift_16bit_stream",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d", [64, 97])
@pytest.mark.parametrize("variant", LN_VARIANTS)
def test_add_layer_norm(dtype, d, variant):
    res_rows = 7
    rows = 5 * res_rows  # not a multiple of the kernel's row block
    assert rows % BLOCK_ROWS
    weight = _randn(d, dtype=dtype, seed=1, scale=0.2, shift=1.0)
    bias = _randn(d, dtype=dtype, seed=2, scale=0.1)
    # the inputs are rows of wider buffers (row stride ≠ D), the outputs slices of longer ones
    y_buf = torch.full((rows + 3, d + 5), NAN, dtype=dtype)
    y = y_buf[:rows, :d]
    delta, delta2, x_out, shift = None, None, None, None
    if variant == "ln":
        x = _randn(rows, d + 9, dtype=dtype, seed=d, scale=2.0, shift=0.5)[:, 4 : 4 + d]
    elif variant.startswith("shift"):
        stream = dtype if variant.endswith("16bit_stream") else torch.float32
        x = _randn(rows, d, dtype=stream, seed=d + 2, scale=2.0, shift=0.5)
        shift = _randn(d, seed=d + 4, scale=0.3)
    else:
        delta = _randn(rows, d + 3, dtype=dtype, seed=d + 1)[:, :d]
        if variant.startswith("add2"):
            delta2 = _randn(rows + 1, d + 7, dtype=dtype, seed=d + 3)[1:, 2 : 2 + d]
        if variant.endswith("broadcast"):
            x = _randn(res_rows, d, seed=d + 2, scale=2.0, shift=0.5)
            x_out = torch.full((rows, d), NAN)
        else:
            stream = dtype if variant.endswith("16bit_stream") else torch.float32
            x = _randn(rows, d, dtype=stream, seed=d + 2, scale=2.0, shift=0.5)
            x_out = None if variant.endswith("no_store") else x
    x_in = x.clone()
    got = add_layer_norm(x, weight, bias, EPS, y, delta=delta, delta2=delta2, shift=shift,
                         x_out=x_out)  # fmt: skip
    assert got.data_ptr() == y.data_ptr()
    assert torch.isnan(y_buf[rows:]).all() and torch.isnan(y_buf[:, d:]).all()
    s_ref, y_ref = add_layer_norm_torch(x_in, weight, bias, EPS, dtype, rows, delta, delta2,
                                        shift)  # fmt: skip
    s_exact, y_exact = _add_ln_exact(x_in, weight, bias, rows, delta, delta2, shift)
    _check(y, y_ref, y_exact, dtype)
    if x_out is not None:  # the fp32 sum, rounded to the stream's dtype
        _check(x_out, s_ref.to(x_out.dtype), s_exact, x_out.dtype)
    else:
        assert torch.equal(x, x_in)


def test_add_layer_norm_two_branches_repeat_the_one_branch_sums():
    """The forward without a backward adds the attention branch again in the FFN's pass
    instead of storing the stream between: the same fp32 sums, so the same stream and
    LayerNorm bit for bit as storing x_mid and adding the FFN branch to it."""
    rows, d = 19, 97
    weight = _randn(d, seed=1, scale=0.2, shift=1.0)
    bias = _randn(d, seed=2, scale=0.1)
    x = _randn(rows, d, seed=3, scale=2.0, shift=0.5)
    da = _randn(rows, d, dtype=torch.bfloat16, seed=4)
    db = _randn(rows, d, dtype=torch.bfloat16, seed=5)
    x_mid, x_out = torch.full((rows, d), NAN), torch.full((rows, d), NAN)
    y3, y3_lean = (torch.empty(rows, d, dtype=torch.bfloat16) for _ in range(2))
    add_layer_norm(x, weight, bias, EPS, y3, delta=da, x_out=x_mid)
    add_layer_norm(x, weight, bias, EPS, y3_lean, delta=da)
    assert torch.equal(y3, y3_lean)
    y, y_lean = torch.empty(rows, d), torch.empty(rows, d)
    add_layer_norm(x_mid, weight, bias, EPS, y, delta=db, x_out=x_out)
    add_layer_norm(x, weight, bias, EPS, y_lean, delta=da, delta2=db, x_out=x)
    assert torch.equal(y, y_lean) and torch.equal(x, x_out)


def test_add_layer_norm_rejects_a_second_branch_alone_or_with_dropout():
    x, y = _randn(8, 16), torch.empty(8, 16)
    with pytest.raises(ValueError, match="delta2"):
        add_layer_norm(x, torch.ones(16), torch.zeros(16), EPS, y, delta2=x)
    drop = (DropoutSpec.make(0.1, 3), ChunkPos(0, 0, 8))
    with pytest.raises(ValueError, match="delta2"):
        add_layer_norm(x, torch.ones(16), torch.zeros(16), EPS, y, delta=x, delta2=x,
                       dropout=drop, delta_tag=1)  # fmt: skip


@pytest.mark.parametrize("shift", [torch.zeros(15), torch.zeros(16).bfloat16(),
                                   torch.zeros(32)[::2]], ids=["shape", "dtype", "stride"])
def test_add_layer_norm_rejects_a_bad_shift(shift):
    x, y = _randn(8, 16), torch.empty(8, 16)
    with pytest.raises(ValueError, match="shift"):
        add_layer_norm(x, torch.ones(16), torch.zeros(16), EPS, y, shift=shift)


def test_add_layer_norm_survives_a_large_mean():
    """Two passes (mean, then centred variance): E[x²] − E[x]² would lose every digit here."""
    rows, d = 21, 768
    x = _randn(rows, d, seed=3, shift=1000.0)
    weight, bias = torch.ones(d), torch.zeros(d)
    y = add_layer_norm(x, weight, bias, EPS, torch.full((rows, d), NAN))
    _, y_exact = _add_ln_exact(x, weight, bias, rows)
    _, y_torch = add_layer_norm_torch(x, weight, bias, EPS, torch.float32, rows)
    # what is left is the fp32 rounding of the mean itself (ulp(1000) ≈ 6e-5 of a unit std)
    assert rel_err(y, y_exact) <= max(2 * rel_err(y_torch, y_exact), 1e-6)
    assert rel_err(y, y_exact) < 1e-4


def test_add_layer_norm_rejects_a_stream_of_another_dtype():
    """The stream is fp32 or the output's dtype: a 16-bit stream under fp32 outputs, or
    fp16 under bf16, is a clear error."""
    x = _randn(8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="fp32"):
        add_layer_norm(x, torch.ones(16), torch.zeros(16), EPS, torch.empty(8, 16), x_out=x)
    x16 = x.half()
    y = torch.empty(8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float16"):
        add_layer_norm(x16, torch.ones(16), torch.zeros(16), EPS, y, x_out=x16)


# ------------------------------------------------------------------------------- linear


def _linear_inputs(dtype, rows, k, n_out, seed=0):
    a = _randn(rows, k, dtype=dtype, seed=seed, scale=2.0, shift=0.5)
    w = _randn(n_out, k, dtype=dtype, seed=seed + 1, scale=k**-0.5)
    bias = _randn(n_out, dtype=dtype, seed=seed + 2, scale=0.1)
    return a, w, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_linear(dtype, relu):
    cfg = linear_config(CPU, dtype)
    # more row blocks than GROUP_M (8), two column blocks, K not a multiple of BLOCK_K; a is
    # a row-strided view (as the backend's buffers are)
    rows, k, n_out = 8 * cfg.block_m + 11, 3 * cfg.block_k + 5, cfg.block_n + 37
    a, w, bias = _linear_inputs(dtype, rows, k + 6, n_out)
    a, w = a[:, 3 : 3 + k], w[:, :k].contiguous()
    out = torch.full((rows, n_out), NAN, dtype=dtype)
    got = linear(a, w, bias, out=out, relu=relu)
    assert got.data_ptr() == out.data_ptr()
    ref = linear_torch(a, w, bias, relu=relu)
    exact = linear_torch(*_double((a, w, bias)), relu=relu)
    _check(out, ref, exact, dtype)


def test_linear_allocates_its_output():
    a, w, bias = _linear_inputs(torch.float32, 9, 20, 30)
    out = linear(a, w, bias)
    assert out.shape == (9, 30) and out.dtype == torch.float32
    assert rel_err(out, linear_torch(a, w, bias)) < 1e-5


def test_linear_rejects_mixed_dtypes():
    a, w, bias = _linear_inputs(torch.float32, 4, 8, 8)
    with pytest.raises(TypeError):
        linear(a, w.bfloat16(), bias.bfloat16())


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_linear_head_writes_logits_into_a_score_block(dtype):
    """relu(a·wᵀ + b)·w_last + b_last per row, written at (r // mc, r % mc) of a strided
    block of the scores; nothing else of the score matrix is touched."""
    cfg = linear_config(CPU, dtype, head=True)
    ni, mc, width, k = 7, cfg.block_m // 4 + 3, 40, cfg.block_k + 9  # ragged last row block
    assert (ni * mc) % cfg.block_m and ni * mc > cfg.block_m
    a, w, bias = _linear_inputs(dtype, ni * mc, k, width, seed=5)
    head = (_randn(width, dtype=dtype, seed=8, scale=width**-0.5), _randn(1, dtype=dtype, seed=9))
    scores = torch.full((ni + 4, mc + 6), NAN, dtype=dtype)
    block = scores[2 : 2 + ni, 3 : 3 + mc]
    linear(a, w, bias, out=block, relu=True, head=head, logit_cols=mc)
    untouched = torch.ones_like(scores, dtype=torch.bool)
    untouched[2 : 2 + ni, 3 : 3 + mc] = False
    assert torch.isnan(scores[untouched]).all()
    ref = linear_torch(a, w, bias, relu=True, head=head).view(ni, mc)
    exact = linear_torch(*_double((a, w, bias)), relu=True, head=_double(head)).view(ni, mc)
    _check(block, ref, exact, dtype)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_linear_library_route_writes_into_out(relu, monkeypatch):
    """CARZERO_FAST_TRITON_GEMM=library: a plain epilogue is PyTorch's GEMM, written into
    the caller's buffer (fp32 on CPU here, where it is the PyTorch stage itself)."""
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", "library")
    a, w, bias = _linear_inputs(torch.float32, 37, 59, 29)
    a = a[:, 3:56]  # row-strided, as the backend's buffers can be
    w = w[:, :53].contiguous()
    out = torch.full((37, 29), NAN)
    got = linear(a, w, bias, out=out, relu=relu)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, linear_torch(a, w, bias, relu=relu))


def test_linear_library_route_keeps_the_head_kernel(monkeypatch):
    """The fused logit has no library counterpart: with the library route forced, a head
    call still reduces each row to its logit in the score block."""
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", "library")
    ni, mc, width, k = 3, 5, 24, 40
    a, w, bias = _linear_inputs(torch.float32, ni * mc, k, width, seed=5)
    head = (_randn(width, seed=8, scale=width**-0.5), _randn(1, seed=9))
    scores = torch.full((ni, mc), NAN)
    linear(a, w, bias, out=scores, relu=True, head=head, logit_cols=mc)
    assert rel_err(scores, linear_torch(a, w, bias, relu=True, head=head).view(ni, mc)) < 1e-5


def test_gemm_route_choice(monkeypatch):
    from carzero_fast.kernels.configs import use_library_gemm

    cpu16 = torch.zeros(2, 2, dtype=torch.bfloat16)
    for route, want in (("auto", False), ("triton", False), ("library", True)):
        monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", route)
        assert use_library_gemm(cpu16) is want  # auto: the library on CUDA only
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", "cublas")
    with pytest.raises(ValueError, match="CARZERO_FAST_TRITON_GEMM='cublas'"):
        linear(*_linear_inputs(torch.float32, 4, 8, 8))


TABLES = [(90, 9), (100, 9), (103, 9), (110, 9), (80, 8), (86, 8), (89, 8), (120, 8), (121, 8),
          (75, 8)]  # fmt: skip


@pytest.mark.parametrize(("arch", "table"), TABLES)
def test_each_compute_capability_runs_the_table_that_fits_it(monkeypatch, arch, table):
    """Hopper's tiles (and TMA) on sm_90 and the datacenter Blackwells; Ampere's, which fit
    99 KB of shared memory, on Ampere, Ada and the consumer Blackwells (sm_120 major 12 once
    read as "1x" and ran Hopper's tables). The device is faked: only its capability is read."""
    from carzero_fast.kernels import configs as kc

    assert kc.table_arch(arch) == table
    assert kc.uses_tma(arch) is (table == 9)
    monkeypatch.setattr(kc, "_capability", lambda index: arch)
    gpu = torch.device("cuda", 0)
    assert kc.arch_of(gpu) == arch
    for kind, dtype in (("half", torch.bfloat16), ("ieee", torch.float32)):
        assert linear_config(gpu, dtype) == kc._LINEAR[(table, kind)]
        assert attention_config(gpu, dtype) == kc._ATTENTION[(table, kind)]
    # TF32 through the new switch, and back to its default ("none": inherit), not through
    # the legacy `allow_tf32`, whose reset to False pins "ieee" and so broke later tests'
    # use of the global `torch.backends.fp32_precision` (an xdist-order failure)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        keys = attention_config(gpu, torch.float32, dropout=True).block_p
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert keys == (16 if table == 8 else kc._ATTENTION[(9, "tf32")].block_p)


@pytest.mark.parametrize("switch", ["cuda_matmul", "global", "legacy", "matmul_precision"])
def test_tf32_follows_every_pytorch_switch(switch):  # noqa: ANN001
    """PyTorch >= 2.9 raises on reading the legacy `allow_tf32` once the new `fp32_precision`
    switches were used: fp32 launches crashed for users of the new API."""
    from carzero_fast.kernels import configs as kc

    matmul = torch.backends.cuda.matmul
    assert kc.dot_kind(torch.float32) == "ieee"  # PyTorch's default
    try:
        if switch == "cuda_matmul":
            matmul.fp32_precision = "tf32"
        elif switch == "global":
            torch.backends.fp32_precision = "tf32"
        elif switch == "legacy":
            matmul.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        assert kc.dot_kind(torch.float32) == "tf32"
        assert kc.dot_precision(torch.float32) == "tf32"
        assert kc.dot_kind(torch.bfloat16) == "half"
    finally:  # PyTorch's defaults, "none" (inherit) last: the legacy resets pin "ieee"
        if switch not in ("cuda_matmul", "global"):
            torch.set_float32_matmul_precision("highest")
        torch.backends.fp32_precision = matmul.fp32_precision = "none"
    assert kc.dot_kind(torch.float32) == "ieee"
    assert torch.get_float32_matmul_precision() == "highest"


def test_kernels_refuse_matrices_their_int32_offsets_cannot_reach():
    """Offsets are int32: a matrix whose last element lies 2**31 or more past its first would
    be read and written at wrapped addresses. Meta tensors: shapes without memory."""
    from carzero_fast.kernels.common import INDEX_LIMIT, check_matrices

    fits = torch.empty((2**16, 2**15), device="meta")  # exactly INDEX_LIMIT elements
    check_matrices("linear", a=fits, out=None)
    over = torch.empty((2**16 + 1, 2**15), device="meta")
    with pytest.raises(ValueError, match=r"linear: a of shape \(65537, 32768\).*int32"):
        check_matrices("linear", a=over)
    strided = torch.empty((2, 2**31), device="meta")[:, :8]  # 16 elements, 2**31 + 8 apart
    assert strided.numel() < INDEX_LIMIT
    with pytest.raises(ValueError, match="spans 2147483656 elements"):
        check_matrices("attention", q=strided)
    with pytest.raises(ValueError, match="must be 2-D"):
        check_matrices("attention", k=torch.empty((2, 3, 4), device="meta"))
    with pytest.raises(ValueError, match="unit stride"):
        check_matrices("attention", v=torch.empty((4, 3), device="meta").t())


def test_capabilities_are_not_majors():
    from carzero_fast.kernels import configs as kc

    assert kc.arch_of(torch.device("cpu")) == 90  # the interpreter runs Hopper's tables
    with pytest.raises(ValueError, match="compute capability such as 90"):
        kc.table_arch(9)


# ---------------------------------------------------------------------------- attention

# (D, heads, P): head_dim 16 and 48 (one 64-column slice, padded) at every key count; 96 (two
# slices, the second ragged) and 200 (four slices: 3 × 64 + 8) at one
ATTENTION_SHAPES = [(d, h, p) for d, h in [(64, 4), (96, 2)] for p in (1, 17, 97, 197)] + [
    (192, 2, 97),
    (200, 1, 97),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize(("d", "heads", "p"), ATTENTION_SHAPES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_pair", "shared"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_attention(dtype, d, heads, p, shared, masked):
    n_items = 3
    # shared: two query blocks, the second ragged; per pair: one ragged block
    n_queries = attention_config(CPU, dtype).block_m + 3 if shared else 5
    seed = d + p + 2 * shared + masked
    # K and V are column slices of a wider per-item buffer (as the backend's all-layer K/V);
    # its other columns are NaN, so reading outside the head's columns would show
    kv = torch.full((n_items * p, 4 * d), NAN, dtype=dtype)
    kv[:, d : 2 * d] = _randn(n_items * p, d, dtype=dtype, seed=seed)
    kv[:, 3 * d : 4 * d] = _randn(n_items * p, d, dtype=dtype, seed=seed + 1)
    k, v = kv[:, d : 2 * d], kv[:, 3 * d : 4 * d]
    # sharper softmax than unit-variance scores
    q = _randn(n_queries if shared else n_items * n_queries, d, dtype=dtype, seed=seed + 2)
    q = q * 2.0
    mask = None
    if masked:
        # ragged lengths (≥ 1 visible key): all, one, two thirds of the keys; rows 1… of a
        # longer mask, as the backend's item blocks slice it
        lengths = torch.tensor([1, p, 1, (2 * p + 1) // 3, p])
        mask = (torch.arange(p)[None, :] >= lengths[:, None]).to(torch.int8)[1 : 1 + n_items]
    out = torch.full((n_items * n_queries, d), NAN, dtype=dtype)
    kw = dict(shared_queries=shared, mask=mask)
    got = attention(q, k, v, heads, n_items, n_queries, out=out, **kw)
    assert got.data_ptr() == out.data_ptr()
    ref = attention_torch(q, k, v, heads, n_items, n_queries, **kw)
    exact = attention_torch(*_double((q, k, v)), heads, n_items, n_queries, **kw)
    _check(out, ref, exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("rescale_log2", [0.0, 3.0, 8.0])
def test_attention_rescaling_as_row_maxima_grow(dtype, rescale_log2):
    """Scores rise along the keys, at a different rate per query, so that from one key block
    to the next some rows' maxima grow by less than the rescale threshold (the stale max
    stays their reference), some by more (the accumulators are rescaled), some not at all.
    The second item hides its first 40 keys: rows that see only masked scores in a whole key
    block keep the initial max until a later block."""
    import carzero_fast.kernels.configs as kc

    d, heads, p, n_items, n_queries = 64, 2, 97, 2, 6
    shipped = attention_config(CPU, dtype)
    assert shipped.block_p < p  # several key blocks
    u = torch.nn.functional.normalize(_randn(1, d, seed=1), dim=1)
    ramp = 0.4 * torch.arange(n_items * p, dtype=torch.float64).remainder(p)[:, None]
    k = (ramp * u + 0.3 * _randn(n_items * p, d, seed=2)).to(dtype)
    v = _randn(n_items * p, d, dtype=dtype, seed=3)
    # per query, its rise per key: falling, flat, slow (≈ 1 log2 unit a block), fast (> 8)
    alpha = torch.tensor([-3.0, 0.0, 0.3, 1.0, 3.0, 8.0], dtype=torch.float64)
    q = alpha.repeat(n_items)[:, None] * u + 0.3 * _randn(n_items * n_queries, d, seed=4)
    q = q.to(dtype)
    mask = torch.zeros((n_items, p), dtype=torch.int8)
    mask[1, :40] = 1
    previous = kc.override("attention", 90, kc.dot_kind(dtype),
                           shipped._replace(rescale_log2=rescale_log2))  # fmt: skip
    try:
        out = attention(q, k, v, heads, n_items, n_queries, mask=mask)
    finally:
        kc.override("attention", 90, kc.dot_kind(dtype), previous)
    ref = attention_torch(q, k, v, heads, n_items, n_queries, mask=mask)
    exact = attention_torch(*_double((q, k, v)), heads, n_items, n_queries, mask=mask)
    _check(out, ref, exact, dtype)


def test_attention_allocates_its_output():
    q, kv = _randn(6, 64, seed=1), _randn(2 * 9, 128, seed=2)
    out = attention(q, kv[:, :64], kv[:, 64:], 4, 2, 3)
    assert out.shape == (6, 64) and out.dtype == torch.float32
    assert rel_err(out, attention_torch(q, kv[:, :64], kv[:, 64:], 4, 2, 3)) < 1e-5


def _bad_launches():
    """(what is wrong, the call): each public launcher given one malformed argument."""
    from carzero_fast.kernels import attention_backward, layer_norm_backward

    a, w, bias = _linear_inputs(torch.float32, 8, 64, 16)
    q, kv = _randn(6, 32, seed=1), _randn(2 * 5, 64, seed=2)
    k, v = kv[:, :32], kv[:, 32:]
    strided_out = torch.empty(6, 64)[:, ::2]  # (6, 32) with column stride 2
    mask = torch.zeros(2, 5, dtype=torch.int8)
    lse, dout = torch.empty(6, 2), _randn(6, 32, seed=3)
    x, wn = _randn(9, 32, seed=4), _randn(32, seed=5)
    # case: (what the message must say, the call)
    return {
        "linear: w of another K": ("w (16, 32) and bias (16,) do not fit",
                                   lambda: linear(a, _randn(16, 32, seed=6), bias)),
        "linear: bias of another width": ("bias (15,) do not fit",
                                          lambda: linear(a, w, bias[:15])),
        "linear: out of another shape": ("out must be (8, 16), got (8, 15)",
                                         lambda: linear(a, w, bias, out=torch.empty(8, 15))),
        "linear: transposed a": ("a needs unit stride along its rows",
                                 lambda: linear(_randn(64, 8, seed=7).t(), w, bias)),
        "attention: strided out": ("out needs unit stride along its rows",
                                   lambda: attention(q, k, v, 2, 2, 3, out=strided_out)),
        "attention: bf16 lse": ("lse must be fp32 (6, 2), got torch.bfloat16",
                                lambda: attention(q, k, v, 2, 2, 3, lse=lse.bfloat16())),
        "attention: bool mask": ("mask must be int8 (2, 5) (1 = ignore), got torch.bool",
                                 lambda: attention(q, k, v, 2, 2, 3, mask=mask.bool())),
        "attention: mask rows strided": ("mask needs unit stride along its rows", lambda: attention(
            q, k, v, 2, 2, 3, mask=torch.zeros(5, 2, dtype=torch.int8).t())),
        "attention: mask of other keys": ("got torch.int8 (2, 4)",
                                          lambda: attention(q, k, v, 2, 2, 3, mask=mask[:, :4])),
        "attention: q rows": ("q must have 6 rows", lambda: attention(q[:5], k, v, 2, 2, 3)),
        "attention: heads": ("D = 32 does not split into 3 heads",
                             lambda: attention(q, k, v, 3, 2, 3)),
        "attention_backward: strided dout": ("dout needs unit stride", lambda: attention_backward(
            q, k, v, q, torch.empty(6, 64)[:, ::2], lse, 2, 2, 3)),
        "attention_backward: lse shape": ("lse must be fp32 (6, 2), got torch.float32 (5, 2)",
                                          lambda: attention_backward(q, k, v, q, dout, lse[:5],
                                                                     2, 2, 3)),
        "attention_backward: dk shape": ("dk and dv must be fp32 (10, 32)", lambda: (
            attention_backward(q, k, v, q, dout, lse, 2, 2, 3, dk=torch.zeros(9, 32),
                               dv=torch.zeros(9, 32)))),
        "layer_norm_backward: strided dy": ("dy needs unit stride", lambda: layer_norm_backward(
            x, wn, _randn(32, 9, seed=8).t(), EPS)),
        "layer_norm_backward: dy shape": ("dy must be (9, 32) like x, got (8, 32)",
                                          lambda: layer_norm_backward(x, wn, x[:8], EPS)),
        "add_layer_norm: delta shape": ("delta must be (9, 32) like y, got (8, 32)",
                                        lambda: add_layer_norm(x, wn, wn, EPS,
                                                               torch.empty(9, 32), delta=x[:8])),
        "add_layer_norm: x rows": ("x must be (rows dividing 9, 32), got (4, 32)",
                                   lambda: add_layer_norm(x[:4], wn, wn, EPS, torch.empty(9, 32))),
        "add_layer_norm: weight width": ("weight and bias must be (32,), got (31,)",
                                         lambda: add_layer_norm(x, wn[:31], wn, EPS,
                                                                torch.empty(9, 32))),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_launches()))
def test_launchers_reject_malformed_arguments(case):
    """The public launchers name a bad shape, stride or dtype: before these checks most of
    these calls ran and returned wrong numbers."""
    expected, call = _bad_launches()[case]
    launcher = case.split(":")[0]
    with pytest.raises(ValueError, match=re.escape(f"{launcher}: ") + ".*" + re.escape(expected)):
        call()


def test_kernels_refuse_float64():
    """tl.dot of float64 blocks would not accumulate in fp32 (garbage under the interpreter,
    a compile error on a GPU): the kernels' configuration lookup names the dtype."""
    a, w, bias = _linear_inputs(torch.float32, 8, 16, 16)
    with pytest.raises(TypeError, match="float64"):
        linear(a.double(), w.double(), bias.double())
