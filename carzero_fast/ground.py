"""`carzero-fast ground`: where a prompt looks in a chest X-ray, as CARZero shows localisation.

The map is the fusion module's cross-attention in CARZero's image→text (i2t) direction: the
memory is the image's tokens (CLS + g×g patches), the query the prompt's sentence embedding
(row 0 of the text tokens). Every layer's per-head attention of that query over the patch
tokens is averaged over heads and layers (or heads of the last layer only), reshaped to the
g×g patch grid (14×14 for ViT-B/16 at 224 px), min–max normalised to [0, 1], upsampled
bilinearly to the 224×224 crop and blended as a jet heat map on that crop.

The image the map is drawn on is the 224×224 centre crop of the 256×256 resized and
zero-padded X-ray: exactly the pixels the model saw (un-normalised back to [0, 1]), so every
patch of the map sits on the pixels it attended to. Mapping back to the original resolution
would need the inverse of the resize, padding and crop, and the 16-pixel border the crop
drops is not seen by the model at all.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .aligner import CrossAttentionAligner
from .model import CARZeroModel, check_crop_size, check_device, error_text
from .validation import check_inputs

LAYER_CHOICES = ("all", "last")


def attention_maps(
    aligner: CrossAttentionAligner, memory: Tensor, query: Tensor
) -> tuple[Tensor, Tensor]:
    """One (memory item, query) pair through the fusion module, keeping its attention weights.

    The same math as the `reference` backend for one pair in eval mode (no dropout), written
    out per head so that each layer's per-head attention of the query over the memory tokens,
    softmax(q·kᵀ/√dh), can be returned (`nn.MultiheadAttention` only returns their mean).

    Args:
        aligner: the fusion module (its dropout is not applied, whatever its mode).
        memory: `(1, P, D)` tokens of one item (e.g. an image: CLS + patches).
        query: `(1, D)` one global vector (e.g. a prompt's sentence embedding).

    Returns:
        (logit: scalar tensor, the pair's logit as `aligner(memory, query)` computes it;
         weights: `(L, H, P)`, layer l's head h attention over the P tokens, rows summing to 1).
    """
    cfg = aligner.config
    check_inputs(cfg, memory, query, None, aligner.decoder_norm.weight)
    if memory.shape[0] != 1 or query.shape[0] != 1:
        raise ValueError(
            f"attention_maps takes one pair: memory (1, P, D) and query (1, D), got "
            f"{tuple(memory.shape)} and {tuple(query.shape)}"
        )
    w = aligner.weights().to(memory.dtype)
    d, h, eps = cfg.d_model, cfg.n_heads, cfg.layer_norm_eps
    dh = d // h
    p = memory.shape[1]
    mem = F.layer_norm(memory[0], (d,), w.norm0_w, w.norm0_b, eps)  # (P, D)
    tgt = F.layer_norm(query[0], (d,), w.norm0_w, w.norm0_b, eps)  # (D,)
    maps = []
    for lw in w.layers:
        y = F.layer_norm(tgt, (d,), lw.norm2_w, lw.norm2_b, eps)
        wq, wk, wv = lw.in_proj_w.chunk(3)
        bq, bk, bv = lw.in_proj_b.chunk(3)
        q = F.linear(y, wq, bq).reshape(h, 1, dh)  # (H, 1, dh)
        k = F.linear(mem, wk, bk).reshape(p, h, dh).transpose(0, 1)  # (H, P, dh)
        v = F.linear(mem, wv, bv).reshape(p, h, dh).transpose(0, 1)  # (H, P, dh)
        # q is scaled before the product, as F.multi_head_attention_forward does, so that the
        # rounding matches the reference's.
        attn = torch.softmax(torch.bmm(q * math.sqrt(1.0 / dh), k.transpose(1, 2)), dim=-1)
        maps.append(attn[:, 0])  # (H, P)
        y = torch.bmm(attn, v).reshape(d)  # heads concatenated, (D,)
        tgt = tgt + F.linear(y, lw.out_proj_w, lw.out_proj_b)
        y = F.layer_norm(tgt, (d,), lw.norm3_w, lw.norm3_b, eps)
        y = F.linear(F.relu(F.linear(y, lw.linear1_w, lw.linear1_b)), lw.linear2_w, lw.linear2_b)
        tgt = tgt + y
    x = F.layer_norm(tgt, (d,), w.norm0_w, w.norm0_b, eps)  # the decoder's final norm
    for i, (hw, hb) in enumerate(w.head):
        x = F.linear(x, hw, hb)
        if i < len(w.head) - 1:
            x = F.relu(x)
    return x.reshape(()), torch.stack(maps)


def map_from_weights(
    weights: Tensor, layers: str = "all", grid: int | None = None, normalize: bool = True
) -> Tensor:
    """Attention weights `(L, H, P)` over CLS + patch tokens → the patch-grid map `(g, g)`.

    Args:
        weights: `(L, H, P)` from `attention_maps`, token 0 the CLS token.
        layers: "all" (mean over heads and layers) or "last" (mean over the last layer's heads).
        grid: patches per side g (the ViT's `grid_size`); None: sqrt(P - 1), which must be an
            integer. P - 1 must equal g² either way.
        normalize: min–max scale to [0, 1] (a constant map gives zeros); False keeps the
            attention mass per patch (it sums with the CLS token's mean weight to 1).

    Returns:
        `(g, g)` map in row-major patch order (row 0 the top of the image).
    """
    if weights.dim() != 3:
        raise ValueError(f"weights must be (L, H, P), got shape {tuple(weights.shape)}")
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, got {layers!r}")
    n = weights.shape[2] - 1
    g = math.isqrt(max(n, 0)) if grid is None else grid
    if n <= 0 or g * g != n:
        want = "a square number" if grid is None else f"{g}² = {g * g} (the ViT's grid)"
        raise ValueError(
            f"the memory has {n} patch tokens after the CLS token, not {want}: it cannot be "
            "laid out on a square patch grid"
        )
    chosen = weights if layers == "all" else weights[-1:]
    m = chosen[:, :, 1:].mean(dim=(0, 1)).reshape(g, g)
    if not normalize:
        return m
    lo, hi = m.min(), m.max()
    if hi <= lo:
        return torch.zeros_like(m)
    return (m - lo) / (hi - lo)


def _pair(model: CARZeroModel, pixels: Tensor, prompt: str) -> tuple[Tensor, Tensor]:
    """Encode one image and one prompt → (image tokens `(1, P, D)`, sentence embedding `(1, D)`)."""
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.dim() != 4 or pixels.shape[0] != 1:
        raise ValueError(f"pixels must be (3, H, W) or (1, 3, H, W), got {tuple(pixels.shape)}")
    param = next(model.img_encoder.parameters())
    img = model.encode_images(pixels.to(device=param.device, dtype=param.dtype))
    txt = model.encode_texts([prompt])
    return img, txt[:, 0].to(img.dtype)


def _grid(model: CARZeroModel) -> int | None:
    """The ViT's patches per side, when its encoder has our `ViTConfig`."""
    cfg = getattr(model.img_encoder, "config", None)
    return getattr(cfg, "grid_size", None)


def grounding_map(
    model: CARZeroModel,
    pixels: Tensor,
    prompt: str,
    *,
    layers: str = "all",
    normalize: bool = True,
) -> Tensor:
    """The prompt's cross-attention over the image's patches (CARZero's i2t direction).

    Args:
        model: a `CARZeroModel`.
        pixels: `(3, 224, 224)` or `(1, 3, 224, 224)` preprocessed image (`preprocess`).
        prompt: the text whose sentence embedding queries the image tokens.
        layers, normalize: as in `map_from_weights`.

    Returns:
        `(g, g)` float CPU tensor, g the ViT's grid (14 for ViT-B/16 at 224 px).
    """
    with torch.no_grad():
        img, query = _pair(model, pixels, prompt)
        _, weights = attention_maps(model.aligner, img, query)
    return map_from_weights(weights.float().cpu(), layers, _grid(model), normalize)


def jet(x: np.ndarray) -> np.ndarray:
    """The classic "jet" colour map: values in [0, 1] → RGB in [0, 1], shape `(..., 3)`.

    Piecewise linear: dark blue (0) → blue → cyan → yellow → red → dark red (1); values
    outside [0, 1] are clipped first.
    """
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    # Each channel is a tent of height 1.5 clipped to [0, 1], centred at 3/4 (red), 1/2
    # (green) and 1/4 (blue).
    channels = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return np.stack(channels, axis=-1)


def overlay(view: Tensor, heat: Tensor, alpha: float) -> np.ndarray:
    """Blend a heat map on a grayscale image: `(1 - alpha) · gray + alpha · jet(heat)`.

    Args:
        view: `(H, W)` grayscale image in [0, 1].
        heat: `(g, g)` map in [0, 1], upsampled bilinearly (half-pixel centres) to `(H, W)`.
        alpha: weight of the colour, in [0, 1] (0: the plain image).

    Returns:
        `(H, W, 3)` uint8 RGB image.
    """
    if view.dim() != 2 or heat.dim() != 2:
        raise ValueError(f"view and heat must be 2-D, got {tuple(view.shape)}, {tuple(heat.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    size = tuple(view.shape)
    up = F.interpolate(heat.float()[None, None], size=size, mode="bilinear", align_corners=False)
    color = jet(up[0, 0].cpu().numpy())  # (H, W, 3)
    gray = view.cpu().double().numpy().clip(0.0, 1.0)[..., None]  # (H, W, 1)
    out = (1.0 - alpha) * gray + alpha * color
    return np.rint(out * 255.0).clip(0, 255).astype(np.uint8)


def model_view(pixels: Tensor) -> Tensor:
    """Preprocessed pixels `(3, 224, 224)` → the crop the model saw, `(224, 224)` in [0, 1]."""
    from .encoders.image import PIXEL_MEAN, PIXEL_STD

    return (pixels[0].float() * PIXEL_STD + PIXEL_MEAN).clamp(0.0, 1.0)


# formats Pillow writes an RGB image as without extra libraries or lossy palettes
_OVERLAY_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")


def overlay_format(out: Path) -> str:
    """The image format OUT's suffix names (`.png`, `.jpg`/`.jpeg`, `.tif`/`.tiff`, `.bmp`,
    `.webp` where Pillow has WebP); no suffix is PNG. Another suffix is a UsageError (such a
    file used to get PNG bytes whatever its name)."""
    from PIL import Image, features

    suffix = out.suffix.lower()
    if not suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(suffix)
    if fmt not in _OVERLAY_FORMATS or (fmt == "WEBP" and not features.check("webp")):
        raise UsageError(f"--out {out}: the overlay is written as .png, .jpg, .tif, .bmp or "
                         f".webp, not {suffix}")  # fmt: skip
    return fmt


def _write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """`write(file)` into a temporary file next to `path`, then rename it onto `path`: the file
    appears whole or not at all (an interrupted run leaves no half-written image)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class UsageError(ValueError):
    """Bad input: reported as one line on stderr with exit code 2."""


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from .encoders.image import load_grayscale, preprocess
    from .encoders.text import clean_text

    # cheap checks first, so that bad input fails before the model loads
    if not clean_text(args.prompt):
        raise UsageError("--prompt is empty (no words left after CARZero's text cleaning)")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"the folder of --out, {out.parent}, does not exist")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory")
    if args.save_map and out.suffix.lower() == ".npy":
        raise UsageError("--out ends in .npy, the name --save-map writes the map to; use .png")
    image_format = overlay_format(out)
    if Path(args.image).exists() and out.resolve() == Path(args.image).resolve():
        raise UsageError(f"--out {out} is the input image")
    for path in (out, out.with_suffix(".npy")) if args.save_map else (out,):
        if path.exists() and not args.force:
            raise UsageError(f"{path} exists: pass --force to overwrite it, or choose another "
                             "--out")  # fmt: skip
    device = check_device(args.device)
    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model} is not a directory (carzero-fast convert makes "
                         "one from a CARZero checkpoint)")  # fmt: skip
    pixels = preprocess(load_grayscale(args.image))  # (3, 224, 224); ValueError if unreadable

    model = CARZeroModel.from_checkpoint(args.model)
    check_crop_size(model)  # the map is drawn on the 224-px crop the model must take
    model = model.to(device)
    with torch.no_grad():
        img, query = _pair(model, pixels, args.prompt)
        logit, weights = attention_maps(model.aligner, img, query)
    weights = weights.float().cpu()
    raw = map_from_weights(weights, args.layers, _grid(model), normalize=False)
    heat = map_from_weights(weights, args.layers, _grid(model))
    rgb = overlay(model_view(pixels), heat, args.alpha)

    npy = out.with_suffix(".npy") if args.save_map else None
    if npy is not None:
        _write_atomic(npy, lambda f: np.save(f, raw.numpy()))
    try:
        _write_atomic(out, lambda f: Image.fromarray(rgb).save(f, format=image_format))
    except BaseException:
        if npy is not None:  # no half of the output: the map goes with the image that failed
            npy.unlink(missing_ok=True)
        raise
    g = heat.shape[0]
    print(f"wrote {out} ({g}×{g} map, layers={args.layers}, i2t logit {float(logit):.4f})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="carzero-fast ground",
        description="the cross-attention map of a prompt over a chest X-ray (mean over heads "
        "and layers, upsampled from the patch grid) blended on the 224×224 crop the model sees",
    )
    p.add_argument("--model", required=True, help="our model directory (carzero-fast convert)")
    p.add_argument("--image", required=True, help="the X-ray (PNG, JPEG, 16-bit PNG, DICOM)")
    p.add_argument("--prompt", required=True, help='the text, e.g. "There is pleural effusion."')
    p.add_argument("--out", required=True,
                   help="the overlay, 224×224 RGB: .png (or no suffix), .jpg, .tif, .bmp, .webp")
    p.add_argument("--alpha", type=float, default=0.5, help="colour weight in [0, 1]")
    p.add_argument("--layers", choices=LAYER_CHOICES, default="all",
                   help="average over all decoder layers or use the last one")  # fmt: skip
    p.add_argument("--save-map", action="store_true",
                   help="also write OUT with suffix .npy: the (g, g) float32 attention mass per "
                   "patch, before normalisation and upsampling")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, KeyError, OSError) as e:
        print(f"carzero-fast ground: {error_text(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
