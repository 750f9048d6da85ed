"""How fast `score` turns X-ray files into model inputs: `preprocess_file` (decode, CARZero's
resize, pad, crop, normalise) on generated 2048–3000 px PNG and JPEG files, per image on one
thread and as images/s through a thread pool of 1 and 2 workers, as `score` runs it.

    python -m benchmarks.decode_speed [--images 32]

The files are a smooth field plus noise (an X-ray's size and roughly its compressibility; a
real film's content moves the decode time by its entropy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from carzero_fast.encoders.image import preprocess_file

SIZES = [(2048, 2500), (2500, 2048), (3000, 3000), (2304, 2816)]  # (height, width)


def make_files(root: Path, sizes: list[tuple[int, int]] = SIZES, seed: int = 0) -> list[Path]:
    """One PNG and one JPEG (quality 90) per (height, width)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for h, w in sizes:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        field = 128 + 60 * np.sin(x / w * 7 + rng.uniform(0, 6)) * np.cos(y / h * 5)
        px = np.clip(field + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)
        for suffix, kw in ((".png", {}), (".jpg", {"quality": 90})):
            path = root / f"x{h}x{w}{suffix}"
            Image.fromarray(px).save(path, **kw)
            files.append(path)
    return files


def per_image_ms(files: list[Path], repeats: int = 5) -> dict[str, float]:
    """Median ms of one `preprocess_file` call per file, one thread."""
    out = {}
    for f in files:
        preprocess_file(f)  # warm the file cache and the code paths
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            preprocess_file(f)
            times.append(time.perf_counter() - t0)
        out[f.name] = 1e3 * statistics.median(times)
    return out


def rate(files: list[Path], n: int, workers: int) -> float:
    """Images/s of `n` calls (cycling over `files`) through a pool of `workers` threads."""
    work = [files[i % len(files)] for i in range(n)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(preprocess_file, work[:workers]))  # threads started
        t0 = time.perf_counter()
        list(pool.map(preprocess_file, work))
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_speed",
                                description="score's image preprocessing speed, X-ray sizes")
    p.add_argument("--images", type=int, default=32, help="calls per pool measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    if args.images < 1 or min(args.workers) < 1:
        p.error("--images and --workers must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp))
        print("| file | KiB | ms, one thread |\n|---|---:|---:|")
        for name, ms in per_image_ms(files).items():
            print(f"| {name} | {(Path(tmp) / name).stat().st_size // 1024} | {ms:.1f} |")
        for w in args.workers:
            print(f"{w} worker(s): {rate(files, args.images, w):.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
