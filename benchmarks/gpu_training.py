"""The GPU check's training section (see `gpu_check.py`'s docstring, item 4): gradients of a
step against `reference`, triton's dropout against a same-mask PyTorch computation, then
step times and peak memory per backend."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

import carzero_fast as cf

from .gpu_common import autocast, passed, record, rel, with_env

if TYPE_CHECKING:
    from .gpu_check import Check


def recomputing_all(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` with the triton training forward keeping no chunk for the backward (each one
    recomputed): what the kept chunk saves, measured against the default."""
    from carzero_fast.backends import fused_train

    def plain(w, cfg, memory, queries, mask, budget, dropout=None):  # noqa: ANN001, ANN202
        out = fused_train.triton_forward(w, cfg, memory, queries, mask, budget, dropout,
                                         torch.float32)  # fmt: skip
        return out, None

    def run() -> object:
        keeping = fused_train.forward_keeping_last
        fused_train.forward_keeping_last = plain
        try:
            return fn()
        finally:
            fused_train.forward_keeping_last = keeping

    return run


def step_fn(al: cf.CrossAttentionAligner, img: torch.Tensor, txt: torch.Tensor, backend: str,
             amp: bool, budget: int | None = None, train: bool = False,
             keep_grads: bool = False) -> Callable[[], object]:  # fmt: skip
    """One training step of the alignment: both directions, CARZero's loss, backward (into
    the tokens, leaves that need gradients, and the weights); `train`: dropout on. The
    gradients are let go of at the end unless `keep_grads`, as an optimizer step would: a
    peak measured from after a step then includes the next step's gradients (with them
    still held, the baseline would hold them and the peak come out that much low)."""

    def step() -> object:
        al.train(train)
        al.zero_grad(set_to_none=True)
        img.grad = txt.grad = None
        try:
            with autocast(img.device) if amp else contextlib.nullcontext():
                i2t, t2i = al.both_directions(img, txt, backend=backend,
                                              chunk_budget_bytes=budget)  # fmt: skip
                loss = cf.carzero_loss(i2t, t2i)
            loss.backward()
        finally:  # a failed train-mode step must not leave dropout on for the next row
            al.eval()
        if not keep_grads:
            al.zero_grad(set_to_none=True)
            img.grad = txt.grad = None
        return loss.detach()

    return step


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _grads(al: cf.CrossAttentionAligner, img, txt, backend: str) -> list[torch.Tensor]:  # noqa: ANN001
    img, txt = leaf(img), leaf(txt)
    step_fn(al, img, txt, backend, amp=False, keep_grads=True)()
    return [img.grad, txt.grad, *(p.grad for p in al.parameters())]


def training(chk: Check, sizes: tuple[int, ...], budgets_gib: tuple[float, ...] = ()) -> dict:
    """Training gradients against the reference, then step times; `budgets_gib` adds triton
    rows at those chunk budgets (the default budget's row is always there)."""
    d = chk.cfg.d_model
    n = 6 if chk.smoke else 16
    img, txt = chk.randn(n, 197, d), chk.randn(n, 98, d)
    matrices = [p.dim() > 1 for p in chk.al.parameters()]

    def agg(gs: list[torch.Tensor], oracle: list[torch.Tensor]) -> list[float]:
        """Errors of the two token gradients, then of the weight matrices' together and the
        vectors' (biases, LayerNorms) together: one vector's alone can be ~0 (the logit
        bias's is exactly zero under a softmax loss), and a wrong bias gradient must not
        hide among the matrices' many more elements."""
        def cat(grads: list[torch.Tensor], want: bool) -> torch.Tensor:
            pieces = zip(grads[2:], matrices, strict=True)
            return torch.cat([g.float().flatten() for g, is_matrix in pieces
                              if is_matrix == want])  # fmt: skip

        tokens = [rel(gs[0], oracle[0]), rel(gs[1], oracle[1])]
        return tokens + [rel(cat(gs, kind), cat(oracle, kind)) for kind in (True, False)]

    out: dict = {}
    record(out, "fp32_triton", lambda: agg(_grads(chk.al, img, txt, "triton"),
                                           _grads(chk.al, img, txt, "reference")))  # fmt: skip
    img16, txt16 = img.bfloat16(), txt.bfloat16()

    def bf16() -> dict:
        # against the reference on the same rounded weights and tokens in fp32: the rounding
        # common to every path would otherwise drown what each path's arithmetic adds
        oracle = _grads(chk.al16_fp32, img16.float(), txt16.float(), "reference")
        first = _grads(chk.al16, img16, txt16, "triton")
        again = _grads(chk.al16, img16, txt16, "triton")
        return {
            "triton": agg(first, oracle),
            "reference": agg(_grads(chk.al16, img16, txt16, "reference"), oracle),
            "triton_bitwise_repeatable": all(torch.equal(a, b)
                                             for a, b in zip(first, again, strict=True)),
        }  # fmt: skip

    record(out, "bf16", bf16)
    record(out, "dropout_fp32_triton", lambda: _dropout_check(chk))
    out["pass"] = (
        passed(out["fp32_triton"], lambda v: max(v) < 1e-4)
        and passed(out["bf16"], lambda v: v["triton_bitwise_repeatable"] and all(
            t <= 2 * r for t, r in zip(v["triton"], v["reference"], strict=True)))
        and passed(out["dropout_fp32_triton"], lambda v: max(v) < 1e-4)
    )  # fmt: skip
    print(f"  training gradients: {out}", flush=True)
    for nm in sizes:
        img, txt = leaf(chk.randn(nm, 197, d)), leaf(chk.randn(nm, 98, d))
        img16, txt16 = leaf(img.bfloat16()), leaf(txt.bfloat16())
        fns = {}
        if nm <= 256:
            fns["reference"] = ("fp16-autocast", step_fn(chk.al, img, txt, "reference", True))
        fns["chunked"] = ("bf16", step_fn(chk.al16, img16, txt16, "chunked", False))
        fns["triton"] = ("bf16", step_fn(chk.al16, img16, txt16, "triton", False))
        own_gemms = with_env(step_fn(chk.al16, img16, txt16, "triton", False),
                             CARZERO_FAST_TRITON_GEMM="triton")  # fmt: skip
        fns["triton, own GEMMs"] = ("bf16", own_gemms)
        if nm <= 256:
            fns["triton, recompute all"] = ("bf16", recomputing_all(
                step_fn(chk.al16, img16, txt16, "triton", False)))  # fmt: skip
            # train mode: dropout 0.1 at every site, as CARZero trains
            fns["reference, dropout"] = (
                "fp16-autocast",
                step_fn(chk.al, img, txt, "reference", True, train=True),
            )
            fns["chunked, dropout"] = (
                "bf16",
                step_fn(chk.al16, img16, txt16, "chunked", False, train=True),
            )
        fns["triton, dropout"] = (
            "bf16",
            step_fn(chk.al16, img16, txt16, "triton", False, train=True),
        )
        for gib in budgets_gib:
            fns[f"triton@{gib:g}GiB"] = (
                "bf16",
                step_fn(chk.al16, img16, txt16, "triton", False, int(gib * 2**30)),
            )
        flops = 3 * (chk.flops(nm, nm, 197) + chk.flops(nm, nm, 98))
        chk._time_all(f"training step N=M={nm}", fns, flops, reps=3 if nm <= 256 else 1)
    return out


def _dropout_check(chk: Check) -> list[float]:
    """Train mode (dropout): triton's logits and gradients against autograd of the
    materialised PyTorch computation with the same counter-based masks, fp32, N = M = 8."""
    from carzero_fast.backends.fused import draw_dropout
    from carzero_fast.backends.fused_reference import dropout_reference_forward

    d, al = chk.cfg.d_model, chk.al
    mem, q = chk.randn(8, 197, d), chk.randn(8, d)
    g_out = chk.randn(8, 8)

    def grads(fn: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        al.zero_grad(set_to_none=True)
        a, b = leaf(mem), leaf(q)
        torch.manual_seed(3)
        out = fn(a, b)
        out.backward(g_out)
        w = torch.cat([p.grad.flatten() for p in al.parameters()])
        return [out.detach(), a.grad, b.grad, w]

    torch.manual_seed(3)
    spec = draw_dropout(chk.cfg, True)
    al.train()
    try:
        ref = grads(lambda a, b: dropout_reference_forward(al.weights(), chk.cfg, a, b, None,
                                                           spec))  # fmt: skip
        got = grads(lambda a, b: al(a, b, backend="triton"))
    finally:
        al.eval()
    return [rel(g, r) for g, r in zip(got, ref, strict=True)]
