"""Image files as CARZero's preprocessing reads them: EXIF orientation (applied on PNG and
JPEG as cv2.imread does, not on WebP), DICOM (MONOCHROME1/2, windows, rescale, pydicom's values
bit for bit, memory per pixel, Pillow's pixel limit) and unreadable or missing files, each
refused with an error naming the path."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from carzero_fast.encoders.image import load_grayscale, preprocess, preprocess_file

# EXIF orientation (cv2.imread applies it to JPEG and PNG)
# ------------------------------------------------------------------------------------------------

# EXIF orientation → how to turn the stored pixels upright (PIL's Image.Transpose methods)
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),  # rotate 90° clockwise
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, 1),
}


def save_with_orientation(path: Path, arr: np.ndarray, orientation: int, **kw) -> None:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **kw)


def test_png_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.random.default_rng(4).integers(0, 256, size=(100, 300), dtype=np.uint8)
    for orientation, upright in UPRIGHT.items():
        path = tmp_path / f"o{orientation}.png"
        save_with_orientation(path, arr, orientation)
        got = load_grayscale(path)
        assert np.array_equal(got, upright(arr)), orientation
    assert torch.equal(preprocess_file(tmp_path / "o6.png"), preprocess(np.rot90(arr, -1)))


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((100, 300), dtype=np.uint8)
    arr[:40, :80] = 255  # a bright block in the stored top-left corner
    path = tmp_path / "o6.jpg"
    save_with_orientation(path, arr, 6, quality=95)
    with Image.open(path) as img:
        stored = np.asarray(img)  # PIL alone does not turn it
    got = load_grayscale(path)
    assert stored.shape == (100, 300) and got.shape == (300, 100)  # as cv2.imread's
    assert np.array_equal(got, np.rot90(stored, -1))
    assert got[:80, -40:].mean() > 200 and got[80:, :].mean() < 30  # the block: top right


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    """OpenCV 4.8 (CARZero's) reads WebP as stored, orientation tag or not."""
    arr = np.random.default_rng(5).integers(0, 256, size=(20, 30), dtype=np.uint8)
    path = tmp_path / "o6.webp"
    save_with_orientation(path, arr, 6, lossless=True)
    assert np.array_equal(load_grayscale(path), arr)


def write_dicom(path: Path, arr: np.ndarray, photometric: str, window: tuple[float, float] | None,
                rescale: tuple[float, float] | None = None,
                voi_function: str | None = None):  # fmt: skip
    """A minimal Part 10 file (preamble + DICM) with 16-bit pixels, signed for an int16 arr,
    via pydicom 3; rescale: (slope, intercept) of the modality LUT."""
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
    signed = arr.dtype == np.int16
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = arr.astype("<i2" if signed else "<u2").tobytes()
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


def pydicom_chain(path: Path) -> np.ndarray:
    """The DICOM reading as pydicom computes it on the whole image, in float64: modality
    LUT, VOI LUT or window, MONOCHROME1 negated, min–max, then float32."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    x = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    x = -x if ds.PhotometricInterpretation == "MONOCHROME1" else x
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


@pytest.mark.parametrize(
    ("kind", "photometric", "window", "rescale", "voi_function"),
    [
        ("12-bit", "MONOCHROME2", None, None, None),
        ("12-bit", "MONOCHROME1", (2048.0, 3001.0), None, None),
        ("12-bit", "MONOCHROME2", (1500.0, 2001.0), (1.5, -1024.0), None),
        ("16-bit", "MONOCHROME2", (31000.5, 20000.3), None, "LINEAR_EXACT"),
        ("16-bit", "MONOCHROME1", (32000.0, 20000.0), None, "SIGMOID"),
        ("signed", "MONOCHROME2", (-500.0, 1500.0), (0.37, -1024.0), None),
    ],
)
def test_dicom_values_are_pydicoms_bit_for_bit(
    tmp_path: Path,
    kind: str,
    photometric: str,
    window: tuple[float, float] | None,
    rescale: tuple[float, float] | None,
    voi_function: str | None,
) -> None:
    """load_grayscale maps each distinct stored value once and looks the pixels up: the
    numbers must be those of the float64 chain run on the whole image."""
    rng = np.random.default_rng(6)
    i, j = np.mgrid[0:60, 0:80]
    base = 2000 + 900 * np.sin(j / 9) + 700 * np.cos(i / 7) + rng.normal(0, 60, (60, 80))
    arr12 = base.clip(0, 4095).astype(np.uint16)
    arr = {
        "12-bit": arr12,
        "16-bit": arr12 * 16 + rng.integers(0, 16, arr12.shape, dtype=np.uint16),
        "signed": (arr12.astype(np.int32) - 2048).astype(np.int16),
    }[kind]
    path = tmp_path / "scan.dcm"
    write_dicom(path, arr, photometric, window, rescale=rescale, voi_function=voi_function)
    got = load_grayscale(path)
    assert got.dtype == np.float32 and np.array_equal(got, pydicom_chain(path))


def test_dicom_reading_memory_is_a_few_bytes_per_pixel(tmp_path: Path) -> None:
    """~8 bytes a pixel: the file's bytes, the decoded uint16 pixels and the float32 result
    (the float64 chain took 32)."""
    rng = np.random.default_rng(8)
    arr = rng.integers(0, 4096, size=(1000, 1000), dtype=np.uint16)
    path = tmp_path / "big.dcm"
    write_dicom(path, arr, "MONOCHROME1", (2048.0, 3001.0), rescale=(1.5, -1024.0))
    load_grayscale(path)  # imports and caches outside the measurement
    tracemalloc.start()
    try:
        got = load_grayscale(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (1000, 1000)
    assert peak < 10 * arr.size, f"{peak / arr.size:.1f} bytes a pixel"


def test_dicom_over_pillows_pixel_limit_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom

    arr = np.arange(30, dtype=np.uint16).reshape(5, 6)
    path = tmp_path / "scan.dcm"
    write_dicom(path, arr, "MONOCHROME2", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)
    assert load_grayscale(path).shape == (5, 6)  # at the limit: read
    # a header that claims 20000 × 20000 pixels (a decompression bomb) is refused from the
    # header alone, under Pillow's default limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89478485)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 20000
    ds.NumberOfFrames = 2
    ds.save_as(tmp_path / "bomb.dcm")

    def no_decoding(self: object) -> None:
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoding))
    message = (
        "DICOM of 20000×20000 pixels × 2 frame(s) = 800000000 pixels exceeds the limit of "
        "89478485 (PIL.Image.MAX_IMAGE_PIXELS); not decoded"
    )
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {tmp_path / 'bomb.dcm'}")):
        load_grayscale(tmp_path / "bomb.dcm")
    with pytest.raises(ValueError, match=re.escape(message)):
        preprocess_file(tmp_path / "bomb.dcm")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 29)
    with pytest.raises(ValueError, match=re.escape("5×6 pixels × 1 frame(s) = 30 pixels")):
        load_grayscale(path)


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
