"""Training through the chunked backend: recomputation, dropout, determinism, memory."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_directions_draw_independent_dropout, make_aligner, random_mask, rel_err

import carzero_fast as cf
from carzero_fast.backends.chunked import Dropout, chunked_both_directions, chunked_forward
from carzero_fast.memory import track_memory
from carzero_fast.weights import AlignerWeights

TINY = cf.AlignerConfig(d_model=8, n_heads=2, n_layers=2, d_ffn=12, head_dims=(6, 4), dropout=0.3)


def _step(al, img, txt, backend="chunked", budget=None):
    """A CARZero training step: both directions, the loss, backward."""
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    al.zero_grad(set_to_none=True)
    al.chunk_budget_bytes = budget
    i2t, t2i = cf.alignment_logits(al, img, txt, backend=backend)
    loss = cf.carzero_loss(i2t, t2i)
    loss.backward()
    return loss, [img.grad, txt.grad] + [p.grad for p in al.parameters()]


def test_training_step_matches_reference_without_dropout():
    cfg = cf.AlignerConfig(d_model=32, n_layers=2, d_ffn=40, head_dims=(24, 8), dropout=0.0)
    al = make_aligner(cfg, 2).train()
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 9, 32, generator=g), torch.randn(6, 5, 32, generator=g)
    loss_r, grads_r = _step(al, img, txt, "reference")
    loss_c, grads_c = _step(al, img, txt, "chunked", budget=1)
    assert rel_err(loss_c, loss_r) < 1e-5
    for a, b in zip(grads_c, grads_r, strict=True):
        assert rel_err(a, b, floor=1e-3) < 1e-4  # floor: mlp_head.9.bias's gradient is ~0


@pytest.mark.parametrize("form", ["kv", "folded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_no_worse_than_pytorch(form, dtype, products16):
    """16-bit training step: relative RMS error of each token gradient and of all weights'
    gradients together against the fp32 reference, within 2× the reference's own in that
    dtype (the reference is plain PyTorch autograd), with the chunked backend's products in
    16 bits and in fp32 rounded to 16 bits."""
    cfg = cf.AlignerConfig(d_model=32, n_layers=2, d_ffn=40, head_dims=(24, 8), dropout=0.0)
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(6, 9, 32, generator=g), torch.randn(6, 5, 32, generator=g)

    def grads(dtype, backend):  # noqa: ANN001, ANN202
        al = make_aligner(cfg, 2, dtype=dtype).train()
        a = img.to(dtype).detach().requires_grad_(True)  # a leaf of its own in every dtype
        b = txt.to(dtype).detach().requires_grad_(True)
        if backend == "reference":
            i2t, t2i = cf.alignment_logits(al, a, b, backend="reference")
        else:  # a budget of one byte: one pair per chunk
            i2t, t2i = chunked_both_directions(al.weights(), cfg, a, b, None, None, True, 1,
                                               form)  # fmt: skip
        cf.carzero_loss(i2t.float(), t2i.float()).backward()
        w = torch.cat([p.grad.float().flatten() for p in al.parameters()])
        return [a.grad.float(), b.grad.float(), w]

    exact, own, got = grads(torch.float32, "reference"), grads(dtype, "reference"), grads(
        dtype, "chunked")  # fmt: skip
    for what, x, y, e in zip(["img", "txt", "weights"], got, own, exact, strict=True):
        assert rel_err(x, e) <= 2 * rel_err(y, e), what


def _flat_fn(cfg, mask, budget, form):
    """Chunked logits as a function of (memory, queries, *weights) with a fixed dropout seed."""

    def fn(mem, q, *flat):
        torch.manual_seed(1234)  # same seed every call → same masks: a deterministic function
        w = AlignerWeights.unflatten(list(flat), cfg.n_layers)
        return chunked_forward(w, cfg, mem, q, mask, True, budget, form)

    return fn


def test_gradcheck_with_dropout_in_both_forms():
    """fp64 finite differences of the recomputing backward, dropout active, several chunks."""
    al = make_aligner(TINY, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    mem = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = random_mask(3, 5, seed=2)
    flat = [p.detach().clone().requires_grad_(True) for p in al.weights().flatten()]
    for form in ("kv", "folded"):
        fn = _flat_fn(TINY, mask, 1, form)
        out = fn(mem, q, *flat)
        assert rel_err(out, _flat_fn(TINY, mask, 1, form)(mem, q, *flat)) == 0.0
        # inputs: every element; weights: random directions (fast mode), to keep it quick
        assert torch.autograd.gradcheck(lambda m, x, f=fn: f(m, x, *flat), (mem, q), atol=1e-6)
        assert torch.autograd.gradcheck(fn, (mem, q, *flat), atol=1e-6, fast_mode=True)


def test_gradcheck_both_directions_in_one_node():
    """i2t and t2i share one autograd node; the globals (row 0) get gradients from both uses."""
    al = make_aligner(TINY, seed=9, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    img = torch.randn(3, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    flat = [p.detach().clone().requires_grad_(True) for p in al.weights().flatten()]

    def fn(i, t, *fl):
        torch.manual_seed(99)
        w = AlignerWeights.unflatten(list(fl), TINY.n_layers)
        return chunked_both_directions(w, TINY, i, t, None, random_mask(4, 3), True, 1)

    assert torch.autograd.gradcheck(lambda i, t: fn(i, t, *flat), (img, txt), atol=1e-6)
    assert torch.autograd.gradcheck(fn, (img, txt, *flat), atol=1e-6, fast_mode=True)


def _same_mask_pair(w, cfg, mem, q, bias, masks, p_drop, form):  # noqa: ANN001, ANN202
    """One pair's logit as DESIGN.md §1 writes it (K/V projected, dropout as x·mask/(1−p)),
    with the masks the chunked backend drew, in its order."""
    d, h_n, eps = cfg.d_model, cfg.n_heads, cfg.layer_norm_eps
    dh, scale = d // h_n, 1.0 / (1.0 - p_drop)
    masks = iter(masks)

    def drop(x):  # noqa: ANN001, ANN202
        return x * next(masks).reshape(x.shape) * scale

    def ln(x, wt, b):  # noqa: ANN001, ANN202
        return torch.nn.functional.layer_norm(x, (d,), wt, b, eps)

    mem, x = ln(mem, w.norm0_w, w.norm0_b), ln(q, w.norm0_w, w.norm0_b)  # (P, D), (D,)
    for lw in w.layers:
        (wq, wk, wv), (bq, bk, bv) = lw.in_proj_w.split(d), lw.in_proj_b.split(d)
        qv = ln(x, lw.norm2_w, lw.norm2_b) @ wq.T + bq
        k, v = mem @ wk.T + bk, mem @ wv.T + bv
        heads = [slice(i * dh, (i + 1) * dh) for i in range(h_n)]
        probs = torch.softmax(torch.stack([k[:, h] @ qv[h] for h in heads]) / dh**0.5 + bias, -1)
        # the folded form draws one mask per head, the kv form one for all heads
        a = torch.stack([drop(pr) for pr in probs]) if form == "folded" else drop(probs)
        o = torch.cat([a[i] @ v[:, h] for i, h in enumerate(heads)])
        x = x + drop(o @ lw.out_proj_w.T + lw.out_proj_b)
        hid = drop(torch.relu(ln(x, lw.norm3_w, lw.norm3_b) @ lw.linear1_w.T + lw.linear1_b))
        x = x + drop(hid @ lw.linear2_w.T + lw.linear2_b)
    x = drop(ln(x, w.norm0_w, w.norm0_b))
    for i, (hw, hb) in enumerate(w.head):
        x = x @ hw.T + hb
        if i < len(w.head) - 1:
            x = drop(torch.relu(x))
    assert next(masks, None) is None  # every mask drawn was used once
    return x[0]


@pytest.mark.parametrize("form", ["kv", "folded"])
def test_dropout_forward_matches_the_same_mask_computation(form, monkeypatch):
    """Training-mode logits against the plain computation with the same masks: where dropout
    applies and its 1/(1−p), including the scales the chunked stages fold into GEMMs."""
    al = make_aligner(TINY, seed=12)
    g = torch.Generator().manual_seed(13)
    mem, q = torch.randn(3, 5, 8, generator=g), torch.randn(4, 8, generator=g)
    mask = random_mask(3, 5, seed=14)
    drawn: list[tuple[Dropout, torch.Tensor]] = []  # keeps each chunk's Dropout alive
    keep = Dropout.keep

    def recording_keep(self, shape, device):  # noqa: ANN001, ANN202
        k = keep(self, shape, device)
        drawn.append((self, k))
        return k

    monkeypatch.setattr(Dropout, "keep", recording_keep)
    torch.manual_seed(15)
    with torch.no_grad():  # the forward only: one pair per chunk (budget of one byte)
        out = chunked_forward(al.weights(), TINY, mem, q, mask, True, 1, form)
    chunks: dict[int, list[torch.Tensor]] = {}
    for d, k in drawn:
        chunks.setdefault(id(d), []).append(k.float())
    assert len(chunks) == 3 * 4
    p_drop = drawn[0][0].p
    # the config's rate (quantised to 1/65536 by the kernels' 16-bit draws); the oracle
    # below takes the drawn one
    assert abs(p_drop - TINY.dropout) <= 2**-17
    bias = torch.zeros(3, 5).masked_fill(mask, float("-inf"))
    want = torch.stack([
        _same_mask_pair(al.weights(), TINY, mem[n], q[j], bias[n], masks, p_drop, form)
        for (n, j), masks in zip([(n, j) for n in range(3) for j in range(4)],
                                 chunks.values(), strict=True)
    ]).view(3, 4)  # fmt: skip
    assert rel_err(out, want) < 1e-5
    assert not torch.equal(out, al.eval()(mem, q, mask))  # dropout did act


def test_dropout_is_applied_and_seeded():
    al = make_aligner(TINY, seed=4)
    g = torch.Generator().manual_seed(5)
    mem, q = torch.randn(4, 6, 8, generator=g), torch.randn(5, 8, generator=g)
    with torch.no_grad():
        eval_out = al.eval()(mem, q)
        al.train()
        torch.manual_seed(0)
        a = al(mem, q)
        torch.manual_seed(0)
        b = al(mem, q)
        c = al(mem, q)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, eval_out)


def test_seeded_training_steps_are_bitwise_identical():
    al = make_aligner(TINY, seed=6).train()
    g = torch.Generator().manual_seed(7)
    img, txt = torch.randn(5, 7, 8, generator=g), torch.randn(5, 4, 8, generator=g)
    torch.manual_seed(42)
    loss_a, grads_a = _step(al, img, txt, budget=1)
    torch.manual_seed(42)
    loss_b, grads_b = _step(al, img, txt, budget=1)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


def test_backward_starts_from_the_forwards_last_chunk(monkeypatch):
    """The forward keeps its last chunk's graph: a step runs 2·chunks − 1 chunk forwards.
    A second backward (retain_graph) has nothing kept and recomputes every chunk; both
    backwards give the same gradients, in train mode with dropout on."""
    import carzero_fast.backends.chunked as chunked

    calls = []
    original = chunked.pair_chunk_forward
    monkeypatch.setattr(chunked, "pair_chunk_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))  # fmt: skip
    al = make_aligner(TINY, seed=12).train()
    g = torch.Generator().manual_seed(13)
    img = torch.randn(5, 7, 8, generator=g, requires_grad=True)
    txt = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    w = al.weights()
    budget = 1  # one pair per chunk: 15 chunks per direction
    torch.manual_seed(5)
    i2t, t2i = chunked_both_directions(w, TINY, img, txt, None, None, True, budget)
    assert len(calls) == 2 * 15
    loss = (i2t * torch.randn(5, 3, generator=g)).sum() + (
        t2i * torch.randn(3, 5, generator=g)
    ).sum()
    params = [img, txt, *al.parameters()]
    first = torch.autograd.grad(loss, params, retain_graph=True)
    assert len(calls) == 2 * 15 + 2 * 15 - 1
    second = torch.autograd.grad(loss, params)
    assert len(calls) == 4 * 15 - 1 + 2 * 15
    for a, b in zip(first, second, strict=True):
        assert rel_err(a, b, floor=1e-6) < 1e-6
    with torch.no_grad():  # nothing to keep without autograd
        calls.clear()
        chunked_both_directions(w, TINY, img, txt, None, None, True, budget)
        assert len(calls) == 2 * 15


def test_the_kept_chunk_does_not_raise_the_peak(monkeypatch):
    """Keeping the forward's last chunk costs no memory: a step peaks exactly as high as with
    every chunk recomputed (each kept piece is let go of as soon as the backward used it)."""
    import carzero_fast.backends.chunked as chunked

    cfg = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96, head_dims=(48, 24))
    al = make_aligner(cfg, seed=1).train()
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(12, 9, 64, generator=g), torch.randn(12, 5, 64, generator=g)
    apply = chunked._ChunkedAlign.apply

    def peak(keep):
        def apply_keeping(cfg, jobs, training, k, *rest):  # noqa: ANN001, ANN202
            return apply(cfg, jobs, training, k and keep, *rest)

        monkeypatch.setattr(chunked._ChunkedAlign, "apply", apply_keeping)
        with track_memory() as tracker:
            _step(al, img, txt, budget=2**17)  # 1 item × 5–7 queries a chunk
        return tracker.peak_bytes

    assert peak(True) == peak(False)


def test_calls_summed_into_one_loss_hold_one_kept_chunk():
    """Several calls before one backward: each forward kept its last chunk and a full set of
    weight-gradient buffers until the backward, so the memory held before the backward grew
    by both per call. A call now lets go of an earlier call's (whose backward recomputes it);
    the gradients are the same either way."""
    from carzero_fast.backends import kept

    cfg = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96, head_dims=(48, 24))
    al = make_aligner(cfg, seed=3).train()
    al.chunk_budget_bytes = 3 * 2**16  # 2-3 items × 6 queries: a few chunks a direction
    g = torch.Generator().manual_seed(4)
    views = [(torch.randn(6, 9, 64, generator=g), torch.randn(6, 5, 64, generator=g))
             for _ in range(3)]  # fmt: skip

    def held_before_backward(k: int) -> tuple[int, list[torch.Tensor]]:
        al.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with track_memory() as tracker:
            loss = sum(cf.carzero_loss(*cf.alignment_logits(al, i, t)) for i, t in views[:k])
            held = tracker.live_bytes
            loss.backward()
        return held, [p.grad.clone() for p in al.parameters()]

    one, _ = held_before_backward(1)
    three, grads = held_before_backward(3)
    logits = 2 * 2 * 6 * 6 * 4  # two more calls' (6, 6) i2t and t2i, fp32
    assert three - one <= 2 * logits + 4096  # (+ the loss terms' scalars)
    assert not kept._PENDING  # taken by the backward
    # the same gradients as one backward per call, each keeping its own chunk
    al.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    for i, t in views:
        cf.carzero_loss(*cf.alignment_logits(al, i, t)).backward()
    for a, b in zip(grads, (p.grad for p in al.parameters()), strict=True):
        assert rel_err(a, b, floor=1e-6) < 1e-5


def test_dropout_masks_keep_the_right_fraction():
    drop = Dropout(0.1, seed=3, chunk=(0, 0), device=torch.device("cpu"))
    out = drop(torch.ones(200_000))
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.9) < 0.005
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.9))
    other = Dropout(0.1, seed=3, chunk=(0, 1), device=torch.device("cpu"))(torch.ones(200_000))
    assert not torch.equal(other, out)  # every chunk draws its own masks


def test_dropout_drops_exactly_the_quantised_probability():
    """At the smallest rate the 16-bit draws can express (threshold 1: a draw of 0 drops) the
    drop rate is 1/65536, the `p` the 1/(1 − p) scale assumes: a threshold off by one drops
    twice as many (or none)."""
    drop = Dropout(2**-16, seed=5, chunk=(0, 0), device=torch.device("cpu"))
    assert drop.threshold == 1 and drop.p == 2**-16
    n = 2**22  # 64 drops expected (sd 8)
    dropped = int((drop.keep((n,), torch.device("cpu")) == 0).sum())
    assert 32 < dropped < 96, dropped


def test_the_two_directions_draw_independent_dropout():
    al = make_aligner(TINY, seed=8)
    tokens = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(9))
    assert_directions_draw_independent_dropout(al, tokens, "chunked", 1e-2)


def _training_peak(al, n, backend, budget):
    g = torch.Generator().manual_seed(n)
    img, txt = torch.randn(n, 3, 128, generator=g), torch.randn(n, 3, 128, generator=g)
    with track_memory() as tracker:
        _step(al, img, txt, backend, budget)
    return tracker.peak_bytes


def test_training_memory_does_not_grow_with_pairs_times_width():
    """From 16×16 to 64×64 pairs, the reference's peak grows by many N·M·D tensors; the
    chunked backend's grows only by O(N·P·D + N·M) (inputs' gradients, logits)."""
    cfg = cf.AlignerConfig(d_model=128, n_layers=2, d_ffn=64, head_dims=(32, 16))
    al = make_aligner(cfg, seed=8).train()
    budget = 2**20
    one_nmd = 64 * 64 * 128 * 4  # bytes of one fp32 (N·M, D) tensor at N = M = 64
    grow_ref = _training_peak(al, 64, "reference", budget) - _training_peak(
        al, 16, "reference", budget
    )
    grow_chunked = _training_peak(al, 64, "chunked", budget) - _training_peak(
        al, 16, "chunked", budget
    )
    assert grow_ref > 4 * one_nmd  # the measurement sees materialised pair tensors
    assert grow_chunked < one_nmd / 3


def test_frozen_aligner_or_frozen_features_match_reference():
    """Only what needs a gradient is differentiated; the rest gets none, like the reference."""
    cfg = cf.AlignerConfig(d_model=32, n_layers=2, d_ffn=40, head_dims=(24, 8), dropout=0.0)
    al = make_aligner(cfg, seed=10)
    g = torch.Generator().manual_seed(11)
    img, txt = torch.randn(4, 6, 32, generator=g), torch.randn(5, 3, 32, generator=g)

    def grads(backend, inputs, weights):
        for p in al.parameters():
            p.requires_grad_(weights)
            p.grad = None
        i, t = img.clone().requires_grad_(inputs), txt.clone().requires_grad_(inputs)
        i2t, t2i = cf.alignment_logits(al, i, t, backend=backend)
        (0.3 * i2t.sum() + (t2i**2).sum()).backward()
        return [i.grad, t.grad] + [p.grad for p in al.parameters()]

    for inputs, weights in ((True, False), (False, True)):
        for a, b in zip(grads("chunked", inputs, weights), grads("reference", inputs, weights),
                        strict=True):  # fmt: skip
            assert (a is None) == (b is None)
            if b is not None:
                assert rel_err(a, b, floor=1e-3) < 1e-4


def test_double_backward_is_refused():
    """The backward recomputes without a graph: create_graph=True raises and names the
    reference backend, instead of gradients whose own gradients are silently zero."""
    al = make_aligner(TINY).eval()
    g = torch.Generator().manual_seed(3)
    img, q = torch.randn(2, 5, 8, generator=g).requires_grad_(), torch.randn(3, 8, generator=g)
    with pytest.raises(RuntimeError, match="no double backward.*'reference'"):
        torch.autograd.grad(al(img, q, backend="chunked").sum(), img, create_graph=True)
    (g_ref,) = torch.autograd.grad(al(img, q, backend="reference").sum(), img, create_graph=True)
    assert g_ref.requires_grad


def test_chunked_training_under_autocast_computes_in_the_inputs_dtype():
    """Under torch.autocast a chunked step runs with autocast off (its recomputing backward
    needs the forward's dtypes): the numbers of the same step without autocast, bit for bit,
    whether backward() is called inside the autocast region or after it."""
    cfg = cf.AlignerConfig(d_model=32, n_heads=4, n_layers=2, d_ffn=24, head_dims=(12, 8),
                           dropout=0.0)  # fmt: skip
    al = make_aligner(cfg, seed=3).train()
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(6, 7, 32, generator=g), torch.randn(6, 6, 32, generator=g)

    def step(autocast, backward_inside):
        x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        al.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            i2t, t2i = al.both_directions(x, y, backend="chunked", chunk_budget_bytes=20_000)
            loss = cf.carzero_loss(i2t, t2i)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [i2t, t2i, x.grad, y.grad, *(p.grad for p in al.parameters())]

    plain = step(autocast=False, backward_inside=False)
    for backward_inside in (False, True):
        got = step(autocast=True, backward_inside=backward_inside)
        for a, b in zip(got, plain, strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b)


def test_backward_recomputes_the_forwards_chunks_when_the_thread_count_changes():
    """CPU item blocks follow torch.get_num_threads(); the plan is fixed in the forward, so a
    backward at another thread count recomputes the same chunks and dropout masks."""
    cfg = cf.AlignerConfig(d_model=8, n_heads=2, n_layers=2, d_ffn=12, head_dims=(6, 4),
                           dropout=0.2)  # fmt: skip
    al = make_aligner(cfg, seed=8).double().train()
    g = torch.Generator().manual_seed(9)
    img = torch.randn(9, 5, 8, generator=g, dtype=torch.float64)
    txt = torch.randn(9, 4, 8, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    from carzero_fast.backends.plan import pieces, plan_chunks

    budget = next(b for b in range(1000, 10**6, 250)
                  if plan_chunks(cfg, 9, 9, 5, 8, b, True, False).items == 4
                  and plan_chunks(cfg, 9, 9, 4, 8, b, True, False).items == 4)  # fmt: skip
    assert pieces(9, 4, 2) != pieces(9, 4, 1)  # the item blocks of 2 and of 1 thread differ

    def step(backward_threads):
        x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        al.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        torch.set_num_threads(2)
        try:
            loss = cf.carzero_loss(*chunked_both_directions(al.weights(), cfg, x, y, None, None,
                                                            True, budget, form="kv"))  # fmt: skip
            torch.set_num_threads(backward_threads)
            loss.backward()
        finally:
            torch.set_num_threads(threads)
        return [x.grad, y.grad, *(p.grad for p in al.parameters())]

    for a, b in zip(step(2), step(1), strict=True):
        # equal up to the GEMMs' summation order at another thread count (a chunk with other
        # dropout masks differs by ~1e-1)
        assert rel_err(a, b) < 1e-12


def test_an_unused_direction_is_not_recomputed(monkeypatch):
    """A loss on i2t alone: the backward recomputes i2t's chunks only (autograd hands the
    unused t2i None, not a zero gradient to push through every chunk)."""
    import carzero_fast.backends.chunked as chunked

    jobs = []
    original = chunked._backward_chunks
    monkeypatch.setattr(chunked, "_backward_chunks",
                        lambda prep, cfg, job, *a: jobs.append(job.memory)
                        or original(prep, cfg, job, *a))  # fmt: skip
    al = make_aligner(TINY, seed=10).train()
    g = torch.Generator().manual_seed(11)
    img = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    txt = torch.randn(4, 3, 8, generator=g, requires_grad=True)
    i2t, t2i = al.both_directions(img, txt, backend="chunked")
    torch.nn.functional.cross_entropy(i2t, torch.arange(4)).backward()
    assert jobs == [0]
    assert img.grad is not None and txt.grad is not None


def _small_aligner(dropout: float) -> cf.CrossAttentionAligner:
    cfg = cf.AlignerConfig(d_model=32, n_heads=4, n_layers=2, d_ffn=48, head_dims=(40, 16),
                           dropout=dropout)  # fmt: skip
    return make_aligner(cfg, seed=21)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_of_a_chunked_training_step(compiler):
    """torch.compile of the module and of a whole training step (both directions, the loss,
    backward, an SGD update) runs with graph breaks around the recomputing Function and gives
    eager's numbers bit for bit, with dropout under the same seed (it crashed: dynamo traced
    the Function's gradient-buffer views)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(22)
    img, txt = torch.randn(4, 6, 32, generator=g), torch.randn(4, 5, 32, generator=g)

    def run(compiled: bool) -> list[torch.Tensor]:
        al = _small_aligner(dropout=0.1).train()
        opt = torch.optim.SGD(al.parameters(), lr=0.1)

        def step(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            loss = cf.carzero_loss(*cf.alignment_logits(al, a, b, backend="chunked"))
            loss.backward()
            return loss.detach()

        fn = torch.compile(step, backend=compiler) if compiled else step
        losses = []
        for i in range(2):
            torch.manual_seed(i)
            opt.zero_grad(set_to_none=True)
            losses.append(fn(img, txt))
            opt.step()
        module = torch.compile(al, backend=compiler) if compiled else al
        torch.manual_seed(5)
        out = module(img, txt[:, 0], backend="chunked")
        out.sum().backward()
        return [*losses, out, *(p.detach().clone() for p in al.parameters()),
                *(p.grad for p in al.parameters())]

    for a, b in zip(run(compiled=True), run(compiled=False), strict=True):
        assert torch.equal(a, b)


def test_chunked_calls_without_gradients_compile_to_one_graph():
    """Without gradients and without a mask (whose all-hidden check reads it on the host),
    a `chunked` call and zero-shot scoring trace to one graph (`fullgraph=True` raises at
    any graph break) and give eager's numbers."""
    torch._dynamo.reset()
    al = _small_aligner(dropout=0.0).eval()
    g = torch.Generator().manual_seed(23)
    img, txt = torch.randn(3, 6, 32, generator=g), torch.randn(4, 5, 32, generator=g)
    calls = [lambda a, b: al(a, b[:, 0], backend="chunked"),
             lambda a, b: cf.zero_shot_scores(al, a, b, backend="chunked")]  # fmt: skip
    with torch.no_grad():
        for fn in calls:
            assert torch.equal(torch.compile(fn, backend="eager", fullgraph=True)(img, txt),
                               fn(img, txt))  # fmt: skip
    torch._dynamo.reset()


def test_torch_func_transforms_name_the_backend():
    al = _small_aligner(dropout=0.0).eval()
    img, q = torch.randn(3, 5, 32), torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="backend 'chunked' does not run under torch.func"):
        torch.func.grad(lambda x: al(x, q, backend="chunked").sum())(img)
    with torch.no_grad(), pytest.raises(RuntimeError, match="use backend='reference'"):
        torch.func.vmap(lambda x: al(x[None], q, backend="chunked")[0])(img)
    grads = torch.func.grad(lambda x: al(x, q, backend="reference").sum())(img)
    assert grads.shape == img.shape


def test_a_reentrant_checkpoint_returns_the_loss_it_differentiates():
    """Train-mode calls plan their chunks (and so draw their dropout masks) as a training step
    does with or without autograd: a reentrant checkpoint, whose forward runs under no_grad,
    returns the loss of the masks its recomputation differentiates."""
    from torch.utils.checkpoint import checkpoint

    al = _small_aligner(dropout=0.2).train()
    g = torch.Generator().manual_seed(23)
    img, txt = torch.randn(6, 7, 32, generator=g), torch.randn(6, 5, 32, generator=g)

    def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cf.carzero_loss(*al.both_directions(a, b, backend="chunked",
                                                   chunk_budget_bytes=20_000))  # fmt: skip

    results = []
    for wrap in (False, True):
        a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        al.zero_grad(set_to_none=True)
        torch.manual_seed(9)
        loss = checkpoint(loss_of, a, b, use_reentrant=True) if wrap else loss_of(a, b)
        loss.backward()
        results.append([loss.detach(), a.grad, b.grad, *(p.grad for p in al.parameters())])
    for x, y in zip(*results, strict=True):
        assert rel_err(x, y) < 1e-6


def test_module_wrappers_are_named():
    al = _small_aligner(dropout=0.0)

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    img, txt = torch.randn(2, 3, 32), torch.randn(2, 4, 32)
    with pytest.raises(TypeError, match="DistributedCARZeroLoss"):
        cf.alignment_logits(Wrapper(al), img, txt)
    with pytest.raises(TypeError, match=r"pass its \.module"):
        cf.zero_shot_scores(Wrapper(al), img, txt)
