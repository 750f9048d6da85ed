"""How fast `carzero-fast score` runs: a full-size random CARZero (ViT-B/16, BERT-base shape,
the aligner at CARZero dims) on generated 1024×1024 PNGs, CheXpert's 14 findings.

    python -m benchmarks.score_speed [--images 32] [--batch-size 16] [--dtype fp32]

Random weights and a made-up vocabulary: the work per image is the real model's; the scores
mean nothing. Prints images/s of the whole command (decoding, ViT, aligner, CSV).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, images, rng, image = build(root)
        for i in range(args.images):
            px = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
            image.fromarray(px).save(images / f"{i:04d}.png")
        classes = root / "classes.txt"
        classes.write_text("\n".join(FINDINGS) + "\n")
        t0 = time.perf_counter()
        code = cli(["score", "--model", str(model_dir), "--images", str(images), "--classes",
                    str(classes), "--out", str(root / "scores.csv"), "--batch-size",
                    str(args.batch_size), "--dtype", args.dtype, "--device", "cpu"])  # fmt: skip
        dt = time.perf_counter() - t0
        assert code == 0
        print(f"score: {args.images} images × {len(FINDINGS)} classes, batch {args.batch_size}, "
              f"{args.dtype}: {dt:.1f} s, {args.images / dt:.2f} images/s "
              f"(includes loading the model and encoding the prompts)")  # fmt: skip


if __name__ == "__main__":
    main()
