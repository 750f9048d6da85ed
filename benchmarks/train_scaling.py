"""Training step against batch size: time and peak memory per backend, a memory model, and the
largest batch that fits a memory budget.

    python -m benchmarks.train_scaling [--batches 8,16,32,48] [--backends reference,chunked]
        [--budget-mib 2048] [--device cpu|cuda] [--dtype fp32|bf16] [--json out.json]

A step is CARZero's: both directions over a square batch (B images with 197 tokens, B texts
with 98), `carzero_loss`, backward, in training mode (dropout on). Peak memory is what the step
allocates beyond its inputs (`track_memory` on CPU, the CUDA allocator's peak on a GPU).
Per backend, peak = a + b·B + c·B² is fitted by least squares (the reference keeps O(B²·D)
activations, a streaming backend O(B²) logits and O(B) gradients); the largest batch under the
budget comes from the fit and is then run once to check it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import carzero_fast as cf
from carzero_fast.bench import interleaved_median
from carzero_fast.csvfiles import write_json
from carzero_fast.memory import peak_extra_mib as _peak_mib
from carzero_fast.memory import retain_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(al: cf.CrossAttentionAligner, backend: str, b: int, dev: torch.device,
              dtype: torch.dtype) -> Callable[[], object]:  # fmt: skip
    d = al.config.d_model
    img = torch.randn(b, 197, d, device=dev, dtype=dtype, requires_grad=True)
    txt = torch.randn(b, 98, d, device=dev, dtype=dtype, requires_grad=True)

    def step() -> object:
        al.zero_grad(set_to_none=True)
        img.grad = txt.grad = None
        i2t, t2i = cf.alignment_logits(al, img, txt, backend=backend)
        cf.carzero_loss(i2t, t2i).backward()
        # let go of the gradients, as an optimizer step would: the next call's peak, taken
        # from after this one, then counts its own gradients
        al.zero_grad(set_to_none=True)
        img.grad = txt.grad = None
        return None

    return step


def fit(batches: list[int], peaks: list[float]) -> list[float]:
    """Coefficients (a, b, c) of peak ≈ a + b·B + c·B² (c = 0 with fewer than 3 batches)."""
    deg = 2 if len(batches) >= 3 else 1
    coef = np.polyfit(np.asarray(batches, float), np.asarray(peaks, float), deg)[::-1]
    return [float(x) for x in coef] + [0.0] * (3 - len(coef))


def largest_batch(coef: list[float], budget_mib: float, limit: int = 1 << 20) -> int:
    """The largest B in [1, limit] whose fitted peak is within the budget (0 if none).

    A step's memory does not shrink as its batch grows, but a fit through small batches can
    (a negative linear term): B is taken as within the budget when the fit puts some batch
    at least as large within it (the largest non-decreasing curve under the fit), so that a
    dip or a bump at small B neither hides the batches measured within the budget nor
    admits batches beyond one that is over it."""
    a, b, c = coef
    xs = np.arange(1, limit + 1, dtype=np.float64)
    peaks = a + b * xs + c * xs * xs
    lowest_from_here = np.minimum.accumulate(peaks[::-1])[::-1]  # non-decreasing in B
    return int(np.count_nonzero(lowest_from_here <= budget_mib))


def run(batches: list[int], backends: list[str], budget_mib: float, dev: torch.device,
        dtype: torch.dtype, cfg: cf.AlignerConfig, repeats: int, verify: bool) -> dict:  # fmt: skip
    torch.manual_seed(0)
    al = cf.CrossAttentionAligner(cfg).to(dev, dtype).train()
    rows, models = [], {}
    peaks: dict[str, list[float]] = {backend: [] for backend in backends}
    for b in batches:
        # the backends alternate step by step at each batch (ratios within one run only)
        steps = {backend: make_step(al, backend, b, dev, dtype) for backend in backends}
        times = interleaved_median(steps, repeats, dev)
        for backend, step in steps.items():
            peak = _peak_mib(step, dev)
            peaks[backend].append(peak)
            rows.append({"backend": backend, "batch": b, "step_s": times[backend],
                         "peak_extra_mib": peak})  # fmt: skip
            print(f"  {backend:<10} B={b:<5} step {times[backend]:8.3f} s  "
                  f"peak {peak:9.1f} MiB", flush=True)  # fmt: skip
        steps = None  # their inputs freed before the next batch's
    for backend in backends:
        coef = fit(batches, peaks[backend])
        # a fit is trusted up to 4× the largest measured batch: beyond, the answer is "≥ that"
        cap = 4 * max(batches)
        b_max = largest_batch(coef, budget_mib, limit=cap)
        model = {"a_mib": coef[0], "b_mib_per_pair_row": coef[1], "c_mib_per_pair": coef[2],
                 "largest_batch_in_budget": b_max, "capped": b_max >= cap}  # fmt: skip
        if verify and b_max > 0:
            # The fit can miss (a streaming backend's chunks change shape with B): run the
            # step, and shrink the batch until its measured peak is within the budget.
            b, measured = b_max, _peak_mib(make_step(al, backend, b_max, dev, dtype), dev)
            for _ in range(8):
                if measured <= budget_mib or b <= 1:
                    break
                b = max(1, min(b - 1, int(b * (budget_mib / measured) ** 0.5)))
                measured = _peak_mib(make_step(al, backend, b, dev, dtype), dev)
            model["checked_batch"] = b
            model["measured_peak_at_checked_mib"] = measured
        models[backend] = model
    return {"budget_mib": budget_mib, "device": str(dev), "dtype": str(dtype), "rows": rows,
            "models": models}  # fmt: skip


def markdown(res: dict) -> str:
    lines = ["| backend | B | step s | peak extra MiB |", "|---|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['batch']} | {r['step_s']:.3f} | "
                     f"{r['peak_extra_mib']:.1f} |")  # fmt: skip
    lines += ["", f"| backend | peak model (MiB) | largest B in {res['budget_mib']:g} MiB "
              "by the model | checked B (measured peak) |", "|---|---|---:|---:|"]  # fmt: skip
    for name, m in res["models"].items():
        checked = ""
        if "checked_batch" in m:
            checked = f"{m['checked_batch']} ({m['measured_peak_at_checked_mib']:.1f} MiB)"
        lines.append(
            f"| {name} | {m['a_mib']:.1f} + {m['b_mib_per_pair_row']:.3f}·B + "
            f"{m['c_mib_per_pair']:.4f}·B² | {'≥ ' if m['capped'] else ''}"
            f"{m['largest_batch_in_budget']} | {checked} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,16,32,48")
    p.add_argument("--backends", default="reference,chunked")
    p.add_argument("--budget-mib", type=float, default=2048.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--d-model", type=int, default=768, help="smaller for a smoke run")
    p.add_argument("--no-verify", action="store_true", help="skip the run at the largest batch")
    p.add_argument("--json", default=None)
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory (the reference stops page-faulting "
                        "after warm-up: the strictest baseline); default: glibc's")  # fmt: skip
    args = p.parse_args(argv)
    malloc = retain_freed_memory() if args.malloc == "keep" else "default"
    try:
        batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        batches = []
    if len(batches) < 2 or batches[0] <= 0:
        print(f"train_scaling: --batches must be two or more positive integers (the memory "
              f"model is fitted through them), got {args.batches!r}", file=sys.stderr)  # fmt: skip
        return 2
    backends = [b.strip() for b in args.backends.split(",")]
    unknown = [b for b in backends if b not in cf.BACKENDS]
    if unknown or args.d_model % 4:
        print(f"train_scaling: unknown backend {unknown[0]!r}" if unknown else
              f"train_scaling: --d-model must be a multiple of 4 (4 heads), got {args.d_model}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.json:  # found now, not after the whole run
        folder = Path(args.json).absolute().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            print(f"train_scaling: cannot write --json {args.json}", file=sys.stderr)
            return 2
    cfg = cf.AlignerConfig() if args.d_model == 768 else cf.AlignerConfig(
        d_model=args.d_model, n_heads=4, n_layers=2, d_ffn=2 * args.d_model,
        head_dims=(args.d_model, args.d_model // 2))  # fmt: skip
    res = run(batches, backends, args.budget_mib, torch.device(args.device),
              DTYPES[args.dtype], cfg, max(1, args.repeats), not args.no_verify)  # fmt: skip
    res["malloc"] = malloc
    print(markdown(res))
    if args.json:
        write_json(Path(args.json), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
