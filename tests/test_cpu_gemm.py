"""The chunked backend's products: oneDNN / PyTorch routes agree, and the linear layer's
backward (including its in-place accumulation into gradient buffers) is exact."""

import pytest
import torch
from conftest import make_aligner, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

import carzero_fast as cf
from carzero_fast.backends import cpu_gemm
from carzero_fast.backends.cpu_gemm import linear, mm_t, onednn_enabled


@pytest.fixture(params=["onednn", "pytorch", "library"])
def route(request, monkeypatch):
    """Run a test through oneDNN (every product, however small), through PyTorch's GEMM, and
    through the route other devices take (PyTorch's ops and autograd, no `_Linear`)."""
    if request.param == "onednn":
        monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", _onednn())
        monkeypatch.setattr(cpu_gemm, "_ONEDNN_MIN_MACS", 0)
    else:
        monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", None)
    if request.param == "library":
        monkeypatch.setattr(cpu_gemm, "python_backward", lambda x: False)
    return request.param


def _onednn():
    """oneDNN's linear, also where `auto` does not select it (AVX2-only CPUs)."""
    op = cpu_gemm._probe_onednn()
    if op is None:
        pytest.skip("this PyTorch build has no oneDNN linear")
    return op


def _spy(monkeypatch) -> list:
    """Route the products to oneDNN, counting its calls."""
    calls, real = [], _onednn()
    monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", lambda *a: calls.append(1) or real(*a))
    return calls


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed_w", "strided_x", "sliced_w"])
def test_mm_t_matches_addmm(layout, route):
    x, w, b = _rand(37, 96, seed=1), _rand(53, 96, seed=2), _rand(53, seed=3)
    if layout == "transposed_w":
        w = w.t().contiguous().t()  # [53, 96] with column-major strides
    elif layout == "strided_x":
        x = _rand(37, 3 * 96, seed=4)[:, 96:192]  # a column slice: row stride 3·96
    elif layout == "sliced_w":
        w = _rand(3 * 53, 96, seed=5)[53:106]  # a row slice with a storage offset
    want = torch.addmm(b, x, w.t())
    torch.testing.assert_close(mm_t(x, w, b), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mm_t(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    scaled = torch.addmm(b, x, w.t(), beta=0.5, alpha=1.25)
    torch.testing.assert_close(mm_t(x, w, b, 1.25, 0.5), scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mm_t(x, w, b, 1.0, 0.5), torch.addmm(b, x, w.t(), beta=0.5),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(mm_t(x, w, None, 1.25), 1.25 * (x @ w.t()), rtol=1e-5, atol=1e-5)


def test_onednn_route_is_taken_for_large_fp32_cpu_products_only(monkeypatch, products16):
    """(16-bit products go there too when they are computed in fp32.)"""
    calls = _spy(monkeypatch)
    big_x, big_w = _rand(128, 128, seed=6), _rand(128, 128, seed=7)  # 2^21 multiply-adds
    mm_t(big_x, big_w)
    assert len(calls) == 1
    mm_t(big_x[:100], big_w)  # below the threshold: PyTorch's GEMM
    mm_t(big_x.double(), big_w.double())
    assert len(calls) == 1
    mm_t(big_x.bfloat16(), big_w.bfloat16())
    assert len(calls) == (2 if products16 == "fp32" else 1)
    assert onednn_enabled(big_x) and not onednn_enabled(big_x.double())
    # other dtypes go through PyTorch and stay exact
    xd, wd = _rand(5, 7, seed=6, dtype=torch.float64), _rand(4, 7, seed=7, dtype=torch.float64)
    assert torch.equal(mm_t(xd, wd), xd @ wd.t())


def _plain(x, w, b, alpha, beta, w_in_out):
    w_t = w.t() if w_in_out else w
    y = alpha * (x @ w_t.t())
    return y if b is None else y + beta * b


@pytest.mark.parametrize("w_in_out", [False, True])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (1.25, 0.5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward_and_backward_match_autograd(w_in_out, scales, with_bias, route):
    alpha, beta = scales
    x = _rand(3, 11, 24, seed=8, dtype=torch.float64).float().requires_grad_()
    w = _rand(*((24, 17) if w_in_out else (17, 24)), seed=9).requires_grad_()
    b = _rand(17, seed=10).requires_grad_() if with_bias else None
    g = _rand(3, 11, 17, seed=11)
    y = linear(x, w, b, alpha, beta, w_in_out)
    y.backward(g)
    got = [t.grad.clone() for t in (x, w, b) if t is not None]
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    b2 = None if b is None else b.detach().requires_grad_()
    want_y = _plain(x2, w2, b2, alpha, beta, w_in_out)
    want_y.backward(g)
    want = [t.grad for t in (x2, w2, b2) if t is not None]
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_in_out", [False, True])
def test_linear_adds_into_preset_gradient_buffers(w_in_out, route):
    """The backend's leaves carry gradient buffers (views of a weight's gradient): dW and db
    are added into them in place, over several backward passes, and nothing else changes."""
    w_oi = _rand(17, 24, seed=12)  # [out, in]
    w = (w_oi.t().contiguous() if w_in_out else w_oi).requires_grad_()
    b = _rand(17, seed=13).requires_grad_()
    w_grad, b_grad = torch.full_like(w, 0.5), torch.full_like(b, -1.0)
    w.grad, b.grad = w_grad, b_grad
    xs = [_rand(9, 24, seed=14 + i) for i in range(2)]
    gs = [_rand(9, 17, seed=20 + i) for i in range(2)]
    for x, g in zip(xs, gs, strict=True):
        linear(x, w, b, 2.0, 3.0, w_in_out).backward(g)
    assert w.grad is w_grad and b.grad is b_grad  # the same buffers, filled in place
    want_w = 0.5 + sum(2.0 * g.t() @ x for x, g in zip(xs, gs, strict=True))  # [out, in]
    want_b = -1.0 + sum(3.0 * g.sum(0) for g in gs)
    torch.testing.assert_close(w.grad.t() if w_in_out else w.grad, want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, want_b, rtol=1e-5, atol=1e-5)


def test_linear_output_allows_in_place_ops_under_autograd(route):
    x = _rand(4, 6, 8, seed=30).requires_grad_()
    w = _rand(5, 8, seed=31).requires_grad_()
    y = linear(x, w)
    y.relu_()  # the chunked stages apply ReLU in place on a GEMM's output
    y.sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.relu(x2 @ w2.t()).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_chunked_backend_at_carzero_dims_on_onednn_matches_the_reference(monkeypatch):
    """The chunked backend's products at D = 768 on oneDNN (whichever route `auto` takes
    here, the other parity tests at D = 768 run that one)."""
    al = cf.CrossAttentionAligner(cf.AlignerConfig()).eval()
    img, txt = _rand(3, 17, 768, seed=40), _rand(5, 768, seed=41)
    with torch.no_grad():
        want = al(img, txt, backend="reference")
        calls = _spy(monkeypatch)
        got = al(img, txt, backend="chunked")
    assert len(calls) > 0
    assert rel_err(got, want) < 1e-5


def test_route_selection_by_environment_variable(monkeypatch):
    assert cpu_gemm._select("torch") is None
    with pytest.raises(ValueError, match="CARZERO_FAST_CPU_GEMM='mkl'.*auto, onednn, torch"):
        cpu_gemm._select("mkl")
    if cpu_gemm._probe_onednn() is None:
        with pytest.raises(RuntimeError, match="no working oneDNN linear"):
            cpu_gemm._select("onednn")
    else:
        assert cpu_gemm._select("onednn") is not None
        # auto: oneDNN but on AVX2-only CPUs, where PyTorch's (MKL's) products were faster
        for capability, on in (("AVX512", True), ("AVX2", False), ("DEFAULT", True)):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            assert cpu_gemm.onednn_by_default() == on
            assert (cpu_gemm._select("auto") is not None) == on, capability
        monkeypatch.undo()
    monkeypatch.setattr(cpu_gemm, "_probe_onednn", lambda: None)  # a build without it
    assert cpu_gemm._select("auto") is None
    with pytest.raises(RuntimeError, match="no working oneDNN linear"):
        cpu_gemm._select("onednn")


def test_onednn_probe_draws_no_random_numbers():
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    cpu_gemm._probe_onednn()
    assert torch.equal(torch.rand(4), want)


def test_chunked_training_step_same_on_the_other_devices_route(monkeypatch):
    """A chunked training step (dropout on) with PyTorch's autograd for every linear layer,
    as on a GPU, gives the CPU route's loss and gradients. Weights of order one everywhere
    (norms and biases too): under the default initialisation most gradients sit below any
    absolute tolerance, and a 5% error in one of them passed."""
    cfg = cf.AlignerConfig(d_model=32, n_heads=4, d_ffn=48, n_layers=2, head_dims=(24, 16),
                           dropout=0.1)  # fmt: skip
    al = make_aligner(cfg, seed=0)
    img, txt = _rand(6, 9, 32, seed=50), _rand(6, 7, 32, seed=51)

    def step() -> list[torch.Tensor]:
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        al.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        i2t, t2i = al.both_directions(a, b, backend="chunked", chunk_budget_bytes=20_000)
        loss = cf.carzero_loss(i2t, t2i)
        loss.backward()
        return [loss.detach(), a.grad, b.grad, *(p.grad for p in al.parameters())]

    al.train()
    want = step()
    monkeypatch.setattr(cpu_gemm, "python_backward", lambda x: False)
    got = step()
    names = ["loss", "img", "txt", *(n for n, _ in al.named_parameters())]
    logit_bias = names[-1]  # its gradient is exactly zero under a softmax loss: rounding only
    for name, a, e in zip(names, got, want, strict=True):
        assert rel_err(a, e, floor=1e-3 if name == logit_bias else 0.0) < 1e-5, name


# -- 16-bit products on CPUs without native 16-bit GEMMs ------------------------------------

aten = torch.ops.aten
PRODUCTS = (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_)


class ProductDtypes(TorchDispatchMode):
    """The operand dtypes of every matrix product dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket in PRODUCTS:
            self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        elif func.overloadpacket in (aten.matmul, aten.linear, aten.mv, aten.dot):
            raise AssertionError(f"uncounted product {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_round_once(dtype, products16):
    """Each product wrapper in both routes: the 16-bit result of the exact product (within
    one rounding plus fp32 summation), in the operands' dtype, on the route's operands."""
    a, b = _rand(37, 96, seed=60, dtype=dtype), _rand(96, 53, seed=61, dtype=dtype)
    a3, b3 = _rand(3, 37, 96, seed=62, dtype=dtype), _rand(3, 96, 29, seed=63, dtype=dtype)
    c, bias = _rand(37, 53, seed=64, dtype=dtype), _rand(53, seed=65, dtype=dtype)
    f64 = torch.float64
    cases = {
        "mm": (lambda: cpu_gemm.mm(a, b), a.to(f64) @ b.to(f64)),
        "mm out": (lambda: cpu_gemm.mm(a, b, out=torch.empty(37, 53, dtype=dtype)),
                   a.to(f64) @ b.to(f64)),
        "bmm": (lambda: cpu_gemm.bmm(a3, b3), a3.to(f64) @ b3.to(f64)),
        "matmul": (lambda: cpu_gemm.matmul(a3[None], b3[None]), a3.to(f64) @ b3.to(f64)),
        "addmm_": (lambda: cpu_gemm.addmm_(c.clone(), a, b, alpha=0.5),
                   c.to(f64) + 0.5 * a.to(f64) @ b.to(f64)),
        "mm_t": (lambda: mm_t(a, b.t(), bias, 1.25, 0.5),
                 0.5 * bias.to(f64) + 1.25 * a.to(f64) @ b.to(f64)),
    }  # fmt: skip
    unit = torch.finfo(dtype).eps  # one rounding: half of it, relative
    for name, (run, exact) in cases.items():
        with ProductDtypes() as seen:
            got = run()
        assert got.dtype == dtype, name
        assert seen.dtypes == ({torch.float32} if products16 == "fp32" else {dtype}), name
        assert rel_err(got.to(f64).reshape(exact.shape), exact) < unit, name


def test_chunked_16bit_step_runs_every_product_in_fp32_where_asked(products16):
    """A bf16 chunked training step (both forms, dropout on): with the fp32 route no matrix
    product sees a 16-bit operand (SDPA, a fused op, keeps its own); the plan then counts
    4 bytes an element (the fp32 operand copies)."""
    from carzero_fast.backends.chunked import chunked_both_directions

    cfg = cf.AlignerConfig(d_model=32, n_heads=4, d_ffn=48, n_layers=2, head_dims=(24, 16),
                           dropout=0.1)  # fmt: skip
    al = make_aligner(cfg, seed=3, dtype=torch.bfloat16).train()
    img = _rand(5, 9, 32, seed=66, dtype=torch.bfloat16).requires_grad_(True)
    txt = _rand(5, 7, 32, seed=67, dtype=torch.bfloat16).requires_grad_(True)
    for form in ("kv", "folded"):
        with ProductDtypes() as seen:
            i2t, t2i = chunked_both_directions(al.weights(), cfg, img, txt, None, None, True,
                                               40_000, form)  # fmt: skip
            cf.carzero_loss(i2t.float(), t2i.float()).backward()
        assert i2t.dtype == torch.bfloat16 and img.grad.dtype == torch.bfloat16
        want = {torch.float32} if products16 == "fp32" else {torch.bfloat16, torch.float32}
        assert seen.dtypes <= want and torch.bfloat16 not in seen.dtypes - want, form
        if products16 == "native":
            assert torch.bfloat16 in seen.dtypes, form
    import carzero_fast.backends.chunked as chunked

    job = chunked._make_job(cfg, (img, txt), 0, 1, None, True, 40_000, "kv", True)
    plans = [chunked.plan_chunks(cfg, 5, 5, 9, size, 40_000, True, False) for size in (4, 2)]
    assert plans[0] != plans[1]  # (several chunks either way)
    assert job.plan == plans[0 if products16 == "fp32" else 1]


def test_16bit_route_selection_by_environment_variable(monkeypatch):
    wide = {torch.bfloat16, torch.float16}
    assert cpu_gemm._select16("native") == frozenset()
    assert cpu_gemm._select16("fp32") == wide
    with pytest.raises(ValueError, match="CARZERO_FAST_CPU_GEMM16='bf16'.*auto, fp32, native"):
        cpu_gemm._select16("bf16")
    monkeypatch.setattr(cpu_gemm, "has_native_cpu_products", lambda dtype: dtype == torch.bfloat16)
    assert cpu_gemm._select16("auto") == {torch.float16}  # an AVX-512 CPU without FP16
    monkeypatch.setattr(cpu_gemm, "has_native_cpu_products", lambda dtype: False)
    assert cpu_gemm._select16("auto") == wide
    x = torch.zeros(2, dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_gemm, "_FP32_PRODUCTS", frozenset(wide))
    assert cpu_gemm.fp32_products(x) and not cpu_gemm.fp32_products(x.float())
    assert not cpu_gemm.fp32_products(x.to("meta"))  # CPU tensors only
