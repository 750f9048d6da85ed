"""Block-size sweep of the triton backend's kernels on a GPU (bf16, CARZero shapes).

    python -m benchmarks.tune_gpu --out DIR [--only passes,attention,...]  # SECTIONS
    TRITON_INTERPRET=1 python -m benchmarks.tune_gpu --smoke --out DIR   # CPU dry run

The forward's add + LayerNorm passes (each kind, with its bandwidth). For each candidate
configuration: every `linear` variant the backend launches, at a chunk's shape, on the kernel
itself against the library route's cuBLAS call on the same product (`addmm` with its bias,
ReLU fused), and the attention kernel against
PyTorch's SDPA on the same work (on contiguous K/V, and as the "library" attention route runs
it on strided K/V), the attention backward (dQ and dK/dV kernels) against
SDPA's backward on the same work; training's ReLU backward with its column sums against
PyTorch's two passes; train mode's dropout epilogue and attention beside the
same kernels without masks; then the whole forward at N = M = 1024: shipped, on its own
GEMM kernels, and with the fastest configuration of each forward kernel. Each section is
guarded and `tune_gpu.json` rewritten after it (a failure is recorded under "errors").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from carzero_fast.kernels import (
    add_layer_norm,
    attention,
    attention_backward,
    attention_torch,
    layer_norm_backward,
    linear,
    relu_backward,
    relu_backward_torch,
)
from carzero_fast.kernels import configs as kc
from carzero_fast.kernels import layernorm as kln

from .gpu_common import make_model, median_time, with_env
from .gpu_training import leaf, step_fn

# (config, TMA kernel?) — every candidate compiles without spills for sm_90; the first is
# the shipped one
LINEAR_CANDIDATES = [
    (kc.LinearConfig(128, 128, 64, 8, 3), True),
    (kc.LinearConfig(128, 256, 64, 8, 3), True),
    (kc.LinearConfig(128, 128, 64, 8, 4), True),
    (kc.LinearConfig(128, 256, 64, 8, 4), True),
    (kc.LinearConfig(128, 128, 64, 8, 3), False),
]
# the second rescales the accumulators at every key block (the textbook online softmax, no
# branch; the shipped threshold skips most of those [64, 192] multiplies), the last takes
# key blocks of 64 (fewer steps; 207 registers against 158 on sm_90, no spills)
ATTENTION_CANDIDATES = [
    kc.AttentionConfig(64, 32, 4, 3),
    kc.AttentionConfig(64, 32, 4, 3, rescale_log2=0.0),
    kc.AttentionConfig(64, 32, 4, 2),
    kc.AttentionConfig(64, 16, 4, 3),
    kc.AttentionConfig(128, 32, 8, 3),
    kc.AttentionConfig(64, 64, 4, 3),
]
# backward tiles (dq_block_m, dq_block_p, dkdv_block_m, dkdv_block_p, warps, dq_stages,
# dkdv_stages, block_c); spill-free for sm_90 without dropout (the sweep runs none); the last
# is the first design's head tile padded to 256 columns, for comparison
ATTENTION_BWD_CANDIDATES = [
    kc.AttentionBwdConfig(64, 32, 64, 32, 8, 2, 2, 64),
    kc.AttentionBwdConfig(64, 64, 64, 32, 8, 2, 2, 64),
    kc.AttentionBwdConfig(64, 32, 64, 32, 8, 3, 3, 64),
    kc.AttentionBwdConfig(128, 32, 64, 32, 8, 2, 2, 64),
    kc.AttentionBwdConfig(64, 32, 128, 32, 8, 2, 2, 64),
    kc.AttentionBwdConfig(64, 16, 64, 16, 8, 2, 2, 256),
]

# LayerNorm backward (rows per block, warps, programs per SM: 0 = one program per row block,
# else looping programs); the shipped one first. With the loop, 4 warps take 164-194
# registers: 3 programs fit an SM
LN_BWD_CANDIDATES = [(4, 4, 0), (4, 4, 3), (4, 4, 6), (8, 8, 2), (2, 4, 3), (8, 8, 0)]


def bench(fn, dev: torch.device) -> float:  # noqa: ANN001
    """Median seconds of fn (CUDA events through triton.testing on a GPU)."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# what `--only` can pick; every section is guarded (a failure is recorded and the others run)
# and the JSON is rewritten after each, so a late failure loses nothing already measured
SECTIONS = ("passes", "linear", "attention", "dropout", "attention_bwd", "dq_sums",
            "layer_norm_bwd", "backend")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "tune_out"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="",
                        help=f"comma-separated sections: {', '.join(SECTIONS)}")  # fmt: skip
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    if only - set(SECTIONS):
        parser.error(f"unknown --only sections {sorted(only - set(SECTIONS))}; choose from "
                     f"{', '.join(SECTIONS)}")  # fmt: skip

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.smoke else "cuda")
    arch = kc.arch_of(dev)
    dt = torch.bfloat16
    d, f, heads, p = (64, 96, 4, 17) if args.smoke else (768, 1024, 4, 197)
    rows = 64 if args.smoke else 32768
    torch.manual_seed(0)

    def rnd(*shape: int, dtype: torch.dtype = dt, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    results: dict = {"device": str(dev), "arch": arch, "errors": {}, "linear": [],
                     "attention": [], "attention_bwd": []}  # fmt: skip
    if dev.type == "cuda":
        results["device"] = torch.cuda.get_device_name(dev)

    def run_section(name: str, fn) -> None:  # noqa: ANN001
        if only and name not in only:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — recorded; the other sections still run
            results["errors"][name] = repr(e)[:500]
            print(f"{name}: FAILED {e!r}", flush=True)
        (out_dir / "tune_gpu.json").write_text(json.dumps(results, indent=1))

    x = rnd(rows, d, dtype=torch.float32)
    g, bt = rnd(d), rnd(d)
    w_dd, b_d = rnd(d, d, scale=d**-0.5), rnd(d)
    w_fd, b_f = rnd(f, d, scale=d**-0.5), rnd(f)
    w_df = rnd(d, f, scale=f**-0.5)
    a_d, a_f = rnd(rows, d), rnd(rows, f)
    y_d, y_f = torch.empty_like(a_d), torch.empty_like(a_f)

    def passes() -> None:
        """The forward's add + LayerNorm passes (fp32 stream, 16-bit branches and outputs;
        bytes per element read and written), the residual GEMMs, the ReLU backward."""
        a_d2 = rnd(rows, d)
        x16, shift = rnd(rows, d), rnd(d, dtype=torch.float32)
        ln_passes = {
            "add, stream in place": (dict(delta=a_d, x_out=x), 4 + 2 + 4 + 2),
            "add, no stream out (LN3)": (dict(delta=a_d), 4 + 2 + 2),
            "add both branches, stream in place": (dict(delta=a_d, delta2=a_d2, x_out=x),
                                                   4 + 2 + 2 + 4 + 2),
            "add both branches, no stream out": (dict(delta=a_d, delta2=a_d2), 4 + 2 + 2 + 2),
            # a 16-bit stream whose GEMMs add their products to it (bias left out)
            "16-bit stream read, shift": (dict(shift=shift), 2 + 2),
        }  # fmt: skip
        results["add_layer_norm"] = {}
        for name, (kw, per_elem) in ln_passes.items():
            x_in = x16 if "shift" in kw else x
            t_ln = bench(lambda kw=kw, x_in=x_in: add_layer_norm(x_in, g, bt, 1e-5, y_d, **kw),
                         dev)  # fmt: skip
            tb_s = rows * d * per_elem / t_ln / 1e12
            results["add_layer_norm"][name] = {"us": t_ln * 1e6, "tb_s": tb_s}
            print(f"add_layer_norm {rows}x{d} [{name}]: {t_ln * 1e6:.1f} us, {tb_s:.2f} TB/s")
        # the same GEMMs with the bias epilogue (the branch written apart) and adding into the
        # 16-bit stream in place (cuBLAS reading it as C), as the forward's two residual routes
        results["residual_gemm"] = {}
        for name, a_in, w_in in (("out proj", a_d, w_dd), ("linear2", a_f, w_df)):
            flops = 2 * rows * d * a_in.shape[1]
            t_bias = bench(lambda a_in=a_in, w_in=w_in: torch.addmm(b_d, a_in, w_in.t(), out=y_d),
                           dev)  # fmt: skip
            t_add = bench(lambda a_in=a_in, w_in=w_in: x16.addmm_(a_in, w_in.t()), dev)
            results["residual_gemm"][name] = {
                "bias_us": t_bias * 1e6, "into_stream_us": t_add * 1e6,
                "bias_tflops": flops / t_bias / 1e12,
                "into_stream_tflops": flops / t_add / 1e12}  # fmt: skip
            print(f"residual gemm [{name}]", json.dumps(results["residual_gemm"][name]), flush=True)
        # training's ReLU backward with the next bias gradient, against PyTorch's two passes
        act = torch.relu(rnd(rows, f))
        t_kernel = bench(lambda: relu_backward(a_f, act), dev)
        t_torch = bench(lambda: relu_backward_torch(a_f, act), dev)
        results["relu_backward"] = {"kernel_us": t_kernel * 1e6, "torch_us": t_torch * 1e6,
                                    "kernel_tb_s": rows * f * 6 / t_kernel / 1e12}  # fmt: skip
        print("relu_backward", json.dumps(results["relu_backward"]), flush=True)

    def linear_sweep() -> None:
        """Each candidate on the kernel itself (the library route would run cuBLAS for these
        plain epilogues on CUDA) against the library route's own call on the same product."""
        w_kv, b_kv = rnd(8 * d, d, scale=d**-0.5), rnd(8 * d)
        hw1, hb1 = rnd(f // 2, f, scale=f**-0.5), rnd(f // 2)
        kv_rows = rows // 4
        y_h, y_kv = rnd(rows, f // 2), rnd(kv_rows, 8 * d)
        relu_mm = torch._addmm_activation
        variants = {  # name: (launch(tma), flops, the library route on the same product)
            "q/out proj": (lambda t: linear(a_d, w_dd, b_d, out=y_d, tma=t), 2 * rows * d * d,
                           lambda: torch.addmm(b_d, a_d, w_dd.t(), out=y_d)),
            "kv proj (4 layers)": (
                lambda t: linear(a_d[:kv_rows], w_kv, b_kv, out=y_kv, tma=t),
                2 * kv_rows * d * 8 * d, lambda: torch.addmm(b_kv, a_d[:kv_rows], w_kv.t(),
                                                             out=y_kv)),
            "linear1 relu": (lambda t: linear(a_d, w_fd, b_f, relu=True, out=y_f, tma=t),
                             2 * rows * d * f, lambda: relu_mm(b_f, a_d, w_fd.t(), out=y_f)),
            "linear2": (lambda t: linear(a_f, w_df, b_d, out=y_d, tma=t), 2 * rows * d * f,
                        lambda: torch.addmm(b_d, a_f, w_df.t(), out=y_d)),
            "head relu": (lambda t: linear(a_f, hw1, hb1, relu=True, out=y_h, tma=t),
                          rows * f * f, lambda: relu_mm(hb1, a_f, hw1.t(), out=y_h)),
        }  # fmt: skip
        base_lin = kc.override("linear", arch, "half", LINEAR_CANDIDATES[0][0])
        try:
            for cand, tma in LINEAR_CANDIDATES:
                kc.override("linear", arch, "half", cand)
                config = dict(cand._asdict(), tma=tma)
                for name, (fn, flops, library) in variants.items():
                    try:
                        own = with_env(lambda fn=fn, tma=tma: fn(tma),
                                       CARZERO_FAST_TRITON_GEMM="triton")  # fmt: skip
                        t, tc = bench(own, dev), bench(library, dev)
                        row = {"config": config, "variant": name, "us": t * 1e6,
                               "tflops": flops / t / 1e12,
                               "cublas_tflops": flops / tc / 1e12}  # fmt: skip
                    except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
                        row = {"config": config, "variant": name, "error": repr(e)[:300]}
                    results["linear"].append(row)
                    print("linear", json.dumps(row), flush=True)
        finally:
            kc.override("linear", arch, "half", base_lin)

    items, m = (3, 10) if args.smoke else (16, 1024)
    kv = rnd(items * p, 2 * d)
    q = rnd(items * m, d)
    o = torch.empty_like(q)
    k_, v_ = kv[:, :d], kv[:, d:]
    qh = q.view(items, m, heads, d // heads).transpose(1, 2)
    kh = k_.reshape(items, p, heads, d // heads).transpose(1, 2).contiguous()
    vh = v_.reshape(items, p, heads, d // heads).transpose(1, 2).contiguous()
    flops = 4 * items * m * p * d

    def sweep(kernel: str, candidates: list, launch, flops: int, baseline_s: float) -> None:  # noqa: ANN001
        """Time `launch` under each candidate config of `kernel` into results[kernel]."""
        shipped = kc.override(kernel, arch, "half", candidates[0])
        try:
            for cand in candidates:
                kc.override(kernel, arch, "half", cand)
                try:
                    t = bench(launch, dev)
                    row = {"config": cand._asdict(), "us": t * 1e6, "tflops": flops / t / 1e12,
                           "sdpa_tflops": flops / baseline_s / 1e12}  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    row = {"config": cand._asdict(), "error": repr(e)[:300]}
                results[kernel].append(row)
                print(kernel, json.dumps(row), flush=True)
        finally:
            kc.override(kernel, arch, "half", shipped)

    def attention_section() -> None:
        # SDPA on contiguous K/V, and as CARZERO_FAST_TRITON_ATTENTION=library runs it: K/V as
        # column slices of one (items·P, 2D) buffer, the output a fresh tensor
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh), dev)
        t_lib = bench(lambda: attention_torch(q, k_, v_, heads, items, m), dev)
        results["attention_baselines"] = {"sdpa_contiguous_tflops": flops / t_sdpa / 1e12,
                                          "sdpa_strided_tflops": flops / t_lib / 1e12}  # fmt: skip
        print("attention baselines", json.dumps(results["attention_baselines"]), flush=True)
        sweep("attention", ATTENTION_CANDIDATES,
              lambda: attention(q, k_, v_, heads, items, m, out=o), flops, t_sdpa)  # fmt: skip

    def dropout_section() -> None:
        results["dropout"] = {}  # filled row by row: a failed row costs only itself
        time_dropout(a_d, w_fd, b_f, y_f, q, k_, v_, o, heads, items, m, dev,
                     results["dropout"])  # fmt: skip

    def bwd_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lse, the output's gradient, fp32 dK/dV accumulators) of the attention above."""
        lse = torch.empty((items * m, heads), dtype=torch.float32, device=dev)
        attention(q, k_, v_, heads, items, m, out=o, lse=lse)
        acc = torch.zeros((items * p, 2 * d), dtype=torch.float32, device=dev)
        return lse, rnd(items * m, d), acc

    def attention_bwd_section() -> None:
        # both kernels, dK/dV added into fp32 accumulators as training does; 5 products of
        # 2·m·P·D per item (S and dP recomputed, dQ, dK, dV)
        lse, do, acc = bwd_inputs()
        leaves = [t.detach().requires_grad_(True) for t in (qh, kh, vh)]
        o_ref = F.scaled_dot_product_attention(*leaves)
        do_h = do.view(items, m, heads, d // heads).transpose(1, 2)
        t_sdpa_bwd = bench(lambda: torch.autograd.grad(o_ref, leaves, do_h, retain_graph=True),
                           dev)  # fmt: skip
        sweep("attention_bwd", ATTENTION_BWD_CANDIDATES,
              lambda: attention_backward(q, k_, v_, o, do, lse, heads, items, m,
                                         dk=acc[:, :d], dv=acc[:, d:]),
              10 * items * m * p * d, t_sdpa_bwd)  # fmt: skip

    def dq_sums_section() -> None:
        lse, do, acc = bwd_inputs()
        results["dq_sums"] = {}
        time_dq_sums(q, k_, v_, o, do, lse, heads, items, m, acc, dev, results["dq_sums"])

    def layer_norm_bwd_section() -> None:
        results["layer_norm_bwd"] = []
        sweep_layer_norm_bwd(x, g, a_d, dev, args.smoke, results["layer_norm_bwd"])

    run_section("passes", passes)
    run_section("linear", linear_sweep)
    run_section("attention", attention_section)
    run_section("dropout", dropout_section)
    run_section("attention_bwd", attention_bwd_section)
    run_section("dq_sums", dq_sums_section)
    run_section("layer_norm_bwd", layer_norm_bwd_section)
    results["best"] = {"linear": best(results["linear"], "sum"),
                       "attention": best(results["attention"]),
                       "attention_bwd": best(results["attention_bwd"])}  # fmt: skip
    print("best", json.dumps(results["best"]), flush=True)
    import carzero_fast as cf

    small = cf.AlignerConfig(d_model=d, n_heads=heads, n_layers=2, d_ffn=f, head_dims=(32,))
    run_section("backend", lambda: time_backend(results, arch, rnd, dev,
                                                small if args.smoke else cf.AlignerConfig(),
                                                6 if args.smoke else 1024))  # fmt: skip
    (out_dir / "tune_gpu.json").write_text(json.dumps(results, indent=1))
    return 0


def best(rows: list[dict], key: str | None = None) -> dict | None:
    """The fastest config of a sweep's rows (`key`: summed over the variants per config)."""
    ok = [r for r in rows if "us" in r]
    if key is not None:
        per: dict[str, float] = {}
        for r in ok:
            per[json.dumps(r["config"])] = per.get(json.dumps(r["config"]), 0.0) + r["us"]
        return json.loads(min(per, key=per.get)) if per else None
    return min(ok, key=lambda r: r["us"])["config"] if ok else None


def time_backend(results: dict, arch: int, rnd, dev: torch.device, cfg, nm: int) -> None:  # noqa: ANN001
    """The whole forward at N = M = `nm`: shipped, on its own GEMM kernels (TMA and pointer:
    the shipped route runs these plain epilogues on cuBLAS), and with the sweeps' fastest
    linear and attention configurations (when both sweeps ran)."""
    import importlib

    import carzero_fast as cf
    from carzero_fast.backends.fused import triton_forward

    al = cf.CrossAttentionAligner(cfg).to(dev).to(torch.bfloat16).eval()
    w = al.weights()
    mem, qq = rnd(nm, 197, cfg.d_model), rnd(nm, cfg.d_model)
    kl = importlib.import_module("carzero_fast.kernels.linear")  # not the function
    auto_tma, never = kl.use_tma, (lambda a, w: False)
    best_lin, best_att = results["best"]["linear"], results["best"]["attention"]
    own = {"CARZERO_FAST_TRITON_GEMM": "triton"}
    runs = [("shipped", None, {}), ("own GEMMs, TMA", auto_tma, own),
            ("own GEMMs, pointer", never, own)]  # fmt: skip
    if best_lin and best_att:
        runs.append(("best, own GEMMs", None, own))
    shipped = kc.shipped(arch, "half")
    timing = results["triton_forward_ms"] = {}
    try:
        for label, tma_rule, env in runs:
            if label.startswith("best"):
                lin_cfg = dict(best_lin)
                tma_rule = auto_tma if lin_cfg.pop("tma") else never
                kc.override("linear", arch, "half", kc.LinearConfig(**lin_cfg))
                kc.override("attention", arch, "half", kc.AttentionConfig(**best_att))
            kl.use_tma = tma_rule or auto_tma

            def fwd() -> object:
                with torch.no_grad():
                    return triton_forward(w, cfg, mem, qq, None)

            t = bench(with_env(fwd, **env), dev)
            timing[label] = t * 1e3
            print(f"triton_forward N=M={nm} bf16 [{label}]: {t * 1e3:.1f} ms", flush=True)
    finally:
        kl.use_tma = auto_tma
        kc.override("linear", arch, "half", shipped["linear"])
        kc.override("attention", arch, "half", shipped["attention"])


def time_dropout(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, heads: int,
                 items: int, m: int, dev: torch.device, out: dict) -> None:  # fmt: skip
    """Train mode's kernels with their dropout masks, beside the same kernels without: linear1's
    ReLU + dropout epilogue at the shipped half-width tiles and at the full ones (which compile
    spill-free since the masks draw four columns per Philox call), and the attention forward;
    each row into `out` as it is timed (or its error)."""
    import importlib

    from carzero_fast.backends.philox import SITE_ATTENTION, SITE_FFN_HIDDEN, ChunkPos, DropoutSpec
    from carzero_fast.backends.philox import tag as site_tag

    kl = importlib.import_module("carzero_fast.kernels.linear")  # not the function
    spec = DropoutSpec.make(0.1, 1234)
    rows, f = y.shape
    flops = 2 * rows * a.shape[1] * f
    drop = (spec, ChunkPos(0, 0, m), site_tag(SITE_FFN_HIDDEN, 0))
    shipped = kl.DROPOUT_BLOCK_N
    runs = (("no dropout, cuBLAS", "library", None), ("no dropout, this kernel", "triton", None),
            (f"dropout, {shipped}-wide tiles", "auto", shipped),
            ("dropout, full tiles", "auto", 1 << 30))  # fmt: skip
    for label, gemm, block_n in runs:
        kl.DROPOUT_BLOCK_N = block_n or shipped
        run = lambda block_n=block_n: linear(a, w, b, relu=True, out=y, tma=True,  # noqa: E731
                                             dropout=drop if block_n else None)  # fmt: skip
        launch = with_env(run, CARZERO_FAST_TRITON_GEMM=gemm)
        try:
            t = bench(launch, dev)
            out[f"linear1 [{label}]"] = {"us": t * 1e6, "tflops": flops / t / 1e12}
        except Exception as e:  # noqa: BLE001 — recorded, the run goes on
            out[f"linear1 [{label}]"] = {"error": repr(e)[:300]}
        finally:
            kl.DROPOUT_BLOCK_N = shipped
    lse = torch.empty((items * m, heads), dtype=torch.float32, device=dev)
    flops = 4 * items * m * (k.shape[0] // items) * q.shape[1]
    a_drop = (spec, ChunkPos(0, 0, m), site_tag(SITE_ATTENTION, 0))
    for label, dropout in (("lse, no dropout", None), ("lse, dropout", a_drop)):
        try:
            t = bench(lambda dropout=dropout: attention(q, k, v, heads, items, m, out=o,
                                                        lse=lse, dropout=dropout), dev)  # fmt: skip
            out[f"attention [{label}]"] = {"us": t * 1e6, "tflops": flops / t / 1e12}
        except Exception as e:  # noqa: BLE001 — recorded, the run goes on
            out[f"attention [{label}]"] = {"error": repr(e)[:300]}
    for name, row in out.items():
        print(f"dropout {name}: {json.dumps(row)}", flush=True)


def time_dq_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 do: torch.Tensor, lse: torch.Tensor, heads: int, items: int, m: int,
                 acc: torch.Tensor, dev: torch.device, out: dict) -> None:  # fmt: skip
    """The query projection's bias gradient as training takes it for layers 2…: the attention
    backward with the dQ kernel's column sums (`dq_sum`), beside the backward without them
    and PyTorch's reduction over the 16-bit dq apart (what it replaced)."""
    d = q.shape[1]
    dq_sum = torch.empty(d, dtype=torch.float32, device=dev)
    kw = dict(dk=acc[:, :d], dv=acc[:, d:], dq_dtype=q.dtype)
    dq, _, _ = attention_backward(q, k, v, o, do, lse, heads, items, m, **kw)
    runs = {
        "backward with dq_sum": lambda: attention_backward(q, k, v, o, do, lse, heads, items, m,
                                                           dq_sum=dq_sum, **kw),
        "backward without": lambda: attention_backward(q, k, v, o, do, lse, heads, items, m,
                                                       **kw),
        "PyTorch sum over dq": lambda: dq.sum(0, dtype=torch.float32),
    }  # fmt: skip
    for label, run in runs.items():  # each row into `out` as it is timed (or its error)
        try:
            out[label] = {"us": bench(run, dev) * 1e6}
        except Exception as e:  # noqa: BLE001 — recorded, the run goes on
            out[label] = {"error": repr(e)[:300]}
    print("dq sums", json.dumps(out), flush=True)


def sweep_layer_norm_bwd(x: torch.Tensor, g: torch.Tensor, dy: torch.Tensor, dev: torch.device,
                         smoke: bool, out: list[dict]) -> None:  # fmt: skip
    """The LayerNorm backward under each (rows, warps, programs per SM) candidate: the kernel
    alone on `x`'s rows as 16-bit training without dropout runs it (fp32 stream, 16-bit dy,
    fp32 dres in; fp32 dx and the 16-bit dx of the residual branch out: 16 bytes per
    element), and on a GPU a whole triton training step at N = M = 256 beside the
    reference's (fp16 autocast). Each candidate's row is appended to `out` as it is timed."""
    rows, d = x.shape
    dres = torch.randn(rows, d, device=dev)
    dx16 = torch.empty((rows, d), dtype=dy.dtype, device=dev)
    shipped = (kln.LN_BWD_ROWS, kln.LN_BWD_WARPS, kln.LN_BWD_PROGRAMS_PER_SM)
    step = ref_step = None
    if not smoke:
        import carzero_fast as cf

        al = make_model(cf.AlignerConfig(), dev)
        al16 = make_model(cf.AlignerConfig(), dev).bfloat16()
        img, txt = torch.randn(256, 197, d, device=dev), torch.randn(256, 98, d, device=dev)
        img16, txt16 = leaf(img.bfloat16()), leaf(txt.bfloat16())
        step = step_fn(al16, img16, txt16, "triton", amp=False)
        ref_step = step_fn(al, leaf(img), leaf(txt), "reference", amp=True)
    try:
        for n_rows, warps, per_sm in LN_BWD_CANDIDATES:
            kln.LN_BWD_ROWS, kln.LN_BWD_WARPS, kln.LN_BWD_PROGRAMS_PER_SM = n_rows, warps, per_sm
            row: dict = {"rows": n_rows, "warps": warps, "programs_per_sm": per_sm}
            out.append(row)
            try:
                t = bench(lambda: layer_norm_backward(x, g, dy, 1e-5, dres=dres, dx16=dx16), dev)
                row.update(us=t * 1e6, tb_s=rows * d * 16 / t / 1e12)
                if step is not None:
                    row["step_ms"] = median_time(step, dev, reps=5) * 1e3
                    row["reference_step_ms"] = median_time(ref_step, dev, reps=3) * 1e3
                    row["x_reference"] = row["reference_step_ms"] / row["step_ms"]
            except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
                row["error"] = repr(e)[:300]
            print("layer_norm_bwd", json.dumps(row), flush=True)
    finally:  # the shipped configuration back, also when the sweep is interrupted
        kln.LN_BWD_ROWS, kln.LN_BWD_WARPS, kln.LN_BWD_PROGRAMS_PER_SM = shipped


if __name__ == "__main__":
    sys.exit(main())
