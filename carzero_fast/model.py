"""`CARZeroModel`: image encoder + text encoder + aligner, from CARZero's checkpoints or ours.

Two formats load:

- CARZero's released Lightning `.ckpt` (or any torch file whose state dict has keys under
  `CARZero.img_encoder.`, `CARZero.text_encoder.`, `CARZero.fusion_module.`, or the same
  without the `CARZero.` prefix). The BERT architecture and tokenizer are not in it: they come
  from a local Hugging Face directory (`tokenizer=`, e.g. the Bio_ClinicalBERT folder CARZero
  was trained from). The ViT's shape is inferred from its weights.
- our directory: `model.safetensors` (keys `img_encoder.*` in timm's names, `text_encoder.*`
  in transformers' names, `fusion_module.*` in the original's), `config.json` (the three
  configurations) and `tokenizer/` (the tokenizer files).

Pickle checkpoints load with `weights_only=True`; one that needs more says so, and loads only
with `trust_checkpoint=True` (`--trust-checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .aligner import CrossAttentionAligner
from .config import AlignerConfig

FORMAT = "carzero_fast"
PARTS = ("img_encoder", "text_encoder", "fusion_module")


def _load_torch_file(path: Path, trust_checkpoint: bool) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as e:  # noqa: BLE001 — re-raised with what to do about it
        first_line = (str(e).splitlines() or [""])[0][:200]
        # torch's weights-only unpickler refuses a readable pickle that names objects beyond
        # tensors with this message; any other failure means torch cannot read the file at
        # all, and unpickling it without weights_only would not help (nor be safe to suggest)
        refused = isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)
        if trust_checkpoint or not refused:
            raise ValueError(f"{path} is not a checkpoint torch can read ({type(e).__name__}: "
                             f"{first_line})") from e  # fmt: skip
        raise ValueError(
            f"checkpoint {path} cannot be loaded with weights_only=True ({type(e).__name__}: "
            f"{first_line}); it holds Python objects beyond tensors. If you "
            "trust the file, pass --trust-checkpoint (trust_checkpoint=True)"
        ) from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path} holds no state dict")
    return sd


def split_carzero_state_dict(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A CARZero state dict → {part: its keys without the prefix} for the three parts."""
    parts: dict[str, dict[str, Tensor]] = {p: {} for p in PARTS}
    for key, value in sd.items():
        for part in PARTS:
            for prefix in (f"CARZero.{part}.", f"{part}."):
                if key.startswith(prefix):
                    parts[part][key[len(prefix) :]] = value
    missing = [p for p in PARTS if not parts[p]]
    if missing:
        found = sorted({k.split(".")[0] for k in sd})[:8]
        raise ValueError(
            f"not a CARZero checkpoint: no {', '.join(missing)} weights (expected keys under "
            f"'CARZero.<part>.' or '<part>.'; top-level names found: {found})"
        )
    return parts


class CARZeroModel(nn.Module):
    """CARZero for zero-shot scoring: images `(N, 3, 224, 224)` and prompts → `(N, M)`."""

    def __init__(self, img_encoder: nn.Module, text_encoder: nn.Module,
                 aligner: CrossAttentionAligner) -> None:  # fmt: skip
        super().__init__()
        self.img_encoder, self.text_encoder, self.aligner = img_encoder, text_encoder, aligner

    # -- encoding ------------------------------------------------------------------------------
    def encode_images(self, pixels: Tensor) -> Tensor:
        """pixels `(N, 3, 224, 224)` (preprocessed) → tokens `(N, 197, D)`, global in row 0."""
        return self.img_encoder(pixels)

    def encode_texts(self, texts: list[str]) -> Tensor:
        """prompts → tokens `(M, 98, D)`, sentence embedding in row 0."""
        return self.text_encoder(texts)

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        trust_checkpoint: bool = False,
        vit_heads: int | None = None,
    ) -> CARZeroModel:
        """Our directory, or a CARZero `.ckpt` with `tokenizer` = a local BERT directory
        (config + tokenizer files). `vit_heads` overrides the ViT's head count (the weights do
        not determine it; default embed_dim / 64, ViT-B's 12)."""
        p = Path(path)
        if p.is_dir():
            return cls._from_directory(p)
        if not p.is_file():
            raise ValueError(f"checkpoint {p} does not exist")
        if tokenizer is None:
            raise ValueError(
                f"{p} is a CARZero checkpoint: its BERT configuration and tokenizer are not in "
                "it; give the local BERT directory it was trained from (tokenizer=DIR; on the "
                "command line: carzero-fast convert CKPT OUT_DIR --tokenizer DIR)"
            )
        parts = split_carzero_state_dict(_load_torch_file(p, trust_checkpoint))
        return cls._from_parts(parts, Path(tokenizer), vit_heads)

    @classmethod
    def _from_parts(cls, parts: dict[str, dict[str, Tensor]], bert_dir: Path,
                    vit_heads: int | None) -> CARZeroModel:  # fmt: skip
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from .encoders.image import VisionTransformer, infer_config
        from .encoders.text import TextEncoder

        vit_sd = parts["img_encoder"]
        vit_cfg = infer_config(vit_sd, num_heads=vit_heads) if vit_heads else infer_config(vit_sd)
        vit = VisionTransformer(vit_cfg)
        vit.load_timm_state_dict(vit_sd)
        if not bert_dir.is_dir():
            raise ValueError(f"BERT directory {bert_dir} does not exist")
        try:
            bert_cfg = AutoConfig.from_pretrained(bert_dir, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(bert_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{bert_dir} is not a BERT directory (config + tokenizer): {e}") from e
        bert = AutoModel.from_config(bert_cfg)
        text_sd = _strip_model_prefix(parts["text_encoder"])
        _load_exact(bert, text_sd, "text_encoder")
        aligner = CrossAttentionAligner.from_carzero_state_dict(parts["fusion_module"])
        return cls(vit, TextEncoder(bert, tok), aligner).eval()

    @classmethod
    def _from_directory(cls, directory: Path) -> CARZeroModel:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from .encoders.image import VisionTransformer, ViTConfig
        from .encoders.text import TextEncoder

        cfg_path, weights = directory / "config.json", directory / "model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise ValueError(f"{directory} is not a carzero_fast model directory "
                             "(config.json and model.safetensors expected)")  # fmt: skip
        try:
            cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_path} is not a {FORMAT} configuration")
        lacking = [k for k in ("vit", "bert", "aligner") if not isinstance(cfg.get(k), dict)]
        if lacking:
            raise ValueError(f"{cfg_path} lacks the {' and '.join(lacking)} configuration "
                             "(an edited or truncated config.json?)")  # fmt: skip
        try:
            vit_cfg = ViTConfig.from_dict(cfg["vit"])
            aligner_cfg = AlignerConfig(**cfg["aligner"])
        except (TypeError, ValueError) as e:  # unknown keys, bad values
            raise ValueError(f"{cfg_path}: {e}") from e
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # noqa: BLE001 — safetensors raises its own error type
            raise ValueError(f"{weights} cannot be read as safetensors ({e}): a truncated or "
                             "corrupted copy? Convert or copy the model again") from e  # fmt: skip
        parts = split_carzero_state_dict(tensors)
        vit = VisionTransformer(vit_cfg)
        vit.load_timm_state_dict(parts["img_encoder"])
        bert_cfg = dict(cfg["bert"])
        if "model_type" not in bert_cfg:
            raise ValueError(f"{cfg_path}: the bert configuration lacks 'model_type'")
        bert = AutoModel.from_config(AutoConfig.for_model(bert_cfg.pop("model_type"), **bert_cfg))
        _load_exact(bert, parts["text_encoder"], "text_encoder")
        tok_dir = directory / "tokenizer"
        if not tok_dir.is_dir() or not any(tok_dir.iterdir()):
            raise ValueError(f"{directory} lacks its tokenizer folder ({tok_dir}): copy the "
                             "whole model directory")  # fmt: skip
        try:
            tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{tok_dir} is not a tokenizer transformers can load: "
                             f"{error_text(e)}") from e  # fmt: skip
        text = TextEncoder(bert, tok, **cfg.get("text", {}))
        try:  # names missing, unknown and misshapen keys, as for a CARZero checkpoint
            aligner = CrossAttentionAligner.from_carzero_state_dict(parts["fusion_module"],
                                                                    aligner_cfg)  # fmt: skip
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{directory}: the fusion_module weights do not fit the aligner "
                             f"configuration in config.json: {error_text(e)}") from e  # fmt: skip
        return cls(vit, text, aligner).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write our format; the directory appears complete or not at all (temp + rename)."""
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a directory")
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not empty")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tensors = {}
            for part, module in (("img_encoder", self.img_encoder),
                                 ("text_encoder", self.text_encoder.model),
                                 ("fusion_module", self.aligner)):  # fmt: skip
                for k, v in module.state_dict().items():
                    tensors[f"{part}.{k}"] = v.detach().to("cpu").contiguous()
            save_file(_dedupe(tensors), str(tmp / "model.safetensors"))
            cfg = {
                "format": FORMAT, "version": 1,
                "vit": self.img_encoder.config.to_dict(),
                "bert": self.text_encoder.model.config.to_dict(),
                "text": {"max_length": self.text_encoder.max_length,
                         "n_layers_summed": self.text_encoder.n_layers_summed},
                "aligner": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in dataclasses.asdict(self.aligner.config).items()},
            }  # fmt: skip
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
            self.text_encoder.tokenizer.save_pretrained(tmp / "tokenizer")
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def error_text(e: BaseException) -> str:
    """An exception's message for a one-line report: a KeyError's own text without the quotes
    `str(KeyError)` adds."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def check_device(name: str) -> torch.device:
    """`--device NAME` as a torch device that exists here, or ValueError naming the problem
    (checked before a model loads)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this PyTorch has no usable CUDA device (use "
                             "--device cpu)")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA "
                             "devices")  # fmt: skip
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def check_crop_size(model: CARZeroModel) -> None:
    """Raise ValueError unless the model's ViT takes the 224-px crops that CARZero's test
    transform (`encoders.image.preprocess`, which `score` and `ground` use) produces. CARZero
    resizes to 256 and crops 224 whatever the encoder; a ViT trained at another size is not the
    model those transforms were made for, so it is refused rather than fed resized crops."""
    from .encoders.image import CROP_SIZE

    size = getattr(getattr(model.img_encoder, "config", None), "img_size", CROP_SIZE)
    if size != CROP_SIZE:
        raise ValueError(f"the model's ViT takes {size}×{size}-px images (its position "
                         f"embedding's size), but CARZero's preprocessing feeds "
                         f"{CROP_SIZE}×{CROP_SIZE}-px crops: this is not a model for "
                         "CARZero's transforms")  # fmt: skip


def _strip_model_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """CARZero's text encoder holds BERT as `.model`: drop that level when present."""
    if sd and all(k.startswith("model.") for k in sd):
        return {k[len("model.") :]: v for k, v in sd.items()}
    return sd


def _dedupe(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses shared storage (tied embeddings): store each a copy."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _load_exact(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """load_state_dict that names missing, unexpected and misshapen keys in one message
    (buffers such as BERT's position_ids may be absent: they are rebuilt by the model)."""
    own = module.state_dict()
    persistent_params = {k for k, _ in module.named_parameters()}
    missing = sorted(k for k in persistent_params if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    misshapen = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
                       for k in sd if k in own and sd[k].shape != own[k].shape)  # fmt: skip
    if missing or unexpected or misshapen:
        raise KeyError(f"{what} weights do not fit the model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}, misshapen {misshapen[:5]}")  # fmt: skip
    module.load_state_dict(sd, strict=False)


def convert_main(argv: list[str] | None = None) -> int:
    """`carzero-fast convert CKPT OUT_DIR [--tokenizer DIR] [--trust-checkpoint]`."""
    import argparse
    import sys

    what = "a CARZero checkpoint → our model directory"
    p = argparse.ArgumentParser(prog="carzero-fast convert", description=what)
    p.add_argument("checkpoint", help="CARZero's Lightning .ckpt (or our directory)")
    p.add_argument("out_dir", help="the new model directory (must not exist or be empty)")
    p.add_argument("--tokenizer", help="local BERT directory (config + tokenizer files) the "
                   "checkpoint's text encoder was trained from")  # fmt: skip
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled Python objects in the checkpoint (only for trusted files)",
    )
    p.add_argument("--vit-heads", type=int, default=None, help="ViT heads (default D/64)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        # cheap checks first: no checkpoint is read for an output that cannot be written
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a directory")
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise ValueError(f"{out_dir} exists and is not empty")
        model = CARZeroModel.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer,
                                             trust_checkpoint=args.trust_checkpoint,
                                             vit_heads=args.vit_heads)  # fmt: skip
        out = model.save_pretrained(out_dir)
    except (ValueError, KeyError) as e:
        print(f"carzero-fast convert: {error_text(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    try:
        check_crop_size(model)
    except ValueError as e:  # the conversion is right; say now what score and ground will say
        print(f"carzero-fast convert: warning: {e}; score and ground will refuse it",
              file=sys.stderr)  # fmt: skip
    return 0
