"""A tiny random CARZero for the zero-shot tests: ViT 224/32 (7×7 grid), a 4-layer BERT with a
made-up vocabulary saved as a local directory, and a small aligner."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from conftest import make_aligner

import carzero_fast as cf
from carzero_fast.encoders.image import VisionTransformer, ViTConfig
from carzero_fast.encoders.text import TextEncoder
from carzero_fast.model import CARZeroModel

D = 32
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "there", "is", "a", "no", "left",
         "effusion", "edema", "pne", "##umo", "##thorax", "nodule", "cardio", "##megaly",
         "."]  # fmt: skip


def bert_dir(root: Path) -> Path:
    """A local BERT directory (config + vocabulary), as `--tokenizer` takes."""
    d = root / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = transformers.BertTokenizer(str(d / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=D, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=128)  # fmt: skip
    tok.save_pretrained(d)
    cfg.save_pretrained(d)
    return d


def tiny_model(bert: Path, aligner_layers: int = 1) -> CARZeroModel:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=224, patch_size=32, embed_dim=D, depth=1,
                                      num_heads=4))  # fmt: skip
    model = transformers.BertModel(transformers.BertConfig.from_pretrained(bert))
    tok = transformers.AutoTokenizer.from_pretrained(bert, local_files_only=True)
    al_cfg = cf.AlignerConfig(d_model=D, n_heads=4, n_layers=aligner_layers, d_ffn=48,
                              head_dims=(24, 16))  # fmt: skip
    return CARZeroModel(vit, TextEncoder(model, tok), make_aligner(al_cfg)).eval()
