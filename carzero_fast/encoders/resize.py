"""OpenCV's `cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)` in numpy, for one channel.

CARZero resizes its uint8 X-rays with INTER_AREA (`_resize_img`), so the pixels the model saw
are OpenCV's, rounding included. `resize_area` repeats OpenCV's arithmetic (imgproc
resize.cpp: `hal::resize`, `computeResizeAreaTab`, `ResizeArea_Invoker`, `resizeAreaFast_`,
the linear `resizeGeneric_`), step by step and in its order, on uint8 and float32 images:

- Shrinking by an exact integer factor on both axes (OpenCV's "area fast" path): block means.
  uint8 2×2 blocks round half up, ((a + b + c + d + 2) >> 2); other factors compute
  float32(sum) · float32(1/area) and round half to even (`saturate_cast`).
- Shrinking otherwise: output pixel i covers the source interval [i·s, (i+1)·s), s = in/out
  (in float64); a source pixel weighs overlap / s as a float32, and OpenCV drops overlaps of at
  most 1e-3. Each source row is combined horizontally, then the rows vertically, each a float32
  multiply-then-add in increasing source order; uint8 then rounds half to even and saturates.
  That is out = Wy · img · Wxᵀ with coverage-weight matrices, in OpenCV's float32 order.
- Enlarging on either axis: no area average; OpenCV interpolates linearly between source
  pixels sx = floor(i·s) and sx + 1 with weight frac((i + 1) − (sx + 1)/s) on the second (0 when
  that is ≤ 0), edges clamped. An integer enlargement therefore repeats pixels. uint8 uses
  OpenCV's 11-bit fixed point and the rounding of its SIMD vertical pass.

Checked against opencv-python-headless 4.8.0.74 (CARZero's pinned version; 2,584 size pairs)
and 5.0.0.93 (1,292) on x86-64, noise and smooth images, 1 to 4280 px, enlarged, shrunk and
mixed, integer and fractional factors: uint8 identical everywhere; float32 identical except
when both factors are integers, where OpenCV's summation order differs (up to 4.2e-7).
"""

from __future__ import annotations

import math

import numpy as np

_F32 = np.float32
_DBL_EPSILON = float(np.finfo(np.float64).eps)
_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: uint8 weights are 11-bit fixed point


def resize_area(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """`cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)` for a 2-D image.

    Args:
        img: (H, W) uint8 or float32 array.
        height, width: output size, both ≥ 1.

    Returns:
        (height, width) array of img's dtype (a copy when the size is unchanged, as OpenCV's).
    """
    if img.ndim != 2 or img.dtype not in (np.uint8, np.float32):
        raise TypeError(f"resize_area takes a 2-D uint8 or float32 array, got {img.dtype} "
                        f"of shape {img.shape}")  # fmt: skip
    if height < 1 or width < 1:
        raise ValueError(f"resize_area: output size must be positive, got {height}×{width}")
    h, w = img.shape
    if (h, w) == (height, width):
        return img.copy()
    # The scales as OpenCV computes them: inverse first, then its reciprocal (in float64).
    inv_x, inv_y = width / w, height / h
    scale_x, scale_y = 1.0 / inv_x, 1.0 / inv_y
    if scale_x >= 1 and scale_y >= 1:
        ix, iy = round(scale_x), round(scale_y)
        # OpenCV's exactness test, on the float64 scales (for image sizes: out divides in).
        if abs(scale_x - ix) < _DBL_EPSILON and abs(scale_y - iy) < _DBL_EPSILON:
            return _shrink_integer(img, iy, ix)
        return _shrink_fractional(img, height, width, scale_y, scale_x)
    return _enlarge(img, height, width, scale_y, scale_x, inv_y, inv_x)


def _shrink_integer(img: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Means of fy×fx blocks (the input is exactly (out_h·fy, out_w·fx))."""
    h, w = img.shape
    blocks = img.reshape(h // fy, fy, w // fx, fx)
    if img.dtype == np.uint8:
        # Exact in any order, as OpenCV's int sums; rows first (one pass over contiguous memory)
        # is 4× faster than numpy's two-axis reduction.
        sums = blocks.sum(axis=1, dtype=np.int32).sum(axis=2)
        if fy == fx == 2:
            return ((sums + 2) >> 2).astype(np.uint8)  # OpenCV's 2×2 path: integer, half up
        return _saturate_u8(sums.astype(_F32) * _F32(1.0 / (fx * fy)))
    # float32: OpenCV sums in its own order; ours differs by float32 rounding only.
    return blocks.sum(axis=(1, 3), dtype=_F32) * _F32(1.0 / (fx * fy))


def _area_taps(n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's `computeResizeAreaTab` for one axis, as a tap table.

    Output d covers source [f1, f2) = [d·scale, d·scale + scale): a partly covered pixel on the
    left (s1 − 1), whole pixels s1 … s2 − 1, a partly covered one on the right (s2); OpenCV drops
    parts of at most 1e-3. The taps are consecutive source pixels, so row d is `start + k`.
    Computed in float64 array arithmetic, which rounds as OpenCV's (and Python's) doubles.

    Returns:
        (index, weight): (n_out, T) source indices (intp) and float32 weights, output d's
        taps in increasing source order, padded with weight 0 (which adds exactly nothing).
    """
    f1 = np.arange(n_out, dtype=np.float64) * scale
    f2 = f1 + scale
    cell = np.minimum(scale, n_in - f1)  # the last cell may be cut short by the image edge
    s2 = np.minimum(np.floor(f2), n_in - 1)
    s1 = np.minimum(np.ceil(f1), s2)
    has_left = s1 - f1 > 1e-3
    has_right = f2 - s2 > 1e-3
    start = (s1 - has_left).astype(np.intp)
    count = has_left + (s2 - s1).astype(np.intp) + has_right  # taps per output
    k = np.arange(int(count.max()))[None, :]  # [1, T]
    index = np.where(k < count[:, None], start[:, None] + k, 0)
    weight = np.where(k < count[:, None], (1.0 / cell).astype(_F32)[:, None], _F32(0.0))
    weight[has_left, 0] = ((s1 - f1) / cell).astype(_F32)[has_left]
    right = np.minimum(np.minimum(f2 - s2, 1.0), cell) / cell
    rows = np.flatnonzero(has_right)
    weight[rows, count[rows] - 1] = right.astype(_F32)[rows]
    return index, weight.astype(_F32)


def _transpose(img: np.ndarray, rows: int = 64) -> np.ndarray:
    """`np.ascontiguousarray(img.T)`, a band of rows at a time (twice as fast for large images:
    a band's columns stay in cache)."""
    out = np.empty(img.shape[::-1], dtype=img.dtype)
    for r in range(0, img.shape[0], rows):
        out[:, r : r + rows] = img[r : r + rows].T
    return out


def _shrink_fractional(
    img: np.ndarray, height: int, width: int, scale_y: float, scale_x: float
) -> np.ndarray:
    """OpenCV's `ResizeArea_Invoker`: rows combined horizontally, then vertically, float32."""
    h, w = img.shape
    x_index, x_weight = _area_taps(w, width, scale_x)
    y_index, y_weight = _area_taps(h, height, scale_y)
    # Work on the transpose, so that each horizontal tap gathers whole contiguous rows (twice as
    # fast as gathering columns); element by element the arithmetic is OpenCV's.
    cols = _transpose(img)  # (W, H), img's dtype: uint8 stays 1 byte a pixel
    acc = np.zeros((width, h), dtype=_F32)
    taken = np.empty((width, h), dtype=img.dtype)
    term = np.empty((width, h), dtype=_F32)
    for t in range(x_index.shape[1]):
        np.take(cols, x_index[:, t], axis=0, out=taken)
        np.multiply(taken, x_weight[:, t, None], out=term)  # uint8 × float32 → float32
        acc += term
    rows = np.ascontiguousarray(acc.T)  # (H, width): every source row resized horizontally
    out = np.zeros((height, width), dtype=_F32)
    for t in range(y_index.shape[1]):
        out += y_weight[:, t, None] * rows[y_index[:, t]]
    return _saturate_u8(out) if img.dtype == np.uint8 else out


def _linear_taps(
    n_in: int, n_out: int, scale: float, inv_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """INTER_AREA's coefficients when enlarging: source index sx and float32 weight f of
    sx + 1 (sx weighs 1 − f) for each output index; past the last pixel, sx = n − 1, f = 0."""
    sx = np.empty(n_out, dtype=np.intp)
    f = np.empty(n_out, dtype=_F32)
    for d in range(n_out):
        s = math.floor(d * scale)
        fd = _F32((d + 1) - (s + 1) * inv_scale)
        fd = _F32(0.0) if fd <= 0 else _F32(fd - _F32(math.floor(fd)))
        if s >= n_in - 1:
            s, fd = n_in - 1, _F32(0.0)
        sx[d], f[d] = s, fd
    return sx, f


def _enlarge(
    img: np.ndarray,
    height: int,
    width: int,
    scale_y: float,
    scale_x: float,
    inv_y: float,
    inv_x: float,
) -> np.ndarray:
    """OpenCV's linear `resizeGeneric_` with INTER_AREA's coefficients (any axis enlarged)."""
    h, w = img.shape
    sx, fx = _linear_taps(w, width, scale_x, inv_x)
    sy, fy = _linear_taps(h, height, scale_y, inv_y)
    sx1 = np.minimum(sx + 1, w - 1)
    # The vertical pass reads rows sy and sy + 1 clamped, with fy as computed (not zeroed).
    sy1 = np.minimum(sy + 1, h - 1)
    if img.dtype == np.float32:
        rows = img[:, sx] * (_F32(1.0) - fx) + img[:, sx1] * fx  # (H, width)
        return rows[sy] * (_F32(1.0) - fy)[:, None] + rows[sy1] * fy[:, None]
    # uint8: weights rounded to 11 bits, horizontal sums exact in integers.
    a0 = np.rint((_F32(1.0) - fx) * _F32(_COEF_SCALE)).astype(np.int64)
    a1 = np.rint(fx * _F32(_COEF_SCALE)).astype(np.int64)
    b0 = np.rint((_F32(1.0) - fy) * _F32(_COEF_SCALE)).astype(np.int64)[:, None]
    b1 = np.rint(fy * _F32(_COEF_SCALE)).astype(np.int64)[:, None]
    src = img.astype(np.int64)
    rows = src[:, sx] * a0 + src[:, sx1] * a1  # (H, width), scale 2^11
    # OpenCV's SIMD vertical pass (VResizeLinearVec_32s8u), used for every column on x86:
    # int16 lanes of row >> 4, high halves of the products (>> 16), saturating add, then
    # (+ 2) >> 2. Its scalar formula, (b0·r0 + b1·r1 + 2^21) >> 22, differs by 1 at times.
    r0 = np.clip(rows[sy] >> 4, -32768, 32767)
    r1 = np.clip(rows[sy1] >> 4, -32768, 32767)
    total = np.clip(((r0 * b0) >> 16) + ((r1 * b1) >> 16), -32768, 32767)
    return np.clip((total + 2) >> 2, 0, 255).astype(np.uint8)


def _saturate_u8(x: np.ndarray) -> np.ndarray:
    """OpenCV's `saturate_cast<uchar>(float)`: round half to even, clip to [0, 255]."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
