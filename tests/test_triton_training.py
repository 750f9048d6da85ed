"""Training on the `triton` backend under Triton's CPU interpreter: the golden gradients, the
`reference` oracle at odd shapes and several chunk plans, 16-bit error, determinism, frozen
parts, dropout against a same-mask PyTorch oracle, and memory that does not grow with
N·M·D."""

from __future__ import annotations

import dataclasses
import os
import sys

# Before Triton's first import (see tests/test_kernels.py).
_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (  # noqa: E402
    assert_directions_draw_independent_dropout,
    column_major,
    make_aligner,
    random_mask,
    rel_err,
)

import carzero_fast as cf  # noqa: E402
from carzero_fast.backends.fused import draw_dropout  # noqa: E402
from carzero_fast.backends.fused_reference import dropout_reference_forward  # noqa: E402
from carzero_fast.backends.fused_train import plan_train  # noqa: E402
from carzero_fast.backends.philox import DropoutSpec  # noqa: E402
from carzero_fast.memory import track_memory  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_active():
    if _TRITON_PRELOADED:
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (see this module's top)")


CONFIGS = {
    # head_dim 48 (padded tiles), two hidden head layers
    "d96h2": cf.AlignerConfig(d_model=96, n_heads=2, n_layers=2, d_ffn=160, head_dims=(48, 24)),
    # three layers, one hidden head layer
    "d64h4": cf.AlignerConfig(d_model=64, n_heads=4, n_layers=3, d_ffn=96, head_dims=(40,)),
}
N, M, PI, PT = 5, 7, 19, 11


def make_tokens(d, n=N, m=M, pi=PI, pt=PT, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, pi, d, generator=g), torch.randn(m, pt, d, generator=g)
    return img.to(dtype), txt.to(dtype)


def train_step(al, backend, img, txt, img_mask=None, txt_mask=None, budget=None, loss=False):
    """Both directions, a random linear functional of the logits (or CARZero's loss when
    square), backward → [objective, img grad, txt grad, every parameter's grad]."""
    al.zero_grad(set_to_none=True)
    a = img.clone().requires_grad_(True)
    b = txt.clone().requires_grad_(True)
    i2t, t2i = al.both_directions(a, b, img_mask, txt_mask, backend=backend,
                                  chunk_budget_bytes=budget)  # fmt: skip
    if loss:
        obj = cf.carzero_loss(i2t, t2i)
    else:
        g = torch.Generator().manual_seed(7)
        obj = (i2t.float() * torch.randn(i2t.shape, generator=g)).sum() + (
            t2i.float() * torch.randn(t2i.shape, generator=g)).sum()  # fmt: skip
    obj.backward()
    return [obj.detach(), a.grad, b.grad] + [p.grad for p in al.parameters()]


def grad_names(al):
    return ["objective", "img", "txt"] + [n for n, _ in al.named_parameters()]


# ----------------------------------------------------------------------------- golden


def test_loss_and_gradients_match_golden(golden, golden_weights, triton_only):
    al = cf.CrossAttentionAligner.from_carzero_state_dict(golden_weights).eval()
    img, txt = golden["inputs.img_tokens"], golden["inputs.txt_tokens"]
    got = train_step(al, "triton", img, txt, loss=True)
    assert rel_err(got[0].reshape(1), golden["outputs.loss"]) < 1e-5
    assert rel_err(got[1], golden["grads.img_tokens"]) < 1e-4
    assert rel_err(got[2], golden["grads.txt_tokens"]) < 1e-4
    for name, p in al.named_parameters():
        # floor: mlp_head.9.bias's gradient is analytically zero (see test_golden.py)
        assert rel_err(p.grad, golden[f"grads.weights.{name}"], floor=1e-3) < 1e-4, name


# -------------------------------------------------------------------------- reference


def budget_for(cfg, want, n=N, m=M, p=PI):
    """The smallest budget whose i2t plan (items per block, queries per chunk) is `want`."""
    b = 1
    while plan_train(cfg, n, m, p, 4, b) != want:
        b = int(b * 1.02) + 1
        assert b < 2**30, want
    return b


# (config, masked, i2t plan): item blocks of two (the last ragged) over all queries; one item
# with ragged query chunks; everything in one chunk
CASES = [("d96h2", True, (2, M)), ("d96h2", False, (1, 4)), ("d64h4", True, (1, 4)),
         ("d64h4", False, (N, M))]  # fmt: skip


@pytest.mark.parametrize(("name", "masked", "plan"), CASES, ids=[str(c) for c in CASES])
def test_fp32_gradients_match_reference(name, masked, plan, triton_only):
    al = make_aligner(CONFIGS[name], seed=3)
    cfg = al.config
    img, txt = make_tokens(cfg.d_model, seed=1)
    img_mask = random_mask(N, PI, seed=2) if masked else None
    txt_mask = column_major(random_mask(M, PT, seed=3)) if masked else None  # any strides
    expected = train_step(al, "reference", img, txt, img_mask, txt_mask)
    got = train_step(al, "triton", img, txt, img_mask, txt_mask, budget=budget_for(cfg, plan))
    for n, a, b in zip(grad_names(al), got, expected, strict=True):
        assert rel_err(a, b) < 2e-5, n


def test_no_uninitialised_reads(request, triton_only):
    """Every buffer the step allocates through torch.empty / empty_like / new_empty starts
    as NaN: a kernel or stage that reads an element before writing it, or an accumulator
    that is not cleared, fails the comparison. One item per block (each block reuses the
    buffers) and ragged query chunks, masks, train mode with dropout against the same-mask
    oracle."""
    al = make_aligner(CONFIGS["d96h2"], seed=3).train()
    img, txt = make_tokens(96, seed=1)
    mask = random_mask(N, PI, seed=2)
    q = txt[:, 0]
    g_out = torch.randn(N, M, generator=torch.Generator().manual_seed(4))

    def grads(fn):  # noqa: ANN001, ANN202
        al.zero_grad(set_to_none=True)
        a, b = img.clone().requires_grad_(True), q.clone().requires_grad_(True)
        torch.manual_seed(9)
        fn(a, b).backward(g_out)
        return [a.grad, b.grad] + [p.grad for p in al.parameters()]

    torch.manual_seed(9)
    spec = draw_dropout(al.config, True)
    expected = grads(lambda a, b: dropout_reference_forward(al.weights(), al.config, a, b, mask,
                                                            spec))  # fmt: skip
    request.getfixturevalue("nan_buffers")  # from here on (the oracle ran on plain buffers)
    budget = budget_for(al.config, (1, 4))
    got = grads(lambda a, b: al(a, b, mask, backend="triton", chunk_budget_bytes=budget))
    for n, a, b in zip(["img", "txt"] + [n for n, _ in al.named_parameters()], got, expected,
                       strict=True):  # fmt: skip
        assert rel_err(a, b) < 2e-5, n


@pytest.mark.parametrize(("n", "m", "pi", "pt"), [(1, 1, 1, 1), (3, 2, 1, 17)])
def test_odd_shapes(n, m, pi, pt, triton_only):
    al = make_aligner(CONFIGS["d64h4"], seed=4)
    img, txt = make_tokens(64, n, m, pi, pt, seed=5)
    expected = train_step(al, "reference", img, txt)
    got = train_step(al, "triton", img, txt)
    for name, a, b in zip(grad_names(al), got, expected, strict=True):
        # floor: with one token (P = 1) the queries do not matter, so the gradients of the
        # query path (LN2, Wq of layers > 1) are exactly zero and only rounding noise here
        assert rel_err(a, b, floor=1e-2) < 2e-5, name


def test_gradients_use_the_configs_layer_norm_eps(triton_only):
    """The backward's LayerNorms (the pair layers' and decoder_norm's recomputed in each
    chunk, LN0 of the memory tokens) take the config's eps, as the forward's do
    (test_triton_backend's eps test): at a non-default eps and tokens of small spread the
    gradients are the reference's, which another eps would not give."""
    cfg = dataclasses.replace(CONFIGS["d64h4"], n_layers=2, layer_norm_eps=1e-2)
    al = make_aligner(cfg, seed=3)
    img, txt = (0.05 * t for t in make_tokens(64, n=3, m=2, pi=5, pt=4, seed=1))
    expected = train_step(al, "reference", img, txt)
    other = make_aligner(dataclasses.replace(cfg, layer_norm_eps=2e-2), seed=3)
    wrong = train_step(other, "reference", img, txt)
    assert min(rel_err(a, b) for a, b in zip(wrong[1:3], expected[1:3], strict=True)) > 1e-3
    got = train_step(al, "triton", img, txt)
    for name, a, b in zip(grad_names(al), got, expected, strict=True):
        assert rel_err(a, b) < 2e-5, name


@pytest.mark.parametrize("route", ["auto", "library"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_pytorch(dtype, route, monkeypatch):
    """Relative RMS error against the fp32 reference, of each token gradient and of all
    parameter gradients together, within 2× PyTorch's own (the reference in that dtype).
    "library": PyTorch's GEMM for the plain-epilogue layers (the default for 16-bit on CUDA),
    forced here on CPU.

    Per parameter the 16-bit errors are dominated by ReLU units whose pre-activation lies
    within rounding of zero for one of the few pairs (any backend flips a different few), so
    the parameters are judged together.
    """
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", route)
    al32 = make_aligner(CONFIGS["d96h2"], seed=5)
    img, txt = make_tokens(96, n=8, m=8, seed=6)
    exact = train_step(al32, "reference", img, txt)
    al = make_aligner(CONFIGS["d96h2"], seed=5, dtype=dtype)
    got = train_step(al, "triton", img.to(dtype), txt.to(dtype))
    torch_err = train_step(al, "reference", img.to(dtype), txt.to(dtype))

    def errors(g):
        params = torch.cat([t.float().flatten() for t in g[3:]])
        exact_params = torch.cat([t.flatten() for t in exact[3:]])
        return [rel_err(g[1], exact[1]), rel_err(g[2], exact[2]), rel_err(params, exact_params)]

    for what, err, base in zip(["img", "txt", "params"], errors(got), errors(torch_err),
                               strict=True):  # fmt: skip
        assert err <= 2 * base, (what, err, base)


def test_autocast_runs_the_16_bit_path(triton_only):
    """Under torch.autocast (bf16) an fp32 model and fp32 tokens run the kernels' bf16 path
    (GEMM operands rounded, stream in fp32, as autocast does), with backward() inside or after
    the region: its error against fp32 within 2× that of reference under the same autocast."""
    al = make_aligner(CONFIGS["d64h4"], seed=5)
    img, txt = make_tokens(64, n=6, m=6, seed=8)

    def under_autocast(backend, backward_inside=False):
        al.zero_grad(set_to_none=True)
        a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            i2t, t2i = al.both_directions(a, b, backend=backend)
            loss = cf.carzero_loss(i2t, t2i)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads = [a.grad, b.grad, *(p.grad for p in al.parameters())]
        assert all(g.dtype == torch.float32 for g in grads)
        return i2t, torch.cat([g.flatten() for g in grads])

    al.zero_grad(set_to_none=True)
    a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    cf.carzero_loss(*al.both_directions(a, b, backend="reference")).backward()
    exact = torch.cat([g.flatten() for g in (a.grad, b.grad, *(p.grad for p in al.parameters()))])
    i2t, got = under_autocast("triton")
    assert i2t.dtype == torch.bfloat16
    _, inside = under_autocast("triton", backward_inside=True)
    assert torch.equal(got, inside)
    _, torch_err = under_autocast("reference")
    assert 0 < rel_err(got, exact) <= 2 * rel_err(torch_err, exact)


# ---------------------------------------------------------- determinism, frozen parts


def test_deterministic(triton_only):
    al = make_aligner(CONFIGS["d64h4"], seed=6)
    img, txt = make_tokens(64, n=3, m=4, seed=7)
    budget = budget_for(al.config, (2, 4), 3, 4)  # item blocks of 2 and 1
    first = train_step(al, "triton", img, txt, budget=budget)
    second = train_step(al, "triton", img, txt, budget=budget)
    for name, a, b in zip(grad_names(al), first, second, strict=True):
        assert torch.equal(a, b), name


def test_frozen_aligner_and_frozen_tokens(triton_only):
    """Only what needs a gradient gets one; the rest equals the full computation's."""
    al = make_aligner(CONFIGS["d64h4"], seed=8)
    img, txt = make_tokens(64, seed=9)
    full = train_step(al, "reference", img, txt)
    al.requires_grad_(False)
    got = train_step(al, "triton", img, txt)
    assert all(p.grad is None for p in al.parameters())
    assert rel_err(got[1], full[1]) < 2e-5 and rel_err(got[2], full[2]) < 2e-5
    # tokens and decoder_norm frozen: LN0(queries) needs no gradient, but the queries' path
    # into layer 1 (its norm2, the q rows of its in_proj) still does
    al.requires_grad_(True)
    al.decoder_norm.requires_grad_(False)
    al.zero_grad(set_to_none=True)
    i2t = al(img, txt[:, 0], backend="triton")
    i2t.sum().backward()
    ref = make_aligner(CONFIGS["d64h4"], seed=8)
    ref(img, txt[:, 0], backend="reference").sum().backward()
    for (name, p), (_, q) in zip(al.named_parameters(), ref.named_parameters(), strict=True):
        if name.startswith("decoder_norm."):
            assert p.grad is None, name
            continue
        assert rel_err(p.grad, q.grad, floor=1e-6) < 2e-5, name


def test_double_backward_is_refused(triton_only):
    """The backward recomputes without a graph: differentiating it again raises instead of
    silently dropping the second-order terms."""
    al = make_aligner(cf.AlignerConfig(d_model=32, n_heads=2, n_layers=1, d_ffn=48,
                                       head_dims=(24,)))  # fmt: skip
    img, txt = make_tokens(32, n=2, m=3, pi=5, seed=2)
    img.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no double backward.*'reference'"):
        torch.autograd.grad(al(img, txt[:, 0], backend="triton").sum(), img, create_graph=True)
    (g_img,) = torch.autograd.grad(al(img, txt[:, 0], backend="triton").sum(), img)
    assert g_img.shape == img.shape  # a first-order backward is unaffected


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint(reentrant, triton_only):
    """Under torch.utils.checkpoint, both kinds, the gradients equal a plain call's (the
    non-reentrant kind refuses a second unpack of the saved tensors: it used to raise)."""
    from torch.utils.checkpoint import checkpoint

    al = make_aligner(cf.AlignerConfig(d_model=32, n_heads=2, n_layers=1, d_ffn=48,
                                       head_dims=(24,)))  # fmt: skip
    img, txt = make_tokens(32, n=2, m=3, pi=5, seed=2)
    grads = []
    for wrap in (False, True):
        a = img.clone().requires_grad_(True)
        al.zero_grad(set_to_none=True)

        def f(x):  # noqa: ANN001, ANN202
            return al(x, txt[:, 0], backend="triton").square().sum()

        (checkpoint(f, a, use_reentrant=reentrant) if wrap else f(a)).backward()
        grads.append([a.grad, *(p.grad for p in al.parameters())])
    for x, y in zip(*grads, strict=True):
        assert torch.equal(x, y)


def test_empty_batch_is_connected(triton_only):
    al = make_aligner(CONFIGS["d64h4"], seed=1)
    img, txt = make_tokens(64, n=0, seed=1)
    img.requires_grad_(True)
    i2t = al(img, txt[:, 0], backend="triton")
    assert i2t.shape == (0, M) and i2t.requires_grad
    i2t.sum().backward()
    assert next(al.parameters()).grad is not None


DROP_CFG = cf.AlignerConfig(d_model=64, n_heads=2, n_layers=2, d_ffn=96, head_dims=(40, 24),
                            dropout=0.3)  # fmt: skip


@pytest.mark.parametrize(("plan", "route"), [((2, M), "auto"), ((1, 3), "auto"),
                                             ((2, M), "library")])  # fmt: skip
def test_dropout_matches_the_same_mask_reference(plan, route, monkeypatch, triton_only):
    """Training mode: outputs and every gradient equal autograd of the materialised PyTorch
    computation with the same counter-based masks, whatever the chunk plan, and with the
    plain-epilogue layers on PyTorch's GEMM ("library")."""
    monkeypatch.setenv("CARZERO_FAST_TRITON_GEMM", route)
    al = make_aligner(DROP_CFG, seed=9).train()
    mem, q = make_tokens(64, seed=10)
    q = q[:, 0]
    mask = random_mask(N, PI, seed=11)
    budget = budget_for(DROP_CFG, plan)

    def run(fn):
        al.zero_grad(set_to_none=True)
        a, b = mem.clone().requires_grad_(True), q.clone().requires_grad_(True)
        torch.manual_seed(5)  # the direction's seed is drawn from torch's generator
        out = fn(a, b)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)))
        return [out.detach(), a.grad, b.grad] + [p.grad for p in al.parameters()]

    torch.manual_seed(5)
    spec = draw_dropout(DROP_CFG, True)
    assert spec == DropoutSpec.make(0.3, spec.seed)  # DROP_CFG's rate, whatever draw_dropout did
    expected = run(lambda a, b: dropout_reference_forward(al.weights(), DROP_CFG, a, b, mask,
                                                          spec))  # fmt: skip
    got = run(lambda a, b: al(a, b, mask, backend="triton", chunk_budget_bytes=budget))
    names = ["out", "memory", "queries"] + [n for n, _ in al.named_parameters()]
    for name, x, y in zip(names, got, expected, strict=True):
        assert rel_err(x, y) < 2e-5, name
    with torch.no_grad():  # a training-mode call without gradients draws the same masks
        torch.manual_seed(5)
        assert rel_err(al(mem, q, mask, backend="triton"), expected[0]) < 2e-6


def test_the_two_directions_draw_independent_dropout(triton_only):
    al = make_aligner(dataclasses.replace(CONFIGS["d64h4"], n_layers=1), seed=2)
    tokens = make_tokens(64, n=3, m=3, pi=4, pt=4, seed=3)[0]
    assert_directions_draw_independent_dropout(al, tokens, "triton", 1e-3)


def test_dropout_steps_reproducible_under_manual_seed(triton_only):
    al = make_aligner(DROP_CFG, seed=12).train()
    img, txt = make_tokens(64, n=4, m=4, seed=13)
    torch.manual_seed(0)
    first = train_step(al, "triton", img, txt, loss=True)
    torch.manual_seed(0)
    second = train_step(al, "triton", img, txt, loss=True)
    torch.manual_seed(1)
    other = train_step(al, "triton", img, txt, loss=True)
    for name, a, b in zip(grad_names(al), first, second, strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first[0], other[0])  # another seed, other masks
    al.eval()
    assert not torch.equal(first[0], train_step(al, "triton", img, txt, loss=True)[0])


def test_backward_starts_from_the_forwards_last_chunk(monkeypatch, triton_only):
    """The forward runs the last job's last backward chunk the backward's way and keeps it:
    the first backward recomputes one chunk fewer than it runs; a second one (retain_graph)
    has nothing kept and recomputes them all, to the same gradients (dropout on)."""
    import carzero_fast.backends.fused_train as fused_train

    calls = []
    original = fused_train.recompute
    monkeypatch.setattr(fused_train, "recompute", lambda *a: calls.append(1) or original(*a))
    al = make_aligner(DROP_CFG, seed=14).train()
    n_img, n_txt = 3, 4
    img, txt = make_tokens(64, n_img, n_txt, seed=15)
    budget = budget_for(DROP_CFG, (1, 3), n_img, n_txt)  # ragged query chunks (3 + 1)
    chunks = 0
    for n, m, p in ((n_img, n_txt, PI), (n_txt, n_img, PT)):
        items, block_q = plan_train(DROP_CFG, n, m, p, 4, budget)
        chunks += -(-n // items) * -(-m // block_q)
    a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    torch.manual_seed(3)
    i2t, t2i = al.both_directions(a, b, backend="triton", chunk_budget_bytes=budget)
    assert len(calls) == 1
    g = torch.Generator().manual_seed(4)
    obj = (i2t * torch.randn(i2t.shape, generator=g)).sum() + (
        t2i * torch.randn(t2i.shape, generator=g)).sum()  # fmt: skip
    params = [a, b, *al.parameters()]
    first = torch.autograd.grad(obj, params, retain_graph=True)
    assert len(calls) == chunks
    second = torch.autograd.grad(obj, params)
    assert len(calls) == 2 * chunks
    for name, x, y in zip(["img", "txt"] + grad_names(al)[3:], first, second, strict=True):
        assert torch.equal(x, y), name


def test_calls_summed_into_one_loss_keep_one_chunk(monkeypatch, triton_only):
    """Two calls before one backward: the second lets go of the first's kept chunk (each
    would hold up to a chunk budget until the backward), so the first's backward recomputes
    all of its chunks; the gradients equal one backward per call (dropout on)."""
    import carzero_fast.backends.fused_train as fused_train
    from carzero_fast.backends import kept

    calls = []
    original = fused_train.recompute
    monkeypatch.setattr(fused_train, "recompute", lambda *a: calls.append(1) or original(*a))
    al = make_aligner(DROP_CFG, seed=16).train()
    n = m = 2  # one item a chunk: two chunks a direction
    views = [tuple(t.requires_grad_(True) for t in make_tokens(64, n, m, 9, 5, seed=s))
             for s in (17, 18)]  # fmt: skip
    budget = budget_for(DROP_CFG, (1, 2), n=n, m=m, p=9)
    assert plan_train(DROP_CFG, m, n, 5, 4, budget)[0] < n  # t2i: several chunks too

    g = torch.Generator().manual_seed(19)
    weights = [torch.randn(n, m, generator=g), torch.randn(m, n, generator=g)]

    def loss(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        i2t, t2i = al.both_directions(img, txt, backend="triton", chunk_budget_bytes=budget)
        return (i2t * weights[0]).sum() + (t2i * weights[1]).sum()

    def each_loss() -> list[torch.Tensor]:
        torch.manual_seed(5)
        return [loss(i, t) for i, t in views]

    together = each_loss()
    assert len(calls) == 2 and len(kept._PENDING) == 1  # one forward each
    sum(together).backward()
    assert not kept._PENDING
    summed = [p.grad.clone() for p in al.parameters()]
    al.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    for i, t in views:  # one backward per call, each starting from its own kept chunk
        loss(i, t).backward()
    for (name, p), x in zip(al.named_parameters(), summed, strict=True):
        assert rel_err(x, p.grad, floor=1e-6) < 1e-5, name


# ------------------------------------------------------------------------------ memory


def test_training_memory_does_not_grow_with_pairs(triton_only):
    """At a fixed plan, from N = M = 8 to N = M = 16 a training step's peak grows by
    token-sized tensors (the inputs' gradients and their fp32 accumulators: O((N + M)·P·D))
    and the (N, M) logits only, never by O(N·M·D)."""
    cfg = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=1, d_ffn=64, head_dims=(40,))
    al = make_aligner(cfg)
    d, p, plan = cfg.d_model, 1, (2, 8)  # one token: the token-sized terms stay small
    budget = budget_for(cfg, plan, n=8, m=8, p=p)
    peaks = {}
    for nm in (8, 16):
        assert plan_train(cfg, nm, nm, p, 4, budget) == plan
        img, txt = make_tokens(d, nm, nm, p, p, seed=nm)
        img.requires_grad_(True)
        txt.requires_grad_(True)
        with track_memory() as tracker:
            i2t, t2i = al.both_directions(img, txt, backend="triton", chunk_budget_bytes=budget)
            cf.carzero_loss(i2t, t2i).backward()
        peaks[nm] = tracker.peak_bytes
    token_tensor = 2 * 8 * p * d * 4  # growth of one fp32 tensor of both modalities' tokens
    pair_row = 16 * 16 * d * 4  # one fp32 row of D per pair at N = M = 16
    assert peaks[16] - peaks[8] < 6 * token_tensor + pair_row / 8, peaks


def test_every_launch_runs_under_the_inputs_device(monkeypatch, triton_only):
    """Triton launches on the current CUDA device, not on its arguments': the forward (with
    and without gradients) and the recomputing backward keep every kernel launch inside
    `launch_device` (spied here: CPU tensors have no device to switch to)."""
    import contextlib

    import triton.runtime.interpreter as interpreter

    from carzero_fast.backends import fused, fused_train

    state = {"depth": 0, "launches": 0, "outside": 0}

    @contextlib.contextmanager
    def spy(t):  # noqa: ANN001, ANN202
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1

    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN202
        state["launches"] += 1
        state["outside"] += state["depth"] == 0
        return run(self, *args, **kwargs)

    monkeypatch.setattr(fused, "launch_device", spy)
    monkeypatch.setattr(fused_train, "launch_device", spy)
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    al = make_aligner(CONFIGS["d64h4"], seed=3).train()
    img, txt = make_tokens(64, n=2, m=3, seed=1)
    train_step(al, "triton", img, txt)
    with torch.no_grad():
        al(img, txt[:, 0], backend="triton")
    assert state["launches"] > 50
    assert state["outside"] == 0, f"{state['outside']} of {state['launches']} launches"
