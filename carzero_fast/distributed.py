"""Past one GPU: CARZero's InfoNCE over the global batch, and sharded zero-shot scoring.

Built on `torch.distributed` (NCCL on GPUs, gloo on CPU); no transport of our own.

**Global-negative loss.** Rank r holds B_r images and their B_r texts (pair b ↔ b; ranks may
hold different B_r, G = Σ B_r). CARZero's loss needs two G×G matrices, I2T (images as memory,
text globals as queries) and T2I. Each rank

1. all-gathers, with autograd, the *globals* (row 0 of each token tensor) of every rank:
   2·G·D elements;
2. scores its own row blocks of both matrices — its B_r images against all G text globals,
   its B_r texts against all G image globals — so every pair of the global batch is scored
   exactly once across ranks, and no per-pair activation ever leaves a rank;
3. all-gathers the score blocks (2·G·G elements) and takes its share of the loss: the
   row-wise cross-entropies of its own rows and the column-wise ones of its own columns.

The shares sum to the single-process loss, so the gradients (through the gathers' backward,
an all-reduce of the gathered tensors' gradients) sum to the single-process gradients.

Communication per step and rank (elements of the activations' dtype, scores included),
forward: one all-gather of R × 5 integers (batch sizes, D, dtype, which tokens need
gradients, whether the rank's own checks failed: ranks that disagree all raise the same
error, and a rank whose inputs fail stops the others, instead of running collectives on
mismatched bytes or leaving them waiting), all-gathers of 2 × (R·max B_r)·D globals and
2 × (R·max B_r)·G scores (padded to the largest B_r), an all-reduce of the scalar loss;
backward: all-reduce of 2 × G·D and 2 × G·G gradients. Nothing of size B·P·D (tokens) or per
pair (activations) crosses ranks.

**Dropout** (train mode) is drawn by each rank for its own rows, from its own torch
generator (as any DDP model's dropout is): the loss equals the per-rank calls', not one
process's on the concatenated batch, which would draw other masks. Ranks seeded alike draw
alike; seed each rank differently (e.g. `torch.manual_seed(seed + rank)`) for independent
masks. Without dropout (eval mode, or `dropout=0`) the loss and every gradient equal one
process's on the concatenated batch.

**Gradient scale.** `DistributedCARZeroLoss(reduction="mean")` (the default, for
`DistributedDataParallel`, which averages gradients over ranks) back-propagates world_size ×
this rank's share: after DDP's average the parameters see exactly the single-process
gradient, and the token gradients are world_size × exact (what the encoders' own DDP average
then brings back to exact). `reduction="sum"` back-propagates the share itself: token
gradients exact, parameter gradients summing to the exact ones over ranks.

**Sharded scoring.** `score_shards_to_csv` gives each rank a disjoint shard of the images,
appends its rows to its own part file batch by batch (flushed, so a killed rank loses at most
the batch in flight, and `resume=True` continues after the last complete batch, also with
another number of ranks), and rank 0 merges the parts into the one CSV through a temporary
file and an atomic rename; no rank returns before that file exists.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .aligner import CrossAttentionAligner
from .csvfiles import (
    changed_since,
    iter_complete_rows,
    part_path,
    parts_of,
    rewrite_csv,
    row_text,
    run_file,
    write_json,
)
from .loss import zero_shot_scores
from .prompts import state_fingerprint
from .validation import SUPPORTED_DTYPES, check_inputs, check_token_pair

__all__ = ["DistributedCARZeroLoss", "gather_rows", "init_from_env", "score_shards_to_csv"]


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "carzero_fast.distributed needs an initialised process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """`init_process_group` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, …),
    NCCL when CUDA is available else gloo, with a timeout so that a rank that dies makes the
    others fail instead of waiting forever. Returns (rank, world size)."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":  # before the group: NCCL binds each rank to the current device
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if not 0 <= local < torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local} names no CUDA device on this machine "
                                 f"({torch.cuda.device_count()} visible)")  # fmt: skip
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _sizes(n: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's row count (one small all-gather: the only host read of a step)."""
    _, world = _world(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    all_sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(all_sizes, mine, group=group)
    return [int(s) for s in torch.cat(all_sizes).tolist()]


def _checked_sizes(
    img_tokens: Tensor,
    txt_tokens: Tensor,
    group: dist.ProcessGroup | None,
    device: torch.device,
    problem: Exception | None = None,
) -> list[int]:
    """Every rank's pair count, from the step's one small all-gather, which also compares D,
    the dtype and whether the tokens need gradients across ranks: where they differ every
    rank raises the same error (mismatched collectives would otherwise run on wrong bytes,
    abort without naming the problem, or wait for a gradient all-reduce that never comes).
    `problem`: this rank's own inputs failed their local checks; it still joins the gather
    (else the other ranks would wait in it), then raises that error, and the others one that
    names it."""
    _, world = _world(group)
    if problem is not None:
        mine = torch.tensor([0, 0, 0, 0, 1], dtype=torch.int64, device=device)
    else:
        # per tensor: each one's globals gather runs an all-reduce in backward iff it needs them
        grad_on = torch.is_grad_enabled()
        img_grad = grad_on and img_tokens.requires_grad
        txt_grad = grad_on and txt_tokens.requires_grad
        needs_grad = int(img_grad) | 2 * int(txt_grad)
        mine = torch.tensor([img_tokens.shape[0], img_tokens.shape[2],
                             SUPPORTED_DTYPES.index(img_tokens.dtype), needs_grad, 0],
                            dtype=torch.int64, device=device)  # fmt: skip
    rows = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).tolist()
    if problem is not None:
        raise problem
    failed = [r for r, row in enumerate(table) if row[4]]
    if failed:
        raise ValueError(f"rank {failed[0]}'s tokens failed its checks (its own error names "
                         "the problem); every rank stops")  # fmt: skip
    _, d0, dtype0, grad0, _ = table[0]
    for r, (_, d, dtype, grad, _) in enumerate(table):
        if d != d0:
            raise ValueError(f"rank {r} has tokens of D = {d}, rank 0 of D = {d0}; every rank "
                             "must feed the same aligner")  # fmt: skip
        if dtype != dtype0:
            names = SUPPORTED_DTYPES[dtype], SUPPORTED_DTYPES[dtype0]
            raise TypeError(f"rank {r} has {names[0]} tokens, rank 0 {names[1]}; every rank "
                            "must use one dtype")  # fmt: skip
        if bool(grad) != bool(grad0):
            its, theirs = ("need", "do not") if grad else ("do not need", "do")
            raise ValueError(f"rank {r}'s tokens {its} gradients, rank 0's {theirs}; all "
                             "ranks must agree (a backward would wait for a gradient "
                             "all-reduce the other ranks never start)")  # fmt: skip
        if grad != grad0:
            which = {1: "img_tokens only", 2: "txt_tokens only", 3: "both"}
            raise ValueError(f"rank {r} needs gradients for {which[grad]}, rank 0 for "
                             f"{which[grad0]}; all ranks must agree (the backwards would "
                             "pair one tensor's gradient all-reduce with another's: wrong "
                             "gradients)")  # fmt: skip
    return [row[0] for row in table]


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows `(B_r, ...)` → `(Σ B_r, ...)`, with autograd: the
    backward sums the gathered tensor's gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:  # noqa: ANN001
        rank, _ = _world(group)
        pad = max(sizes)
        padded = x.new_zeros((pad, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss share reaches every row
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: Tensor, group: dist.ProcessGroup | None = None,
                sizes: list[int] | None = None) -> Tensor:  # fmt: skip
    """All ranks' `x` `(B_r, ...)` concatenated in rank order, differentiably; ranks may hold
    different B_r (pass `sizes` when known, else one all-gather finds them)."""
    if sizes is None:
        sizes = _sizes(x.shape[0], x.device, group)
    return _GatherRows.apply(x, sizes, group)


def _share(s_full: Tensor, start: int, n: int, g: int) -> Tensor:
    """This rank's share of `sym(S)` (the global mean over rows and columns): the CE of its
    rows [start, start+n) plus the CE of its columns [start, start+n), over 2·G; 16-bit
    logits' softmax in fp32, fp32 and fp64 kept (as `carzero_loss`)."""
    s = s_full.float() if s_full.dtype in (torch.float16, torch.bfloat16) else s_full
    idx = torch.arange(start, start + n, device=s.device)
    rows = F.cross_entropy(s[start : start + n], idx, reduction="sum")
    cols = F.cross_entropy(s[:, start : start + n].t(), idx, reduction="sum")
    return (rows + cols) / (2 * g)


class DistributedCARZeroLoss(nn.Module):
    """CARZero's loss over the global batch of all ranks (module docstring: the algorithm,
    the communication, the gradient scale). Wrap it in `DistributedDataParallel` to train.

    forward(img_tokens `(B_r, Pi, D)`, txt_tokens `(B_r, Pt, D)`, optional bool masks) →
    scalar: the global loss (the same value on every rank), fp32 for 16-bit tokens, else the
    tokens' dtype (as `carzero_loss`).
    """

    def __init__(
        self,
        aligner: CrossAttentionAligner,
        *,
        reduction: str = "mean",
        group: dist.ProcessGroup | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' (DDP) or 'sum', got {reduction!r}")
        self.aligner, self.reduction, self.group, self.backend = aligner, reduction, group, backend

    def forward(
        self,
        img_tokens: Tensor,
        txt_tokens: Tensor,
        img_mask: Tensor | None = None,
        txt_mask: Tensor | None = None,
    ) -> Tensor:
        rank, world = _world(self.group)
        problem: Exception | None = None
        try:  # this rank's own checks: a failure is shared in the sizes' gather
            check_token_pair(self.aligner.config, img_tokens, txt_tokens)  # before row 0
            if img_tokens.shape[0] != txt_tokens.shape[0]:
                raise ValueError(f"rank {rank}: {img_tokens.shape[0]} images but "
                                 f"{txt_tokens.shape[0]} texts; pairs must match")  # fmt: skip
            param = self.aligner.decoder_norm.weight  # the masks too, before any collective
            check_inputs(self.aligner.config, img_tokens, txt_tokens[:, 0], img_mask, param,
                         ("img_mask", "img_tokens"))  # fmt: skip
            check_inputs(self.aligner.config, txt_tokens, img_tokens[:, 0], txt_mask, param,
                         ("txt_mask", "txt_tokens"))  # fmt: skip
        except (TypeError, ValueError) as e:
            problem = e
        device = (img_tokens.device if isinstance(img_tokens, Tensor)
                  else next(self.aligner.parameters()).device)  # fmt: skip
        sizes = _checked_sizes(img_tokens, txt_tokens, self.group, device, problem)
        g, start, n = sum(sizes), sum(sizes[:rank]), sizes[rank]
        if g == 0:
            raise ValueError("the global batch is empty on every rank")
        img_glob = gather_rows(img_tokens[:, 0], self.group, sizes)  # [G, D]
        txt_glob = gather_rows(txt_tokens[:, 0], self.group, sizes)  # [G, D]
        al = self.aligner
        i2t = al(img_tokens, txt_glob, img_mask, backend=self.backend)  # [B_r, G] own rows
        t2i = al(txt_tokens, img_glob, txt_mask, backend=self.backend)  # [B_r, G]
        i2t_full = gather_rows(i2t, self.group, sizes)  # [G, G] score blocks only
        t2i_full = gather_rows(t2i, self.group, sizes)
        share = _share(i2t_full, start, n, g) + _share(t2i_full, start, n, g)
        total = share.detach().clone()
        dist.all_reduce(total, group=self.group)
        scaled = share * world if self.reduction == "mean" else share
        return scaled + (total - scaled).detach()  # value: the global loss


# ---------------------------------------------------------------------------------------------
# Sharded zero-shot scoring
# ---------------------------------------------------------------------------------------------


def score_shards_to_csv(
    aligner: CrossAttentionAligner,
    image_ids: Sequence[str],
    load_images: Callable[[Sequence[int]], Tensor],
    txt_tokens: Tensor,
    class_names: Sequence[str],
    out_csv: str | os.PathLike,
    *,
    batch_size: int = 64,
    resume: bool = False,
    probabilities: bool = False,
    backend: str | None = None,
    group: dist.ProcessGroup | None = None,
    _stop_after_batches: int | None = None,
) -> Path | None:
    """Zero-shot scores of every image for every class, sharded over the ranks.

    image_ids: N ids (the CSV's first column, in this order in the merged file);
    load_images(indices) → image tokens `(len(indices), Pi, D)` (row 0 the global) for those
    positions of `image_ids`; txt_tokens `(C, Pt, D)` one prompt per class. Rank r scores
    the batches (blocks of `batch_size` positions) r, r+R, … and appends each to its part
    file as soon as it is done; rank 0 then merges
    the parts in `image_ids` order into `out_csv` (temporary file + atomic rename) and removes
    the parts. Returns the CSV's path on rank 0, None elsewhere. Works without a process
    group too (one shard). `_stop_after_batches` is for tests: the rank raises after that many
    batches, as if killed.

    `out_csv.run.json` records what the scores depend on (the aligner's weights, the prompt
    tokens and their dtype, the classes, `probabilities`, `batch_size`) and stays beside the
    CSV; `resume=True` continues only a run that matches it (ValueError naming what
    changed), and without `resume` the part files of an earlier run are refused, not mixed
    with this one's.
    """
    rank, world = _world(group) if dist.is_initialized() else (0, 1)
    out = Path(out_csv)
    header = ["image", *class_names]
    if txt_tokens.shape[0] != len(class_names):
        raise ValueError(f"{txt_tokens.shape[0]} prompts for {len(class_names)} classes")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids must be unique (they key the resume)")
    identity = _scoring_identity(aligner, txt_tokens, class_names, probabilities, batch_size)
    if resume:
        changed = changed_since(out, identity)
        if changed:
            raise ValueError(f"resume=True: changed since the run that wrote {out}'s parts "
                             f"({run_file(out)}): {', '.join(changed)}; score with its "
                             "settings, or into another out_csv")  # fmt: skip
    elif parts_of(out):
        raise ValueError(f"{parts_of(out)[0]} is a part of an earlier run of {out}: pass "
                         "resume=True to continue it, or remove its part files")  # fmt: skip
    part = part_path(out, rank, world)
    # Batches are fixed blocks of positions (block k → rank k % R), the same in every run and
    # for every world size, so a resumed or re-sharded run computes each score in the same
    # batch as an uninterrupted single process: the CSV comes out identical, bit for bit.
    blocks = [range(lo, min(len(image_ids), lo + batch_size))
              for lo in range(0, len(image_ids), batch_size)][rank::world]  # fmt: skip
    kept: list[list[str]] = []
    if resume:
        # rows of earlier runs, whatever their number of ranks: the blocks do not depend on it
        have = {r[0]: row_text(r) for p in parts_of(out) for r in iter_complete_rows(p, header)}
        is_done = [all(image_ids[i] in have for i in b) for b in blocks]
        kept = [have[image_ids[i]] for b, d in zip(blocks, is_done, strict=True) if d for i in b]
        blocks = [b for b, d in zip(blocks, is_done, strict=True) if not d]
    if world > 1:
        dist.barrier(group)  # every rank has checked and read before any part is written
    if rank == 0 and (not resume or not run_file(out).exists()):
        write_json(run_file(out), identity)
    rewrite_csv(part, header, kept)  # complete blocks only, atomically; then batch by batch
    with open(part, "a", newline="") as f:
        w = csv.writer(f)
        for n_done, idx in enumerate(blocks):
            if _stop_after_batches is not None and n_done >= _stop_after_batches:
                raise RuntimeError(f"rank {rank}: stopped after {n_done} batches (test hook)")
            with torch.no_grad():
                s = zero_shot_scores(aligner, load_images(list(idx)), txt_tokens, backend=backend)
            if probabilities:
                s = torch.sigmoid(s)
            for i, row in zip(idx, s.float().cpu().tolist(), strict=True):
                w.writerow([image_ids[i], *(f"{v:.9g}" for v in row)])
            f.flush()
            os.fsync(f.fileno())
    if world > 1:
        dist.barrier(group)
    on_rank0(lambda: _merge_parts(out, header, image_ids, world), f"merge {out}", group)
    return out if rank == 0 else None


def _scoring_identity(aligner: CrossAttentionAligner, txt_tokens: Tensor,
                      class_names: Sequence[str], probabilities: bool,
                      batch_size: int) -> dict:  # fmt: skip
    """What `score_shards_to_csv`'s scores depend on beyond rounding (its run file)."""
    prompts = hashlib.sha256(str(tuple(txt_tokens.shape)).encode())
    prompts.update(txt_tokens.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"aligner_sha256": state_fingerprint(aligner), "prompts_sha256": prompts.hexdigest(),
            "dtype": str(txt_tokens.dtype), "classes": list(class_names),
            "probabilities": probabilities, "batch_size": batch_size}  # fmt: skip


def on_rank0(fn: Callable[[], object], what: str, group: dist.ProcessGroup | None = None) -> None:
    """Run `fn` on rank 0 (alone when there is no process group); every rank then raises
    rank 0's error if it failed: none returns before `fn` is done, none reports success when
    it failed (e.g. a merge of the ranks' part files)."""
    rank, world = _world(group) if dist.is_initialized() else (0, 1)
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — every rank raises it, below
            error = f"rank 0 could not {what}: {type(e).__name__}: {e}"
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0,
                                   group=group)  # fmt: skip
        error = box[0]
    if error is not None:
        raise RuntimeError(error)


def _merge_parts(out: Path, header: list[str], image_ids: Sequence[str], world: int) -> None:
    """This run's parts → `out` in `image_ids` order; then every part file of `out` goes
    (earlier runs' of another number of ranks included: their rows were carried over)."""
    parts = [part_path(out, r, world) for r in range(world)]
    rows = {r[0]: row_text(r) for p in parts for r in iter_complete_rows(p, header)}  # text
    missing = [i for i in image_ids if i not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no scores (first: {missing[0]})")
    rewrite_csv(out, header, [rows[i] for i in image_ids])
    for p in parts_of(out):
        p.unlink()
