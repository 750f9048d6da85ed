"""How fast `carzero-fast score` runs: a full-size random CARZero (ViT-B/16, BERT-base shape,
the aligner at CARZero dims) on generated 1024×1024 PNGs, CheXpert's 14 findings.

    python -m benchmarks.score_speed [--images 64] [--batch-size 16] [--dtype fp32]

Random weights and a made-up vocabulary: the work per image is the real model's; the scores
mean nothing. Scores n/2 and then n images, printing images/s of each whole command
(model loading, prompt encoding, decoding, ViT, aligner, CSV) and the rate once running
(the extra images over the extra time).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import carzero_fast as cf
from carzero_fast.cli import main as cli

FINDINGS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged cardiomediastinum",
            "fracture", "lung lesion", "lung opacity", "no finding", "pleural effusion",
            "pleural other", "pneumonia", "pneumothorax", "support devices"]  # fmt: skip


def build(root: Path) -> tuple:
    import transformers
    from PIL import Image

    from carzero_fast.encoders.image import VisionTransformer, ViTConfig
    from carzero_fast.encoders.text import TextEncoder
    from carzero_fast.model import CARZeroModel

    words = sorted({w for f in FINDINGS for w in f.split()} | {"there", "is", "."})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    bert_dir = root / "bert"
    bert_dir.mkdir()
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(bert_dir / "vocab.txt"))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab)))
    torch.manual_seed(0)
    model = CARZeroModel(VisionTransformer(ViTConfig()), TextEncoder(bert, tok),
                         cf.CrossAttentionAligner(cf.AlignerConfig()))  # fmt: skip
    model_dir = model.save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    return model_dir, images, rng, Image


def _score(model_dir: Path, images: Path, classes: Path, out: Path, args) -> float:  # noqa: ANN001
    """Seconds of one whole `carzero-fast score` command."""
    t0 = time.perf_counter()
    code = cli(["score", "--model", str(model_dir), "--images", str(images), "--classes",
                str(classes), "--out", str(out), "--batch-size", str(args.batch_size),
                "--dtype", args.dtype, "--device", "cpu"])  # fmt: skip
    if code != 0:
        raise RuntimeError(f"carzero-fast score exited {code} (its message is above)")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.score_speed",
                                     description="how fast `carzero-fast score` runs on CPU")
    parser.add_argument("--images", type=int, default=64,
                        help="images of the second run; the first scores half as many")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    for flag, value, low in (("--images", args.images, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, images, rng, image = build(root)
        classes = root / "classes.txt"
        classes.write_text("\n".join(FINDINGS) + "\n")
        # two runs, n/2 then n images: the difference is the rate once the model is loaded
        # and the prompts encoded (what a long run approaches)
        runs = []
        for n in (args.images // 2, args.images):
            for i in range(n):
                if not (images / f"{i:04d}.png").exists():
                    px = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
                    image.fromarray(px).save(images / f"{i:04d}.png")
            runs.append((n, _score(model_dir, images, classes, root / f"scores{n}.csv", args)))
        (n1, t1), (n2, t2) = runs
        print(f"score: {len(FINDINGS)} classes, batch {args.batch_size}, {args.dtype}: "
              f"{n1} images {t1:.1f} s ({n1 / t1:.2f} images/s), {n2} images {t2:.1f} s "
              f"({n2 / t2:.2f} images/s), whole commands including loading the model and "
              f"encoding the prompts; once running: {(n2 - n1) / (t2 - t1):.2f} images/s")


if __name__ == "__main__":
    main()
