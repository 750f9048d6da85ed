"""A few steps of CARZero alignment training with global negatives, under torchrun.

    torchrun --nproc_per_node 2 examples/train_distributed.py --steps 5 --batch 8

Each rank draws its own synthetic image/text token batch (a different size on the last rank,
as an uneven last batch would be), the loss covers the global batch (every rank's negatives),
`DistributedDataParallel` averages the gradients. Prints loss and step time per rank. Runs
on CPU (gloo) or one GPU per rank (NCCL); `--small` uses a tiny model for a quick check.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import carzero_fast as cf
from carzero_fast.distributed import DistributedCARZeroLoss, init_from_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="pairs per rank")
    parser.add_argument("--small", action="store_true", help="a tiny model (quick check)")
    parser.add_argument("--backend", default=None, help="aligner backend (default: auto)")
    args = parser.parse_args()

    rank, world = init_from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = (cf.AlignerConfig(d_model=64, n_heads=4, n_layers=2, d_ffn=128, head_dims=(64, 32))
           if args.small else cf.AlignerConfig())  # fmt: skip
    torch.manual_seed(0)  # the same initial weights on every rank
    aligner = cf.CrossAttentionAligner(cfg).to(device).train()
    torch.manual_seed(1 + rank)  # dropout masks (drawn from this generator) differ per rank
    model = DDP(DistributedCARZeroLoss(aligner, backend=args.backend))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # the last rank holds one pair fewer: an uneven last batch
    b = args.batch - (1 if rank == world - 1 and world > 1 else 0)
    gen = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps):
        img = torch.randn(b, 197, cfg.d_model, generator=gen).to(device)
        txt = torch.randn(b, 98, cfg.d_model, generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(img, txt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"rank {rank}/{world} step {step}: global batch loss {loss.item():.4f}, "
              f"{b} local pairs, step {dt * 1e3:.0f} ms", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
