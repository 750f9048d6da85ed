"""Compile report: every shipped kernel configuration built for one GPU architecture, no GPU
needed (`python -m carzero_fast.kernels --arch 90 --json`).

Each configuration is compiled with `triton.compile(ASTSource(...), target=GPUTarget(...))`;
the cubin's resources come from the `cuobjdump` in Triton's wheel, and the PTX says whether
the matrix code reached the tensor cores (`wgmma` on sm_90, `mma` on sm_80). fp32 in IEEE mode
is, by design, FMA code (reported with `tensor_cores: false`, `ieee_fp32: true`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .attention import attention_kernel
from .attention_backward import attention_dkdv_kernel, attention_dq_kernel, slice_width
from .common import FP_FUSION
from .configs import SHARED_LIMIT, shipped, shipped_with_dropout, table_arch, uses_tma
from .layernorm import (
    BLOCK_ROWS,
    LN_BWD_ROWS,
    LN_BWD_WARPS,
    add_layer_norm_kernel,
    layer_norm_backward_kernel,
)
from .linear import DROPOUT_BLOCK_N, linear_kernel, linear_tma_kernel
from .relu_backward import BLOCK_C as RELU_BLOCK_C
from .relu_backward import BLOCK_R as RELU_BLOCK_R
from .relu_backward import relu_backward_kernel

# CARZero's dims: D = 768, 4 heads of 192, FFN 1024, head 1024-512-256-1
D_MODEL, HEAD_DIM = 768, 192

# (dtype, dot kind, Triton input precision) compiled for every kernel
DTYPES = (
    ("bf16", "half", "ieee"),
    ("fp16", "half", "ieee"),
    ("fp32", "tf32", "tf32"),
    ("fp32", "ieee", "ieee"),
)

# the flag sets of `linear` the backend launches: Q/K/V/output projections and linear2
# (plain), linear1 and the head's hidden layers (RELU), the head's last hidden layer with the
# final logit (RELU+HEAD)
LINEAR_VARIANTS = {
    "plain": dict(RELU=False, HEAD=False, DROPOUT=False),
    "relu": dict(RELU=True, HEAD=False, DROPOUT=False),
    "relu_head": dict(RELU=True, HEAD=True, DROPOUT=False),
    "relu_dropout": dict(RELU=True, HEAD=False, DROPOUT=True),  # training, dropout on
}
# the counter-based dropout's scalars (kernels/dropout.py)
DROPOUT_SIG = {"seed": "i64", "threshold": "i64", "drop_scale": "fp32", "n0": "i32",
               "m0": "i32", "drop_tag": "i32"}  # fmt: skip


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    finally:
        os.unlink(path)

    def grab(key: str) -> int:
        m = re.search(rf"{key}[:=]\s*(\d+)", text)
        return int(m.group(1)) if m else 0

    # a stack frame is where spilled registers (and run-time indexed arrays) live
    return {"registers": grab("REG"), "spill_bytes": grab("STACK") + grab("LOCAL")}


# Integer arguments whose CARZero values are multiples of 16 (strides 768, 1024, 6144, …;
# chunk sizes are planned as multiples of 16). At run time Triton's JIT specialises such
# arguments (and 16-byte-aligned pointers) as divisible by 16, which is what lets it vectorise
# and pipeline the loads (cp.async / wgmma operands in shared memory); the report must compile
# the same specialisation. P = 197 (n_keys, the mask's row stride) is not a multiple of 16.
ALIGNED_INTS = {"n_rows", "n_out", "K", "stride_a", "stride_w", "stride_out", "res_rows",
                "stride_do", "stride_dkv", "stride_dq", "logit_cols", "n_queries", "stride_q",
                "q_item_stride", "stride_kv", "stride_x", "stride_delta", "stride_x_out",
                "stride_y", "stride_dy", "stride_dres", "stride_dx"}  # fmt: skip


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):  # noqa: ANN001
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    names = list(fn.arg_names)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, ty in signature.items()
             if ty.startswith("*") or k in ALIGNED_INTS}  # fmt: skip
    if any(ty.startswith("tensordesc") for ty in signature.values()):
        attrs = {}  # descriptors carry their own alignment; the JIT adds no hints with them
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": FP_FUSION}
    return triton.compile(src, target=target, options=options)


def _ln_flags(delta: bool = True, delta2: bool = False, write: bool = True,
              drop: bool = False, shift: bool = False) -> dict:  # fmt: skip
    """add_layer_norm_kernel's switches for one build."""
    return dict(HAS_DELTA=delta, HAS_DELTA2=delta2, HAS_SHIFT=shift, WRITE_X=write,
                DROP_DELTA=drop, DROP_Y=drop)  # fmt: skip


def _jobs(arch: int) -> list[tuple[str, dict, object, dict, dict, int, int, bool]]:
    """(kernel, config description, fn, signature, constexprs, warps, stages, matrix?)."""
    jobs = []
    for dt, kind, prec in DTYPES:
        tables = shipped(arch, kind)
        ptr = f"*{dt}"
        for variant, flags in LINEAR_VARIANTS.items():
            head = flags["HEAD"]
            cfg = tables["head" if head else "linear"]
            sig = {"p_a": ptr, "p_w": ptr, "p_bias": ptr, "p_out": ptr, "p_head_w": ptr,
                   "p_head_b": ptr, "n_rows": "i32", "n_out": "i32", "K": "i32",
                   "stride_a": "i32", "stride_w": "i32", "stride_out": "i32",
                   "logit_cols": "i32", **DROPOUT_SIG}  # fmt: skip
            if flags["DROPOUT"]:
                cfg = cfg._replace(block_n=min(cfg.block_n, DROPOUT_BLOCK_N))
            const = dict(flags, PRECISION=prec, UPCAST=False, BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8)  # fmt: skip
            desc = dict(variant=variant, dtype=dt, precision=prec, **cfg._asdict())
            jobs.append(("linear", desc, linear_kernel, sig, const, cfg.num_warps,
                         cfg.num_stages, True))  # fmt: skip
            if kind == "half" and uses_tma(arch):  # Hopper's 16-bit path: TMA-fed tiles
                bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
                sig = {"d_a": f"tensordesc<{dt}[{bm}, {bk}]>",
                       "d_w": f"tensordesc<{dt}[{bn}, {bk}]>", "p_bias": ptr, "p_out": ptr,
                       "p_head_w": ptr, "p_head_b": ptr, "n_rows": "i32", "n_out": "i32",
                       "K": "i32", "stride_out": "i32", "logit_cols": "i32",
                       **DROPOUT_SIG}  # fmt: skip
                jobs.append(("linear_tma", dict(desc), linear_tma_kernel, sig, const,
                             cfg.num_warps, cfg.num_stages, True))  # fmt: skip
        # inference without and with a mask; training with dropout (and the log-sum-exp)
        for has_mask, training in ((False, False), (True, False), (True, True)):
            cfg = tables["attention"]
            cfg = shipped_with_dropout(cfg, kind, arch) if training else cfg
            sig = {"p_q": ptr, "p_k": ptr, "p_v": ptr, "p_mask": "*i8", "p_out": ptr,
                   "p_lse": "*fp32", "n_queries": "i32", "n_keys": "i32", "stride_q": "i32",
                   "q_item_stride": "i32", "stride_kv": "i32", "stride_mask": "i32",
                   "stride_out": "i32", "scale": "fp32", **DROPOUT_SIG}  # fmt: skip
            const = dict(HEAD_DIM=HEAD_DIM, HAS_MASK=has_mask, PRECISION=prec, UPCAST=False,
                         BLOCK_M=cfg.block_m, BLOCK_P=cfg.block_p, BLOCK_C=64,
                         STORE_LSE=training, DROPOUT=training,
                         RESCALE_LOG2=cfg.rescale_log2)  # fmt: skip
            desc = dict(mask=has_mask, dropout=training, dtype=dt, precision=prec,
                        head_dim=HEAD_DIM, **cfg._asdict())  # fmt: skip
            jobs.append(("attention", desc, attention_kernel, sig, const, cfg.num_warps,
                         cfg.num_stages, True))  # fmt: skip
        for name, fn, dropout in (
            ("attention_dkdv", attention_dkdv_kernel, False),
            ("attention_dq", attention_dq_kernel, False),
            ("attention_dkdv", attention_dkdv_kernel, True),
            ("attention_dq", attention_dq_kernel, True),
        ):  # backward, as launched
            sig = {"p_q": ptr, "p_k": ptr, "p_v": ptr, "p_mask": "*i8"}
            if name == "attention_dq":  # it computes delta = rowsum(dO ∘ O) from the output
                sig["p_out"] = ptr
            sig.update({"p_do": ptr, "p_lse": "*fp32", "p_delta": "*fp32"})
            # dq: fp32 for layer 1's shared queries, the GEMM dtype with its column sums (the
            # query projection's bias gradient) for the others (both are launched; the eval
            # rows build the first, the dropout rows the second)
            dq_sig = {"p_dq": ptr if dropout else "*fp32", "p_dq_parts": "*fp32"}
            sig.update({"p_dk": "*fp32", "p_dv": "*fp32"} if name == "attention_dkdv"
                       else dq_sig)  # fmt: skip
            sig.update({"n_queries": "i32", "n_keys": "i32", "stride_q": "i32",
                        "q_item_stride": "i32", "stride_kv": "i32", "stride_mask": "i32"})
            if name == "attention_dq":
                sig["stride_out"] = "i32"
            sig.update({"stride_do": "i32", "stride_dkv" if name == "attention_dkdv"
                        else "stride_dq": "i32", "scale": "fp32", **DROPOUT_SIG})  # fmt: skip
            bwd = tables["attention_bwd"]
            bwd = shipped_with_dropout(bwd, kind, arch) if dropout else bwd
            tiles = ((bwd.dkdv_block_m, bwd.dkdv_block_p, bwd.dkdv_stages)
                     if name == "attention_dkdv"
                     else (bwd.dq_block_m, bwd.dq_block_p, bwd.dq_stages))  # fmt: skip
            const = dict(HEAD_DIM=HEAD_DIM, HAS_MASK=True, PRECISION=prec, UPCAST=False,
                         BLOCK_M=tiles[0], BLOCK_P=tiles[1],
                         BLOCK_C=slice_width(HEAD_DIM, bwd.block_c), DROPOUT=dropout)  # fmt: skip
            if name == "attention_dkdv":  # as training launches it: into the accumulators
                const["ACCUMULATE"] = True
            else:
                const["SUM_DQ"] = dropout
            desc = dict(dtype=dt, precision=prec, head_dim=HEAD_DIM, dropout=dropout,
                        block_m=tiles[0], block_p=tiles[1], block_c=const["BLOCK_C"])  # fmt: skip
            jobs.append((name, desc, fn, sig, const, bwd.num_warps, tiles[2], True))
        if kind != "tf32":  # no dot: one build per dtype. LN0(memory) (no add, 16-bit in)
            # and the residual add + LN (fp32 stream in and out, or a 16-bit one; 16-bit delta);
            # the forward without a backward: LN3 storing no stream, the FFN's pass adding
            # both branches (storing the stream, or not in the last layer)
            for name, x_ty, flags in (
                ("ln", ptr, _ln_flags(delta=False, write=False)),
                ("add_ln", "*fp32", _ln_flags()),
                ("add_ln_16bit_stream", ptr, _ln_flags()),
                ("add_ln_dropout", "*fp32", _ln_flags(drop=True)),
                ("add_ln_no_store", "*fp32", _ln_flags(write=False)),
                ("add_ln_no_store_16bit_stream", ptr, _ln_flags(write=False)),
                ("add2_ln", "*fp32", _ln_flags(delta2=True)),
                ("add2_ln_16bit_stream", ptr, _ln_flags(delta2=True)),
                ("add2_ln_no_store", "*fp32", _ln_flags(delta2=True, write=False)),
                ("add2_ln_no_store_16bit_stream", ptr, _ln_flags(delta2=True, write=False)),
                # the stream in the GEMMs' dtype, their branches added there without biases
                ("shift_ln", ptr, _ln_flags(delta=False, write=False, shift=True)),
            ):
                if name.endswith("16bit_stream") and dt == "fp32":
                    continue  # the same build as the fp32 stream's
                sig = {"p_x": x_ty, "p_delta": ptr, "p_delta2": ptr, "p_shift": "*fp32",
                       "p_x_out": x_ty if flags["WRITE_X"] else "*fp32", "p_w": ptr,
                       "p_b": ptr, "p_y": ptr, "n_rows": "i32", "res_rows": "i32",
                       "stride_x": "i32", "stride_delta": "i32", "stride_delta2": "i32",
                       "stride_x_out": "i32",
                       "stride_y": "i32", "eps": "fp32", **DROPOUT_SIG, "cols": "i32",
                       "tag_delta": "i32", "tag_y": "i32"}  # fmt: skip
                del sig["drop_tag"]
                const = dict(D=D_MODEL, BLOCK_R=BLOCK_ROWS, BLOCK_D=1024, **flags)
                warps = 8 if flags["DROP_DELTA"] else 4  # as `add_layer_norm` launches it
                jobs.append(("add_layer_norm", dict(variant=name, dtype=dt, d_model=D_MODEL),
                             add_layer_norm_kernel, sig, const, warps, 1, False))  # fmt: skip
            sig = {"p_x": "*fp32", "p_w": ptr, "p_dy": ptr, "p_dres": "*fp32", "p_dx": "*fp32",
                   "p_dx16": ptr, "p_dw_part": "*fp32", "p_db_part": "*fp32",
                   "p_ds_part": "*fp32", "n_rows": "i32", "stride_x": "i32", "stride_dy": "i32",
                   "stride_dres": "i32", "stride_dx": "i32", "stride_dx16": "i32",
                   "eps": "fp32", **DROPOUT_SIG, "cols": "i32"}  # fmt: skip
            del sig["drop_tag"]
            sig.update(tag_dx16="i32", tag_dy="i32")
            # one row block per program, or looping programs; with the residual branch's dx
            # in the GEMM dtype and its column sums (16-bit training), through the branch's
            # dropout mask (training mode, any dtype), and decoder_norm's with SimR's mask on
            # its output's gradient too
            for loop in (False, True):
                for dx16, drop, drop_dy in ((False, False, False), (True, False, False),
                                            (True, True, False), (True, True, True)):  # fmt: skip
                    if dx16 and not drop and dt == "fp32":
                        continue
                    const = dict(D=D_MODEL, HAS_DRES=not drop_dy, WRITE_DX16=dx16,
                                 DROP_DX16=drop, DROP_DY=drop_dy, LOOP=loop,
                                 BLOCK_R=LN_BWD_ROWS, BLOCK_D=1024)  # fmt: skip
                    desc = dict(dtype=dt, d_model=D_MODEL, rows=LN_BWD_ROWS, loop=loop,
                                dx16=dx16, dropout=drop, dropped_output=drop_dy)  # fmt: skip
                    jobs.append(("layer_norm_backward", desc, layer_norm_backward_kernel, sig,
                                 const, LN_BWD_WARPS, 1, False))  # fmt: skip
            # a ReLU's backward with the column sums of its result (training)
            sig = {"p_dy": ptr, "p_act": ptr, "p_dx": ptr, "p_part": "*fp32", "n_rows": "i32",
                   "n_cols": "i32", "stride_dy": "i32", "stride_act": "i32",
                   "stride_dx": "i32"}  # fmt: skip
            const = dict(BLOCK_R=RELU_BLOCK_R, BLOCK_C=RELU_BLOCK_C)
            jobs.append(("relu_backward", dict(dtype=dt), relu_backward_kernel, sig, const, 4, 1,
                         False))  # fmt: skip
    return jobs


def compile_report(arch: int) -> list[dict]:
    """One dict per shipped configuration: kernel, config, registers, spill_bytes,
    shared_bytes, tensor_cores, error. A build that needs more shared memory than the GPUs
    running this arch's table give a block (`configs.SHARED_LIMIT`) is an error: its launch
    would fail there."""
    limit = SHARED_LIMIT[table_arch(arch)]
    rows = []
    for kernel, desc, fn, sig, const, warps, stages, matrix in _jobs(arch):
        row = {"kernel": kernel, "config": dict(desc, num_warps=warps, num_stages=stages),
               "arch": arch, "matrix": matrix, "ieee_fp32": desc["dtype"] == "fp32"
               and desc.get("precision") == "ieee", "registers": None, "spill_bytes": None,
               "shared_bytes": None, "tensor_cores": None, "error": None}  # fmt: skip
        try:
            compiled = _compile(fn, sig, const, arch, warps, stages)
            row.update(_resources(compiled.asm["cubin"]))
            row["shared_bytes"] = int(compiled.metadata.shared)  # dynamic: Triton's buffers
            ptx = compiled.asm["ptx"]
            row["tensor_cores"] = bool(re.search(r"\bwgmma\b|\bwgmma\.|\bmma\.sync\b|\bmma\.", ptx))
            row["wgmma"] = "wgmma" in ptx
        except Exception as e:  # noqa: BLE001 — reported, not raised: the report lists all
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        if row["shared_bytes"] is not None and row["shared_bytes"] > limit:
            row["error"] = (f"shared memory: {row['shared_bytes']} B, over the {limit} B a "
                            f"block gets on the GPUs that run sm_{arch}'s table")  # fmt: skip
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carzero_fast.kernels",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    parser.add_argument("--json", action="store_true", help="print the JSON list only")
    args = parser.parse_args(argv)
    rows = compile_report(args.arch)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            status = r["error"] or (
                f"regs {r['registers']}, spill {r['spill_bytes']} B, "
                f"smem {r['shared_bytes']} B, tensor cores {r['tensor_cores']}"
            )
            print(f"sm_{args.arch} {r['kernel']:<10} [{cfg}]: {status}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
