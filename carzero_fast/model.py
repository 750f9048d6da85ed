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

Pickle checkpoints load with `weights_only=True`; the Python objects that refuses (Lightning's
hyper-parameters: an OmegaConf config) are read as inert placeholders, and only a file that
names a global torch blocks outright (os.system, ...) needs `trust_checkpoint=True`
(`--trust-checkpoint`), which unpickles everything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .aligner import CrossAttentionAligner
from .config import AlignerConfig

FORMAT = "carzero_fast"
PARTS = ("img_encoder", "text_encoder", "fusion_module")


def _inert(name: str, container: type | None = None) -> type:
    """A class standing in for the global `name` of a checkpoint: it accepts any arguments and
    state and keeps none, so the object it stands for is read without importing or running
    anything. With `container` (OrderedDict or list, for a dict or list subclass, whose items
    the weights-only unpickler adds only to those exact types), its objects are plain ones of
    that type, holding the items."""

    def __new__(cls: type, *args: object, **kwargs: object) -> object:  # noqa: ARG001
        return container() if container is not None else object.__new__(cls)

    module, _, qualname = name.rpartition(".")
    return type(qualname, (), {
        "__new__": __new__,
        "__init__": lambda self, *args, **kwargs: None,
        "__setstate__": lambda self, state: None,
        "__repr__": lambda self: f"<{name}, not loaded>",
        "__module__": module,
    })  # fmt: skip


def read_state_dict(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict:
    """The state dict of a torch file (a Lightning checkpoint's `state_dict` entry, or the
    file's dict itself).

    Without `trust_checkpoint`, torch's weights-only unpickler reads it; the Python objects it
    refuses (a Lightning checkpoint's hyper-parameters, an OmegaConf config, callbacks' state)
    are read as inert placeholders, so nothing in the file runs and their packages need not be
    installed. A file naming a global torch blocks outright (os.system, ...) raises ValueError
    unless `trust_checkpoint`, which unpickles everything (only for files you trust).
    """
    path = Path(path)
    try:
        if trust_checkpoint:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if "Weights only load failed" not in str(e):
                    raise
                obj = _load_with_placeholders(path)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 — re-raised with the file's name
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a checkpoint torch can read ({type(e).__name__}: "
                         f"{first_line})") from e  # fmt: skip
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path} holds no state dict")
    return sd


def _load_with_placeholders(path: Path) -> object:
    """`torch.load(weights_only=True)` with an inert stand-in for every global the file names
    beyond torch's allowlist; a name whose objects receive items (a dict or list subclass,
    `defaultdict`) is read again as a plain container. ValueError where torch still refuses
    (e.g. os.system: blocked even as a name)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError as e:  # the names are listed for zip files only
        with open(path, "rb") as f:
            head = f.read(8)
        if not head.startswith(b"\x80"):  # neither a zip nor a pickle: no checkpoint at all
            raise ValueError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}: "
                             "an HTML page or a truncated download?)") from e  # fmt: skip
        raise ValueError(f"checkpoint {path}, in torch's legacy (non-zip) format, holds Python "
                         "objects that only an unrestricted load reads; if you trust the file, "
                         "pass --trust-checkpoint (trust_checkpoint=True)") from e  # fmt: skip
    containers: dict[str, type] = {}
    while True:
        stand_ins = {n: _inert(n, containers.get(n)) for n in names}
        try:
            with torch.serialization.safe_globals([(c, n) for n, c in stand_ins.items()]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            m = re.search(r"Can only (SETITEMS?|extend lists|append to lists).* but got "
                          r"<class '([^']+)'>", text)  # fmt: skip
            got = m.group(2) if m else None
            name = next((n for n, c in stand_ins.items()
                         if f"{c.__module__}.{c.__qualname__}" == got), None)  # fmt: skip
            if not name or name in containers:
                lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                why = next((ln for ln in lines if ln.startswith(("Trying to", "Can only"))), "")
                raise ValueError(f"checkpoint {path} cannot be read safely ({why}); if you "
                                 "trust the file, pass --trust-checkpoint "
                                 "(trust_checkpoint=True)") from e  # fmt: skip
            containers[name] = OrderedDict if m.group(1).startswith("SETITEM") else list


def split_carzero_state_dict(
    sd: dict[str, object],
) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """A CARZero state dict → ({part: its tensors without the prefix} for the three parts,
    the keys outside them). A key under both `CARZero.<part>.` and `<part>.`, or a value that
    is not a tensor, is refused."""
    parts: dict[str, dict[str, Tensor]] = {p: {} for p in PARTS}
    other = []
    for key, value in sd.items():
        for part in PARTS:
            prefix = next((f for f in (f"CARZero.{part}.", f"{part}.") if key.startswith(f)), "")
            if prefix:
                name = key[len(prefix) :]
                if name in parts[part]:
                    raise ValueError(f"checkpoint key '{key}': {part} '{name}' appears twice, "
                                     f"with and without the 'CARZero.' prefix")  # fmt: skip
                if not isinstance(value, Tensor):
                    raise ValueError(f"checkpoint key '{key}' holds a {type(value).__name__}, "
                                     "not a tensor")  # fmt: skip
                parts[part][name] = value
                break
        else:
            other.append(key)
    missing = [p for p in PARTS if not parts[p]]
    if missing:
        found = sorted({k.split(".")[0] for k in sd})[:8]
        raise ValueError(
            f"not a CARZero checkpoint: no {', '.join(missing)} weights (expected keys under "
            f"'CARZero.<part>.' or '<part>.'; top-level names found: {found})"
        )
    return parts, other


class CheckpointWarning(UserWarning):
    """Something in a checkpoint that loading leaves out (keys outside the model's parts)."""


class CARZeroModel(nn.Module):
    """CARZero for zero-shot scoring: images `(N, 3, 224, 224)` and prompts → `(N, M)`."""

    def __init__(self, img_encoder: nn.Module, text_encoder: nn.Module,
                 aligner: CrossAttentionAligner) -> None:  # fmt: skip
        super().__init__()
        self.img_encoder, self.text_encoder, self.aligner = img_encoder, text_encoder, aligner

    def forward(self, pixels: Tensor, prompts: list[str], *, backend: str | None = None) -> Tensor:
        """Zero-shot logits of every image for every prompt: pixels `(N, 3, 224, 224)`
        (preprocessed) and M prompts → `(N, M)` (`zero_shot_scores`; sigmoid gives
        probabilities)."""
        from .loss import zero_shot_scores

        return zero_shot_scores(self.aligner, self.encode_images(pixels),
                                self.encode_texts(prompts), backend=backend)  # fmt: skip

    # -- encoding ------------------------------------------------------------------------------
    def encode_images(self, pixels: Tensor) -> Tensor:
        """pixels `(N, 3, 224, 224)` (preprocessed, any float dtype) → tokens `(N, 197, D)`
        on the model's device, in its dtype (as `encode_texts`), global in row 0."""
        param = next(self.img_encoder.parameters())
        if isinstance(pixels, Tensor) and pixels.is_floating_point():
            pixels = pixels.to(device=param.device, dtype=param.dtype)
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
            given = [n for n, v in (("tokenizer", tokenizer), ("vit_heads", vit_heads),
                                    ("trust_checkpoint", trust_checkpoint))
                     if v is not None and v is not False]  # fmt: skip
            if given:
                raise ValueError(f"{p} is a model directory: its config.json and tokenizer "
                                 f"decide the model; {', '.join(given)} are for a CARZero "
                                 "checkpoint file")  # fmt: skip
            return cls._from_directory(p)
        if not p.is_file():
            raise ValueError(f"checkpoint {p} does not exist")
        if tokenizer is None:
            raise ValueError(
                f"{p} is a CARZero checkpoint: its BERT configuration and tokenizer are not in "
                "it; give the local BERT directory it was trained from (tokenizer=DIR; on the "
                "command line: carzero-fast convert CKPT OUT_DIR --tokenizer DIR)"
            )
        parts, other = split_carzero_state_dict(read_state_dict(p, trust_checkpoint))
        if other:
            warnings.warn(f"{p}: {len(other)} key(s) outside img_encoder, text_encoder and "
                          f"fusion_module are not part of the model, ignored: {other[:8]}",
                          CheckpointWarning, stacklevel=2)  # fmt: skip
        return cls._from_parts(parts, Path(tokenizer), vit_heads)

    @classmethod
    def _from_parts(cls, parts: dict[str, dict[str, Tensor]], bert_dir: Path,
                    vit_heads: int | None) -> CARZeroModel:  # fmt: skip
        from transformers import AutoConfig

        from .encoders.image import VisionTransformer, infer_config
        from .encoders.text import TextEncoder

        vit_sd = parts["img_encoder"]
        vit_cfg = infer_config(vit_sd, num_heads=vit_heads)  # None: D / 64; 0 is refused
        vit = VisionTransformer(vit_cfg)
        vit.load_timm_state_dict(vit_sd)
        if not bert_dir.is_dir():
            raise ValueError(f"BERT directory {bert_dir} "
                             f"{'is a file' if bert_dir.exists() else 'does not exist'}")
        try:
            bert_cfg = AutoConfig.from_pretrained(bert_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{bert_dir} is not a BERT directory (config + tokenizer): {e}") from e
        bert = _bert_from_config(bert_cfg)
        text_sd = _strip_model_prefix(parts["text_encoder"])
        _load_exact(bert, text_sd, "text_encoder")
        tok = _load_tokenizer(bert_dir, bert)
        aligner = CrossAttentionAligner.from_carzero_state_dict(parts["fusion_module"])
        return cls(vit, TextEncoder(bert, tok), aligner).eval()

    @classmethod
    def _from_directory(cls, directory: Path) -> CARZeroModel:
        from transformers import AutoConfig

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
        if not isinstance(cfg.get("text", {}), dict):
            lacking.append("text")
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
        parts, other = split_carzero_state_dict(tensors)
        if other:
            raise ValueError(f"{weights} holds keys outside img_encoder, text_encoder and "
                             f"fusion_module: {other[:8]}")  # fmt: skip
        try:  # a configuration that does not fit the weights is config.json's fault here
            vit = VisionTransformer(vit_cfg)
            vit.load_timm_state_dict(parts["img_encoder"])
            bert_cfg = dict(cfg["bert"])
            if "model_type" not in bert_cfg:
                raise ValueError("the bert configuration lacks 'model_type'")
            bert = _bert_from_config(AutoConfig.for_model(bert_cfg.pop("model_type"),
                                                          **bert_cfg))  # fmt: skip
            _load_exact(bert, parts["text_encoder"], "text_encoder")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path} does not fit {weights.name}: {error_text(e)}") from e
        tok_dir = directory / "tokenizer"
        if not tok_dir.is_dir() or not any(tok_dir.iterdir()):
            raise ValueError(f"{directory} lacks its tokenizer folder ({tok_dir}): copy the "
                             "whole model directory")  # fmt: skip
        tok = _load_tokenizer(tok_dir, bert)
        try:
            text = TextEncoder(bert, tok, **cfg.get("text", {}))
        except (TypeError, ValueError) as e:  # unknown or bad "text" settings
            raise ValueError(f"{cfg_path}: text: {error_text(e)}") from e
        try:  # names missing, unknown and misshapen keys, as for a CARZero checkpoint
            aligner = CrossAttentionAligner.from_carzero_state_dict(parts["fusion_module"],
                                                                    aligner_cfg)  # fmt: skip
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{directory}: the fusion_module weights do not fit the aligner "
                             f"configuration in config.json: {error_text(e)}") from e  # fmt: skip
        return cls(vit, text, aligner).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write our format; the directory appears complete or not at all (temp + rename).
        The tensors keep the model's dtype; `from_checkpoint` builds the model in fp32 (cast
        it after loading, e.g. `.to(torch.bfloat16)`).

        A symbolic link is written through: the model lands where it points."""
        parametrized = [n for n, m in self.named_modules()
                        if getattr(m, "parametrizations", None)]  # fmt: skip
        if parametrized:
            raise ValueError(f"{parametrized[0]} has parametrizations, which the saved model "
                             "would hold as their originals, not the weights that run: make "
                             "them permanent first (torch.nn.utils.parametrize."
                             "remove_parametrizations(module, name))")  # fmt: skip
        out = _write_target(Path(directory))
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a directory")
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not empty")
        created = [d for d in reversed(out.absolute().parents) if not d.exists()]
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
            _umask_modes(tmp)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in reversed(created):  # the folders made for it, if still empty
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
        return Path(directory)


def _write_target(path: Path) -> Path:
    """Where writing the directory `path` lands: a symbolic link's target (the rename that
    completes a save would replace the link, and rmdir refuses one), else `path` itself."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError before Python 3.13
        raise ValueError(f"{path} is a symbolic link that cannot be followed ({e})") from None


def _umask_modes(root: Path) -> None:
    """Give `root` and everything in it the modes a plain mkdir / open would under the umask
    (mkdtemp and safetensors create them private, 0700 / 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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


def _bert_from_config(config: object) -> nn.Module:
    """BERT of `config` in float32, as CARZero built it, whatever dtype the config names (a
    config saved from a half-precision model would otherwise round the weights loaded into
    it)."""
    from transformers import AutoModel

    return AutoModel.from_config(config).float()


def _load_tokenizer(directory: Path, bert: nn.Module) -> object:
    """The tokenizer in `directory`, refused when it has no vocabulary file (transformers then
    builds one that maps every word to [UNK]) or more tokens than `bert` has embeddings."""
    from transformers import AutoTokenizer

    from .encoders.text import TOKENIZER_FILES

    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {directory}: expected one of {TOKENIZER_FILES} (the "
                         "vocabulary of the BERT the model was trained from)")  # fmt: skip
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory} holds no tokenizer transformers can load: "
                         f"{error_text(e)}") from e  # fmt: skip
    rows = bert.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise ValueError(f"the tokenizer in {directory} has {len(tok)} tokens but the text "
                         f"encoder embeds {rows}: not its training vocabulary")  # fmt: skip
    return tok


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
    buffers = dict(module.named_buffers())  # non-persistent ones included, unlike own
    missing = sorted(k for k in persistent_params if k not in sd)
    unexpected = sorted(k for k in sd if k not in own and k not in buffers)
    # A non-persistent buffer saved by an older version (BERT's position_ids before
    # transformers 4.31) is rebuilt by the model: dropped, not loaded.
    sd = {k: v for k, v in sd.items() if k in own}
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
        target = _write_target(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a directory")
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise ValueError(f"{out_dir} exists and is not empty")
        parent = target.absolute().parent
        if not parent.is_dir():
            raise ValueError(f"the folder of {out_dir} ({parent}) "
                             f"{'is a file' if parent.exists() else 'does not exist'}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write in {parent}, the folder of {out_dir}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = CARZeroModel.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer,
                                                 trust_checkpoint=args.trust_checkpoint,
                                                 vit_heads=args.vit_heads)  # fmt: skip
        for w in caught:  # ours as one line each, any library's as it was
            if issubclass(w.category, CheckpointWarning):
                print(f"carzero-fast convert: warning: {w.message}", file=sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out = model.save_pretrained(out_dir)
    except (ValueError, KeyError, TypeError, OSError) as e:
        # TypeError: a checkpoint value of the wrong kind (e.g. integer LayerNorm weights)
        print(f"carzero-fast convert: {error_text(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    try:
        check_crop_size(model)
    except ValueError as e:  # the conversion is right; say now what score and ground will say
        print(f"carzero-fast convert: warning: {e}; score and ground will refuse it",
              file=sys.stderr)  # fmt: skip
    return 0
