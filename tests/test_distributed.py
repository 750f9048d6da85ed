"""Global-negative InfoNCE and sharded scoring on torch.distributed (gloo, spawned ranks)."""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_aligner, rel_err
from torch.nn.parallel import DistributedDataParallel as DDP

import carzero_fast as cf
from carzero_fast.distributed import DistributedCARZeroLoss, score_shards_to_csv

CFG = cf.AlignerConfig(d_model=32, n_heads=4, n_layers=2, d_ffn=48, head_dims=(40, 24, 16),
                       dropout=0.0)  # fmt: skip
P_IMG, P_TXT = 7, 5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(sizes: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    return (torch.randn(n, P_IMG, CFG.d_model, generator=g),
            torch.randn(n, P_TXT, CFG.d_model, generator=g))  # fmt: skip


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))  # fmt: skip


def _finish() -> None:
    """End a spawned rank that succeeded: all ranks meet, the group is destroyed, and the
    process leaves without the interpreter's teardown. Gloo's native threads can outlive
    the group and abort the process during that teardown (CI saw `terminate called without
    an active exception` once, after every result had been written); the results are on
    disk by then, so the exit status must not depend on it."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _loss_worker(rank: int, world: int, port: int, sizes: list[int], mode: str, out: str) -> None:
    _init(rank, world, port)
    torch.set_num_threads(1)
    comm: list[tuple[str, int]] = []
    for name in ("all_gather", "all_reduce"):
        original = getattr(dist, name)

        def record(*args, _name=name, _orig=original, **kw):  # noqa: ANN002, ANN003, ANN202
            t = args[1] if _name == "all_gather" else args[0]
            comm.append((_name, t.numel()))
            return _orig(*args, **kw)

        setattr(dist, name, record)
    dtype = torch.float64 if mode == "fp64" else torch.float32
    img, txt = (t.to(dtype) for t in _batch(sizes))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    img, txt = img[lo:hi].clone().requires_grad_(True), txt[lo:hi].clone().requires_grad_(True)
    al = make_aligner(CFG, dtype=dtype)
    crit = DistributedCARZeroLoss(al, reduction="mean" if mode == "ddp" else "sum")
    model = DDP(crit) if mode == "ddp" else crit
    n_forward = len(comm)
    loss = model(img, txt)
    n_before_backward = len(comm)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in al.named_parameters()}
    comm_log = (comm[n_forward:n_before_backward], comm[n_before_backward:])
    torch.save({"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "params": grads,
                "comm": comm_log}, f"{out}/rank{rank}.pt")  # fmt: skip
    _finish()


def _single(sizes: list[int], dtype: torch.dtype = torch.float32) -> dict:
    img, txt = (t.to(dtype) for t in _batch(sizes))
    img.requires_grad_(True)
    txt.requires_grad_(True)
    al = make_aligner(CFG, dtype=dtype)
    loss = cf.carzero_loss(*al.both_directions(img, txt))
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad,
            "params": {k: p.grad for k, p in al.named_parameters()}}  # fmt: skip


def _spawn(fn, world: int, *args) -> None:  # noqa: ANN001
    mp.spawn(fn, args=(world, _port(), *args), nprocs=world, join=True)


@pytest.mark.parametrize(("sizes", "mode"), [([3, 2], "sum"), ([2, 1, 3], "sum"), ([3, 2], "ddp"),
                                            ([2, 1, 3], "ddp"), ([3, 0], "ddp")],
                         ids=["2ranks-sum", "3ranks-sum", "2ranks-ddp", "3ranks-ddp",
                              "empty-rank-ddp"])  # fmt: skip
def test_global_loss_and_gradients_equal_single_process(sizes, mode, tmp_path):
    """Loss and every gradient equal one process's on the concatenated batch, with uneven
    batches and a rank without pairs (which must still join DDP's gradient all-reduce)."""
    world = len(sizes)
    _spawn(_loss_worker, world, sizes, mode, str(tmp_path))
    ref = _single(sizes)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    bounds = [sum(sizes[:r]) for r in range(world + 1)]
    scale = world if mode == "ddp" else 1  # DDP mode: token gradients are world × exact
    for r, res in enumerate(ranks):
        assert rel_err(res["loss"], ref["loss"]) < 1e-6
        lo, hi = bounds[r], bounds[r + 1]
        assert rel_err(res["img"] / scale, ref["img"][lo:hi]) < 1e-5
        assert rel_err(res["txt"] / scale, ref["txt"][lo:hi]) < 1e-5
    for name, g in ref["params"].items():
        if mode == "ddp":  # DDP averaged: every rank holds the exact gradient
            for res in ranks:
                assert rel_err(res["params"][name], g, floor=1e-2) < 1e-5, name
        else:  # shares: they sum to the exact gradient
            total = sum(res["params"][name] for res in ranks)
            assert rel_err(total, g, floor=1e-2) < 1e-5, name


def test_fp64_tokens_give_the_fp64_loss(tmp_path):
    """fp64 tokens: the loss and gradients are fp64's, as `carzero_loss` keeps fp64 (they
    were rounded through an fp32 loss)."""
    sizes = [2, 3]
    _spawn(_loss_worker, 2, sizes, "fp64", str(tmp_path))
    ref = _single(sizes, torch.float64)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["loss"].dtype == torch.float64
        assert rel_err(res["loss"], ref["loss"]) < 1e-12
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        assert rel_err(res["img"], ref["img"][lo:hi]) < 1e-10


def test_only_globals_and_scores_cross_ranks(tmp_path):
    """Communication volume: exactly the stated messages, none of token or pair size."""
    sizes = [3, 2]
    _spawn(_loss_worker, 2, sizes, "sum", str(tmp_path))
    g, d, world, bmax = sum(sizes), CFG.d_model, 2, max(sizes)
    for r in range(world):
        fwd, bwd = torch.load(tmp_path / f"rank{r}.pt")["comm"]
        # sizes, D, dtype, needs-grad, failed; image and text globals (padded to the largest
        # batch); the two score blocks; the loss value
        assert fwd == [
            ("all_gather", 5),
            ("all_gather", bmax * d),
            ("all_gather", bmax * d),
            ("all_gather", bmax * g),
            ("all_gather", bmax * g),
            ("all_reduce", 1),
        ]
        # the gathered scores' and globals' gradients
        assert sorted(bwd) == sorted([("all_reduce", g * g)] * 2 + [("all_reduce", g * d)] * 2)
        largest = max(n for _, n in fwd + bwd)
        assert largest < min(sizes) * P_TXT * d  # smaller than any rank's tokens
        assert largest < g * g * d  # nothing per pair


def _mismatch_worker(rank: int, world: int, port: int, case: str, out: str) -> None:
    _init(rank, world, port)
    img, txt = _batch([2, 2])
    img, txt = img[2 * rank : 2 * rank + 2], txt[2 * rank : 2 * rank + 2]
    if rank == 1 and case == "dtype":
        img, txt = img.double(), txt.double()
    if rank == 1 and case == "bad-d":  # fails this rank's own check, before the shared one
        img = img[..., :-1]
    if rank == 1 and case == "count":
        txt = txt[:1]
    if case == "grad-split":  # both ranks need gradients, but for different tensors
        (img if rank == 0 else txt).requires_grad_(True)
    elif rank == 0 or case != "grad":
        img.requires_grad_(True)
    txt_mask = None
    if rank == 1 and case == "mask":  # a mask is checked before any collective too
        txt_mask = torch.zeros(txt.shape[:2], dtype=torch.bool)
        txt_mask[1] = True
    try:
        DistributedCARZeroLoss(make_aligner(CFG))(img, txt, None, txt_mask)
        message = "no error"
    except (TypeError, ValueError) as e:
        message = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}.txt").write_text(message)
    _finish()


@pytest.mark.parametrize(("case", "expected"), [
    ("dtype", "TypeError: rank 1 has torch.float64 tokens, rank 0 torch.float32"),
    ("grad", "ValueError: rank 1's tokens do not need gradients, rank 0's do"),
    ("grad-split", "ValueError: rank 1 needs gradients for txt_tokens only, rank 0 for "
                   "img_tokens only"),
])  # fmt: skip
def test_ranks_that_disagree_all_raise_the_same_error(case, expected, tmp_path):
    """A dtype or requires-grad that differs across ranks: every rank raises the same named
    error (gloo would otherwise run mismatched collectives: wrong numbers, or an abort that
    names nothing, or a backward waiting for an all-reduce that never comes)."""
    _spawn(_mismatch_worker, 2, case, str(tmp_path))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1] and messages[0].startswith(expected), messages


@pytest.mark.parametrize(("case", "own"), [
    ("bad-d", "ValueError: img_tokens has D = 31"),
    ("count", "ValueError: rank 1: 2 images but 1 texts; pairs must match"),
    ("mask", "ValueError: txt_mask hides every token of item(s) [1]"),
])  # fmt: skip
def test_a_rank_whose_own_inputs_fail_stops_every_rank(case, own, tmp_path):
    """A rank whose tokens fail its local checks still joins the step's sizes gather, so
    the other ranks raise an error naming it instead of waiting in the gather until the
    timeout; it raises its own."""
    _spawn(_mismatch_worker, 2, case, str(tmp_path))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[1].startswith(own), messages
    assert messages[0] == ("ValueError: rank 1's tokens failed its checks (its own error "
                           "names the problem); every rank stops"), messages  # fmt: skip


def test_loss_needs_a_process_group():
    crit = DistributedCARZeroLoss(make_aligner(CFG))
    img, txt = _batch([2])
    with pytest.raises(RuntimeError, match="process group"):
        crit(img, txt)


# --------------------------------------------------------------------------- sharded scoring

N_IMG, CLASSES = 11, ["atelectasis", "effusion", "edema", "nodule", "pneumonia"]


def _score_inputs():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(N_IMG, P_IMG, CFG.d_model, generator=g)
    txt = torch.randn(len(CLASSES), P_TXT, CFG.d_model, generator=g)
    ids = [f"img{i:03d}.png" for i in range(N_IMG)]
    return ids, imgs, txt


def _score(out: str, resume: bool = False, stop: int | None = None) -> None:
    ids, imgs, txt = _score_inputs()
    score_shards_to_csv(make_aligner(CFG), ids, lambda idx: imgs[idx], txt, CLASSES, out,
                        batch_size=3, resume=resume, _stop_after_batches=stop)  # fmt: skip


def _score_worker(rank: int, world: int, port: int, out: str, resume: bool,
                  stop_rank: int | None) -> None:  # fmt: skip
    _init(rank, world, port)
    torch.set_num_threads(1)
    _score(out, resume, stop=1 if rank == stop_rank else None)
    assert Path(out).exists()  # no rank returns before rank 0 has merged
    _finish()


def _one_thread_score(out: str) -> None:
    """One process, one thread like each spawned rank (the GEMM path, and so the last bits,
    depends on the thread count; the batches are the same by construction)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _score(out)
    finally:
        torch.set_num_threads(threads)


def test_sharded_scoring_equals_one_process_and_resumes(tmp_path):
    single = tmp_path / "single.csv"
    _one_thread_score(str(single))
    rows = list(csv.reader(single.open()))
    assert rows[0] == ["image", *CLASSES] and len(rows) == N_IMG + 1
    expected = single.read_text()

    sharded = tmp_path / "sharded.csv"
    _spawn(_score_worker, 2, str(sharded), False, None)
    assert sharded.read_text() == expected
    assert not list(tmp_path.glob("sharded.csv.part-*"))  # parts merged and removed

    resumed = tmp_path / "resumed.csv"
    with pytest.raises(Exception, match="stopped after 1 batches"):
        _spawn(_score_worker, 2, str(resumed), False, 1)  # rank 1 dies after one batch
    assert not resumed.exists()  # nothing half-written in the output's place
    part1 = tmp_path / "resumed.csv.part-00001-of-00002"
    assert len(part1.read_text().splitlines()) == 1 + 3  # header + its first batch
    with part1.open("a") as f:
        f.write("img999.png,0.1")  # a torn line, as from a kill mid-write
    _spawn(_score_worker, 2, str(resumed), True, None)
    assert resumed.read_text() == expected


def test_sharded_resume_with_another_number_of_ranks(tmp_path):
    """Killed with 2 ranks, resumed with 3, or with 1 (no process group): the earlier parts'
    complete batches are kept whatever the number of ranks, and no part file is left."""
    expected_path = tmp_path / "single.csv"
    _one_thread_score(str(expected_path))
    expected = expected_path.read_text()

    three = tmp_path / "three.csv"
    with pytest.raises(Exception, match="stopped after 1 batches"):
        _spawn(_score_worker, 2, str(three), False, 0)
    _spawn(_score_worker, 3, str(three), True, None)
    assert three.read_text() == expected
    assert not list(tmp_path.glob("three.csv.part-*"))

    one = tmp_path / "one.csv"
    with pytest.raises(Exception, match="stopped after 1 batches"):
        _spawn(_score_worker, 2, str(one), False, 1)
    ids, imgs, txt = _score_inputs()
    loaded: list[int] = []

    def load(idx: list[int]) -> torch.Tensor:
        loaded.extend(idx)
        return imgs[idx]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        score_shards_to_csv(make_aligner(CFG), ids, load, txt, CLASSES, one, batch_size=3,
                            resume=True)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert loaded == [9, 10]  # blocks 0-2 were done by the 2 ranks: only block 3 was left
    assert one.read_text() == expected
    assert not list(tmp_path.glob("one.csv.part-*"))


def test_resume_scores_a_partly_written_batch_again(tmp_path):
    """A kill inside a batch's write can leave some of its rows complete: resuming scores
    that whole batch again (in the same batch as an uninterrupted run) and keeps none of its
    rows, so the CSV is the uninterrupted one."""
    full = tmp_path / "full.csv"
    _score(str(full))
    out = tmp_path / "scores.csv"
    with pytest.raises(RuntimeError, match="stopped after 2 batches"):
        _score(str(out), stop=2)
    part = tmp_path / "scores.csv.part-00000-of-00001"
    lines = part.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 2 * 3  # header + two batches of 3
    part.write_text("".join(lines[:-2]))  # the second batch's write cut after its first row
    ids, imgs, txt = _score_inputs()
    loaded: list[int] = []

    def load(idx: list[int]) -> torch.Tensor:
        loaded.extend(idx)
        return imgs[idx]

    score_shards_to_csv(make_aligner(CFG), ids, load, txt, CLASSES, out, batch_size=3,
                        resume=True)  # fmt: skip
    assert loaded == list(range(3, N_IMG))  # block 0 kept, block 1 scored again whole
    assert out.read_text() == full.read_text()


def _fail_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    if rank == 1:
        raise ValueError("rank 1 broke on purpose")
    t = torch.ones(1)
    try:
        dist.all_reduce(t)  # would wait for rank 1 forever without the launcher's teardown
    except RuntimeError:
        # gloo may notice rank 1's exit first: then wait like a hung rank, so that the error
        # the launcher reports is rank 1's own, not this echo of it (a race under CPU load)
        time.sleep(120)
    _finish()


def test_a_failing_rank_fails_the_job_with_its_error():
    t0 = time.monotonic()
    with pytest.raises(Exception, match="rank 1 broke on purpose"):
        _spawn(_fail_worker, 2)
    assert time.monotonic() - t0 < 50  # not the 60 s collective timeout: no hang


def test_score_without_process_group_writes_the_csv(tmp_path):
    out = tmp_path / "scores.csv"
    _score(str(out))
    ids, imgs, txt = _score_inputs()
    with torch.no_grad():
        ref = cf.zero_shot_scores(make_aligner(CFG), imgs, txt)
    rows = list(csv.reader(out.open()))[1:]
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows])
    assert [r[0] for r in rows] == ids
    assert rel_err(got, ref) < 1e-6
    assert Path(out).exists()


def test_score_resume_continues_only_the_same_run(tmp_path):
    """Parts of an interrupted run are not mixed with another: without resume they are
    refused; a resume with other settings (probabilities, another aligner) is refused naming
    them; the run file stays beside the CSV."""
    ids, imgs, txt = _score_inputs()
    whole, out = tmp_path / "whole.csv", tmp_path / "s.csv"
    _score(str(whole))

    def score(resume: bool, probabilities: bool = False, seed: int = 0) -> None:
        score_shards_to_csv(make_aligner(CFG, seed=seed), ids, lambda idx: imgs[idx], txt,
                            CLASSES, out, batch_size=3, resume=resume,
                            probabilities=probabilities)  # fmt: skip

    with pytest.raises(RuntimeError, match="stopped after 1 batches"):
        _score(str(out), stop=1)
    with pytest.raises(ValueError, match="part of an earlier run .* resume=True"):
        score(resume=False)
    with pytest.raises(ValueError, match="changed since .*: probabilities;"):
        score(resume=True, probabilities=True)
    with pytest.raises(ValueError, match="changed since .*: aligner_sha256;"):
        score(resume=True, seed=1)
    score(resume=True)
    assert out.read_text() == whole.read_text()
    assert json.loads(Path(f"{out}.run.json").read_text())["classes"] == CLASSES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is")
def test_nccl_init_names_a_local_rank_without_its_gpu(monkeypatch):
    from carzero_fast.distributed import init_from_env

    monkeypatch.setenv("LOCAL_RANK", "1")
    # refused before the process group starts: no rendezvous is waited for
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 names no CUDA device .*\(0 visible\)"):
        init_from_env("nccl")
    assert not dist.is_initialized()
