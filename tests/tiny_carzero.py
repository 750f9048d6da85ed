"""A tiny random CARZero for the zero-shot tests: ViT 224/32 (7×7 grid), a 4-layer BERT with a
made-up vocabulary saved as a local directory, and a small aligner; and what the command-line
tests (`convert`, `score`) share: a Lightning-style checkpoint, a small image collection with
DICOMs and an unreadable file, and the scores computed directly."""

from __future__ import annotations

import csv
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import transformers
from conftest import make_aligner
from PIL import Image

import carzero_fast as cf
from carzero_fast.encoders.image import VisionTransformer, ViTConfig, preprocess_file
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


CLASSES = ["effusion", "pneumothorax", "cardiomegaly"]


def carzero_ckpt(model: CARZeroModel, path: Path, extra: object = None) -> Path:
    """A checkpoint laid out like CARZero's Lightning one."""
    sd = {}
    for k, v in model.img_encoder.state_dict().items():
        sd[f"CARZero.img_encoder.model.{k}"] = v
    for k, v in model.text_encoder.model.state_dict().items():
        sd[f"CARZero.text_encoder.model.{k}"] = v
    for k, v in model.aligner.state_dict().items():
        sd[f"CARZero.fusion_module.{k}"] = v
    sd["CARZero.fusion_module.logit_scale"] = torch.ones(())
    ckpt = {"state_dict": sd, "epoch": 7}
    if extra is not None:
        ckpt["hyper_parameters"] = extra
    torch.save(ckpt, path)
    return path


def write_dicom(path: Path, arr: np.ndarray) -> None:
    """A 16-bit MONOCHROME2 DICOM holding `arr` (rows × columns)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def collection(root: Path) -> Namespace:
    """Under `root`: the tiny BERT folder, the tiny model saved as our directory, 17 PNGs of
    odd sizes, 3 DICOMs, one unreadable "broken.png", and a classes.txt of `CLASSES`."""
    bert = bert_dir(root)
    model = tiny_model(bert)
    model_dir = model.save_pretrained(root / "model")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(17):
        h, w = (300 + 13 * i, 260 + 7 * (i % 5))
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(imgs / f"x{i:02d}.png")
    for i in range(3):
        write_dicom(imgs / f"d{i}.dcm", rng.integers(0, 4096, (280, 240)))
    (imgs / "broken.png").write_bytes(b"\x89PNG not really")
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return Namespace(root=root, bert=bert, model=model, model_dir=model_dir, images=imgs,
                     classes=classes)  # fmt: skip


def direct_scores(model: CARZeroModel, paths: list[Path]) -> torch.Tensor:
    """The scores `score` should write: "There is {class}." for every class, in one call."""
    prompts = [f"There is {c}." for c in CLASSES]
    with torch.no_grad():
        txt = model.encode_texts(prompts)
        img = model.encode_images(torch.stack([preprocess_file(p) for p in paths]))
        return cf.zero_shot_scores(model.aligner, img, txt)


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open(newline="")))


def score_args(s: Namespace, out: Path, *extra: str) -> list[str]:
    """`carzero-fast score` over `collection`'s images, in batches of 4 on 2 workers."""
    return ["score", "--model", str(s.model_dir), "--images", str(s.images), "--classes",
            str(s.classes), "--out", str(out), "--batch-size", "4", "--workers", "2",
            *extra]  # fmt: skip
