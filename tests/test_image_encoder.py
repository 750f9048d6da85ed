"""The image side: ViT token encoder (timm names, loading, config inference) against a
from-scratch functional re-implementation, and CARZero's preprocessing against hand computation
on PNG (8- and 16-bit) and DICOM files written here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carzero_fast.encoders.image import (
    PIXEL_MEAN,
    PIXEL_STD,
    VisionTransformer,
    ViTConfig,
    infer_config,
    load_grayscale,
    preprocess,
    preprocess_file,
)

TINY = ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=4)


def make_vit(cfg: ViTConfig = TINY, seed: int = 0) -> VisionTransformer:
    """A ViT whose every parameter is random (norms and biases too), so no term hides behind a
    zero or a one."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    return model.eval()


def timm_names(depth: int) -> list[str]:
    """timm's VisionTransformer(num_classes=0, global_pool="token") parameter names."""
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
    return names + ["norm.weight", "norm.bias"]


# ------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------


def test_parameter_names_and_shapes_match_timm() -> None:
    model = VisionTransformer(TINY)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(shapes) == sorted(timm_names(TINY.depth))
    assert sorted(n for n, _ in model.named_parameters()) == sorted(timm_names(TINY.depth))
    d = TINY.embed_dim
    assert shapes["patch_embed.proj.weight"] == (d, 3, 8, 8)
    assert shapes["cls_token"] == (1, 1, d)
    assert shapes["pos_embed"] == (1, 1 + 16, d)
    assert shapes["blocks.1.attn.qkv.weight"] == (3 * d, d)
    assert shapes["blocks.1.mlp.fc1.weight"] == (4 * d, d)
    assert shapes["blocks.1.mlp.fc2.weight"] == (d, 4 * d)
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def test_forward_shape_and_input_checks() -> None:
    model = make_vit()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 4 * 4, 48) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 1, 32, 32))


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def functional_vit(sd: dict[str, torch.Tensor], cfg: ViTConfig, x: torch.Tensor) -> torch.Tensor:
    """ViT forward from the state dict alone, in float64: patchify by reshape (no conv),
    explicit softmax attention and erf GELU."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n, c, hh, ww = x.shape
    p, d, h = cfg.patch_size, cfg.embed_dim, cfg.num_heads
    gh, gw = hh // p, ww // p
    # patch (i, j) flattened in the conv weight's (c, kh, kw) order, patches row-major
    patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
    t = patches @ sd["patch_embed.proj.weight"].reshape(d, -1).T + sd["patch_embed.proj.bias"]
    t = torch.cat([sd["cls_token"].expand(n, 1, d), t], dim=1) + sd["pos_embed"]
    hd = d // h
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        y = _layer_norm(t, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], cfg.layer_norm_eps)
        qkv = y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]  # (n, L, 3d)
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        heads = []
        for j in range(h):
            sl = slice(j * hd, (j + 1) * hd)
            scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
            heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])
        a = torch.cat(heads, dim=-1) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        t = t + a
        y = _layer_norm(t, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], cfg.layer_norm_eps)
        y = y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"]
        y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
        t = t + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    return _layer_norm(t, sd["norm.weight"], sd["norm.bias"], cfg.layer_norm_eps)


def test_forward_matches_functional_reimplementation() -> None:
    model = make_vit(seed=1)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
    ref = functional_vit(model.state_dict(), TINY, x)
    assert (got.double() - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 0.5  # the comparison is not between near-zeros
    # the CLS row differs per image: it attended over that image's patches
    assert (got[0, 0] - got[1, 0]).abs().max().item() > 1e-3


def test_state_dict_round_trip_and_config_dict() -> None:
    model = make_vit(seed=3)
    again = VisionTransformer(ViTConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))))
    again.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again.config == TINY
    with pytest.raises(ValueError, match="unknown keys"):
        ViTConfig.from_dict({**TINY.to_dict(), "global_pool": "token"})


def prefixed_timm_dict(model: VisionTransformer, prefix: str) -> dict[str, torch.Tensor]:
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    d = model.config.embed_dim
    sd[prefix + "head.weight"] = torch.randn(1000, d)  # timm's classifier: ignored
    sd[prefix + "head.bias"] = torch.randn(1000)
    return sd


def test_load_timm_state_dict_with_prefix_and_head() -> None:
    src = make_vit(seed=4)
    x = torch.randn(2, 3, 32, 32)
    for prefix in ("model.", "encoder.", "img_encoder.model.", ""):
        dst = VisionTransformer(TINY)
        dst.load_timm_state_dict(prefixed_timm_dict(src, prefix))
        with torch.no_grad():
            assert torch.equal(src(x), dst(x))


def test_load_timm_state_dict_errors_name_the_keys() -> None:
    src = make_vit(seed=5)
    sd = prefixed_timm_dict(src, "model.")
    missing = dict(sd)
    del missing["model.blocks.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        VisionTransformer(TINY).load_timm_state_dict(missing)
    misshapen = dict(sd)
    misshapen["model.pos_embed"] = torch.zeros(1, 5, 48)
    with pytest.raises(
        KeyError, match=r"pos_embed: checkpoint \(1, 5, 48\) vs model \(1, 17, 48\)"
    ):
        VisionTransformer(TINY).load_timm_state_dict(misshapen)
    extra = dict(sd)
    extra["model.mask_token"] = torch.zeros(1, 1, 48)
    extra["decoder.weight"] = torch.zeros(3)  # outside the prefix
    with pytest.raises(KeyError, match=r"unexpected \['decoder.weight', 'mask_token'\]"):
        VisionTransformer(TINY).load_timm_state_dict(extra)
    with pytest.raises(KeyError, match="patch_embed.proj.weight"):
        VisionTransformer(TINY).load_timm_state_dict({"norm.weight": torch.ones(48)})
    # a failed load leaves the target untouched
    dst = VisionTransformer(TINY)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(KeyError):
        dst.load_timm_state_dict(misshapen)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_infer_config() -> None:
    sd = prefixed_timm_dict(make_vit(), "model.")
    assert infer_config(sd, num_heads=4) == TINY
    with pytest.raises(ValueError, match="num_heads"):
        infer_config(sd)  # 48 is not a multiple of 64: the head count must be given
    wide = ViTConfig(
        img_size=48, patch_size=16, in_chans=1, embed_dim=128, depth=3, num_heads=2, mlp_ratio=2.0
    )
    assert infer_config(VisionTransformer(wide).state_dict()) == wide  # heads = 128 // 64
    model = VisionTransformer.from_timm_state_dict(sd, num_heads=4)
    assert model.config == TINY
    assert torch.equal(model.pos_embed, sd["model.pos_embed"])


def test_config_validation() -> None:
    assert ViTConfig().num_tokens == 197 and ViTConfig().mlp_hidden_dim == 3072
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(embed_dim=50, num_heads=4)
    with pytest.raises(ValueError, match="depth"):
        ViTConfig(depth=0)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        ViTConfig(layer_norm_eps=0.0)


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------


def hand_pipeline(resized: np.ndarray, top: int, left: int) -> torch.Tensor:
    """Pad the already-resized [0, 1] image onto a 256×256 zero canvas at (top, left), crop
    [16:240] both ways, normalise, repeat to 3 channels (float64 → float32)."""
    canvas = np.zeros((256, 256))
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    crop = (canvas[16:240, 16:240] - PIXEL_MEAN) / PIXEL_STD
    return torch.from_numpy(np.stack([crop] * 3)).float()


def test_preprocess_wide_png_matches_hand_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(256, 512), dtype=np.uint8)  # H 256, W 512
    path = tmp_path / "wide.png"
    Image.fromarray(img).save(path)
    # area resize to 128×256 is the exact mean of each 2×2 block
    blocks = img.astype(np.float64).reshape(128, 2, 256, 2).mean(axis=(1, 3)) / 255.0
    expected = hand_pipeline(blocks, top=64, left=0)  # pad rows: 64 top, 64 bottom
    got = preprocess_file(path)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-6


def test_preprocess_tall_odd_padding_goes_right() -> None:
    rng = np.random.default_rng(1)
    img = rng.random((512, 254))
    blocks = img.reshape(256, 2, 127, 2).mean(axis=(1, 3))
    # width 127 → pad 129 columns: 64 left, 65 right
    expected = hand_pipeline(blocks, top=0, left=64)
    got = preprocess(torch.from_numpy(img))
    assert (got - expected).abs().max().item() < 1e-6


def test_preprocess_short_side_truncates_like_carzero() -> None:
    # 300×200 → 256 × int(200 · 256/300) = 256 × 170 (rounding would give 171), as CARZero's
    # `_resize_img`; pad 86 columns, 43 each side; ones stay ones under area interpolation.
    got = preprocess(np.ones((300, 200), dtype=np.float32))
    one = (1.0 - PIXEL_MEAN) / PIXEL_STD
    cols = (got[0] - one).abs().max(dim=0).values < 1e-6  # (224,) columns that are all ones
    assert cols.sum().item() == 170
    assert cols[43 - 16 : 43 - 16 + 170].all()


def test_preprocess_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(np.full((10, 10), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((3, 10, 10), dtype=np.float32))


def test_png_16bit_and_rgb(tmp_path: Path) -> None:
    img16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    p16 = tmp_path / "deep.png"
    Image.fromarray(img16).save(p16)
    gray = load_grayscale(p16)
    assert gray.dtype == np.float32 and gray.shape == (6, 8)
    np.testing.assert_allclose(gray, img16 / 65535.0, rtol=0, atol=1e-7)
    assert preprocess_file(p16).shape == (3, 224, 224)  # small images are upscaled

    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    prgb = tmp_path / "colour.png"
    Image.fromarray(rgb).save(prgb)
    luma = (200 * 299 + 100 * 587 + 50 * 114) / 1000  # ITU-R 601, as PIL's "L"
    np.testing.assert_allclose(load_grayscale(prgb), round(luma) / 255.0, atol=1e-7)


def write_dicom(path: Path, arr: np.ndarray, photometric: str, window: tuple[float, float] | None,
                rescale: tuple[float, float] | None = None):  # fmt: skip
    """A minimal Part 10 file (preamble + DICM) with uint16 pixels, via pydicom 3; rescale:
    (slope, intercept) of the modality LUT."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = arr.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_monochrome1_with_window(tmp_path: Path) -> None:
    arr = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 1000).astype(np.uint16)  # 0..29000
    center, width = 15000.0, 10001.0
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window: x ≤ c − 0.5 − (w − 1)/2 → min, x > c − 0.5 +
    # (w − 1)/2 → max, linear between; the output range is irrelevant after min–max.
    c, w = center - 0.5, width - 1.0
    x = arr.astype(np.float64)
    windowed = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    assert 0 < (windowed == 0).sum() and 0 < (windowed == 1).sum()  # the window clips
    inverted = 1.0 - windowed  # MONOCHROME1: high values are dark
    expected = (inverted - inverted.min()) / (inverted.max() - inverted.min())
    for name in ("scan.dcm", "scan_without_suffix"):  # the second found by the DICM magic
        path = tmp_path / name
        write_dicom(path, arr, "MONOCHROME1", (center, width))
        got = load_grayscale(path)
        assert got.dtype == np.float32 and got.shape == (5, 6)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert preprocess_file(tmp_path / "scan.dcm").shape == (3, 224, 224)


def test_dicom_window_applies_to_rescaled_values(tmp_path: Path) -> None:
    """The modality LUT (slope, intercept) comes before the window, which is defined on its
    values: read on the stored values instead, this window would clip other pixels."""
    arr = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 100).astype(np.uint16)  # 0..2900
    slope, intercept, center, width = 2.0, -1000.0, 1500.0, 2001.0
    x = arr.astype(np.float64) * slope + intercept  # -1000..4800
    windowed = np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    expected = (windowed - windowed.min()) / (windowed.max() - windowed.min())
    path = tmp_path / "rescaled.dcm"
    write_dicom(path, arr, "MONOCHROME2", (center, width), rescale=(slope, intercept))
    np.testing.assert_allclose(load_grayscale(path), expected, rtol=0, atol=1e-6)


def test_dicom_monochrome2_without_window_and_constant(tmp_path: Path) -> None:
    arr = np.array([[100, 300], [500, 900]], dtype=np.uint16)
    path = tmp_path / "plain.dicom"
    write_dicom(path, arr, "MONOCHROME2", None)
    np.testing.assert_allclose(load_grayscale(path), (arr - 100) / 800.0, atol=1e-7)
    write_dicom(path, np.full((3, 3), 7, dtype=np.uint16), "MONOCHROME1", None)
    assert np.array_equal(load_grayscale(path), np.zeros((3, 3), dtype=np.float32))


@pytest.mark.parametrize("name", ["broken.png", "broken.jpg", "broken.dcm"])
def test_corrupt_file_raises_value_error_naming_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image" * 3)
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {path}:")):
        load_grayscale(path)
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {path}:")):
        preprocess_file(path)


def test_missing_file_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.png"
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {path}:")):
        load_grayscale(path)
