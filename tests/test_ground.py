"""`carzero-fast ground`: attention maps vs the reference, the grounding map, the overlay CLI."""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_aligner
from PIL import Image

import carzero_fast as cf
from carzero_fast.ground import (
    attention_maps,
    grounding_map,
    jet,
    main,
    map_from_weights,
    model_view,
    overlay,
)
from carzero_fast.model import CARZeroModel

transformers = pytest.importorskip("transformers")

from tiny_carzero import D, bert_dir, tiny_model  # noqa: E402

from carzero_fast.encoders.image import (  # noqa: E402
    preprocess,
    preprocess_file,
)

GRID = 7  # 224 / patch 32
PROMPT = "There is left effusion."


def _bert_dir(root: Path) -> Path:
    return bert_dir(root)


def _model(bert: Path) -> CARZeroModel:
    return tiny_model(bert, aligner_layers=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ground")
    model = _model(_bert_dir(root))
    model_dir = model.save_pretrained(root / "model")
    # a smooth "chest" with structure, wider than tall so that the padding shows in the crop
    yy, xx = np.mgrid[0:300, 0:360]
    arr = 128 + 60 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + 20 * (xx > 180)
    image = root / "xray.png"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(image)
    return Namespace(root=root, model=model, model_dir=model_dir, image=image)


def _args(s: Namespace, out: Path, *extra: str) -> list[str]:
    return ["--model", str(s.model_dir), "--image", str(s.image), "--prompt", PROMPT,
            "--out", str(out), *extra]  # fmt: skip


# -- attention_maps against the reference backend ----------------------------------------------


@pytest.mark.parametrize("n_layers, n_heads, p", [(3, 4, 50), (1, 2, 17), (4, 4, 197)])
def test_attention_maps_match_the_reference(monkeypatch, n_layers, n_heads, p):
    cfg = cf.AlignerConfig(d_model=D, n_heads=n_heads, n_layers=n_layers, d_ffn=40,
                           head_dims=(24, 16))  # fmt: skip
    al = make_aligner(cfg, seed=n_layers)
    g = torch.Generator().manual_seed(p)
    memory = torch.randn(1, p, D, generator=g)
    query = torch.randn(1, D, generator=g)

    # The reference calls F.multi_head_attention_forward(..., need_weights=True) once per
    # layer: record the head-averaged weights it returns.
    recorded = []
    original = torch.nn.functional.multi_head_attention_forward

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        recorded.append(weights.detach().clone())
        return out, weights

    monkeypatch.setattr(torch.nn.functional, "multi_head_attention_forward", recording)
    with torch.no_grad():
        want = al(memory, query, backend="reference")  # (1, 1)
    monkeypatch.undo()
    assert len(recorded) == n_layers

    with torch.no_grad():
        logit, weights = attention_maps(al, memory, query)
    assert logit.shape == () and weights.shape == (n_layers, n_heads, p)
    assert abs(float(logit) - float(want[0, 0])) < 1e-6
    torch.testing.assert_close(weights.sum(-1), torch.ones(n_layers, n_heads))
    for layer, ref in enumerate(recorded):
        assert ref.shape == (1, 1, p)  # (N, M, P), averaged over heads
        torch.testing.assert_close(weights[layer].mean(0), ref[0, 0], rtol=0, atol=1e-7)


def test_attention_maps_rejects_more_than_one_pair():
    al = make_aligner(cf.AlignerConfig(d_model=D, n_layers=1, d_ffn=40, head_dims=(16,)))
    with pytest.raises(ValueError, match="one pair"):
        attention_maps(al, torch.randn(2, 5, D), torch.randn(1, D))
    with pytest.raises(ValueError, match="d_model"):
        attention_maps(al, torch.randn(1, 5, D + 1), torch.randn(1, D + 1))


# -- the map -----------------------------------------------------------------------------------


def test_map_from_weights_means_drops_cls_and_normalises():
    torch.manual_seed(1)
    weights = torch.softmax(torch.randn(3, 4, 1 + 25), dim=-1)
    raw = map_from_weights(weights, normalize=False)
    hand = sum(weights[l, h, 1:] for l in range(3) for h in range(4)) / 12  # noqa: E741
    torch.testing.assert_close(raw, hand.reshape(5, 5))
    # attention mass: the patches' share plus the CLS token's is the whole
    torch.testing.assert_close(raw.sum() + weights[:, :, 0].mean(), torch.tensor(1.0))
    norm = map_from_weights(weights)
    assert float(norm.min()) == 0.0 and float(norm.max()) == 1.0
    torch.testing.assert_close(norm, (raw - raw.min()) / (raw.max() - raw.min()))
    last = map_from_weights(weights, "last", grid=5, normalize=False)
    torch.testing.assert_close(last, weights[2, :, 1:].mean(0).reshape(5, 5))
    flat = torch.full((2, 2, 10), 0.1)
    assert torch.equal(map_from_weights(flat), torch.zeros(3, 3))


def test_map_from_weights_rejects_non_square_grids():
    with pytest.raises(ValueError, match="square"):
        map_from_weights(torch.full((1, 1, 1 + 12), 1 / 13))
    with pytest.raises(ValueError, match="ViT's grid"):
        map_from_weights(torch.full((1, 1, 1 + 16), 1 / 17), grid=3)
    with pytest.raises(ValueError, match="layers"):
        map_from_weights(torch.full((1, 1, 5), 0.2), "first")


def test_grounding_map_is_the_head_and_layer_mean_of_the_i2t_attention(setup):
    s = setup
    model = CARZeroModel.from_checkpoint(s.model_dir)
    pixels = preprocess_file(s.image)
    got = grounding_map(model, pixels, PROMPT)
    assert got.shape == (GRID, GRID)
    assert float(got.min()) == 0.0 and float(got.max()) == 1.0

    # by hand: image tokens as memory, the sentence embedding (row 0) as the query
    with torch.no_grad():
        img = model.encode_images(pixels[None])
        txt = model.encode_texts([PROMPT])
        logit, weights = attention_maps(model.aligner, img, txt[:, 0])
        want_logit = model.aligner(img, txt[:, 0], backend="reference")[0, 0]
    assert img.shape == (1, 1 + GRID * GRID, D) and weights.shape == (2, 4, 1 + GRID * GRID)
    assert abs(float(logit) - float(want_logit)) < 1e-6
    hand = weights[:, :, 1:].mean(dim=(0, 1)).reshape(GRID, GRID)
    torch.testing.assert_close(grounding_map(model, pixels, PROMPT, normalize=False), hand)
    torch.testing.assert_close(got, (hand - hand.min()) / (hand.max() - hand.min()))
    last = grounding_map(model, pixels[None], PROMPT, layers="last", normalize=False)
    torch.testing.assert_close(last, weights[-1, :, 1:].mean(0).reshape(GRID, GRID))
    # another prompt queries differently
    assert not torch.equal(grounding_map(model, pixels, "No nodule."), got)


# -- the overlay -------------------------------------------------------------------------------


def test_jet_colours():
    np.testing.assert_allclose(jet(np.array([0.0, 0.5, 1.0])),
                               [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])  # fmt: skip
    np.testing.assert_allclose(jet(np.array([-1.0, 2.0])), jet(np.array([0.0, 1.0])))
    assert jet(np.zeros((4, 5))).shape == (4, 5, 3)


def test_overlay_blends_the_upsampled_map():
    view = torch.linspace(0, 1, 8 * 8).reshape(8, 8)
    heat = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    plain = np.rint(view.double().numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(overlay(view, heat, 0.0), np.stack([plain] * 3, axis=-1))
    full = overlay(view, heat, 1.0)
    # a corner pixel of the 8×8 upsampling lies in its 2×2 cell's corner: the cell's value
    np.testing.assert_array_equal(full[0, 0], np.rint(jet(0.0) * 255).astype(np.uint8))
    np.testing.assert_array_equal(full[0, 7], np.rint(jet(1.0) * 255).astype(np.uint8))
    half = overlay(view, heat, 0.5)
    want = np.rint((0.5 * view[7, 0].item() + 0.5 * jet(0.5)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(half[7, 0], want)
    with pytest.raises(ValueError, match="alpha"):
        overlay(view, heat, 1.5)


# -- the command -------------------------------------------------------------------------------


def test_model_view_is_the_crop_the_model_saw_in_gray():
    """`model_view` undoes the normalisation: a 256×256 image (neither resized nor padded)
    comes back as its centre 224 crop in [0, 1], the overlay's background."""
    img = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    view = model_view(preprocess(img))
    want = torch.from_numpy(img[16:240, 16:240] / 255.0).float()
    torch.testing.assert_close(view, want, rtol=0, atol=1e-6)


def test_ground_command_writes_the_overlay(setup, tmp_path, capsys):
    s = setup
    out = tmp_path / "map.png"
    assert main(_args(s, out, "--alpha", "0.4", "--save-map")) == 0
    assert "7×7 map" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (224, 224)
        got = np.asarray(im)

    pixels = preprocess_file(s.image)
    view = model_view(pixels)
    plain = np.rint(view.double().numpy() * 255).astype(np.uint8)
    assert np.abs(got.astype(int) - plain[..., None]).max() > 20  # the colour is there
    model = CARZeroModel.from_checkpoint(s.model_dir)
    np.testing.assert_array_equal(got, overlay(view, grounding_map(model, pixels, PROMPT), 0.4))
    raw = np.load(out.with_suffix(".npy"))
    assert raw.shape == (GRID, GRID) and raw.dtype == np.float32
    np.testing.assert_array_equal(raw, grounding_map(model, pixels, PROMPT, normalize=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.npy", "map.png"]  # no temp files

    # alpha 0 is the crop the model saw, in gray; --layers last changes the picture
    assert main(_args(s, tmp_path / "a0.png", "--alpha", "0")) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a0.png")),
                                  np.stack([plain] * 3, axis=-1))  # fmt: skip
    assert main(_args(s, tmp_path / "last.png", "--layers", "last")) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "last.png")), got)
    # the suffix names the format (a .jpg used to hold PNG bytes); none is PNG
    assert main(_args(s, tmp_path / "default.png")) == 0
    got_default = np.asarray(Image.open(tmp_path / "default.png"))
    for name, fmt in (("map.JPG", "JPEG"), ("map.tif", "TIFF"), ("map", "PNG")):
        assert main(_args(s, tmp_path / name)) == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.size == (224, 224)
            if fmt != "JPEG":  # lossless: the same picture
                np.testing.assert_array_equal(np.asarray(im), got_default)


def test_ground_bad_input_exits_2_and_writes_nothing(setup, tmp_path, capsys):
    s = setup
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    out = tmp_path / "o" / "map.png"
    out.parent.mkdir()
    from carzero_fast.encoders.image import VisionTransformer, ViTConfig

    vit96 = VisionTransformer(ViTConfig(img_size=96, patch_size=32, embed_dim=D, depth=1,
                                        num_heads=4))  # fmt: skip
    small = CARZeroModel(vit96, s.model.text_encoder, s.model.aligner)
    small_dir = small.save_pretrained(tmp_path / "small")
    cases = [
        (["--model", str(small_dir)], "the model's ViT takes 96×96-px images"),
        (["--model", str(tmp_path / "missing")], "is not a directory"),
        (["--model", str(tmp_path / "o")], "not a carzero_fast model directory"),
        (["--image", str(broken)], "cannot read image"),
        (["--image", str(tmp_path / "nope.png")], "cannot read image"),
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", " ... "], "--prompt is empty"),
        (["--alpha", "1.5"], "--alpha"),
        (["--out", str(tmp_path / "no" / "such" / "map.png")], "does not exist"),
        (["--out", str(out.with_suffix(".pdf"))], "written as .png, .jpg, .tif, .bmp or "
                                                   ".webp, not .pdf"),  # fmt: skip
        (["--device", "foo"], "--device 'foo' is not a device name"),
        (["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], "--device cuda"),
    ]
    for override, message in cases:
        args = _args(s, out, "--save-map")
        flag, value = override
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        assert main(args) == 2, override
        assert message in capsys.readouterr().err, override
        assert list(out.parent.iterdir()) == [], override
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "carzero-fast ground" in capsys.readouterr().out


def test_ground_refuses_to_overwrite_without_force(setup, tmp_path, capsys):
    """An existing overlay or map (or the input image itself) is not overwritten unless
    --force; what is written has the umask's permissions, not mkstemp's 0600."""
    s = setup
    out = tmp_path / "map.png"
    out.write_bytes(b"mine")
    (tmp_path / "map.npy").write_bytes(b"mine too")
    assert main(_args(s, out)) == 2
    assert "exists: pass --force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    out.unlink()
    assert main(_args(s, out, "--save-map")) == 2  # the map's name exists
    assert "map.npy exists" in capsys.readouterr().err and not out.exists()
    assert main(_args(s, out, "--save-map", "--force")) == 0
    assert np.load(tmp_path / "map.npy").ndim == 2
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask
    args = _args(s, out)
    args[args.index("--out") + 1] = args[args.index("--image") + 1]
    image_bytes = Path(args[args.index("--image") + 1]).read_bytes()
    assert main([*args, "--force"]) == 2  # never the input image, even with --force
    assert "is the input image" in capsys.readouterr().err
    assert Path(args[args.index("--image") + 1]).read_bytes() == image_bytes
