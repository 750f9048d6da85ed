"""PNG and JPEG files read as `cv2.imread(path, cv2.IMREAD_GRAYSCALE)` reads them, with Pillow.

OpenCV leaves the colour → gray step to its codecs, and each does it its own way; this module
repeats their arithmetic, so that colour files give CARZero's input bit for bit, not Pillow's
luma (which is off by 1 on colour PNGs and by more on colour JPEGs):

- JPEG: OpenCV asks libjpeg for grayscale output, i.e. the decoded Y channel of a YCbCr file
  (chroma never decoded); Pillow's `draft("L")` asks libjpeg-turbo for the same. Four-channel
  (CMYK/YCCK) files are decoded to CMYK and reduced by OpenCV's `icvCvt_CMYK2Gray_8u_C4C1R`.
- PNG: libpng with the transformations OpenCV's `PngDecoder` sets: alpha dropped (never
  composited), palette expanded to RGB, 1/2/4-bit gray scaled to 8 bits, then libpng's
  `png_do_rgb_to_gray` with OpenCV's coefficients (0.299, 0.587) in 15-bit fixed point, and
  16-bit samples cut to their high byte after the conversion. When the file declares a gamma
  (gAMA, sRGB, or an iCCP holding a known sRGB profile) libpng converts linearised values
  through its gamma tables, up to ±60 levels away from the plain weighted sum; both are here.

Equal to opencv-python-headless 4.8.0.74 (CARZero's pin: libpng 1.6.40, libjpeg-turbo 2.1.3)
and 4.10.0.84 on 306 files (PngSuite, libpng's test PNGs, every PNG colour type and bit depth
with and without gamma chunks, JPEGs of every subsampling, CMYK, progressive, all EXIF
orientations). The gamma chunks are resolved by libpng 1.6.4x's rules, as in CARZero's OpenCV;
OpenCV 5.1 (libpng 1.6.59) differs on a few combinations: it ignores a known sRGB iCCP
profile, accepts gAMA values outside [16, 625000000], and lets an sRGB chunk override a gAMA
within 5 % of 1/2.2 that follows it.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# Formats whose EXIF orientation cv2.imread applies, in OpenCV 4.8 (CARZero's) and 5.0 alike,
# exactly as Pillow's `exif_transpose` (all 8 orientations checked). OpenCV 4.8 ignores it in
# WebP (5.0 applies it); TIFF orientations 5–8 differ between versions (4.8 turns them, 5.0
# fails to read them). Those are read as Pillow decodes them.
_EXIF_ORIENTED_FORMATS = ("JPEG", "MPO", "PNG")
_EXIF_ORIENTATION = 0x0112

# png_set_rgb_to_gray(png, 1, 0.299, 0.587) as OpenCV calls it: libpng's fixed-point 0.299 and
# 0.587 scaled to 15 bits without rounding (png_set_rgb_to_gray_fixed); blue gets the rest.
_PNG_RC, _PNG_GC = 29900 * 32768 // 100000, 58700 * 32768 // 100000  # 9797, 19234
_PNG_BC = 32768 - _PNG_RC - _PNG_GC  # 3737
# OpenCV's own 14-bit weights (imgcodecs/utils.cpp), used for CMYK JPEGs.
_CV_R, _CV_G = int(0.299 * (1 << 14) + 0.5), int(0.587 * (1 << 14) + 0.5)  # 4899, 9617
_CV_B = (1 << 14) - _CV_R - _CV_G  # 1868
_FP_1 = 100000  # libpng's fixed-point 1.0
_SRGB_GAMMA = 45455  # PNG_GAMMA_sRGB_INVERSE
# libpng 1.6.4x's png_sRGB_checks: ICC profiles it takes for an sRGB chunk, as (MD5 words in
# the profile header, rendering intent, length, adler32, crc32).
_KNOWN_SRGB_PROFILES = (
    ((0x29F83DDE, 0xAFF255AE, 0x7842FAE4, 0xCA83390D), 0, 3048, 0x0A3FD9F6, 0x3B8772B9),
    ((0xC95BD637, 0xE95D8A3B, 0x0DF38F99, 0xC1320389), 1, 3052, 0x4909E5E1, 0x427EBB21),
    ((0xFC663378, 0x37E2886B, 0xFD72E983, 0x8228F1B8), 0, 60988, 0xFD2144A1, 0x306FD8AE),
    ((0x34562ABF, 0x994CCD06, 0x6D2C5721, 0xD0D68C5D), 0, 60960, 0x209C35D2, 0xBBEF7812),
    ((0, 0, 0, 0), 1, 3024, 0xA054D762, 0x5D5129CE),
    ((0, 0, 0, 0), 0, 3144, 0xF784F3FB, 0x182EA552),
    ((0, 0, 0, 0), 1, 3144, 0x0398F3FC, 0xF29E526D),
)
_ROWS = 128  # rows per block of the colour → gray arithmetic (`_by_rows`)


@dataclass
class _PngColour:
    """What libpng's rgb_to_gray depends on, from the chunks before the image data."""

    bit_depth: int = 8
    colour: bool = False  # RGB, RGBA or palette
    gamma: int = 0  # file gamma, libpng fixed point; 0: none
    sig_bit: int = 0  # largest sBIT of R, G, B; 0: none


def _is_known_srgb(data: bytes) -> tuple[bool, int]:
    """libpng 1.6.4x's `png_compare_ICC_profile_with_sRGB` on an iCCP chunk's data: whether it
    holds a known sRGB profile, and the profile's rendering intent."""
    sep = data.find(b"\0")
    if not 1 <= sep <= 79 or data[sep + 1 : sep + 2] != b"\0":
        return False, 0
    inflater = zlib.decompressobj()
    try:  # the longest known profile and one byte more: no inflating of large profiles
        profile = inflater.decompress(data[sep + 2 :], 60989)
    except zlib.error:
        return False, 0
    if len(profile) < 100 or struct.unpack(">I", profile[:4])[0] != len(profile):
        return False, 0
    md5, intent = struct.unpack(">4I", profile[84:100]), struct.unpack(">I", profile[64:68])[0]
    for known_md5, known_intent, length, adler, crc in _KNOWN_SRGB_PROFILES:
        if md5 == known_md5 and len(profile) == length and intent == known_intent:
            # libpng stops at the first profile whose signature, length and intent match
            ok = zlib.adler32(profile) == adler and zlib.crc32(profile) == crc
            return ok, intent
    return False, 0


def _png_colour_info(path: Path) -> _PngColour:
    """IHDR, gamma and sBIT as libpng 1.6.4x resolves them (OpenCV 4.8's libpng 1.6.40).

    gAMA, sRGB and iCCP count only before PLTE and IDAT, once each; an sRGB chunk (or a known
    sRGB profile) sets gamma 1/2.2 and wins over gAMA unless that is within 5 % of it; an
    invalid or duplicate gAMA, or a second profile, freezes the gamma as it stands.
    """
    info = _PngColour()
    gamma_from_gama = from_srgb = invalid = False
    intent = -1
    sbit_length = sample_depth = 0

    def set_srgb(new_intent: int) -> None:  # png_colorspace_set_sRGB
        nonlocal intent, from_srgb
        if invalid or not 0 <= new_intent <= 3 or (intent >= 0 and intent != new_intent):
            return
        if not from_srgb:
            info.gamma, intent, from_srgb = _SRGB_GAMMA, new_intent, True

    with open(path, "rb") as f:
        f.seek(8)
        after_plte = False
        while len(head := f.read(8)) == 8:
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"IDAT":
                break
            if ctype not in (b"IHDR", b"PLTE", b"gAMA", b"sRGB", b"iCCP", b"sBIT"):
                f.seek(length + 4, 1)
                continue
            data = f.read(length)
            f.seek(4, 1)
            length = len(data)  # (a truncated file: what there is; Pillow reports the rest)
            if ctype == b"IHDR" and length == 13:
                info.bit_depth, info.colour = data[8], bool(data[9] & 2)
                sbit_length = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(data[9], 0)
                sample_depth = 8 if data[9] == 3 else data[8]
            elif ctype == b"PLTE":
                after_plte = True
            elif after_plte:
                continue  # libpng: "out of place", ignored
            elif ctype == b"gAMA" and length == 4:
                g = struct.unpack(">I", data)[0]
                if not 16 <= g <= 625000000 or gamma_from_gama:
                    invalid = True
                elif not invalid and not (from_srgb and _gamma_mismatch(info.gamma, g)):
                    info.gamma, gamma_from_gama = g, True
            elif ctype in (b"sRGB", b"iCCP") and not invalid:
                if intent >= 0:
                    invalid = True  # libpng: "too many profiles"
                elif ctype == b"sRGB" and length == 1:
                    set_srgb(data[0])
                elif ctype == b"iCCP" and length >= 14:
                    known, profile_intent = _is_known_srgb(data)
                    if known:
                        set_srgb(profile_intent)
            elif ctype == b"sBIT" and length == sbit_length and not info.sig_bit:
                if all(1 <= b <= sample_depth for b in data):  # (palettes: 8-bit samples)
                    info.sig_bit = max(data[:3]) if info.colour else data[0]
    return info


def _gamma_mismatch(old: int, new: int) -> bool:
    """png_colorspace_check_gamma: old / new outside 1 ± 5 % (png_muldiv's rounding)."""
    ratio = math.floor(old * _FP_1 / new + 0.5)
    return ratio > 2**31 - 1 or _significant(ratio)


def _significant(gamma: int) -> bool:
    """png_gamma_significant: further than 5 % from 1."""
    return gamma < _FP_1 - 5000 or gamma > _FP_1 + 5000


def _reciprocal(a: int) -> int:
    """png_reciprocal, in its floating-point form."""
    return math.floor(1e10 / a + 0.5)


@lru_cache(maxsize=16)
def _table8(gamma: int) -> np.ndarray:
    """png_build_8bit_table: 255 · (v / 255)^gamma rounded; the identity if not significant."""
    if not _significant(gamma):
        return np.arange(256, dtype=np.uint32)
    g = gamma * 0.00001
    inner = [math.floor(255 * math.pow(v / 255.0, g) + 0.5) for v in range(1, 255)]
    return np.array([0, *inner, 255], dtype=np.uint32)


@lru_cache(maxsize=16)
def _table16(shift: int, gamma: int) -> np.ndarray:
    """png_build_16bit_table, indexed by v >> shift (libpng's sub-tables laid end to end)."""
    top = (1 << (16 - shift)) - 1
    if not _significant(gamma):
        k = np.arange(top + 1, dtype=np.uint32)
        return k if shift == 0 else (k * 65535 + (1 << (15 - shift))) // top
    g, scale = gamma * 0.00001, 1.0 / top
    return np.array([math.floor(65535.0 * math.pow(i * scale, g) + 0.5) for i in range(top + 1)],
                    dtype=np.uint32)  # fmt: skip


@lru_cache(maxsize=16)
def _table16to8(shift: int, gamma: int) -> np.ndarray:
    """png_build_16to8_table, indexed by v >> shift: the nearest i · 257 after gamma."""
    top = (1 << (16 - shift)) - 1
    table = np.full(top + 1, 65535, dtype=np.uint32)
    last = 0
    for i in range(255):
        v = i * 257 + 128
        bound = math.floor(65535 * math.pow(v / 65535.0, gamma * 0.00001) + 0.5)
        bound = (bound * top + 32768) // 65535 + 1
        table[last:bound] = i * 257
        last = max(last, bound)
    return table


def _by_rows(convert: Callable[..., np.ndarray], *channels: np.ndarray) -> np.ndarray:
    """convert(*blocks) over blocks of _ROWS rows of the channels, into one uint8 array: the
    uint32 temporaries of a block stay in cache, several times faster than whole-image ones."""
    out = np.empty(channels[0].shape, dtype=np.uint8)
    for y in range(0, out.shape[0], _ROWS):
        out[y : y + _ROWS] = convert(*(c[y : y + _ROWS] for c in channels))
    return out


def _png_rgb_to_gray(
    r: np.ndarray, g: np.ndarray, b: np.ndarray, info: _PngColour
) -> np.ndarray:
    """libpng's png_do_rgb_to_gray, then strip_16: R, G, B uint8 or uint16 → uint8."""
    rc, gc, bc = np.uint32(_PNG_RC), np.uint32(_PNG_GC), np.uint32(_PNG_BC)
    gamma = info.gamma
    screen = _reciprocal(gamma) if gamma else _FP_1
    if not gamma or not (_significant(gamma) or _significant(screen)):
        # No gamma tables: truncated for 8 bits ("the historical approach"), rounded for 16.
        add, shift = (0, 15) if r.dtype == np.uint8 else (16384, 23)

        def weighted(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
            acc = r * rc
            acc += g * gc
            acc += b * bc
            acc += np.uint32(add)
            return acc >> shift

        return _by_rows(weighted, r, g, b)
    # Gamma tables: colour pixels weighted in linear light; gray ones (R = G = B) through the
    # overall correction, the identity for OpenCV's reads, which set no screen gamma.
    if r.dtype == np.uint8:
        shift, out_shift = 0, 0
        to_linear, from_linear = _table8(_reciprocal(gamma)), _table8(_reciprocal(screen))
        correction = _table8(math.floor(1e15 / gamma / screen + 0.5))  # png_reciprocal2
    else:  # libpng's 16-bit tables keep 16 - shift bits, at least 11 for an 8-bit output
        sig = info.sig_bit
        shift = min(max(16 - sig if 0 < sig < 16 else 0, 5), 8)
        to_linear = _table16(shift, _reciprocal(gamma))
        from_linear = _table16(shift, _reciprocal(screen))
        correction = _table16to8(shift, _reciprocal(math.floor(1e15 / screen / gamma + 0.5)))
        out_shift = 8  # strip_16, after the conversion
    lut_r, lut_g, lut_b = (to_linear * np.uint32(c) for c in (_PNG_RC, _PNG_GC, _PNG_BC))

    def linear(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
        is_gray = (r == g) & (r == b)  # on the full samples, as libpng tests them
        r, g, b = r >> shift, g >> shift, b >> shift  # the tables' index (no-op for 8 bits)
        acc = lut_r[r]
        acc += lut_g[g]
        acc += lut_b[b]
        acc += np.uint32(16384)
        acc >>= 15
        return np.where(is_gray, correction[r], from_linear[acc >> shift]) >> out_shift

    return _by_rows(linear, r, g, b)


def _png_colour_to_gray(img: Image.Image, path: Path, info: _PngColour) -> np.ndarray:
    """An RGB, RGBA or palette PNG (Pillow-opened, not yet loaded) as OpenCV reads it."""
    img.load()
    if img.mode == "P":
        palette = np.zeros((256, 3), dtype=np.uint8)  # libpng's palette: 256 entries, zeroed
        entries = np.frombuffer(bytes(img.getpalette("RGB") or []), dtype=np.uint8)[: 256 * 3]
        palette.reshape(-1)[: entries.size] = entries
        lut = _png_rgb_to_gray(palette[:, 0], palette[:, 1], palette[:, 2], info)
        return lut[np.asarray(img)]
    # Band by band: numpy views of Pillow's interleaved RGB(A) cost three times as much.
    rgb = [np.asarray(img.getchannel(i)) for i in range(3)]
    if info.bit_depth == 16:
        # Pillow keeps the high byte of 16-bit colour; its unpacker for little-endian 16-bit
        # samples, run on these big-endian ones, gives the low byte: two decodes make the
        # 16-bit samples that libpng converts before cutting them to 8 bits.
        with Image.open(path) as low:
            tile = low.tile[0]  # (decoder, extents, offset, rawmode "RGB;16B" or "RGBA;16B")
            low.tile = [(*tile[:3], tile[3].replace(";16B", ";16L"))]
            low.load()
            rgb = [(hi.astype(np.uint16) << 8) | np.asarray(low.getchannel(i))
                   for i, hi in enumerate(rgb)]  # fmt: skip
    return _png_rgb_to_gray(*rgb, info)


def _cmyk_to_gray(cmyk: np.ndarray) -> np.ndarray:
    """OpenCV's icvCvt_CMYK2Gray_8u_C4C1R on libjpeg's CMYK samples."""
    c, m, y, k = (cmyk[..., i].astype(np.int32) for i in range(4))
    c, m, y = (k - (((255 - v) * k) >> 8) for v in (c, m, y))
    return ((y * _CV_B + m * _CV_G + c * _CV_R + (1 << 13)) >> 14).astype(np.uint8)


def _orient(gray: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a (H, W) array upright by its EXIF orientation, as Pillow's `exif_transpose`."""
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.T,
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].T,
        8: lambda a: np.rot90(a, 1),
    }.get(orientation)
    return gray if turned is None else np.ascontiguousarray(turned(gray))


def read_pil(path: Path) -> np.ndarray:
    """An image file through Pillow, as `cv2.imread(path, 0)` reads PNG and JPEG.

    PNG and JPEG as the module docstring says, upright by their EXIF orientation. Gray files
    of any format as stored, 8-bit as uint8, 16-bit gray as its high byte (libpng's strip_16,
    as OpenCV; values beyond 16 bits are refused). Colour files of other formats (WebP, BMP,
    TIFF, ...) through Pillow's ITU-R 601 luma, which can be 1 off OpenCV's.

    Returns:
        (H, W) uint8 array.
    """
    with Image.open(path) as img:
        fmt = img.format
        orientation = 1
        if fmt in _EXIF_ORIENTED_FORMATS:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        if fmt == "PNG":
            info = _png_colour_info(path)
            if info.colour and img.mode in ("RGB", "RGBA", "P"):
                return _orient(_png_colour_to_gray(img, path, info), orientation)
        elif fmt in ("JPEG", "MPO") and img.mode == "RGB":
            img.draft("L", None)  # libjpeg's own grayscale output: the Y channel, as OpenCV's
        img.load()
        mode = img.mode
        if mode == "CMYK" and fmt in ("JPEG", "MPO"):
            # Pillow inverts CMYK JPEG samples (Adobe's convention); OpenCV takes them raw.
            return _orient(_cmyk_to_gray(255 - np.asarray(img)), orientation)
        if mode.startswith("I;16") or mode == "I":
            # 16-bit grayscale (older Pillow opens 16-bit PNGs as 32-bit "I"): cv2.imread(path,
            # 0) keeps the high byte (libpng's strip_16), and so do we, so that the model sees
            # CARZero's input; larger values have no defined white point.
            arr = np.asarray(img, dtype=np.int64)
            if arr.min() < 0 or arr.max() > 65535:
                raise ValueError(f"16-bit values outside [0, 65535]: {arr.min()}..{arr.max()}")
            return _orient((arr >> 8).astype(np.uint8), orientation)
        if mode == "F":
            raise ValueError("float ('F' mode) images have no defined intensity range")
        # Gray (L, LA, 1, gray 16-bit + alpha, which Pillow opens as RGBA of equal channels):
        # the gray samples themselves. Colour files of other formats: Pillow's luma.
        gray = np.array(img if mode == "L" else img.convert("L"), dtype=np.uint8)
        return _orient(gray, orientation)
