"""The image side: ViT token encoder (timm names, loading, config inference) against a
from-scratch functional re-implementation, and CARZero's preprocessing against hand computation
on PNG files (8- and 16-bit) written here. OpenCV's INTER_AREA resize, which CARZero uses, is
checked against hand-computed coverage weights and against outputs of cv2.resize stored here as
numbers (no OpenCV needed to run the tests). Orientation, DICOM and unreadable files:
tests/test_image_files.py."""

from __future__ import annotations

import hashlib
import json
import math
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
from carzero_fast.encoders.resize import _area_taps, resize_area

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
    with pytest.raises(ValueError, match=r"num_heads \(convert: --vit-heads\)"):
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
    assert load_grayscale(path).dtype == np.uint8  # 8-bit files stay uint8, as in CARZero
    # area resize to 128×256 is the mean of each 2×2 block, rounded to uint8 as OpenCV's 2×2
    # path does, half up: (sum + 2) >> 2; then / 255
    sums = img.astype(np.int64).reshape(128, 2, 256, 2).sum(axis=(1, 3))
    assert (sums % 4 == 2).any()  # some blocks are ties, which round up
    blocks = ((sums + 2) // 4) / 255.0
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
        preprocess(np.full((10, 10), 255.0, dtype=np.float32))  # 0..255 floats would saturate
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(np.full((10, 10), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype int16"):
        preprocess(np.zeros((10, 10), dtype=np.int16))  # no agreed white point
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((3, 10, 10), dtype=np.float32))


def test_preprocess_uint8_and_tensor_inputs() -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(300, 250), dtype=np.uint8)
    got = preprocess(img)
    assert torch.equal(preprocess(torch.from_numpy(img)), got)  # tensors take the same path
    # uint8 is resized as uint8 (rounded), then / 255: not the float resize of img / 255
    small = resize_area(img, 256, 213).astype(np.float64) / 255.0
    expected = hand_pipeline(small, top=0, left=21)  # 43 columns of padding: 21 left, 22 right
    assert (got - expected).abs().max().item() < 1e-6
    floats = preprocess(img.astype(np.float32) / 255)
    assert 0 < (got - floats).abs().max().item() <= 0.5 / 255 / PIXEL_STD + 1e-6
    # a constant 255 image, enlarged, stays white
    white = preprocess(np.full((10, 10), 255, dtype=np.uint8))
    assert torch.allclose(white, torch.full_like(white, (1.0 - PIXEL_MEAN) / PIXEL_STD))


def test_png_16bit_and_rgb(tmp_path: Path) -> None:
    img16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    p16 = tmp_path / "deep.png"
    Image.fromarray(img16).save(p16)
    gray = load_grayscale(p16)
    assert gray.dtype == np.uint8 and gray.shape == (6, 8)
    np.testing.assert_array_equal(gray, img16 >> 8)  # cv2.imread(path, 0): the high byte
    assert preprocess_file(p16).shape == (3, 224, 224)  # small images are upscaled

    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    prgb = tmp_path / "colour.png"
    Image.fromarray(rgb).save(prgb)
    luma = (9797 * 200 + 19234 * 100 + 3737 * 50) >> 15  # libpng's weights, as cv2.imread's
    gray = load_grayscale(prgb)
    assert gray.dtype == np.uint8 and np.all(gray == luma)


# ------------------------------------------------------------------------------------------------
# OpenCV's INTER_AREA resize (CARZero's `_resize_img`)
# ------------------------------------------------------------------------------------------------


def test_resize_area_fractional_is_coverage_weighted() -> None:
    """3 → 2 on both axes: output pixel i covers source [1.5 i, 1.5 (i + 1)), so each source
    pixel weighs its covered length / 1.5; out = Wy · img · Wxᵀ."""
    img = np.array([[10, 40, 100], [200, 0, 70], [30, 250, 130]], dtype=np.uint8)
    weights = np.array([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])  # Wx = Wy
    exact = weights @ img.astype(np.float64) @ weights.T
    # by hand: rows → [20, 80], [400/3, 140/3], [310/3, 170]; then columns → ninths
    np.testing.assert_allclose(exact, np.array([[520, 620], [1020, 1160]]) / 9, rtol=1e-12)
    got = resize_area(img.astype(np.float32), 2, 2)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, exact, rtol=2e-7)
    # uint8 in, uint8 out, rounded: 57.8, 68.9, 113.3, 128.9 (equal-weight bins would give
    # 62.5, 52.5, 120, 112.5)
    assert np.array_equal(resize_area(img, 2, 2), np.array([[58, 69], [113, 129]]))


def test_resize_area_integer_factor_is_block_mean_rounded_as_opencv() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(96, 72), dtype=np.uint8)
    for f in (2, 3, 4, 6):
        sums = img.astype(np.int64).reshape(96 // f, f, 72 // f, f).sum(axis=(1, 3))
        got = resize_area(img, 96 // f, 72 // f)
        # OpenCV: 2×2 in integers, half up; other factors float32 sum · (1/area), half to even
        expected = (sums + 2) // 4 if f == 2 else np.rint(sums.astype(np.float32) / f**2)
        assert np.array_equal(got, expected), f
        f32 = resize_area(img.astype(np.float32), 96 // f, 72 // f)
        np.testing.assert_allclose(f32, sums / f**2, rtol=1e-6)
    # the two rules on ties: 2×2 sums 2 and 6 → 0.5 → 1, 1.5 → 2; 4×4 sums 8, 24, 40 →
    # 0.5 → 0, 1.5 → 2, 2.5 → 2
    pairs = np.array([[1, 1, 3, 3], [0, 0, 0, 0]], dtype=np.uint8)
    assert resize_area(pairs, 1, 2).tolist() == [[1, 2]]
    quads = np.zeros((4, 12), dtype=np.uint8)
    quads[0, :8], quads[1, 4:8], quads[0, 8:], quads[1, 8:] = 2, 4, 4, 6
    assert quads.reshape(4, 3, 4).sum(axis=(0, 2)).tolist() == [8, 24, 40]
    assert resize_area(quads, 1, 3).tolist() == [[0, 2, 2]]


def test_resize_area_keeps_constants() -> None:
    sizes = [((390, 320), (256, 210)), ((3, 2), (256, 170)), ((768, 512), (256, 170)),
             ((1, 1), (7, 5)), ((1024, 1024), (256, 256)), ((200, 300), (170, 256))]  # fmt: skip
    for (h, w), (oh, ow) in sizes:
        assert np.all(resize_area(np.full((h, w), 201, dtype=np.uint8), oh, ow) == 201)
        got = resize_area(np.full((h, w), 0.7, dtype=np.float32), oh, ow)
        assert got.shape == (oh, ow) and np.abs(got - 0.7).max() < 1e-6


def opencv_area_tab(n_in: int, n_out: int, scale: float) -> list[list[tuple[int, float]]]:
    """OpenCV's `computeResizeAreaTab` loop, line by line in Python doubles: for each output,
    its (source index, float32 weight) taps in order."""
    taps = []
    for d in range(n_out):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, n_in - f1)
        s2 = min(math.floor(f2), n_in - 1)
        s1 = min(math.ceil(f1), s2)
        row = []
        if s1 - f1 > 1e-3:
            row.append((s1 - 1, float(np.float32((s1 - f1) / cell))))
        row += [(s, float(np.float32(1.0 / cell))) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            row.append((s2, float(np.float32(min(f2 - s2, 1.0, cell) / cell))))
        taps.append(row)
    return taps


@pytest.mark.parametrize("n_in", [1, 2, 7, 9, 17, 97, 255, 257, 1000, 2500, 3000, 4280])
def test_area_tap_table_is_opencvs_loop(n_in: int) -> None:
    """The array-built tap table (resize._area_taps) equals OpenCV's scalar loop, weights bit for
    bit, for every shrink of an axis to the sizes CARZero's resize and the tests produce."""
    for n_out in sorted({1, 2, 3, 5, 13, 100, 213, 224, 256, n_in // 3, n_in // 2, n_in - 1}):
        if not 1 <= n_out <= n_in:
            continue
        scale = 1.0 / (n_out / n_in)  # as resize_area computes it
        index, weight = _area_taps(n_in, n_out, scale)
        expected = opencv_area_tab(n_in, n_out, scale)
        assert index.dtype == np.intp and weight.dtype == np.float32
        assert index.shape == weight.shape == (n_out, max(len(row) for row in expected))
        for d, row in enumerate(expected):
            pad = index.shape[1] - len(row)  # padding: index 0, weight 0
            assert index[d].tolist() == [s for s, _ in row] + [0] * pad, (n_out, d)
            assert weight[d].tolist() == [a for _, a in row] + [0.0] * pad, (n_out, d)


# From cv2.resize(src, (width, height), interpolation=cv2.INTER_AREA) with
# opencv-python-headless 4.8.0.74 (the version CARZero pins) and 5.0.0.93, identical.
CV2_SRC = [[61, 173, 23, 54, 81, 79, 232], [204, 234, 254, 20, 36, 222, 20],
           [42, 46, 233, 92, 67, 43, 117], [150, 204, 157, 252, 26, 124, 144],
           [176, 1, 51, 119, 16, 249, 164], [204, 131, 152, 88, 83, 33, 52],
           [196, 113, 211, 71, 184, 223, 212], [54, 94, 70, 204, 206, 113, 68],
           [16, 68, 38, 18, 200, 119, 248]]  # fmt: skip
CV2_SRC_TO_4X3 = [[153, 78, 121], [120, 129, 119], [146, 110, 132], [69, 123, 154]]
CV2_SRC_F32_TO_4X3 = [[0.60186744, 0.30600685, 0.47625276],
                      [0.46878308, 0.5040772, 0.46504828],
                      [0.57304704, 0.43118584, 0.51845634],
                      [0.271024, 0.48422045, 0.6031124]]  # fmt: skip
CV2_SMALL = [[67, 98, 227, 157], [73, 95, 198, 93], [124, 125, 119, 124]]
CV2_SMALL_TO_7X9 = [[67, 67, 90, 98, 163, 227, 210, 157, 157],
                    [67, 67, 90, 98, 163, 227, 210, 157, 157],
                    [71, 71, 90, 96, 152, 207, 184, 114, 114],
                    [73, 73, 90, 95, 147, 198, 172, 93, 93],
                    [90, 90, 101, 105, 138, 171, 154, 103, 103],
                    [124, 124, 125, 125, 122, 119, 120, 124, 124],
                    [124, 124, 125, 125, 122, 119, 120, 124, 124]]  # fmt: skip


def test_resize_area_matches_stored_opencv_output() -> None:
    src = np.array(CV2_SRC, dtype=np.uint8)  # 9×7 → 4×3: fractional factors 2.25, 2.33
    assert resize_area(src, 4, 3).tolist() == CV2_SRC_TO_4X3
    f32 = resize_area((src / np.float32(255)).astype(np.float32), 4, 3)
    assert np.array_equal(f32, np.array(CV2_SRC_F32_TO_4X3, dtype=np.float32))  # bit for bit
    # enlarging: OpenCV interpolates linearly with area-derived weights (11-bit fixed point)
    assert resize_area(np.array(CV2_SMALL, dtype=np.uint8), 7, 9).tolist() == CV2_SMALL_TO_7X9


def opencv_check_pattern(h: int, w: int) -> np.ndarray:
    """Integer-only test image (no platform-dependent maths): 64-px squares alternating a
    smooth quadratic ramp and hashed noise."""
    i = np.arange(h, dtype=np.int64)[:, None]
    j = np.arange(w, dtype=np.int64)[None, :]
    smooth = (3 * i * i + 5 * j * j + 7 * i * j) // 9973 % 256
    noise = ((i * 2654435761 + j * 40503 + i * j * 97) >> 7) & 255
    return np.where((i // 64 + j // 64) % 2 == 0, smooth, noise).astype(np.uint8)


@pytest.mark.parametrize(
    ("src_shape", "out_shape", "sha256_16", "total"),
    [  # cv2.resize INTER_AREA of opencv_check_pattern, versions as above: sha256 and sum
        ((390, 320), (256, 210), "26148852392c15b5", 4821720),
        ((3000, 2500), (256, 213), "b5c4de653b068877", 6928521),
        ((2544, 3056), (213, 256), "795dd43f52407686", 6926684),
        ((768, 512), (256, 170), "7c53ddf20699ac05", 5154120),  # 3 and 3.01: not "fast"
        ((1024, 1024), (256, 256), "e75755c061f08273", 8119763),  # 4×4 blocks
        ((200, 150), (256, 192), "6d6c9b4fd2e5a0a1", 3291484),  # enlarged
        # scales 1.0001, 1.0005, 1.9999: overlaps ≤ 1e-3 (right, left), which OpenCV drops
        ((3, 10001), (2, 10000), "a746fd4893266945", 2516353),
        ((2001, 5), (2000, 3), "4e63a69c4b48c06c", 696107),
        ((3, 19999), (2, 10000), "1efd600a9e2e51f6", 2533529),
    ],
)
def test_resize_area_matches_opencv_checksums(
    src_shape: tuple[int, int], out_shape: tuple[int, int], sha256_16: str, total: int
) -> None:
    out = resize_area(opencv_check_pattern(*src_shape), *out_shape)
    assert out.shape == out_shape and out.dtype == np.uint8
    assert int(out.astype(np.int64).sum()) == total
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == sha256_16


@pytest.mark.parametrize(
    ("src_shape", "out_shape", "sha256_16", "total"),
    [  # cv2.resize INTER_AREA of opencv_check_pattern / 255 in float32, versions as above
        ((390, 320), (256, 210), "b82f6e0380b204e8", 18908.776881285976),
        ((3, 10001), (2, 10000), "85aa8f56c2605736", 9867.907446185229),
        ((3, 19999), (2, 10000), "10e54c3e226d1fde", 9935.680942925625),
    ],
)
def test_resize_area_float32_matches_opencv_bit_for_bit(
    src_shape: tuple[int, int], out_shape: tuple[int, int], sha256_16: str, total: float
) -> None:
    """Float32 shows every weight and every rounding of the fractional path, the ≤ 1e-3
    overlaps OpenCV drops included."""
    src = (opencv_check_pattern(*src_shape) / np.float32(255)).astype(np.float32)
    out = resize_area(src, *out_shape)
    assert out.shape == out_shape and out.dtype == np.float32
    assert float(out.astype(np.float64).sum()) == pytest.approx(total, rel=1e-12)
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == sha256_16
