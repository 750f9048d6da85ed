"""The whole `triton` backend under Triton's CPU interpreter: golden vectors, the `reference`
oracle at small odd shapes with tiny chunk budgets, 16-bit error, routes, autograd and memory.
Where it runs and where it falls back: tests/test_triton_selection.py."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import weakref

# Before Triton's first import (see tests/test_kernels.py): its own jitted helpers are built
# at import time, in the mode the environment selects then.
_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import column_major, make_aligner, random_mask, rel_err  # noqa: E402

import carzero_fast as cf  # noqa: E402
from carzero_fast.backends.fused import (  # noqa: E402
    plan_fused,
    triton_forward,
)
from carzero_fast.backends.fused_chunk import chunk_buffers  # noqa: E402
from carzero_fast.backends.fused_train import plan_train  # noqa: E402
from carzero_fast.memory import track_memory  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_active():
    if _TRITON_PRELOADED:
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (see this module's top)")


# small configs covering the head's shapes: a normalised first layer then a fused last
# hidden layer; one hidden layer (LN0 prologue and logit in one kernel); a last hidden layer
# wider than HEAD_MAX_WIDTH (plain kernel + GEMV); three hidden layers, the second written
# where q and the attention's output were (the golden model's is wider than those: its own
# space). 96/2 gives a head_dim (48) that is padded.
CONFIGS = {
    "d96h2": cf.AlignerConfig(d_model=96, n_heads=2, n_layers=2, d_ffn=160, head_dims=(48, 24)),
    "d64h4_head1": cf.AlignerConfig(d_model=64, n_heads=4, n_layers=3, d_ffn=96, head_dims=(40,)),
    "d64h4_wide": cf.AlignerConfig(d_model=64, n_heads=4, n_layers=1, d_ffn=64, head_dims=(300,)),
    "d64h4_head3": cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96,
                                    head_dims=(80, 48, 24)),
}
N, M, P = 5, 7, 19


@pytest.fixture(scope="module", params=list(CONFIGS))
def small(request):
    return make_aligner(CONFIGS[request.param], seed=2)


def _inputs(d, n=N, m=M, p=P, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, p, d, generator=g).to(dtype),
        torch.randn(m, d, generator=g).to(dtype),
    )


def _budget(cfg, itemsize, want, n=N, m=M, p=P, stream_itemsize=None):
    """The smallest budget whose plan (items per block, queries per chunk) is `want`, for
    inputs of `itemsize` bytes and a stream of `stream_itemsize` (default: the inputs')."""
    b, stream = 1, itemsize if stream_itemsize is None else stream_itemsize
    while plan_fused(cfg, n, m, p, itemsize, b, stream) != want:
        b = int(b * 1.02) + 1
        assert b < 2**30, want
    return b


# ----------------------------------------------------------------------------- golden


def test_matches_golden(golden, golden_weights, triton_only):
    al = cf.CrossAttentionAligner.from_carzero_state_dict(golden_weights).eval()
    img, txt = golden["inputs.img_tokens"], golden["inputs.txt_tokens"]
    with torch.no_grad():
        i2t, t2i = cf.alignment_logits(al, img, txt, backend="triton")
        zs = cf.zero_shot_scores(al, img, txt, backend="triton")
    assert rel_err(i2t, golden["outputs.i2t"]) < 1e-5
    assert rel_err(t2i, golden["outputs.t2i"]) < 1e-5
    assert rel_err(zs, golden["outputs.zero_shot"]) < 1e-5


def test_matches_golden_with_residual_adds_in_the_gemms(golden, golden_weights, monkeypatch,
                                                       triton_only):  # fmt: skip
    """The golden model (two layers) with its plain GEMMs on PyTorch, as 16-bit CUDA calls run
    them: layer 2 adds its branches to the fp32 stream inside those GEMMs."""
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", "library")
    calls = _count_stream_gemms(monkeypatch)
    al = cf.CrossAttentionAligner.from_carzero_state_dict(golden_weights).eval()
    img, txt = golden["inputs.img_tokens"], golden["inputs.txt_tokens"]
    with torch.no_grad():
        i2t, t2i = cf.alignment_logits(al, img, txt, backend="triton")
    assert len(calls) == 2 * 2  # one chunk per direction: two adds in layer 2
    assert rel_err(i2t, golden["outputs.i2t"]) < 1e-5
    assert rel_err(t2i, golden["outputs.t2i"]) < 1e-5


# -------------------------------------------------------------------------- reference


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_fp32_matches_reference(small, masked, triton_only):
    cfg = small.config
    mem, q = _inputs(cfg.d_model, seed=1)
    mask = column_major(random_mask(N, P, seed=3)) if masked else None  # any strides
    # (1, 3): several item blocks and ragged query chunks; (2, M): item blocks of two (the
    # last one ragged) over all queries. (The planner fills the queries first, so one plan
    # cannot have both several items per block and several query chunks.)
    plans = [(1, 3), (2, M)]
    with torch.no_grad():
        ref = small(mem, q, mask, backend="reference")
        for plan in plans:
            budget = _budget(cfg, 4, plan)
            out = small(mem, q, mask, backend="triton", chunk_budget_bytes=budget)
            assert out.shape == (N, M) and out.dtype == torch.float32
            assert rel_err(out, ref) < 1e-5, plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_reads_nothing_uninitialised(request, dtype, triton_only):
    """Every buffer the forward allocates through torch.empty / empty_like / new_empty starts
    as NaN: a stage reading an element before writing it (a pool's reused space, a ragged
    last block, the lean layout's skipped streams) fails the comparison. Several item blocks
    and ragged query chunks, masks."""
    al = make_aligner(CONFIGS["d64h4_head3"], seed=6).to(dtype)
    mem, q = _inputs(64, seed=7, dtype=dtype)
    mask = random_mask(N, P, seed=8)
    budget = _budget(al.config, dtype.itemsize, (1, 3))
    with torch.no_grad():
        expected = al(mem, q, mask, backend="triton", chunk_budget_bytes=budget)
        request.getfixturevalue("nan_buffers")
        got = al(mem, q, mask, backend="triton", chunk_budget_bytes=budget)
    assert torch.equal(got, expected)


def test_layer_norm_eps_is_the_configs_on_every_backend():
    """Tokens of small spread make every LayerNorm sensitive to its eps: at a non-default eps
    the backends agree with the reference, which agrees with the module built from the same
    config (torch's nn.LayerNorm). The golden vectors cannot pin eps: at CARZero's 1e-5 and
    unit-variance tokens, doubling it moves the outputs by less than their tolerance."""
    cfg = dataclasses.replace(CONFIGS["d64h4_head1"], layer_norm_eps=1e-2)
    al = make_aligner(cfg, seed=2)
    mem, q = (0.05 * t for t in _inputs(64, seed=3))
    with torch.no_grad():
        ref = al(mem, q, backend="reference")
        wrong = make_aligner(dataclasses.replace(cfg, layer_norm_eps=2e-2), seed=2)(
            mem, q, backend="reference")  # fmt: skip
        assert rel_err(wrong, ref) > 1e-3  # the test can tell the two apart
        for backend in ("chunked", "triton"):
            assert rel_err(al(mem, q, backend=backend), ref) < 1e-5, backend
    assert cf.AlignerConfig().layer_norm_eps == 1e-5  # nn.TransformerDecoderLayer's, CARZero's


def test_fp32_with_library_gemms_matches_reference(monkeypatch, triton_only):
    """The plain-epilogue layers on PyTorch's GEMM (the route 16-bit CUDA calls take), the
    attention, LayerNorms, dropout-free head logit on the kernels: still the reference."""
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", "library")
    al = make_aligner(CONFIGS["d96h2"], seed=4)
    mem, q = _inputs(96, seed=1)
    mask = random_mask(N, P, seed=3)
    with torch.no_grad():
        ref = al(mem, q, mask, backend="reference")
        out = al(mem, q, mask, backend="triton", chunk_budget_bytes=_budget(al.config, 4, (2, M)))
    assert rel_err(out, ref) < 1e-5


def _count_stream_gemms(monkeypatch) -> list[int]:
    """Record the rows of every in-place `addmm_` (a residual add inside a GEMM)."""
    real, calls = torch.Tensor.addmm_, []

    def counted(self, *args, **kwargs):
        calls.append(self.shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_adds_in_the_gemms(dtype, monkeypatch):
    """With PyTorch's GEMMs and the stream in their dtype (fp32; a 16-bit stream), layers 2…
    add out_proj's and linear2's products to the stream inside the GEMM, without biases (the
    passes add them back): fp32 still the reference, bf16 within 2× chunked's error and not
    the passes' result; `CARZERO_FAST_TRITON_RESIDUAL=pass` adds in the passes, and another
    value is an error naming the variable."""
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", "library")
    if dtype != torch.float32:
        monkeypatch.setenv("CARZERO_FAST_TRITON_STREAM", "input")
    cfg = CONFIGS["d64h4_head1"]  # three layers: two of them add in their GEMMs
    al = make_aligner(cfg, seed=6)
    mem, q = _inputs(64, p=21, seed=2)
    mask = random_mask(N, 21, seed=4)
    budget = _budget(cfg, dtype.itemsize, (2, M), p=21)  # three item blocks
    calls = _count_stream_gemms(monkeypatch)
    with torch.no_grad():
        exact = al(mem, q, mask, backend="reference")
        mem_, q_ = mem.to(dtype), q.to(dtype)
        out = al(mem_, q_, mask, backend="triton", chunk_budget_bytes=budget)
        # two GEMMs in each of two layers, for every pair once
        assert len(calls) == 3 * 2 * 2 and sum(calls) == 2 * 2 * N * M
        calls.clear()
        monkeypatch.setenv("CARZERO_FAST_TRITON_RESIDUAL", "pass")
        passes = al(mem_, q_, mask, backend="triton", chunk_budget_bytes=budget)
        assert calls == []
        if dtype == torch.float32:
            assert rel_err(out, exact) < 1e-5 and rel_err(passes, exact) < 1e-5
            # ragged query chunks (the stream a prefix of its buffer), and SDPA's attention
            monkeypatch.setenv("CARZERO_FAST_TRITON_RESIDUAL", "gemm")
            calls.clear()
            ragged = al(mem, q, mask, backend="triton",
                        chunk_budget_bytes=_budget(cfg, 4, (1, 3), p=21))  # fmt: skip
            assert sum(calls) == 2 * 2 * N * M and rel_err(ragged, exact) < 1e-5
            monkeypatch.setenv("CARZERO_FAST_TRITON_ATTENTION", "library")
            sdpa = al(mem, q, mask, backend="triton", chunk_budget_bytes=budget)
            assert rel_err(sdpa, exact) < 1e-5
        else:
            chunked = al(mem_, q_, mask, backend="chunked")
            assert rel_err(out, exact) <= 2 * rel_err(chunked, exact)
            assert not torch.equal(out, passes)
        monkeypatch.setenv("CARZERO_FAST_TRITON_RESIDUAL", "cublas")
        with pytest.raises(ValueError, match="CARZERO_FAST_TRITON_RESIDUAL"):
            al(mem_, q_, mask, backend="triton")


def test_both_directions_match_reference(triton_only):
    al = make_aligner(CONFIGS["d96h2"], seed=4)
    img, txt = _inputs(96, n=3, p=11, seed=5)[0], _inputs(96, n=5, p=7, seed=6)[0]
    img_mask, txt_mask = random_mask(3, 11, seed=7), random_mask(5, 7, seed=8)
    with torch.no_grad():
        got = cf.alignment_logits(al, img, txt, img_mask, txt_mask, backend="triton")
        ref = cf.alignment_logits(al, img, txt, img_mask, txt_mask, backend="reference")
    assert got[0].shape == (3, 5) and got[1].shape == (5, 3)
    assert rel_err(got[0], ref[0]) < 1e-5
    assert rel_err(got[1], ref[1]) < 1e-5


@pytest.mark.parametrize("route", ["auto", "library"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_no_worse_than_chunked(dtype, route, monkeypatch):
    """Relative RMS error against the fp32 reference, judged by the chunked backend's error
    in the same dtype (×2); "library" is the CUDA default for 16-bit (PyTorch's GEMM for the
    plain-epilogue layers), forced here on CPU."""
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", route)
    al = make_aligner(CONFIGS["d96h2"], seed=5)
    mem, q = _inputs(96, p=33, seed=9)
    mask = random_mask(N, 33, seed=10)
    with torch.no_grad():
        exact = al(mem, q, mask, backend="reference")
        mem_, q_ = mem.to(dtype), q.to(dtype)
        chunked = al(mem_, q_, mask, backend="chunked")
        out = al(mem_, q_, mask, backend="triton", chunk_budget_bytes=_budget(al.config, 2, (1, 3)))
    assert out.dtype == dtype and out.shape == (N, M)
    assert rel_err(out, exact) <= 2 * rel_err(chunked, exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_both_residual_streams_no_worse_than_chunked(dtype):
    """`stream_dtype` = the inputs' dtype (the stream rounded at every add, as a plain 16-bit
    PyTorch forward does; the default of no-grad calls) and fp32 (16-bit inputs round only
    GEMM operands): each within 2× the chunked backend's relative RMS error in that dtype,
    and different results (the option takes effect)."""
    al = make_aligner(CONFIGS["d96h2"], seed=5)
    mem, q = _inputs(96, p=33, seed=9)
    mask = random_mask(N, 33, seed=10)
    budget = _budget(al.config, 2, (1, 3), p=33)
    w = al.weights().to(dtype)
    mem_, q_ = mem.to(dtype), q.to(dtype)
    with torch.no_grad():
        exact = al(mem, q, mask, backend="reference")
        chunked = al(mem_, q_, mask, backend="chunked")
        wide = triton_forward(w, al.config, mem_, q_, mask, budget, stream_dtype=torch.float32)
        out = triton_forward(w, al.config, mem_, q_, mask, budget, stream_dtype=dtype)
    assert out.dtype == dtype and out.shape == (N, M)
    assert rel_err(out, exact) <= 2 * rel_err(chunked, exact)
    assert rel_err(wide, exact) <= 2 * rel_err(chunked, exact)
    assert not torch.equal(out, wide)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(TypeError, match="stream_dtype"):
        triton_forward(w, al.config, mem_, q_, mask, budget, stream_dtype=other)


def test_stream_environment_variable_selects_the_inference_stream(monkeypatch, triton_only):
    """The backend's no-grad calls keep the stream in the inputs' dtype (bit for bit
    `stream_dtype=` that dtype), CARZERO_FAST_TRITON_STREAM=fp32 in fp32; training keeps fp32
    (same logits and gradients either way); another value is an error naming the variable."""
    al = make_aligner(CONFIGS["d64h4_head1"], seed=3)
    mem, q = _inputs(64, p=9, seed=4)
    mem16, q16 = mem.bfloat16(), q.bfloat16()
    al16 = make_aligner(CONFIGS["d64h4_head1"], seed=3).bfloat16()
    w = al16.weights()
    budget = 1  # training chunks of 2 items × all queries: pairs outside the kept chunk
    while plan_train(al.config, N, M, 9, 2, budget) != (2, M):
        budget = int(budget * 1.02) + 1

    def train_step() -> list[torch.Tensor]:
        a, b = mem16.clone().requires_grad_(), q16.clone().requires_grad_()
        al16.zero_grad(set_to_none=True)
        out = al16(a, b, backend="triton", chunk_budget_bytes=budget)
        out.float().square().sum().backward()
        return [out.detach(), a.grad, b.grad, *(p.grad for p in al16.parameters())]

    with torch.no_grad():
        got = al16(mem16, q16, backend="triton")
        narrow = triton_forward(w, al.config, mem16, q16, None, stream_dtype=torch.bfloat16)
        wide = triton_forward(w, al.config, mem16, q16, None, stream_dtype=torch.float32)
    assert torch.equal(got, narrow) and not torch.equal(got, wide)
    trained = train_step()
    monkeypatch.setenv("CARZERO_FAST_TRITON_STREAM", "fp32")
    with torch.no_grad():
        got = al16(mem16, q16, backend="triton")
    assert torch.equal(got, wide)
    for a, e in zip(train_step(), trained, strict=True):
        assert torch.equal(a, e)
    monkeypatch.setenv("CARZERO_FAST_TRITON_STREAM", "bf16")
    with torch.no_grad(), pytest.raises(ValueError, match="CARZERO_FAST_TRITON_STREAM"):
        al16(mem16, q16, backend="triton")


def _layer_buffers(cfg, rows, dtype, lean):
    """One chunk's layer buffers as the forward (`lean`: shared, no x_mid, no last stream)
    or as training (`fused_train`'s: one set per layer, every stream stored) lays them out,
    NaN-filled."""
    bufs, _ = chunk_buffers(cfg, rows, dtype, torch.device("cpu"))
    for t in {id(t): t for b in bufs for t in b if t is not None}.values():
        t.fill_(float("nan"))
    if not lean:
        return bufs
    b = bufs[-1]._replace(lse=None, x_mid=None)
    b = b._replace(branch=b.q, ffn_branch=b.o)
    return [b] * (cfg.n_layers - 1) + [b._replace(x_out=None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_without_backward_stores_less_for_the_same_rows(dtype, triton_only):
    """The forward's buffers skip the stream after each attention add (the FFN's pass adds
    both branches again) and the last layer's stream: the decoder_norm'ed rows are the
    training layout's (every stream stored) bit for bit, in every dtype (fp32 stream)."""
    from carzero_fast.backends.fused import call_plan, item_stage, pair_layers, query_stage
    from carzero_fast.kernels import linear

    cfg = CONFIGS["d64h4_head1"]
    al = make_aligner(cfg, seed=3).to(dtype)
    w, (mem, q) = al.weights(), _inputs(64, seed=4, dtype=dtype)
    mask = random_mask(N, P, seed=5).to(torch.int8)
    rows = {}
    with torch.no_grad():
        cp = call_plan(w, cfg, *query_stage(w, cfg, q))
        y_mem = torch.empty((N * P, 64), dtype=dtype)
        kv = torch.empty((N * P, 2 * cfg.n_layers * 64), dtype=dtype)
        item_stage(linear, w, cfg, cp, mem.reshape(N * P, 64), y_mem, kv)
        for lean in (False, True):
            bufs = _layer_buffers(cfg, N * M, dtype, lean)
            rows[lean] = pair_layers(linear, w, cfg, cp, kv, mask, N, slice(0, M), bufs).clone()
    assert not rows[True].isnan().any()
    assert torch.equal(rows[True], rows[False])


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_library_attention_route(masked, monkeypatch):
    """CARZERO_FAST_TRITON_ATTENTION=library: the forward's attention on PyTorch's SDPA over
    the same strided K/V (layer 1's shared queries broadcast): the reference in fp32, within
    2× chunked's error in bf16; training keeps the kernel (its backward needs the
    log-sum-exp) and another value is an error naming the variable."""
    module = importlib.import_module("carzero_fast.kernels.attention")
    real, calls, outputs = module.attention_torch, [], []

    def counted(*args, **kwargs):
        calls.append(kwargs["shared_queries"])
        # a layer's SDPA output is dead once its out_proj ran (no TMA descriptor cached for
        # the call may hold it): at most the previous layer's is still referenced
        assert sum(o() is not None for o in outputs) <= 1
        out = real(*args, **kwargs)
        outputs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(module, "attention_torch", counted)
    monkeypatch.setenv("CARZERO_FAST_TRITON_ATTENTION", "library")
    al = make_aligner(CONFIGS["d96h2"], seed=5)
    mem, q = _inputs(96, p=33, seed=9)
    mask = random_mask(N, 33, seed=10) if masked else None
    budget = _budget(al.config, 4, (2, M), p=33)
    with torch.no_grad():
        exact = al(mem, q, mask, backend="reference")
        out = al(mem, q, mask, backend="triton", chunk_budget_bytes=budget)
        assert rel_err(out, exact) < 1e-5
        # 3 item blocks × 2 layers, layer 1's queries shared by the items
        assert calls == [True, False] * 3
        mem16, q16 = mem.bfloat16(), q.bfloat16()
        chunked = al(mem16, q16, mask, backend="chunked")
        out16 = al(mem16, q16, mask, backend="triton", chunk_budget_bytes=budget // 2)
    assert rel_err(out16, exact) <= 2 * rel_err(chunked, exact)
    if not masked:
        return  # training once, below
    calls.clear()
    mem_ = mem[:2].clone().requires_grad_()
    # one item per chunk: the forward runs the first item's chunk without keeping it
    assert plan_train(al.config, 2, M, 33, 4, budget // 8)[0] == 1
    out = al.eval()(mem_, q, mask[:2], backend="triton", chunk_budget_bytes=budget // 8)
    out.sum().backward()
    assert calls == [] and rel_err(out, exact[:2]) < 1e-5 and mem_.grad is not None
    monkeypatch.setenv("CARZERO_FAST_TRITON_ATTENTION", "sdpa")
    with torch.no_grad(), pytest.raises(ValueError, match="CARZERO_FAST_TRITON_ATTENTION"):
        al(mem, q, backend="triton")


@pytest.mark.parametrize(("n", "m"), [(0, 3), (3, 0), (0, 0)])
def test_empty_batches_give_empty_results(n, m, triton_only):
    al = make_aligner(CONFIGS["d64h4_head1"])
    mem, q = _inputs(64, n=n, m=m, p=9)
    with torch.no_grad():
        out = al(mem, q, backend="triton")
    assert out.shape == (n, m)


# ---------------------------------------------------------------------------- autograd


def _grads(al, backend, mem, q, mask, seed=0):
    mem_, q_ = mem.clone().requires_grad_(True), q.clone().requires_grad_(True)
    al.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs (training mode)
    out = al(mem_, q_, mask, backend=backend)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g_out).sum().backward()
    return [out, mem_.grad, q_.grad] + [p.grad for p in al.parameters()]


def test_gradients_match_chunked():
    """With gradients needed, "triton" runs its own training path: same outputs and gradients
    as the chunked backend (eval mode: the two draw dropout masks differently)."""
    al = make_aligner(CONFIGS["d96h2"]).eval()
    mem, q = _inputs(96, seed=11)
    mask = random_mask(N, P, seed=12)
    got = _grads(al, "triton", mem, q, mask)
    expected = _grads(al, "chunked", mem, q, mask)
    names = ["out", "memory", "queries"] + [n for n, _ in al.named_parameters()]
    for name, a, b in zip(names, got, expected, strict=True):
        assert a is not None and rel_err(a, b) < 1e-5, name
    assert got[0].requires_grad


# ------------------------------------------------------------------------------ memory


@pytest.mark.parametrize(("n", "m", "p"), [(8192, 14, 197), (8192, 14, 98), (8192, 1024, 197)])
def test_plans_stay_within_the_kernels_32_bit_indexing(n, m, p):
    """The kernels index with int32: at any budget (64 GiB here) no buffer a chunk or an item
    block hands them reaches 2^31 elements (a 6 GiB zero-shot budget did at CARZero dims:
    2270 images × 197 tokens × 6144 K/V columns), and the items fit CUDA's grid z axis."""
    from carzero_fast.backends.plan import INDEX_LIMIT, MAX_ITEMS, kv_width, widest_row

    cfg = cf.AlignerConfig()  # CARZero's dims
    for planner in (lambda b: plan_fused(cfg, n, m, p, 2, b, 4),
                    lambda b: plan_train(cfg, n, m, p, 2, b)):  # fmt: skip
        items, queries = planner(64 * 2**30)
        assert items * kv_width(cfg, p) <= INDEX_LIMIT < 2**31
        assert items * queries * widest_row(cfg) <= INDEX_LIMIT
        small_items, small_queries = planner(2**20)  # the budget still binds below it
        assert small_items * small_queries < items * queries
    tiny = cf.AlignerConfig(d_model=8, n_heads=2, n_layers=1, d_ffn=8, head_dims=(4,))
    assert plan_fused(tiny, 10**6, 1, 1, 2, 2**40)[0] == MAX_ITEMS


def test_memory_does_not_grow_with_pairs(triton_only):
    """At a fixed budget (the same plan at both sizes) the buffers are per chunk: from N = M = 8
    to N = M = 32 only the (N, M) scores and the per-query arrays (O(M·D)) grow, never
    O(N·M·D)."""
    cfg = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=1, d_ffn=64, head_dims=(40,))
    al = make_aligner(cfg)
    d, p = cfg.d_model, 5
    budget = _budget(cfg, 4, (1, 8), n=8, m=8, p=p)
    peaks = {}
    for nm in (8, 32):
        assert plan_fused(cfg, nm, nm, p, 4, budget) == (1, 8)
        mem, q = _inputs(d, n=nm, m=nm, p=p, seed=nm)
        with torch.no_grad(), track_memory() as tracker:
            out = al(mem, q, backend="triton", chunk_budget_bytes=budget)
        assert out.shape == (nm, nm)
        peaks[nm] = tracker.peak_bytes
    pair_state = 32 * 32 * d * 4  # one fp32 row of D per pair at N = M = 32
    assert peaks[32] - peaks[8] < pair_state / 8, peaks
