"""`carzero-fast score`: zero-shot scores of a folder of chest X-rays for a disease vocabulary.

Images stream in fixed batches (blocks of `--batch-size` consecutive images of the sorted
list) through a loader thread pool that decodes and preprocesses the next batches while the
current one is scored. Each batch's rows are appended to the CSV in one write, flushed and
synced, so the file holds complete rows only (a row torn by a kill is dropped on `--resume`),
and `--resume` skips the batches already complete: a resumed run computes every score in the
same batch as an uninterrupted one, so the CSV comes out identical at the same thread count (on
CPU the products and the chunked backend's item blocks follow `torch.get_num_threads()`, which
can move a score's last bits). Unreadable images go to an errors CSV (`path,error`) and the
run goes on.

Rows go to part files (`OUT.part-RRRRR-of-WWWWW`, one per rank; one when alone) and only a
finished run writes OUT, merged in the image list's order through a temporary file and a
rename: OUT is complete or absent. A run that stops (a kill, Ctrl-C, an error) leaves its
parts for `--resume`, which keeps their complete batches whatever the number of ranks that
wrote them and refuses a run of other options: `OUT.run.json` records what the scores depend
on (the model files' hash, the prompts, --probabilities, --dtype, --batch-size) and stays
beside OUT as its provenance. Bad input fails before anything is written.

Under `torchrun` (WORLD_SIZE > 1) each rank scores every R-th batch into its own part, and
rank 0 merges them: the same CSV as one process at the ranks' thread count (torchrun sets
OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

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
from .prompts import DEFAULT_TEMPLATE, PromptCache, read_classes, text_fingerprint

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
# files that hold lists of names, not images: refused as images (a .csv is read as a list)
_LIST_SUFFIXES = {".txt", ".tsv", ".lst", ".list", ".json"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ranks wait for the slowest at the end: a rank that dies ends the job through torchrun, so
# the collectives' own timeout only has to outlast an uneven finish
SHARD_TIMEOUT_S = 24 * 3600.0
# test hooks: die without cleanup (like a kill) after this many batches (on this rank only)
_STOP_ENV = "CARZERO_FAST_SCORE_DIE_AFTER_BATCHES"
_STOP_RANK_ENV = "CARZERO_FAST_SCORE_DIE_RANK"


class UsageError(ValueError):
    """Bad input: reported as one line on stderr with exit code 2."""


def list_images(sources: list[str]) -> list[Path]:
    """A directory (searched recursively, following links to folders), a CSV (first column:
    paths, relative to the CSV's folder; `_read_image_list`) or image files (not lists:
    `.txt`, `.tsv`, … are refused). Every name must be valid UTF-8: the CSVs are UTF-8."""
    if len(sources) == 1 and Path(sources[0]).is_dir():
        root = Path(sources[0])
        paths = sorted(_walk_images(root))
        if not paths:
            raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    else:
        if len(sources) == 1 and sources[0].lower().endswith(".csv"):
            src = Path(sources[0])
            if not src.is_file():
                raise UsageError(f"image list {src} does not exist")
            try:  # decoded whole, so that an error's byte offset is the file's
                text = src.read_bytes().decode("utf-8-sig")  # -sig: Excel's BOM
            except UnicodeDecodeError as e:
                raise UsageError(f"image list {src} is not UTF-8 text ({e.reason} at byte "
                                 f"{e.start})") from None  # fmt: skip
            paths = _read_image_list(src, text)
        else:
            paths = [Path(s) for s in sources]
            lists = [str(p) for p in paths if p.suffix.lower() in _LIST_SUFFIXES]
            if lists:
                raise UsageError(f"{lists[0]} looks like a list of images, not an image: "
                                 "give the list as a .csv (first column: paths)")  # fmt: skip
        folders = [str(p) for p in paths if p.is_dir()]
        if folders:
            raise UsageError(f"{folders[0]} is a folder: give one folder alone, a CSV list or "
                             "image files")  # fmt: skip
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"{len(missing)} image file(s) do not exist, first: {missing[0]}")
        if not paths:
            raise UsageError("no images given")
        seen: dict[str, Path] = {}
        for path in paths:  # by absolute path: the key of OUT's rows and of --resume
            key = os.path.abspath(path)
            if key in seen:
                raise UsageError(f"the image list names a file twice: {seen[key]} and {path}")
            seen[key] = path
    for p in paths:
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{str(p)!r} is not a valid UTF-8 name (the CSVs are UTF-8): "
                             "rename it, or list the other images in a CSV") from None  # fmt: skip
    return paths


def _read_image_list(src: Path, text: str) -> list[Path]:
    """The paths of an image-list CSV's first column, relative to its folder. Rows with no
    cell filled (a spreadsheet's trailing rows) are skipped; the first row is a header when
    its first cell has no image suffix and names no file (DICOM files often have neither a
    suffix nor a header above them)."""
    try:
        rows = [(i, r) for i, r in enumerate(csv.reader(io.StringIO(text, newline="")), 1)
                if any(c.strip() for c in r)]  # fmt: skip
    except csv.Error as e:  # a cell over csv's field size limit, …
        raise UsageError(f"image list {src} cannot be read as CSV: {e}") from None
    if rows:
        first = rows[0][1][0]
        if Path(first).suffix.lower() not in IMAGE_SUFFIXES and not (src.parent / first).is_file():
            rows = rows[1:]  # a header ("path", "filename", …)
    for line, r in rows:
        if not r[0].strip():
            raise UsageError(f"image list {src}, row {line}: the first cell (the path) is empty")
    return [src.parent / r[0] for _, r in rows]


def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under `root`, following links to folders (each real folder once: a link
    back up the tree does not loop)."""
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(folder, name)


def _load_batch(pool: ThreadPoolExecutor, paths: list[Path]) -> list[Future]:
    from .encoders.image import preprocess_file

    return [pool.submit(preprocess_file, p) for p in paths]


Batch = tuple[range, list[Path], "Tensor | None", list]


def _batches(paths: list[Path], blocks: list[range], workers: int,
             prefetch: int = 2) -> Iterator[Batch]:  # fmt: skip
    """(block, readable paths, pixels `(n, 3, 224, 224)`, [(path, error)]) per block, with
    the next `prefetch` blocks decoding in the background."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = [_load_batch(pool, [paths[i] for i in b]) for b in blocks[:prefetch]]
        for k, block in enumerate(blocks):
            if k + prefetch < len(blocks):
                pending.append(_load_batch(pool, [paths[i] for i in blocks[k + prefetch]]))
            futures = pending.pop(0)
            ok, pixels, errors = [], [], []
            for i, fut in zip(block, futures, strict=True):
                try:
                    pixels.append(fut.result())
                    ok.append(paths[i])
                except Exception as e:  # noqa: BLE001 — reported per image, the run goes on
                    errors.append((paths[i], f"{type(e).__name__}: {e}"))
            yield block, ok, torch.stack(pixels) if pixels else None, errors
    finally:  # an error or Ctrl-C does not wait for the queued decodes, only running ones
        pool.shutdown(wait=True, cancel_futures=True)


def _format_rows(paths: list[Path], scores: Tensor) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    for p, row in zip(paths, scores.float().cpu().tolist(), strict=True):
        w.writerow([str(p), *(f"{v:.9g}" for v in row)])
    return buf.getvalue()


def _append(f: io.TextIOBase, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def default_workers() -> int:
    """Decoding threads: this process's share of the CPUs it may use (torchrun's local ranks
    split them). Decoding and resizing release the GIL and scale with cores (a 2000–3000 px
    X-ray takes 40–60 ms of one core to decode and preprocess), so a GPU that scores thousands
    of images a second needs every core to keep up."""
    try:
        cpus = len(os.sched_getaffinity(0))  # honours taskset / cpusets, unlike cpu_count
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, local_ranks))


def _shard(device: torch.device) -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) the process group is set up here,
    on NCCL for a CUDA `device`, else on gloo (a CPU run needs no GPU, even where one is)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from .distributed import init_from_env

    return init_from_env("nccl" if device.type == "cuda" else "gloo", timeout_s=SHARD_TIMEOUT_S)


def _identity(args: argparse.Namespace, classes: dict[str, list[str]]) -> dict:
    """What the scores depend on, for `OUT.run.json`: a resume must match it."""
    h = hashlib.sha256()
    root = Path(args.model)
    # the files the model is read from (`CARZeroModel._from_directory`), not whatever else
    # the folder holds (a prompt cache, notes): those do not change a score
    model_files = [root / "config.json", root / "model.safetensors",
                   *(root / "tokenizer").rglob("*")]  # fmt: skip
    for f in sorted(p for p in model_files if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return {"model_sha256": h.hexdigest(), "prompts": classes,
            "probabilities": args.probabilities, "dtype": args.dtype,
            "batch_size": args.batch_size}  # fmt: skip


def _check_identity(out: Path, identity: dict) -> None:
    """A resume continues a run of the same model, prompts and options, or none."""
    changed = changed_since(out, identity)
    if changed:
        names = {"model_sha256": "the model's files (config.json, model.safetensors, "
                 "tokenizer/)", "prompts": "the prompts (classes, template)",
                 "probabilities": "--probabilities", "dtype": "--dtype",
                 "batch_size": "--batch-size"}  # fmt: skip
        raise UsageError(f"--resume: changed since the run that wrote {out}'s scores "
                         f"({run_file(out)}): {', '.join(names[k] for k in changed)}; rerun "
                         "with its model and options, or score into another --out")  # fmt: skip


def _done_rows(sources: list[Path], header: list[str], paths: list[Path],
               check: bool = True) -> dict[str, str]:  # fmt: skip
    """Complete rows of earlier runs that name an image of this listing, keyed by absolute
    path, as text lines with the listing's own spelling of the path (memory: the text).

    check: refuse rows of which none names an image of the listing (a resume from another
    folder reads relative paths from there). Not for the errors CSV: its images may have
    been removed from the listing since, which is what it invites."""
    spelled = {os.path.abspath(p): str(p) for p in paths}
    done: dict[str, str] = {}
    n_rows = 0
    for src in sources:
        for row in iter_complete_rows(src, header):
            n_rows += 1
            key = os.path.abspath(row[0])
            if key in spelled:
                done[key] = row_text([spelled[key], *row[1:]])
    if check and n_rows and not done:
        raise UsageError(f"--resume: none of the {n_rows} rows in {', '.join(map(str, sources))} "
                         "names an image of this listing (relative paths are read from the "
                         "working folder): resume from the same folder with the same "
                         "--images")  # fmt: skip
    return done


def _check_prompts(classes: dict[str, list[str]], template: str | None = None) -> None:
    """Every prompt must keep some words after CARZero's text cleaning, which drops sentences
    of fewer than two words: an empty prompt would be scored as the empty text, the same
    column for every such class (`ground` refuses it too). Two classes whose prompts clean to
    the same texts would get the same column too (a finding of non-ASCII letters or numbers
    only, one that differs in case or punctuation), and so would a `.txt` class whose finding
    cleans away to the `template` alone."""
    from .encoders.text import clean_text
    from .prompts import fill_template

    owner: dict[tuple[str, ...], str | None] = {}
    if template is not None:
        owner[(clean_text(fill_template(template, "")),)] = None
    for name, prompts in classes.items():
        cleaned = []
        for prompt in prompts:
            cleaned.append(clean_text(prompt))
            if not cleaned[-1]:
                raise UsageError(
                    f"class {name!r}: prompt {prompt!r} is empty after CARZero's text cleaning "
                    f"(sentences of fewer than two words are dropped); write a sentence, e.g. "
                    f"'There is {name}.'"
                )
        key = tuple(sorted(cleaned))
        if key in owner:
            other = owner[key]
            same = ("the template's own words" if other is None
                    else f"the prompts of class {other!r}")  # fmt: skip
            raise UsageError(
                f"class {name!r}: its prompts read {' / '.join(key)!r} after CARZero's text "
                f"cleaning (lower-cased ASCII words, numbering dropped), as {same} do: it "
                "would score the same; name the finding in other words"
            )
        owner[key] = name


def _check_outputs(out: Path, errors_path: Path, resume: bool) -> None:
    """The output files can be written, and none that is not this job's is overwritten."""
    for flag, path in (("--out", out), ("--errors", errors_path)):
        if not path.parent.is_dir():
            raise UsageError(f"the folder of {flag}, {path.parent}, does not exist")
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a directory")
    if out.resolve() == errors_path.resolve():
        raise UsageError(f"--out and --errors name the same file, {out}")
    if resume:
        return  # resuming checks that existing files are this job's
    if out.exists():
        raise UsageError(f"{out} exists: pass --resume to continue it, or remove it")
    parts = parts_of(out) + parts_of(errors_path)
    if parts:
        raise UsageError(f"{parts[0]} holds scores of an interrupted run: pass --resume to "
                         "continue it, or remove its part files")  # fmt: skip
    if errors_path.exists():
        raise UsageError(f"{errors_path} (the errors CSV) exists: remove it, or pass --resume "
                         "to continue the run that wrote it")  # fmt: skip


def _check_model_path(model: str) -> None:
    path = Path(model)
    if path.is_file():
        raise UsageError(f"--model {path} is a file; score takes a model directory: convert "
                         f"the CARZero checkpoint first (carzero-fast convert {path} MODEL_DIR "
                         "--tokenizer BERT_DIR)")  # fmt: skip
    if not path.is_dir():
        raise UsageError(f"--model {path} does not exist")


def _check_backend(model, txt: Tensor, backend: str) -> None:  # noqa: ANN001
    """One (prompt, prompt) pair through `backend` on the scoring device and dtype: a backend
    that cannot run there (triton on a CPU, without a usable Triton, …) fails here, before any
    output file is written, instead of at the first batch."""
    from .loss import zero_shot_scores

    try:
        with torch.no_grad():
            zero_shot_scores(model.aligner, txt[:1], txt[:1], backend=backend)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--backend {backend} cannot run here: {e}") from e


def run(args: argparse.Namespace) -> int:
    from .backends import check_backend_name
    from .backends.cpu_gemm import has_native_cpu_products
    from .model import CARZeroModel, check_crop_size, check_device

    # cheap checks first: bad input fails before the model loads and before anything is written
    check_backend_name(args.backend)
    classes = read_classes(args.classes, args.template)
    _check_prompts(classes, args.template if Path(args.classes).suffix.lower() == ".txt"
                   else None)  # fmt: skip
    paths = list_images(args.images)
    out, errors_path = Path(args.out), Path(args.errors or f"{args.out}.errors.csv")
    _check_outputs(out, errors_path, args.resume)
    _check_model_path(args.model)
    device = check_device(args.device)
    rank, world = _shard(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and dtype != torch.float32 and not has_native_cpu_products(dtype):
        print(f"carzero-fast score: note: this CPU has no native {args.dtype} matrix products "
              "(PyTorch runs a generic loop, 60–150× slower than fp32 on AVX2): the encoders "
              "will be slow; --dtype fp32 is faster here", file=sys.stderr)  # fmt: skip
    model = CARZeroModel.from_checkpoint(args.model)
    check_crop_size(model)
    model = model.to(device=device, dtype=dtype)

    # prompts: encoded once per model (disk cache), ensembled per class
    names = list(classes)
    prompts = [t for n in names for t in classes[n]]
    owner = torch.tensor([i for i, n in enumerate(names) for _ in classes[n]], device=device)
    with torch.no_grad():
        txt = _encode_prompts(model, prompts, args.cache_dir if rank == 0 else None)
    txt = txt.to(device=device, dtype=dtype)
    _check_backend(model, txt, args.backend)

    # Batches are fixed blocks of the sorted list; rank r takes blocks r, r+R, … into its own
    # part files, rank 0 merges them at the end.
    header, err_header = ["path", *names], ["path", "error"]
    part, err_part = part_path(out, rank, world), part_path(errors_path, rank, world)
    identity = _identity(args, classes)
    done, done_err = {}, {}
    if args.resume:
        _check_identity(out, identity)
        # earlier runs' rows, whatever their number of ranks (the blocks do not depend on it),
        # the finished OUT's included
        done = _done_rows([out, *parts_of(out)], header, paths)
        if not args.retry_errors:  # else the unreadable images' batches are scored again
            done_err = _done_rows([errors_path, *parts_of(errors_path)], err_header, paths,
                                  check=False)  # fmt: skip
            # an image scored since its error (by a --retry-errors run that stopped) is done
            for key in done.keys() & done_err.keys():
                del done_err[key]
    blocks = [range(lo, min(len(paths), lo + args.batch_size))
              for lo in range(0, len(paths), args.batch_size)][rank::world]  # fmt: skip
    keys = [os.path.abspath(p) for p in paths]
    finished = done.keys() | done_err.keys()
    is_complete = [all(keys[i] in finished for i in b) for b in blocks]
    complete = [b for b, c in zip(blocks, is_complete, strict=True) if c]
    todo = [b for b, c in zip(blocks, is_complete, strict=True) if not c]
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has read the earlier parts before any is rewritten
    wrote_run_file = rank == 0 and (not args.resume or not run_file(out).exists())
    if wrote_run_file:
        write_json(run_file(out), identity)

    # A part holding complete batches is never removed by a failure: it is what --resume
    # continues (this run's new, still empty parts go). OUT appears only when complete.
    empty_before = [p for p in (part, err_part) if not p.exists()]
    try:
        # what is kept (complete batches only, in list order) replaces the part atomically,
        # then each batch is appended as it is scored
        rewrite_csv(part, header, (done[keys[i]] for b in complete for i in b if keys[i] in done))
        rewrite_csv(err_part, err_header, (done_err[keys[i]] for b in complete for i in b
                                           if keys[i] in done_err))  # fmt: skip
        del done, done_err
        with (open(part, "a", newline="", encoding="utf-8") as f_out,
              open(err_part, "a", newline="", encoding="utf-8") as f_err):  # fmt: skip
            _score_batches(args, model, paths, todo, txt, owner, len(names), f_out, f_err,
                           n_total=sum(len(b) for b in blocks),
                           n_kept=sum(len(b) for b in complete),
                           rank=rank, world=world, device=device, dtype=dtype)  # fmt: skip
        _finish(out, errors_path, paths, header, err_header, rank, world)
    except BaseException as e:
        for p in empty_before:
            if p.exists() and not any(iter_complete_rows(p, None)):
                p.unlink()
        kept = [p for p in (part, err_part) if p.exists()]
        if kept:
            print(f"\ncarzero-fast score ({type(e).__name__}): the scored batches stay in "
                  f"{kept[0]}{' and others' if len(kept) > 1 else ''}; rerun with --resume "
                  "to continue", file=sys.stderr)  # fmt: skip
        elif wrote_run_file and not parts_of(out) + parts_of(errors_path):
            run_file(out).unlink(missing_ok=True)  # nothing scored: nothing to resume
        raise
    if rank == 0:
        n_err = sum(1 for _ in iter_complete_rows(errors_path, None))
        if n_err == 0:
            errors_path.unlink()
        else:
            print(f"{n_err} image(s) could not be read: see {errors_path}", file=sys.stderr)
    return 0


def _finish(out: Path, errors_path: Path, paths: list[Path], header: list[str],
            err_header: list[str], rank: int, world: int) -> None:  # fmt: skip
    """Rank 0 merges every rank's parts into OUT and the errors CSV (list order, temporary
    file + rename) and removes every part; no rank returns before, or without rank 0's
    error."""

    def merge() -> None:
        _merge(paths, [part_path(out, r, world) for r in range(world)], out, header)
        _merge(paths, [part_path(errors_path, r, world) for r in range(world)], errors_path,
               err_header)  # fmt: skip
        for p in parts_of(out) + parts_of(errors_path):  # earlier runs' parts too
            p.unlink()

    from .distributed import on_rank0

    if world == 1:
        on_rank0(merge, f"merge the parts into {out}")
        return
    import torch.distributed as dist

    dist.barrier()
    try:
        on_rank0(merge, f"merge the parts into {out}")
    finally:
        dist.destroy_process_group()


def _score_batches(args: argparse.Namespace, model, paths: list[Path], todo: list[range],  # noqa: ANN001
                   txt: Tensor, owner: Tensor, n_classes: int, f_out: io.TextIOBase,
                   f_err: io.TextIOBase, *, n_total: int, n_kept: int, rank: int, world: int,
                   device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
    """Score the `todo` blocks, appending each batch's rows (and unreadable images) as it is
    scored, with a progress line on stderr."""
    die_rank = int(os.environ.get(_STOP_RANK_ENV, "-1"))
    die_after = int(os.environ.get(_STOP_ENV, "-1")) if die_rank in (-1, rank) else -1
    n_done, t0 = n_kept, time.perf_counter()
    for k, (block, ok, pixels, errors) in enumerate(_batches(paths, todo, args.workers)):
        if k == die_after:
            os._exit(137)  # as if killed: no cleanup, no flush beyond what is on disk
        if pixels is not None:
            with torch.no_grad():
                scores = _score(model, pixels.to(device=device, dtype=dtype), txt, owner,
                                n_classes, args.backend)  # fmt: skip
            if args.probabilities:
                scores = torch.sigmoid(scores)
            _append(f_out, _format_rows(ok, scores))
        if errors:
            buf = io.StringIO()
            csv.writer(buf).writerows([str(p), e] for p, e in errors)
            _append(f_err, buf.getvalue())
        n_done += len(block)
        rate = (n_done - n_kept) / max(time.perf_counter() - t0, 1e-9)
        shard = f" (rank {rank}/{world})" if world > 1 else ""
        print(f"\r{n_done}/{n_total} images{shard}, {rate:.1f} images/s", end="",
              file=sys.stderr, flush=True)  # fmt: skip
    print(file=sys.stderr)


def _merge(paths: list[Path], parts: list[Path], out: Path, header: list[str]) -> None:
    """The ranks' part files → one file in the image list's order (temp file + rename); the
    rows are held as text lines meanwhile."""
    rows = {os.path.abspath(r[0]): row_text(r)
            for p in parts for r in iter_complete_rows(p, header)}  # fmt: skip
    keys = (os.path.abspath(p) for p in paths)
    rewrite_csv(out, header, (rows[k] for k in keys if k in rows))


def _encode_prompts(model, prompts: list[str], cache_dir: str | None) -> Tensor:  # noqa: ANN001
    if cache_dir is None:
        return model.encode_texts(prompts)
    cache = PromptCache(cache_dir, text_fingerprint(model.text_encoder))
    have = cache.get(prompts)
    todo = [t for t, e in zip(prompts, have, strict=True) if e is None]
    if todo:
        cache.put(todo, model.encode_texts(todo))
        have = cache.get(prompts)
    return torch.stack(have)


def _score(model, pixels: Tensor, txt: Tensor, owner: Tensor, n_classes: int,
           backend: str) -> Tensor:  # noqa: ANN001 # fmt: skip
    """images → (N, C): zero-shot logits per prompt, averaged over each class's prompts."""
    from .loss import zero_shot_scores

    per_prompt = zero_shot_scores(model.aligner, model.encode_images(pixels), txt,
                                  backend=backend).float()  # fmt: skip
    sums = torch.zeros(per_prompt.shape[0], n_classes, device=per_prompt.device)
    sums.index_add_(1, owner, per_prompt)
    counts = torch.bincount(owner, minlength=n_classes).clamp_min(1)
    return sums / counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carzero-fast score", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="our model directory (carzero-fast convert)")
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="a directory (recursive), a CSV whose first column lists paths, or files",
    )
    p.add_argument("--classes", required=True, help=".txt (one finding per line) or .json "
                   "(class → prompts)")  # fmt: skip
    p.add_argument("--out", required=True, help="scores CSV (path, one column per class)")
    p.add_argument("--errors", help="CSV of unreadable images (default: OUT.errors.csv)")
    # On a GPU the prompts' K/V projections are redone per batch (~the pair work of 30 images
    # for 192 prompts): large batches amortise them
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch (default 256 on CUDA, 32 on CPU)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto", help="aligner backend (auto, chunked, triton, …)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template for .txt classes")
    p.add_argument("--probabilities", action="store_true", help="sigmoid of the logits")
    p.add_argument("--resume", action="store_true", help="continue an interrupted OUT")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --resume: read the images of the errors CSV again (their "
                        "batches are scored again)")  # fmt: skip
    p.add_argument("--cache-dir", default=None, help="prompt-embedding cache directory")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding threads (default: the CPUs this process may use, "
                        "divided among torchrun's local ranks)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.batch_size is None:
        try:
            cuda = torch.device(args.device).type == "cuda"
        except RuntimeError:  # a bad name: `run` reports it
            cuda = False
        args.batch_size = 256 if cuda else 32
    if args.workers is None:
        args.workers = default_workers()
    if args.retry_errors and not args.resume:
        print("carzero-fast score: --retry-errors goes with --resume", file=sys.stderr)
        return 2
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value <= 0:
            print(f"carzero-fast score: {flag} must be positive, got {value}", file=sys.stderr)
            return 2
    try:
        return run(args)
    except (ValueError, KeyError, OSError) as e:  # UsageError is a ValueError
        from .model import error_text

        print(f"carzero-fast score: {error_text(e)}", file=sys.stderr)
        return 2
