"""Colour PNG and JPEG files read as CARZero's `cv2.imread(path, 0)` reads them, bit for bit
(`encoders/image_io.py`): expected arrays are OpenCV's outputs stored as numbers, so that no
OpenCV is needed to run the tests."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np

from carzero_fast.encoders.image import load_grayscale
from carzero_fast.encoders.image_io import _png_colour_info


def write_png(path: Path, arr: np.ndarray, color_type: int,
              chunks: list[tuple[bytes, bytes]]) -> None:  # fmt: skip
    """A PNG by hand: IHDR, `chunks` ((type, data) pairs) in order, one unfiltered IDAT; 16-bit
    samples for a uint16 arr. Lets the tests place gAMA/sRGB/PLTE/eXIf where libpng looks."""
    h, w = arr.shape[:2]
    depth = 16 if arr.dtype == np.uint16 else 8
    raw = b"".join(b"\0" + row.astype(">u2" if depth == 16 else "u1").tobytes() for row in arr)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(*c) for c in chunks)
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def colour_samples() -> tuple[np.ndarray, np.ndarray]:
    """(5, 7, 3) random colours as uint8 and as the uint16 they are the high bytes of; the first
    row gray (R = G = B), which libpng converts by its own branch."""
    rgb16 = np.random.default_rng(11).integers(0, 65536, size=(5, 7, 3), dtype=np.uint16)
    rgb16[0] = rgb16[0, :, :1]
    return (rgb16 >> 8).astype(np.uint8), rgb16


GAMA = (b"gAMA", struct.pack(">I", 45455))  # file gamma 1/2.2, libpng fixed point
# The expected arrays below are cv2.imread(path, 0) of these files, the same in
# opencv-python-headless 4.8.0.74 (CARZero's), 4.10.0.84 and 5.1.0.95.
CV2_RGB = [[204, 32, 172, 151, 235, 7, 123], [92, 125, 60, 109, 183, 241, 93],
           [87, 93, 109, 107, 99, 200, 150], [125, 176, 122, 214, 217, 123, 127],
           [57, 39, 121, 201, 155, 128, 176]]  # fmt: skip
CV2_RGB_GAMMA = [[204, 32, 172, 151, 235, 7, 123], [111, 132, 70, 147, 185, 242, 122],
                 [87, 102, 116, 135, 110, 210, 171], [138, 178, 123, 217, 217, 136, 170],
                 [78, 46, 128, 203, 197, 137, 180]]  # fmt: skip
CV2_RGB16 = [[204, 32, 172, 151, 235, 7, 123], [93, 126, 60, 109, 183, 242, 94],
             [87, 94, 110, 107, 100, 201, 151], [126, 177, 123, 214, 217, 123, 127],
             [57, 40, 122, 201, 156, 128, 176]]  # fmt: skip
CV2_RGB16_GAMMA = [[203, 33, 172, 150, 235, 7, 123], [111, 132, 72, 147, 185, 243, 122],
                   [88, 102, 116, 135, 110, 210, 171], [138, 177, 123, 217, 217, 137, 170],
                   [78, 44, 128, 203, 198, 137, 180]]  # fmt: skip


def test_colour_png_reads_as_opencv(tmp_path: Path) -> None:
    """libpng's rgb_to_gray with OpenCV's coefficients: 15-bit weights, truncated at 8 bits,
    rounded at 16 bits before the high byte is kept; alpha dropped, not composited; palettes
    expanded first; in linear light when the file declares gamma 1/2.2 (gAMA or sRGB), up to
    ±60 levels off the plain sum. Pillow's luma is 1 off on 14 of the 35 RGB pixels."""
    rgb, rgb16 = colour_samples()
    alpha = (np.arange(35, dtype=np.uint8) * 7).reshape(5, 7, 1)
    index = np.arange(35, dtype=np.uint8).reshape(5, 7)[::-1]  # palette entry i = rgb pixel i
    palette = [(b"PLTE", rgb.tobytes()), (b"tRNS", bytes(range(0, 210, 6)))]
    exif6 = b"MM\0*\0\0\0\x08\0\x01" + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + bytes(4)
    cases = {  # name: (samples, PNG colour type, chunks, cv2.imread(path, 0))
        "rgb": (rgb, 2, [], CV2_RGB),
        "rgba": (np.concatenate([rgb, alpha], axis=-1), 6, [], CV2_RGB),
        "palette_trns": (index, 3, palette, np.asarray(CV2_RGB)[::-1]),
        "rgb_exif6": (rgb, 2, [(b"eXIf", exif6)], np.rot90(CV2_RGB, -1)),
        "rgb_srgb": (rgb, 2, [(b"sRGB", b"\0")], CV2_RGB_GAMMA),
        "rgb_gama": (rgb, 2, [GAMA], CV2_RGB_GAMMA),
        "rgb16": (rgb16, 2, [], CV2_RGB16),
        "rgb16_gama": (rgb16, 2, [GAMA], CV2_RGB16_GAMMA),
    }
    for name, (samples, color_type, chunks, expected) in cases.items():
        path = tmp_path / f"{name}.png"
        write_png(path, samples, color_type, chunks)
        got = load_grayscale(path)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name


def test_png_gamma_chunks_resolve_as_libpng(tmp_path: Path) -> None:
    """The file gamma as the libpng 1.6.40 of CARZero's OpenCV 4.8 takes it (each case checked
    there through its output): sRGB means 1/2.2 and wins over a gAMA unless that is within 5 %,
    chunks after PLTE are ignored, and an out-of-range or second gAMA freezes the colour space."""
    rgb = colour_samples()[0]
    srgb, plte = (b"sRGB", b"\0"), (b"PLTE", bytes(6))

    def gama(value: int) -> tuple[bytes, bytes]:
        return b"gAMA", struct.pack(">I", value)

    cases = [([], 0), ([gama(60000), srgb], 45455), ([srgb, gama(60000)], 45455),
             ([srgb, gama(46000)], 46000), ([gama(45455), gama(100000), srgb], 45455),
             ([plte, gama(45455)], 0), ([gama(10)], 0), ([gama(10), srgb], 0)]  # fmt: skip
    for i, (chunks, gamma) in enumerate(cases):
        write_png(tmp_path / f"{i}.png", rgb, 2, chunks)
        assert _png_colour_info(tmp_path / f"{i}.png").gamma == gamma, chunks


# An 11×13 colour JPEG (4:2:0, quality 90) and a 5×6 CMYK one (Adobe), as Pillow wrote them.
JPEG_YCC = base64.b64decode("""
/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4R
DgsLEBYQERMUFRUVDA8XGBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU
FBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/wAARCAALAA0DASIAAhEBAxEB/8QAFAABAAAAAAAAAAAAAAAAAAAA
B//EACMQAAEDAwQDAQEAAAAAAAAAAAECAxEEBSEABhIiBzFBgpH/xAAVAQEBAAAAAAAAAAAAAAAAAAACBf/EACQR
AAAEAwkBAAAAAAAAAAAAAAECETEEB0EAAwUGIVFhcYHw/9oADAMBAAIRAxEAPwAS2z4gSHKcIpkOKV1UogcfXUkc
U4EmTBMSJxpXsvhdmhoUGotbrxUAMZhQHbB9ZPucwMYy07csdvdarUKpGuKVKiEx9H39H+6XLVt22UzQS3RNJBbQ
TifmhMGZmIFMmogrKjCj92lS2z9EQ9wBjgLU85Df6v8A/9k=""")
JPEG_CMYK = base64.b64decode("""
/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwADAgIDAgIDAwMDBAMDBAUIBQUEBAUKBwcGCAwKDAwLCgsLDQ4SEA0OEQ4L
CxAWEBETFBUVFQwPFxgWFBgSFBUU/8AAFAgABgAFBEMRAE0RAFkRAEsRAP/EABUAAQEAAAAAAAAAAAAAAAAAAAgJ
/8QAJBAAAgECBQQDAAAAAAAAAAAAAQIDBBEABRITIQcxQYEGCGH/2gAOBEMATQBZAEsAAD8AHXTCvfIcl2hPNSu6
I25AI5DIguF1alHIse3ggc2GDHmH1ioqfbKLSmW2iS8jIoIAI0hFXizdzc/psMMv5X1WfKlpTUU4ad2lR5ES5Yqw
vexXyxPv2ap4/9k=""")
CV2_JPEG_YCC = [
    [30, 40, 29, 38, 65, 44, 62, 56, 67, 64, 73, 87, 72],
    [51, 66, 82, 39, 55, 75, 77, 87, 66, 75, 81, 72, 109],
    [48, 41, 51, 80, 77, 79, 81, 97, 86, 101, 110, 89, 123],
    [71, 92, 91, 103, 70, 78, 113, 82, 89, 113, 106, 145, 135],
    [70, 64, 82, 89, 91, 94, 110, 96, 97, 137, 124, 103, 133],
    [103, 111, 106, 105, 93, 95, 94, 137, 115, 133, 126, 144, 135],
    [90, 108, 90, 121, 119, 119, 115, 144, 139, 135, 151, 164, 139],
    [106, 111, 121, 115, 123, 123, 145, 136, 163, 156, 165, 174, 165],
    [128, 112, 133, 127, 147, 137, 146, 135, 142, 157, 155, 159, 174],
    [148, 136, 150, 155, 165, 162, 159, 150, 164, 179, 177, 180, 193],
    [160, 150, 152, 167, 167, 180, 173, 170, 186, 201, 197, 196, 205],
]
CV2_JPEG_CMYK = [[31, 43, 34, 40, 61], [52, 66, 77, 41, 68], [54, 46, 54, 78, 70],
                 [64, 94, 94, 98, 79], [72, 65, 89, 88, 83], [102, 110, 104, 109, 99]]  # fmt: skip


def test_colour_jpeg_reads_as_opencv(tmp_path: Path) -> None:
    """YCbCr: libjpeg's own grayscale output, the Y channel (not a luma of the decoded RGB, up
    to 20 levels off at quality 75); CMYK: OpenCV's CMYK → gray on libjpeg's raw samples."""
    for name, data, expected in [("ycc.jpg", JPEG_YCC, CV2_JPEG_YCC),
                                 ("cmyk.jpg", JPEG_CMYK, CV2_JPEG_CMYK)]:  # fmt: skip
        (tmp_path / name).write_bytes(data)
        got = load_grayscale(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name
