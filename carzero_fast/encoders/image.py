"""CARZero's image side: the ViT-B/16 encoder (timm parameter names) and the X-ray preprocessing.

The encoder is timm's `VisionTransformer` as CARZero uses it (an MAE/M3AE-pretrained ViT with
LayerNorm eps 1e-6, no classifier head): `forward` returns the CLS token and the patch tokens
after the final norm, the memory the aligner attends over, with the global token in row 0.

The preprocessing follows CARZero's `process_img` + test transform: grayscale
(`cv2.imread(path, 0)`, EXIF orientation applied) → resize the longer side to 256 with
OpenCV's INTER_AREA → zero-pad to 256×256 centred → 3 channels → centre-crop 224 → normalise
with CARZero's CXR mean/std. PNG/JPEG take the original's path exactly: uint8 in (16-bit PNGs
as their high byte, as `cv2.imread(path, 0)` reads them), OpenCV's uint8 resize reproduced bit
for bit (`resize.resize_area`), / 255. DICOM, which the original does not read, stays float32
in [0, 1]: resized as OpenCV resizes float32, not rounded to 8 bits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .image_io import read_pil as _read_pil
from .resize import resize_area

RESIZE_SIZE = 256
"""Side of the square canvas the image is resized and zero-padded to (CARZero's `imsize`)."""
CROP_SIZE = 224
"""Side of the centre crop fed to the encoder."""
PIXEL_MEAN = 0.4978
"""CARZero's "CXR_MAE" normalisation mean, applied to all three channels."""
PIXEL_STD = 0.2449
"""CARZero's "CXR_MAE" normalisation std, applied to all three channels."""

# timm's classifier-head keys: a checkpoint may carry them, the token encoder has no use for them.
_HEAD_PREFIXES = ("head.", "fc_norm.")
_ANCHOR_KEY = "patch_embed.proj.weight"
_DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class ViTConfig:
    """Shape of the ViT image encoder; the defaults are ViT-B/16 at 224 px, as in CARZero.

    Attributes:
        img_size: side of the square input image (pixels); the position embedding is fixed to it.
        patch_size: side p of the square patches (the patch-embedding conv's kernel and stride).
        in_chans: input channels.
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads (head dim D / num_heads).
        mlp_ratio: MLP hidden width / D; the hidden width is int(D · mlp_ratio) as in timm.
        layer_norm_eps: epsilon of every LayerNorm (1e-6 in MAE-style ViTs, timm's too).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size ({self.img_size}) must be divisible by "
                f"patch_size ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim ({self.embed_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not self.mlp_ratio > 0 or int(self.embed_dim * self.mlp_ratio) <= 0:
            raise ValueError(
                f"ViTConfig.mlp_ratio must give a positive width, got {self.mlp_ratio}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(
                f"ViTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side, img_size / patch_size."""
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: the CLS token plus grid_size² patch tokens."""
        return 1 + self.grid_size**2

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError, missing ones take defaults."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ViTConfig.from_dict: unknown keys {unknown}")
        return cls(**dict(d))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → D-wide tokens (timm's `patch_embed`, conv with bias)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, (H/p)·(W/p), D), patches in row-major order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's `attn`)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        """(N, L, D) → (N, L, D)."""
        n, length, d = x.shape
        h = self.num_heads
        # qkv features are laid out (3, heads, head_dim), as in timm's checkpoints.
        qkv = self.qkv(x).reshape(n, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim**-0.5
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


class Mlp(nn.Module):
    """fc1 → exact (erf) GELU → fc2 (timm's `mlp`)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_hidden_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(N, L, D) → (N, L, D)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """(N, L, D) → (N, L, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT token encoder with timm's parameter names and no classifier head.

    Args:
        config: the encoder's shape; ViT-B/16 at 224 px when omitted.
    """

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else ViTConfig()
        self.config = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's scheme, so that an unloaded model has sane activations; real use loads weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, pixels: Tensor) -> Tensor:
        """Encode images into tokens.

        Args:
            pixels: (N, in_chans, img_size, img_size) preprocessed images (see `preprocess`).

        Returns:
            (N, 1 + (img_size/p)², D): row 0 the CLS (global) token, then the patch tokens in
            row-major grid order, all after the final LayerNorm.
        """
        cfg = self.config
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            # The position embedding is fixed to img_size (no interpolation), as in timm's
            # default strict_img_size.
            raise ValueError(
                f"VisionTransformer expects pixels of shape (N, {', '.join(map(str, expected))}),"
                f" got {tuple(pixels.shape)}"
            )
        x = self.patch_embed(pixels)  # (N, HW, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (N, 1 + HW, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def load_timm_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a timm-style ViT state dict into this module, strictly.

        Keys may carry a common prefix (e.g. "model." or "encoder."): the part of the
        "…patch_embed.proj.weight" key before "patch_embed." is stripped from every key. timm's
        classifier-head keys ("head.*", "fc_norm.*") are ignored; anything else that does not
        match this module's parameters exactly raises.

        Raises:
            KeyError: naming the missing, unexpected and misshapen keys (with both shapes).
        """
        stripped, unexpected = _strip_prefix(state_dict)
        own = self.state_dict()
        kept: dict[str, Tensor] = {}
        misshapen: list[str] = []
        for key, value in stripped.items():
            if key.startswith(_HEAD_PREFIXES):
                continue
            if key not in own:
                unexpected.append(key)
            elif tuple(value.shape) != tuple(own[key].shape):
                misshapen.append(
                    f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                )
            else:
                kept[key] = value
        missing = sorted(set(own) - set(stripped))
        if missing or unexpected or misshapen:
            raise KeyError(
                "VisionTransformer.load_timm_state_dict: state dict does not match "
                f"{self.config}: missing {missing}, unexpected {sorted(unexpected)}, "
                f"misshapen {misshapen}"
            )
        self.load_state_dict(kept, strict=True)

    @classmethod
    def from_timm_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        num_heads: int | None = None,
        layer_norm_eps: float = 1e-6,
    ) -> VisionTransformer:
        """A model shaped by `infer_config(state_dict, ...)` with the state dict loaded."""
        model = cls(infer_config(state_dict, num_heads=num_heads, layer_norm_eps=layer_norm_eps))
        model.load_timm_state_dict(state_dict)
        return model


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip the prefix that precedes "patch_embed.proj.weight" from every key.

    Returns:
        (the stripped dict, the original names of keys that lack the prefix).
    """
    anchors = [k for k in state_dict if k.endswith(_ANCHOR_KEY)]
    if len(anchors) != 1:
        raise KeyError(
            f"expected exactly one key ending in {_ANCHOR_KEY!r} to locate the ViT, "
            f"found {sorted(anchors)}"
        )
    prefix = anchors[0][: -len(_ANCHOR_KEY)]
    if prefix and not prefix.endswith("."):
        # "xpatch_embed.proj.weight" is not a submodule path; keep the names as they are.
        raise KeyError(f"cannot find a module prefix in key {anchors[0]!r}")
    stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    outside = [k for k in state_dict if not k.startswith(prefix)]
    return stripped, outside


def infer_config(
    state_dict: Mapping[str, Tensor],
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
) -> ViTConfig:
    """Read a ViT's shape off a timm-style state dict (prefixes as in `load_timm_state_dict`).

    embed_dim, in_chans and patch size come from `patch_embed.proj.weight` (D, C, p, p), depth
    from the `blocks.{i}` indices, img_size from the length of `pos_embed` (1 + (img/p)²) and
    mlp_ratio from `blocks.0.mlp.fc1.weight`. Shapes do not determine the number of heads nor
    the LayerNorm eps: `num_heads` defaults to embed_dim // 64 (head dim 64, as in every
    standard ViT: 12 for ViT-B, 16 for ViT-L), `layer_norm_eps` to 1e-6.
    """
    sd, _ = _strip_prefix(state_dict)
    for key in ("pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise KeyError(f"infer_config: state dict has no {key!r}")
    d, in_chans, p, p2 = sd[_ANCHOR_KEY].shape
    if p != p2:
        raise ValueError(f"infer_config: non-square patches {p}×{p2} are not supported")
    n_patches = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"infer_config: pos_embed has {n_patches} patch rows, not a square grid")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / d
    if int(d * mlp_ratio) != hidden:
        raise ValueError(f"infer_config: MLP width {hidden} is not int({d} · ratio) for a float")
    if num_heads is None:
        if d % 64:
            raise ValueError(f"infer_config: embed_dim {d} is not a multiple of 64; pass num_heads "
                             "(convert: --vit-heads)")  # fmt: skip
        num_heads = d // 64
    return ViTConfig(
        img_size=grid * p,
        patch_size=p,
        in_chans=in_chans,
        embed_dim=d,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        layer_norm_eps=layer_norm_eps,
    )


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"  # the Part 10 magic after the 128-byte preamble


def _min_max(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own range; a constant array gives zeros."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _check_dicom_size(ds: Any) -> None:
    """Refuse a DICOM over Pillow's decompression-bomb limit, `Image.MAX_IMAGE_PIXELS`, from
    its header: Rows × Columns × frames, before the (maybe compressed) pixels are decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:  # the limit switched off, as Pillow allows
        return
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * frames > limit:
        raise ValueError(
            f"DICOM of {rows}×{cols} pixels × {frames} frame(s) = {rows * cols * frames} "
            f"pixels exceeds the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); not decoded"
        )


def _dicom_to_unit(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values → float32 [0, 1]: modality LUT, VOI LUT or window, MONOCHROME1 inverted,
    min–max; float64 arithmetic, as pydicom's."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # The VOI LUT / window is defined on modality values, so the rescale goes first
    # (pydicom's documented order); for the usual X-ray without rescale it is the identity.
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds).astype(np.float64)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        arr = -arr  # MONOCHROME1 stores low values as white; the min–max below rescales
    return _min_max(arr)


def _dicom_to_unit_by_table(arr: np.ndarray, ds: Any) -> np.ndarray:
    """`_dicom_to_unit` of ≤16-bit integer pixels, evaluated once per distinct stored value.

    The chain maps each pixel by its stored value alone, and the min–max depends only on which
    values occur: running it on the distinct values (at most 65536) and looking the pixels up
    gives the same float32 numbers bit for bit, without float64 copies and masks of the whole
    image: 8 bytes a pixel at the peak with the file's bytes and the decoded pixels, not 32.
    """
    key = arr.view(f"u{arr.dtype.itemsize}")  # signed values by their bits: no copy
    present = np.zeros(2 ** (8 * arr.dtype.itemsize), dtype=bool)
    present[key] = True
    codes = np.flatnonzero(present)
    table = np.zeros(present.shape, dtype=np.float32)
    table[codes] = _dicom_to_unit(codes.astype(key.dtype).view(arr.dtype), ds)
    return table[key]


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    _check_dicom_size(ds)
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise ValueError(f"expected one grayscale frame, got pixel array of shape {arr.shape}")
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        return _dicom_to_unit_by_table(arr, ds)
    return _dicom_to_unit(arr, ds)  # 32-bit or float pixel data: rare, computed directly


def load_grayscale(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an X-ray as a 2-D array, upright, for `preprocess`.

    PNG and JPEG as uint8, CARZero's input: exactly what its `cv2.imread(path, 0)` returns,
    gray or colour (`image_io.read_pil`: OpenCV's codecs' own colour → gray arithmetic,
    libpng's gamma handling included; 16-bit PNGs cut to their high byte after it; alpha
    dropped; upright by EXIF orientation). Other formats through Pillow as uint8 (colour ones by
    Pillow's luma, which can be 1 off OpenCV's). DICOM (suffix
    .dcm/.dicom, or the "DICM" magic at byte 128) through pydicom as float32: modality LUT,
    then VOI LUT or window (`apply_voi_lut`), MONOCHROME1 inverted, then min–max scaled to
    [0, 1] (a constant image gives zeros); refused before decoding when Rows × Columns × frames
    exceeds PIL's `Image.MAX_IMAGE_PIXELS` (PNG/JPEG have Pillow's own check).

    Returns:
        (H, W) uint8 array (PNG/JPEG) or float32 array in [0, 1] (DICOM).

    Raises:
        ValueError: "cannot read image {path}: ..." for missing, unreadable, corrupt, too large
            or unsupported files (the cause is chained).
    """
    p = Path(path)
    try:
        arr = _read_dicom(p) if _is_dicom(p) else _read_pil(p)
        if arr.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    except Exception as e:  # noqa: BLE001 - PIL/pydicom raise many types for corrupt files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return arr


def _resized_shape(h: int, w: int) -> tuple[int, int]:
    """CARZero's `_resize_img` target: the longer side RESIZE_SIZE, the shorter one scaled.

    The shorter side is truncated, int(short · (256 / long)), computed in the original's float
    order so that it agrees with it exactly; at least 1. Height wins ties (square images).
    """
    if h >= w:
        return RESIZE_SIZE, max(1, int(float(w) * (RESIZE_SIZE / float(h))))
    return max(1, int(float(h) * (RESIZE_SIZE / float(w)))), RESIZE_SIZE


def preprocess(gray: np.ndarray | Tensor) -> Tensor:
    """CARZero's test-time image transform.

    Steps: resize so that the longer side is 256 keeping the aspect ratio (`_resized_shape`)
    with OpenCV's INTER_AREA (`resize.resize_area`: its arithmetic, rounding included); uint8
    to [0, 1] by / 255 (torchvision's ToTensor); zero-pad to 256×256 centred (the extra pixel
    of an odd padding goes to the bottom/right); repeat to 3 channels; centre-crop 224 (offset
    16); normalise with mean 0.4978, std 0.2449.

    Args:
        gray: (H, W) grayscale image, numpy array or tensor, either uint8 0..255 (what
            cv2.imread(path, 0) gives CARZero: the result is the original's exactly) or float
            in [0, 1], any float dtype (resized in float32 as cv2.resize resizes float32,
            without the original's rounding to 8 bits).

    Returns:
        (3, 224, 224) float32 tensor, on the input tensor's device (CPU for numpy input); the
        resize itself runs on the CPU.
    """
    device = gray.device if isinstance(gray, Tensor) else torch.device("cpu")
    if isinstance(gray, Tensor):
        gray = gray.detach()
        gray = (gray.to(torch.float32) if gray.is_floating_point() else gray).cpu().numpy()
    x = np.asarray(gray)
    if x.ndim != 2:
        raise ValueError(f"preprocess expects a 2-D (H, W) image, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError("preprocess got an empty image")
    if x.dtype.kind == "f":
        x = x.astype(np.float32, copy=False)
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):
            # Catches unscaled DICOM values and 0..255 floats, which would silently saturate.
            raise ValueError(f"preprocess expects float values in [0, 1], got range [{lo}, {hi}]")
    elif x.dtype != np.uint8:
        # A 16-bit or int array has no agreed white point: scale it to [0, 1] first.
        raise ValueError(f"preprocess expects a uint8 or float image, got dtype {x.dtype}")

    h, w = _resized_shape(x.shape[0], x.shape[1])
    small = torch.from_numpy(resize_area(x, h, w))  # (h, w), x's dtype
    if small.dtype == torch.uint8:
        small = small.to(torch.float32).div(255)  # ToTensor's scaling, after the uint8 resize
    pad_h, pad_w = RESIZE_SIZE - h, RESIZE_SIZE - w
    top, left = pad_h // 2, pad_w // 2
    x = F.pad(small, (left, pad_w - left, top, pad_h - top))  # (256, 256), zeros = black
    off = (RESIZE_SIZE - CROP_SIZE) // 2
    x = x[off : off + CROP_SIZE, off : off + CROP_SIZE]
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x.unsqueeze(0).expand(3, -1, -1).contiguous().to(device)  # gray → identical R, G, B


def preprocess_file(path: str | os.PathLike[str]) -> Tensor:
    """`preprocess(load_grayscale(path))`: an image file → (3, 224, 224) float32 tensor."""
    return preprocess(load_grayscale(path))
