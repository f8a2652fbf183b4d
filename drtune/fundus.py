"""Retina-field detection, square crop with black padding, resize and optional normalisation.

Pure numpy/OpenCV on in-memory arrays (no file IO, no TensorFlow), so ``prepare`` can call it
from its worker threads (OpenCV releases the GIL) and tests can call it on synthetic arrays.

Detection is channel-order agnostic (it thresholds the per-pixel maximum over channels), so
BGR arrays from ``cv2.imread`` work too; the output keeps the channel order of the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from drtune.config import NORMALIZATIONS  # one home for the names; config is pure Python
from drtune.errors import InputError

# Detection runs on a copy whose longer side is at most this: the circle is still located to
# well under 1% of its radius, and the cost no longer depends on the camera's resolution.
_DETECT_MAX_SIDE = 512
# Fields smaller than this fraction of the image are specks, text or flash reflections.
_MIN_FIELD_FRACTION = 0.05
# Minimum brightness gap (0-255) between the field and the border; below it the image is
# treated as uniform (blank frame, failed capture).
_MIN_CONTRAST = 12.0


class NoFieldError(InputError, ValueError):
    """No retina field can be found (all-black, uniform or nearly empty image).

    Subclasses ``InputError`` so the command line reports it as bad data (exit 2), and
    ``ValueError`` for callers that do not know drtune's error types.
    """


@dataclass(frozen=True)
class Field:
    """A detected retina field, in pixel coordinates of the image it was found in.

    Coordinates are pixel indices as in ``cv2.circle`` (the top-left pixel's centre is (0, 0)).
    ``cx, cy, radius`` describe the field's circle, which may extend past the image where the
    camera clipped the field; ``x0, y0, x1, y1`` (exclusive ends) bound the field pixels that
    are actually in the image.
    """

    cx: float
    cy: float
    radius: float
    x0: int
    y0: int
    x1: int
    y1: int


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as an HxWx3 uint8 array.

    Accepts HxW (grey), HxWx1, HxWx3 and HxWx4 (alpha dropped) arrays of uint8 or uint16
    (scaled from the full 16-bit range). Raises ``ValueError`` for anything else.
    """
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle through points, centred for conditioning."""
    mx, my = x.mean(), y.mean()
    u, v = x - mx, y - my
    a = np.column_stack([u, v, np.ones_like(u)])
    (b0, b1, b2), *_ = np.linalg.lstsq(a, u * u + v * v, rcond=None)
    cx, cy = b0 / 2.0, b1 / 2.0
    return float(cx + mx), float(cy + my), float(np.sqrt(max(b2 + cx * cx + cy * cy, 0.0)))


def _robust_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Circle fit that drops outliers: straight chords where a camera mask cuts the field,
    notches, and bits of reflection glued to the rim all sit far from the true circle."""
    keep = np.ones(x.shape, bool)
    cx = cy = r = 0.0
    for _ in range(8):
        cx, cy, r = _fit_circle(x[keep], y[keep])
        resid = np.abs(np.hypot(x - cx, y - cy) - r)
        new = resid <= max(3.0 * 1.4826 * float(np.median(resid[keep])), 1.5)
        if new.sum() < 10 or np.array_equal(new, keep):
            break
        keep = new
    return cx, cy, r


def _detection_copy(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """``rgb`` shrunk to at most ``_DETECT_MAX_SIDE`` pixels a side, and the scale used, so that
    detection costs the same whatever the camera's resolution."""
    h, w = rgb.shape[:2]
    scale = min(1.0, _DETECT_MAX_SIDE / max(h, w))
    if scale == 1.0:
        return rgb, scale
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = rgb
    if scale < 0.5:
        # Area-averaging a 12-Mpixel photo costs ~30 ms; bilinear sampling to twice the
        # target first keeps enough averaging to tame JPEG noise for ~1 ms.
        small = cv2.resize(rgb, (2 * size[0], 2 * size[1]), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(small, size, interpolation=cv2.INTER_AREA), scale


def _field_threshold(level: np.ndarray) -> float:
    """A brightness level between the border's and the field's, from Otsu's split of ``level``.

    Otsu's level itself would cut off dark, vignetted rims, so the threshold sits close to the
    border's median instead: fundus rims fall off to a fraction of the centre's brightness.
    """
    otsu, _ = cv2.threshold(level, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Medians of the two classes, read off the cumulative histogram.
    cum = np.cumsum(np.bincount(level.ravel(), minlength=256))
    n_low = int(cum[int(otsu)])
    if n_low == 0 or n_low == cum[-1]:
        raise NoFieldError("no retina field found: the image is uniform")
    bg = float(np.searchsorted(cum, n_low / 2.0))
    fg = float(np.searchsorted(cum, n_low + (cum[-1] - n_low) / 2.0))
    if fg - bg < _MIN_CONTRAST:
        raise NoFieldError(f"no retina field found: too little contrast ({bg:.0f} vs {fg:.0f})")
    return bg + 0.15 * (fg - bg)


def _field_outline(level: np.ndarray, threshold: float) -> np.ndarray:
    """The outline of the largest bright region after a morphological clean-up (opening drops
    specks of JPEG noise and text, closing fills vessels and notches); ``NoFieldError`` when it
    is too small to be a retina."""
    sh, sw = level.shape
    mask = (level > threshold).astype(np.uint8)
    k = max(3, (min(sh, sw) // 100) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        raise NoFieldError("no retina field found: the image is black")
    contour = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(contour)
    if area < _MIN_FIELD_FRACTION * sh * sw:
        raise NoFieldError(f"no retina field found: the largest bright region covers only "
                           f"{100 * area / (sh * sw):.1f}% of the image")
    return contour


def _outline_circle(contour: np.ndarray, shape: tuple[int, int]) -> tuple[float, float, float]:
    """The field's circle (cx, cy, r in continuous coordinates) from its outline: a robust fit
    to the rim where enough of it is visible, else the bounding box's circle."""
    sh, sw = shape
    area = cv2.contourArea(contour)
    bx, by, bw, bh = cv2.boundingRect(contour)
    xi, yi = contour[:, 0, 0], contour[:, 0, 1]
    # Outline on the image border is where the frame clipped the field, not its rim. Long
    # straight horizontal/vertical runs are chords cut by the frame or a camera mask; a circle
    # of radius R has at most ~2*sqrt(2R) outline pixels in one row, at its top or bottom.
    max_run = 4.0 * np.sqrt(max(bw, bh) / 2.0)
    inner = ((xi > 1) & (xi < sw - 2) & (yi > 1) & (yi < sh - 2)
             & (np.bincount(yi, minlength=sh)[yi] <= max_run)
             & (np.bincount(xi, minlength=sw)[xi] <= max_run))
    pts = contour[:, 0, :].astype(np.float64)
    # Bounding-box circle: right when the field is whole or clipped symmetrically; the fallback
    # when too little of the rim is visible for a fit.
    cx, cy, r = bx + bw / 2.0, by + bh / 2.0, max(bw, bh) / 2.0
    if inner.sum() >= 20:
        fx, fy, fr = _robust_circle(pts[inner, 0] + 0.5, pts[inner, 1] + 0.5)
        # Sanity: the circle holds (nearly) the whole field area, is centred within its box and
        # is not absurdly large; bulges such as reflections may still widen the box a little.
        if (np.pi * fr * fr >= 0.95 * area and 0.8 * r <= fr <= 2.0 * np.hypot(bw, bh)
                and bx <= fx <= bx + bw and by <= fy <= by + bh):
            # Outline pixels' centres lie half a pixel inside the field's edge.
            cx, cy, r = fx, fy, fr + 0.5
    return cx, cy, r


def find_field(image: np.ndarray, threshold: float | None = None) -> Field:
    """Detect the circular retina field of a fundus photograph.

    The per-pixel maximum over channels is thresholded between the border's and the field's
    typical levels (found by Otsu's split), so dark, vignetted rims stay in the field while
    JPEG noise in the black border stays out; ``threshold`` (0-255) overrides that level.
    After a morphological clean-up the largest region (holes filled) is the field, and a robust
    least-squares circle is fitted to its outline, ignoring points on the image border and on
    straight cuts: when the camera clips the field top and bottom, the arcs still fix the circle.

    Raises ``NoFieldError`` if the image is (nearly) uniform or the largest region covers less
    than 5% of the image.
    """
    rgb = to_rgb(image)
    h, w = rgb.shape[:2]
    small, scale = _detection_copy(rgb)
    level = cv2.medianBlur(cv2.max(cv2.max(small[:, :, 0], small[:, :, 1]), small[:, :, 2]), 3)
    contour = _field_outline(level, _field_threshold(level) if threshold is None else threshold)
    cx, cy, r = _outline_circle(contour, level.shape)
    bx, by, bw, bh = cv2.boundingRect(contour)
    # Fitting used continuous coordinates (pixel i spans [i, i+1)), which scale linearly;
    # pixel indices are those minus half a pixel.
    return Field(
        cx=cx / scale - 0.5, cy=cy / scale - 0.5, radius=r / scale,
        x0=max(0, int(np.floor(bx / scale))), y0=max(0, int(np.floor(by / scale))),
        x1=min(w, int(np.ceil((bx + bw) / scale))), y1=min(h, int(np.ceil((by + bh) / scale))),
    )


def crop_square(image: np.ndarray, field: Field, margin: float = 0.0) -> np.ndarray:
    """Crop the square circumscribing the field's circle, enlarged by ``margin`` (a fraction of
    the diameter), padding with black where the square leaves the image, so the whole field is
    visible, centred, and never cut (IDRiD fields are clipped top and bottom by the frame)."""
    side = max(1, int(round(2.0 * field.radius * (1.0 + margin))))
    # A pixel-index centre + 0.5 is the continuous centre; the square's edge is half a side away.
    x0, y0 = int(round(field.cx + 0.5 - side / 2.0)), int(round(field.cy + 0.5 - side / 2.0))
    h, w = image.shape[:2]
    out = np.zeros((side, side) + image.shape[2:], dtype=image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def _circle_mask(shape: tuple[int, ...], radius: float) -> np.ndarray:
    """Boolean HxW mask of the disc of ``radius`` centred in an image of ``shape``."""
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (xx - (shape[1] - 1) / 2.0) ** 2 + (yy - (shape[0] - 1) / 2.0) ** 2 <= radius * radius


def graham_normalize(image: np.ndarray, field_radius_px: float | None = None,
                     scale: float = 0.92) -> np.ndarray:
    """Ben Graham's Kaggle-2015 local contrast normalisation of a square, field-centred crop:
    ``4*img - 4*GaussianBlur(img, sigma=r/30) + 128``, saturated to uint8, which evens out
    illumination and colour between cameras and leaves vessels and lesions on grey.

    Unlike the original, the blur averages field pixels only (normalised convolution), so black
    padding where the frame clipped the field (rows/columns dark across the disc) draws no halo
    along the cut. The filter rings at the dark rim, so all outside ``scale * r`` is set to black
    (Graham used grey 128; black keeps drtune's "border is black" invariant). ``r`` defaults to
    half the image width, as produced by ``crop_square`` without margin.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    rgb = to_rgb(image)
    r = float(field_radius_px) if field_radius_px is not None else rgb.shape[1] / 2.0
    disc = _circle_mask(rgb.shape, r)
    dark = np.where(disc, rgb.max(axis=2), 0) <= 4
    # Frame clipping is axis-aligned: a row or column that is dark across the whole disc is
    # padding, not retina. Eroding by one pixel drops the row blended with padding by resizing.
    valid = disc & ~dark.all(axis=1)[:, None] & ~dark.all(axis=0)[None, :]
    valid = cv2.erode(valid.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    sigma = max(r / 30.0, 0.5)
    weight = cv2.GaussianBlur(valid.astype(np.float32), (0, 0), sigma)
    img = rgb.astype(np.float32)
    blur = cv2.GaussianBlur(img * valid[:, :, None], (0, 0), sigma)
    blur /= np.maximum(weight, 1e-3)[:, :, None]
    out = np.clip(4.0 * (img - blur) + 128.0, 0, 255).astype(np.uint8)
    out[~(valid & _circle_mask(rgb.shape, scale * r))] = 0
    return out


def preprocess(image: np.ndarray, size: int = 256, normalize: str = "none",
               margin: float = 0.0) -> np.ndarray:
    """Photograph -> ``size`` x ``size`` x 3 uint8 crop of the whole retina field.

    ``to_rgb`` -> ``find_field`` -> ``crop_square`` (with ``margin``) -> resize (area averaging
    when shrinking) -> pixels outside the field's circle set to black (removes camera text,
    reflections and border noise) -> optional normalisation, one of ``NORMALIZATIONS``.
    Raises ``NoFieldError`` when no field is found, ``ValueError`` for an unknown ``normalize``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; allowed values: {', '.join(NORMALIZATIONS)}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    rgb = to_rgb(image)
    field = find_field(rgb)
    crop = crop_square(rgb, field, margin)
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_CUBIC
    out = cv2.resize(crop, (size, size), interpolation=interp)
    radius = size / 2.0 / (1.0 + margin)
    out[~_circle_mask(out.shape, radius + 0.5)] = 0
    if normalize == "graham":
        out = graham_normalize(out, field_radius_px=radius)
    return out
