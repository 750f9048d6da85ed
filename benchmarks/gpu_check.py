"""GPU check of the `triton` backend: correctness against `reference`, then timings.

    python -m benchmarks.gpu_check --out DIR          # on a CUDA machine, < 5 minutes
    TRITON_INTERPRET=1 python -m benchmarks.gpu_check --smoke --out DIR   # CPU dry run

1. Correctness at CARZero dims: `triton` and `chunked` against `reference` fp32, in fp32
   (IEEE unless TF32 is allowed) and bf16 (against `reference` fp32 on the bf16 model's
   weights and the rounded inputs, judged against chunked's own bf16 error, ×2); one
   direction in bf16 on every route of `triton` (`VARIANTS`, same rule), and SDPA's
   attention in fp32 with ragged text masks.
2. One direction (images as memory, P = 197) at N = M ∈ {256, 1024}: `reference` (fp16
   autocast, as CARZero ran), `chunked` (bf16), `chunked` with its attention on flash-attn's
   and xformers' kernels (when the `[gpu]` extras are installed), `torch.compile` of
   chunked's pair stage (bf16), `triton` (bf16), and `triton` on its other routes
   (`VARIANTS`) beside its default (a bf16 residual stream, to which layers 2… add their
   branches inside cuBLAS's GEMMs): its plain-epilogue GEMMs on its own kernel instead of
   cuBLAS ("own GEMMs", `CARZERO_FAST_TRITON_GEMM=triton`), an fp32 stream
   (`CARZERO_FAST_TRITON_STREAM=fp32`, the default until 2026-11-29), the bf16 stream with
   its adds in the add + LayerNorm passes (`CARZERO_FAST_TRITON_RESIDUAL=pass`), the
   attention on PyTorch's SDPA (`CARZERO_FAST_TRITON_ATTENTION=library`), 768 MiB chunks
   (fewer launches), and the default captured once in a CUDA graph and replayed (no host
   launches, no gaps between kernels: what launching costs; its replay is compared with an
   eager call).
3. Zero-shot scoring, 2048 images × 192 prompts, both directions: the same backends plus
   CARZero's own loop (one image at a time through the module, fp16 autocast), timed on the
   first images and extrapolated to 2048 (said so in the output).
4. Training: gradients of a step (both directions, `carzero_loss`, backward, tokens and
   weights) against `reference` at CARZero dims; then the step time and peak memory at
   N = M = 256 (`reference` fp16 autocast, `chunked` and `triton` bf16) and 1024 (`chunked`,
   `triton`; the reference's memory grows with N·M, so it is measured at 256 only), in eval
   mode and in train mode (dropout 0.1 at every site, as CARZero trains; triton's dropout
   is checked against a same-mask PyTorch computation first). At 256 also "triton, recompute
   all": every chunk recomputed in backward, where the default forward keeps its last one
   (`fused_train.forward_keeping_last`). Useful FLOPs of a step: 3× the forward's.

Every figure comes with useful TFLOP/s (`Check.flops`: the work the math needs, the same for
every row, so TFLOP/s ranks rows as time does), the fraction of the bf16 GEMM ceiling measured
in this run, and the peak extra memory of the call.
Writes `gpu_check.json` and `gpu_check.md` into --out; sections fail independently.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import carzero_fast as cf
from carzero_fast.backends import chunked as chunked_mod
from carzero_fast.backends.plan import executed_flops
from carzero_fast.memory import device_sync as sync
from carzero_fast.memory import peak_extra_mib

from .gpu_common import (
    BUDGET,
    autocast,
    gemm_ceiling_tflops,
    graph_replay,
    make_model,
    median_time,
    passed,
    record,
    rel,
    with_env,
)
from .gpu_training import leaf, step_fn, training

# the triton backend's routes beside its defaults: row suffix → environment while it runs
VARIANTS = {
    "": {},
    ", own GEMMs": {"CARZERO_FAST_TRITON_GEMM": "triton"},
    ", fp32 stream": {"CARZERO_FAST_TRITON_STREAM": "fp32"},
    ", adds in passes": {"CARZERO_FAST_TRITON_RESIDUAL": "pass"},
    ", SDPA attention": {"CARZERO_FAST_TRITON_ATTENTION": "library"},
    ", fp32 stream + SDPA": {"CARZERO_FAST_TRITON_STREAM": "fp32",
                             "CARZERO_FAST_TRITON_ATTENTION": "library"},
}  # fmt: skip


class Check:
    def __init__(self, dev: torch.device, smoke: bool) -> None:
        self.dev, self.smoke = dev, smoke
        tiny = cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96, head_dims=(80, 48, 24))
        self.cfg = tiny if smoke else cf.AlignerConfig()
        self.al = make_model(self.cfg, dev)
        self.al16 = make_model(self.cfg, dev).to(torch.bfloat16)
        # the oracle of every bf16 check: the bf16 model's own weights in fp32, through
        # `reference` on the rounded inputs; the inputs' and weights' rounding, common to all
        # paths, would otherwise drown what each path's arithmetic adds
        self.al16_fp32 = make_model(self.cfg, dev).to(torch.bfloat16).float()
        self.results: dict = {"sections": {}, "rows": []}
        self.ceiling = 0.0
        self.save: Callable[[], None] = lambda: None  # main's: writes the results so far

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, device=self.dev).to(dtype)

    # -- 1. correctness ------------------------------------------------------------------------
    def correctness(self) -> dict:
        n, m = (5, 7) if self.smoke else (24, 40)
        d = self.cfg.d_model
        img, txt = self.randn(n, 197, d), self.randn(m, 98, d)
        lengths = torch.randint(5, 99, (m,), device=self.dev)
        txt_mask = torch.arange(98, device=self.dev)[None, :] >= lengths[:, None]
        img16, txt16 = img.bfloat16(), txt.bfloat16()
        out: dict = {}  # each check recorded on its own: one that raises costs only its entry
        with torch.no_grad():
            ref = self.al.both_directions(img, txt, None, txt_mask, backend="reference")
            oracle = self.al16_fp32.both_directions(img16.float(), txt16.float(), None,
                                                    txt_mask, backend="reference")  # fmt: skip

            def errors(al, a, b, backend, want, **env):  # noqa: ANN001, ANN202
                got = with_env(lambda: al.both_directions(a, b, None, txt_mask,
                                                          backend=backend), **env)()  # fmt: skip
                return [rel(g, r) for g, r in zip(got, want, strict=True)]

            for backend in ("triton", "chunked"):
                record(out, f"{backend}_fp32", lambda b=backend: errors(self.al, img, txt, b, ref))
                record(out, f"{backend}_bf16",
                       lambda b=backend: errors(self.al16, img16, txt16, b, oracle))  # fmt: skip
            # one direction (images as memory): the 16-bit residual stream and SDPA's attention
            # against the defaults
            q16 = self.randn(m, d).bfloat16()
            oracle1 = self.al16_fp32(img16.float(), q16.float(), backend="reference")
            for name, env in VARIANTS.items():
                run = with_env(lambda: self._call(self.al16, img16, q16, "triton"), **env)
                record(out, f"triton_bf16_one_direction{name}",
                       lambda run=run: rel(run(), oracle1))  # fmt: skip
            record(out, "chunked_bf16_one_direction",
                   lambda: rel(self._call(self.al16, img16, q16, "chunked"), oracle1))  # fmt: skip
            # SDPA's attention with ragged text masks, fp32 (memory-efficient kernels)
            record(out, "triton_fp32_sdpa", lambda: errors(self.al, img, txt, "triton", ref,
                                                           **VARIANTS[", SDPA attention"]))
            zs_ref = cf.zero_shot_scores(self.al, img, txt, None, txt_mask, backend="reference")
            record(out, "zero_shot_fp32", lambda: rel(cf.zero_shot_scores(
                self.al, img, txt, None, txt_mask, backend="triton"), zs_ref))  # fmt: skip
            # a NaN token gives its item's logits NaN (cuBLAS's ReLU epilogue, the kernels'
            # ReLU and softmax must not turn it into a number), the other items' stay finite
            nan_img = img16.clone()
            nan_img[1, 3, 5] = float("nan")
            for backend in ("triton", "chunked"):
                def nan_rows(b: str = backend) -> bool:
                    got = self._call(self.al16, nan_img, q16, b)
                    return bool(got[1].isnan().all()) and not bool(got[[0, 2]].isnan().any())

                record(out, f"{backend}_bf16_nan_rows", nan_rows)
        from carzero_fast.kernels.configs import tf32_allowed

        out["tf32_allowed"] = tf32_allowed()
        out["pass_fp32"] = (passed(out["triton_fp32"], lambda v: max(v) < 1e-4)
                            and passed(out["chunked_fp32"], lambda v: max(v) < 1e-4)
                            and passed(out["zero_shot_fp32"], lambda v: v < 1e-4))  # fmt: skip
        out["pass_bf16"] = passed(out["chunked_bf16"], lambda c: passed(
            out["triton_bf16"], lambda t: all(x <= 2 * y for x, y in zip(t, c, strict=True))))
        out["pass_nan"] = all(out.get(f"{b}_bf16_nan_rows") is True for b in ("triton", "chunked"))
        chunked1 = out["chunked_bf16_one_direction"]
        out["pass_variants"] = passed(out["triton_fp32_sdpa"], lambda v: max(v) < 1e-4) and all(
            passed(chunked1, lambda c, v=v: passed(v, lambda t: t <= 2 * c))
            for k, v in out.items() if k.startswith("triton_bf16_one_direction"))  # fmt: skip
        return out

    # -- 2./3. timings -------------------------------------------------------------------------
    def row(self, case: str, backend: str, dtype: str, seconds: float, flops: float,
            peak_mib: float, note: str = "") -> dict:  # fmt: skip
        r = {"case": case, "backend": backend, "dtype": dtype, "ms": seconds * 1e3,
             "tflops": flops / seconds / 1e12, "frac_ceiling": flops / seconds / 1e12
             / self.ceiling, "peak_extra_mib": peak_mib, "note": note}  # fmt: skip
        self.results["rows"].append(r)
        print(f"  {case:<28} {backend:<22} {dtype:<10} {r['ms']:9.2f} ms "
              f"{r['tflops']:7.1f} TFLOP/s  peak {peak_mib:9.1f} MiB {note}",
              flush=True)  # fmt: skip
        return r

    def flops(self, n: int, m: int, p: int) -> float:
        """Useful FLOPs of one direction, n items × m queries: the work its math needs, K/V
        once per item and layer 1's query projection once per query (`plan.executed_flops`,
        kv form). Every row is credited with these, whatever it executes: the original's count
        (`AlignerConfig.flops_per_pair`) has that projection once per pair, 4% more at P = 197,
        which would credit the reference's redundant work and lift every fraction of the
        ceiling by as much (rows before 2026-12-07 used it)."""
        return float(executed_flops(self.cfg, n, m, p, folded=False))

    def compiled_chunked(self) -> Callable[..., object]:
        """chunked with its pair stage under torch.compile (the executor's loop stays eager)."""
        compiled = torch.compile(chunked_mod.pair_chunk_forward, dynamic=False)

        def run(fn: Callable[[], object]) -> object:
            original = chunked_mod.pair_chunk_forward
            chunked_mod.pair_chunk_forward = compiled
            try:
                return fn()
            finally:
                chunked_mod.pair_chunk_forward = original

        return run

    def one_direction(self, sizes: tuple[int, ...], with_compile: bool) -> None:
        for nm in sizes:
            self._one_size(nm, with_compile)

    def _one_size(self, nm: int, with_compile: bool) -> None:
        d = self.cfg.d_model
        case = f"one direction N=M={nm}"
        mem, q = self.randn(nm, 197, d), self.randn(nm, d)
        mem16, q16 = mem.bfloat16(), q.bfloat16()
        fns: dict[str, tuple[str, Callable[[], object]]] = {}

        def ref() -> object:
            with torch.no_grad(), autocast(self.dev):
                return self.al(mem, q, backend="reference")

        fns["reference"] = ("fp16-autocast" if self.dev.type == "cuda" else "fp32", ref)
        fns["chunked"] = ("bf16", lambda: self._call(self.al16, mem16, q16, "chunked"))
        if with_compile:  # its row and the two baselines of its ratios, timed again
            wrap = self.compiled_chunked()
            fns["chunked+torch.compile"] = (
                "bf16",
                lambda: wrap(lambda: self._call(self.al16, mem16, q16, "chunked")),
            )
            self._time_all(case + " (torch.compile run)", fns, self.flops(nm, nm, 197))
            return
        from carzero_fast.backends.external_attention import available, use_attention

        for impl, found in available().items():  # the [gpu] extras, when installed
            if impl != "sdpa" and found:

                def on_impl(impl: str = impl) -> object:
                    with use_attention(impl):
                        return self._call(self.al16, mem16, q16, "chunked")

                fns[f"chunked+{impl}"] = ("bf16", on_impl)

        def triton(budget: int = BUDGET) -> object:
            return self._call(self.al16, mem16, q16, "triton", budget)

        for name, env in VARIANTS.items():
            fns[f"triton{name}"] = ("bf16", with_env(triton, **env))
        fns["triton, 768 MiB chunks"] = ("bf16", lambda: triton(768 * 2**20))
        if self.dev.type == "cuda":  # the default's kernels without launch gaps
            fns["triton, CUDA graph replay"] = ("bf16", graph_replay(triton, self.dev))
        self._time_all(case, fns, self.flops(nm, nm, 197))

    def _call(self, al: cf.CrossAttentionAligner, mem, q, backend: str,  # noqa: ANN001, ANN202
              budget: int = BUDGET):  # fmt: skip
        with torch.no_grad():
            return al(mem, q, backend=backend, chunk_budget_bytes=budget)

    def _time_all(self, case: str, fns: dict, flops: float, reps: int = 3) -> None:
        base = {}
        for backend, (dtype, fn) in fns.items():
            try:
                t = median_time(fn, self.dev, reps)
                peak = peak_extra_mib(fn, self.dev)
            except Exception as e:  # noqa: BLE001 — recorded; the other rows still run
                print(f"  {case} {backend}: FAILED {type(e).__name__}: {e}", flush=True)
                self.results["rows"].append({"case": case, "backend": backend, "error": repr(e)})
                self.save()
                continue
            r = self.row(case, backend, dtype, t, flops, peak)
            base[backend] = r
            self.save()
        for backend, r in base.items():
            # train-mode rows against the baselines' train-mode rows
            mode = ", dropout" if backend.endswith(", dropout") else ""
            if "reference" + mode in base:
                r["x_reference"] = base["reference" + mode]["ms"] / r["ms"]
            if "chunked" + mode in base:
                r["x_chunked"] = base["chunked" + mode]["ms"] / r["ms"]
            if "carzero-loop" in base:
                r["x_carzero_loop"] = base["carzero-loop"]["ms"] / r["ms"]

    def zero_shot(self, n_img: int, n_txt: int, loop_images: int) -> None:
        d = self.cfg.d_model
        img, txt = self.randn(n_img, 197, d), self.randn(n_txt, 98, d)
        img16, txt16 = img.bfloat16(), txt.bfloat16()
        case = f"zero-shot {n_img}x{n_txt} both dirs"
        flops = self.flops(n_img, n_txt, 197) + self.flops(n_txt, n_img, 98)

        def loop() -> object:
            # CARZero's released inference: one image at a time through the fusion module
            out = []
            with torch.no_grad(), autocast(self.dev):
                for i in range(loop_images):
                    i2t = self.al(img[i : i + 1], txt[:, 0], backend="reference")
                    t2i = self.al(txt, img[i : i + 1, 0], backend="reference")
                    out.append((i2t[0] + t2i[:, 0]) / 2)
            return out

        t_loop = median_time(loop, self.dev, reps=1) * n_img / loop_images
        self.row(case, "carzero-loop", "fp16-autocast", t_loop, flops,
                 peak_extra_mib(loop, self.dev),
                 note=f"timed on {loop_images} images, ×{n_img / loop_images:g}")  # fmt: skip
        loop_row = self.results["rows"][-1]

        def batched(al, a, b, backend):  # noqa: ANN001, ANN202
            amp = backend == "reference"

            def f() -> object:
                with torch.no_grad(), autocast(self.dev) if amp else contextlib.nullcontext():
                    return cf.zero_shot_scores(al, a, b, backend=backend)

            return f

        fns = {
            "reference": ("fp16-autocast", batched(self.al, img, txt, "reference")),
            "chunked": ("bf16", batched(self.al16, img16, txt16, "chunked")),
            "triton": ("bf16", batched(self.al16, img16, txt16, "triton")),
            "triton, SDPA attention": ("bf16", with_env(batched(self.al16, img16, txt16,
                                                                "triton"),
                                                        **VARIANTS[", SDPA attention"])),
            "triton, fp32 stream": ("bf16", with_env(batched(self.al16, img16, txt16, "triton"),
                                                     **VARIANTS[", fp32 stream"])),
        }  # fmt: skip
        self._time_all(case, fns, flops)
        for r in self.results["rows"]:
            if r.get("case") == case and "ms" in r:
                r["x_carzero_loop"] = loop_row["ms"] / r["ms"]


def _profile(chk: Check, nm: int, training: bool = False, backend: str = "triton") -> list[dict]:
    """Where a backend's time goes: CUDA time per kernel over one call (one direction), or
    over one training step (both directions)."""
    from torch.profiler import ProfilerActivity, profile

    d = chk.cfg.d_model
    mem = chk.randn(nm, 197, d, dtype=torch.bfloat16)
    if training:
        fn = step_fn(chk.al16, leaf(mem), leaf(chk.randn(nm, 98, d, dtype=torch.bfloat16)),
                      backend, amp=False)  # fmt: skip
    else:
        q = chk.randn(nm, d, dtype=torch.bfloat16)
        fn = lambda: chk._call(chk.al16, mem, q, backend)  # noqa: E731
    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(chk.dev)
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if cuda_us:
            rows.append({"name": e.key[:80], "calls": e.count, "cuda_ms": cuda_us / 1e3})
    rows.sort(key=lambda r: -r["cuda_ms"])
    total = {"name": "(all kernels)", "calls": sum(r["calls"] for r in rows),
             "cuda_ms": sum(r["cuda_ms"] for r in rows),
             "wall_ms": median_time(fn, chk.dev) * 1e3}  # fmt: skip
    for r in [total, *rows[:12]]:
        print(f"  {r['name']:<60} {r['calls']:6d} {r['cuda_ms']:9.2f} ms", flush=True)
    return [total, *rows[:25]]


Check.profile = _profile  # type: ignore[attr-defined]


def environment(dev: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
    from carzero_fast.backends.fused import kernels_unavailable

    # which of the kernels' tables ran (kernels/configs.table_arch), or why none could
    info["kernels"] = kernels_unavailable(dev)
    if info["kernels"] is None:
        from carzero_fast.kernels import configs

        arch = configs.arch_of(dev)
        info["kernels"] = f"sm_{arch}, table {configs.table_arch(arch)}"
    for pkg in ("flash_attn", "xformers"):
        try:
            __import__(pkg)
            info[pkg] = "installed: chunked+" + pkg + " rows"
        except ImportError:
            info[pkg] = "not installed"
    # the device machine's copy of the tree may carry a stale .git: the caller's word first
    info["commit"] = os.environ.get("CARZERO_COMMIT")
    if not info["commit"]:
        try:
            git = ["git", "describe", "--always", "--dirty", "--abbrev=7"]  # "-dirty": edited
            info["commit"] = subprocess.run(git, text=True, capture_output=True,
                                            check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            info["commit"] = "unknown"
    return info


def markdown(results: dict) -> str:
    lines = ["| case | backend | dtype | ms | useful TFLOP/s | % of bf16 GEMM ceiling "
             "| × reference | × chunked | × CARZero loop | peak extra MiB | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['case']} | {r['backend']} | | failed: {r['error'][:80]} |||||||")
            continue

        def f(key: str, fmt: str = "{:.2f}", r: dict = r) -> str:
            return fmt.format(r[key]) if key in r else ""

        lines.append(
            f"| {r['case']} | {r['backend']} | {r['dtype']} | {r['ms']:.2f} | {r['tflops']:.1f} "
            f"| {100 * r['frac_ceiling']:.1f}% | {f('x_reference')} | {f('x_chunked')} "
            f"| {f('x_carzero_loop', '{:.1f}')} | {r['peak_extra_mib']:.0f} | {r['note']} |"
        )
    return "\n".join(lines)


SECTIONS = ("ceiling", "correctness", "one_direction", "zero_shot", "training", "profile",
            "profile_training", "profile_chunked_training", "torch_compile")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU dry run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-training", action="store_true", help="skip the training step")
    parser.add_argument("--only", default="", help="comma-separated sections (default all): "
                        + ", ".join(SECTIONS))  # fmt: skip
    parser.add_argument(
        "--train-budgets",
        default="",
        help="extra triton training chunk budgets in GiB, comma-separated (e.g. 2,4)",
    )
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    if only - set(SECTIONS):  # a typo would run only the ceiling and exit 0
        parser.error(f"unknown --only sections {sorted(only - set(SECTIONS))}; choose from "
                     f"{', '.join(SECTIONS)}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.smoke else "cuda")
    t_start = time.perf_counter()
    chk = Check(dev, args.smoke)
    res = chk.results
    res["environment"] = environment(dev)
    print(json.dumps(res["environment"]), flush=True)

    budgets = tuple(float(b) for b in filter(None, args.train_budgets.split(",")))

    def section(name: str, fn: Callable[[], object]) -> None:
        if only and name not in only and name != "ceiling":
            return
        t0 = time.perf_counter()
        try:
            res["sections"][name] = {"result": fn()}
        except Exception as e:  # noqa: BLE001 — recorded; later sections still run
            traceback.print_exc()
            res["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
        res["sections"][name]["seconds"] = time.perf_counter() - t0
        print(f"[{name}] {time.perf_counter() - t0:.1f} s: "
              f"{json.dumps(res['sections'][name])[:400]}", flush=True)  # fmt: skip
        save()

    def save() -> None:  # after every section and timed row: a killed run keeps its results
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
        (out / "gpu_check.md").write_text(markdown(res) + "\n")

    chk.save = save

    section("ceiling", lambda: gemm_ceiling_tflops(dev, args.smoke))
    chk.ceiling = max(res["sections"]["ceiling"].get("result", {"x": float("nan")}).values())
    section("correctness", chk.correctness)
    sizes = (8, 16) if args.smoke else (256, 1024)
    section("one_direction", lambda: chk.one_direction(sizes, with_compile=False))
    section("zero_shot", lambda: chk.zero_shot(*((12, 5, 3) if args.smoke else (2048, 192, 32))))
    if not args.no_training:
        section("training", lambda: training(chk, sizes, budgets))
    if not args.smoke:
        section("profile", lambda: chk.profile(1024))
        if not args.no_training:
            section("profile_training", lambda: chk.profile(256, training=True))
            section("profile_chunked_training",
                    lambda: chk.profile(256, training=True, backend="chunked"))  # fmt: skip
    if not args.no_compile and (not only or "torch_compile" in only):
        if time.perf_counter() - t_start < 240:
            section("torch_compile", lambda: chk.one_direction(sizes[:1], with_compile=True))
        else:  # compiling takes minutes: kept within the 5-minute run, and said so
            res["sections"]["torch_compile"] = {"skipped": "the run was past 240 s"}
    res["total_seconds"] = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    print(f"total {res['total_seconds']:.0f} s", flush=True)

    def section_passed(name: str, *keys: str) -> bool:  # sections not run do not fail it
        sec = res["sections"].get(name)
        if sec is None:
            return True
        return all(sec.get("result", {}).get(k) for k in keys)

    ok = (section_passed("correctness", "pass_fp32", "pass_bf16", "pass_variants", "pass_nan")
          and section_passed("training", "pass"))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
