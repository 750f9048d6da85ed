"""Tracked tensor bytes against the resident memory they come to, on CPU.

`python3 -m benchmarks.rss` runs each case in a fresh process (so that no case inherits
another's allocator state) at CARZero dims in fp32, with glibc's default allocator settings
(what a user's process gets; `python3 -m benchmarks` keeps freed memory instead):

- tensors: the most tensor memory alive at once during one call beyond what existed before
  it (`carzero_fast.memory.track_memory`, the figure BENCHMARKS.md and the tests use);
- RSS: the process's resident-memory high-water mark during a call above its resident memory
  just before it (Linux: /proc/self/status VmHWM − VmRSS, the mark reset through
  /proc/self/clear_refs before each call), over several calls: the first call pays for
  one-time allocations (thread pools, oneDNN scratch), later calls show what a loop pays.

Cases: one direction, no grad, N = M = 64 (P = 197), and a CARZero training step (both
directions, loss, backward) at B = 48 (P = 197 images, 98 texts), each for `reference` and
`chunked`. Prints a markdown table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 2**20
CASES = [("forward", "reference"), ("forward", "chunked"), ("train", "reference"),
         ("train", "chunked")]  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_rise(fn) -> float:  # noqa: ANN001
    """MiB by which one call of `fn` raised resident memory above where it started."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def child(task: str, backend: str, size: int, small: bool, calls: int) -> dict:
    """One case in this process: {"tensors_mib", "rss_mib": [per call]}."""
    import torch

    import carzero_fast as cf
    from carzero_fast.memory import track_memory

    cfg = (cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=96, head_dims=(64, 32))
           if small else cf.AlignerConfig())  # fmt: skip
    torch.manual_seed(0)
    al = cf.CrossAttentionAligner(cfg)
    p_img, p_txt = (19, 11) if small else (197, 98)
    if task == "forward":
        al.eval()
        mem, q = torch.randn(size, p_img, cfg.d_model), torch.randn(size, cfg.d_model)

        def fn() -> None:
            with torch.no_grad():
                al(mem, q, backend=backend)
    else:
        al.train()
        img = torch.randn(size, p_img, cfg.d_model, requires_grad=True)
        txt = torch.randn(size, p_txt, cfg.d_model, requires_grad=True)

        def fn() -> None:
            img.grad = txt.grad = None
            al.zero_grad(set_to_none=True)
            cf.carzero_loss(*cf.alignment_logits(al, img, txt, backend=backend)).backward()

    rss = [_rss_rise(fn) for _ in range(calls)]
    with track_memory() as tracker:
        fn()
    return {"tensors_mib": tracker.peak_bytes / MIB, "rss_mib": rss}


def run(calls: int = 3, small: bool = False) -> list[dict]:
    rows = []
    for task, backend in CASES:
        size = (64 if task == "forward" else 48) // (8 if small else 1)
        cmd = [sys.executable, "-m", "benchmarks.rss", "--child", task, backend, str(size),
               "--calls", str(calls)] + (["--small"] if small else [])  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout  # fmt: skip
        rows.append({"task": task, "backend": backend, "size": size,
                     **json.loads(out.splitlines()[-1])})  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | backend | tensors MiB | RSS rise MiB, first call | later calls |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        case = (f"forward N=M={r['size']}" if r["task"] == "forward"
                else f"training step B={r['size']}")  # fmt: skip
        # a rise can read a hair below 0 where the call ends below its start
        first, *later = (max(0.0, v) for v in r["rss_mib"])
        span = f"{min(later):.0f}–{max(later):.0f}" if later else ""
        lines.append(f"| {case} | {r['backend']} | {r['tensors_mib']:.1f} | {first:.0f} | "
                     f"{span} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.rss",
                                description="tracked tensor bytes against resident memory")
    p.add_argument("--calls", type=int, default=3, help="calls per case (RSS per call)")
    p.add_argument("--small", action="store_true", help="a tiny model (a smoke run)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", nargs=3, metavar=("TASK", "BACKEND", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("benchmarks.rss reads /proc/self: Linux only", file=sys.stderr)
        return 2
    if args.calls < 1:
        print(f"--calls must be positive, got {args.calls}", file=sys.stderr)
        return 2
    if args.json and not (args.json.absolute().parent.is_dir()
                          and os.access(args.json.absolute().parent, os.W_OK)):  # fmt: skip
        print(f"cannot write --json {args.json}", file=sys.stderr)  # now, not after the run
        return 2
    if args.child:
        task, backend, size = args.child
        print(json.dumps(child(task, backend, int(size), args.small, args.calls)))
        return 0
    rows = run(args.calls, args.small)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
