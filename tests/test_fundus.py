"""Tests for drtune.fundus: field detection, square crop, resize and Graham normalisation."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_dir
from drtune import fundus
from drtune.errors import InputError
from drtune.fundus import Field, NoFieldError


@functools.lru_cache(maxsize=None)
def _synthetic(h: int, w: int, cx: float, cy: float, r: float, cut_top: int | None = None,
               seed: int = 0) -> np.ndarray:
    """A fundus-like RGB photo: an orange disc whose rim darkens to ~25% of the centre, dark
    vessels and a hemorrhage, noisy near-black border with a bright camera label in a corner.
    ``cut_top`` blacks out rows above it, like a camera mask cutting the field with a chord."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:h, :w]
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2, dtype=np.float32) / np.float32(r)
    shade = np.clip(1.0 - 0.75 * d ** 4, 0.0, 1.0)
    img = np.zeros((h, w, 3), np.float32)
    for c, level in enumerate((190.0, 90.0, 30.0)):
        img[:, :, c] = level * shade
    img[d > 1.0] = 0.0
    field = img.astype(np.uint8)
    t = max(1, round(r / 150))
    for k in range(6):  # vessels and a hemorrhage: dark structures inside the field
        a = k * np.pi / 3
        p1 = (round(cx), round(cy))
        p2 = (round(cx + 0.9 * r * np.cos(a)), round(cy + 0.9 * r * np.sin(a)))
        cv2.line(field, p1, p2, (70, 20, 10), t)
    cv2.circle(field, (round(cx - 0.3 * r), round(cy + 0.4 * r)), round(0.08 * r), (40, 8, 4), -1)
    field[d > 1.0] = 0
    if cut_top is not None:
        field[:cut_top] = 0
    noise = rng.integers(0, 14, size=(h, w, 1), dtype=np.uint8)
    out = np.where(field.max(axis=2, keepdims=True) > 0, field, noise)
    cv2.putText(out, "CAM 01", (3, h - 5), cv2.FONT_HERSHEY_SIMPLEX, max(h / 1500, 0.3),
                (255, 255, 255), 1)
    return out


# (h, w, cx, cy, r): IDRiD-like and 3872x2592 clipped top/bottom, fields fully inside,
# off-centre, clipped at the top only, clipped left/right in a portrait frame, tiny images.
CASES = [
    (2848, 4288, 2100.0, 1424.0, 1600.0),
    (2592, 3872, 1760.0, 1300.0, 1520.0),
    (712, 1072, 525.0, 356.0, 400.0),
    (600, 800, 400.0, 300.0, 250.0),
    (512, 768, 300.0, 280.0, 200.0),
    (700, 900, 450.0, 300.0, 340.0),
    (800, 500, 250.0, 400.0, 280.0),
    (512, 512, 256.0, 256.0, 250.0),
    (120, 160, 80.0, 60.0, 50.0),
]


@pytest.mark.parametrize("h,w,cx,cy,r", CASES)
def test_find_field_locates_circle(h: int, w: int, cx: float, cy: float, r: float) -> None:
    field = fundus.find_field(_synthetic(h, w, cx, cy, r))
    assert abs(field.cx - cx) < 0.02 * r
    assert abs(field.cy - cy) < 0.02 * r
    assert abs(field.radius - r) < 0.02 * r
    tol = 0.03 * r
    assert abs(field.x0 - max(0, cx - r)) < tol and abs(field.x1 - min(w, cx + r)) < tol
    assert abs(field.y0 - max(0, cy - r)) < tol and abs(field.y1 - min(h, cy + r)) < tol


@pytest.mark.parametrize("h,w,cx,cy,r", [(356, 536, 268, 178, 200), (512, 768, 300, 280, 200)])
def test_find_field_uses_pixel_index_coordinates(h: int, w: int, cx: int, cy: int, r: int) -> None:
    # Same convention as cv2.circle, sub-pixel accurate for a sharp-edged field.
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (cx, cy), r, (200, 100, 50), -1)
    field = fundus.find_field(img)
    assert abs(field.cx - cx) < 0.3 and abs(field.cy - cy) < 0.3 and abs(field.radius - r) < 1.0


def test_find_field_ignores_chord_cut_by_camera_mask() -> None:
    # The flat chord is not part of the circle; a plain least-squares fit would shrink it.
    field = fundus.find_field(_synthetic(600, 800, 400.0, 310.0, 260.0, cut_top=80))
    assert abs(field.cx - 400) < 5 and abs(field.cy - 310) < 5 and abs(field.radius - 260) < 5


def test_find_field_ignores_reflection_stuck_to_rim() -> None:
    # A flash reflection or label merging with the field bulges its outline; the fit drops it.
    img = _synthetic(600, 800, 400.0, 300.0, 250.0).copy()
    cv2.ellipse(img, (400 + 250, 300), (40, 90), 0, 0, 360, (240, 240, 240), -1)
    field = fundus.find_field(img)
    assert abs(field.cx - 400) < 2 and abs(field.cy - 300) < 2 and abs(field.radius - 250) < 2


def test_find_field_ignores_chords_inside_frame() -> None:
    # An IDRiD-like clipped photo padded with black: both flat cuts are now inside the frame.
    img = cv2.copyMakeBorder(_synthetic(356, 536, 262.0, 178.0, 200.0), 60, 20, 10, 0,
                             cv2.BORDER_CONSTANT, value=0)
    field = fundus.find_field(img)
    assert abs(field.cx - 272) < 2 and abs(field.cy - 238) < 2 and abs(field.radius - 200) < 2


def test_find_field_is_channel_order_agnostic() -> None:
    img = _synthetic(512, 768, 300.0, 280.0, 200.0)
    assert fundus.find_field(img) == fundus.find_field(np.ascontiguousarray(img[:, :, ::-1]))


@pytest.mark.parametrize("h,w,cx,cy,r", CASES)
def test_preprocess_shows_whole_field(h: int, w: int, cx: float, cy: float, r: float) -> None:
    out = fundus.preprocess(_synthetic(h, w, cx, cy, r), size=128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    bright = out.max(axis=2) > 20
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    # The disc spans the crop wherever the camera did not clip it: never cut, never shrunk.
    expect_top = max(0.0, (r - cy) / (2 * r)) * 128
    expect_bottom = min(128.0, (r + h - cy) / (2 * r) * 128)
    expect_left = max(0.0, (r - cx) / (2 * r)) * 128
    expect_right = min(128.0, (r + w - cx) / (2 * r) * 128)
    assert abs(rows[0] - expect_top) <= 4 and abs(rows[-1] + 1 - expect_bottom) <= 4
    assert abs(cols[0] - expect_left) <= 4 and abs(cols[-1] + 1 - expect_right) <= 4
    for corner in (out[:12, :12], out[:12, -12:], out[-12:, :12], out[-12:, -12:]):
        assert corner.max() == 0  # includes the corner where the camera label was


def test_crop_square_pads_with_black() -> None:
    img = np.full((100, 200, 3), 200, np.uint8)
    crop = fundus.crop_square(img, Field(cx=99.5, cy=49.5, radius=80, x0=20, y0=0, x1=180, y1=100))
    assert crop.shape == (160, 160, 3)
    assert (crop[:30] == 0).all() and (crop[-30:] == 0).all()  # padding above and below
    assert (crop[30:130] == 200).all()
    grey = fundus.crop_square(img[:, :, 0], Field(99.5, 49.5, 40, 60, 10, 140, 90), margin=0.5)
    assert grey.shape == (120, 120)


@pytest.mark.parametrize("kind", ["grey", "grey1", "rgba", "uint16"])
def test_other_input_layouts(kind: str) -> None:
    rgb = _synthetic(600, 800, 400.0, 300.0, 250.0)
    grey = rgb[:, :, 0]
    image = {
        "grey": grey,
        "grey1": grey[:, :, None],
        "rgba": np.dstack([rgb, np.full(grey.shape, 255, np.uint8)]),
        "uint16": rgb.astype(np.uint16) * 257,
    }[kind]
    converted = fundus.to_rgb(image)
    assert converted.shape == (600, 800, 3) and converted.dtype == np.uint8
    expected = np.dstack([grey] * 3) if kind.startswith("grey") else rgb
    assert np.array_equal(converted, expected)
    field = fundus.find_field(image)
    assert abs(field.radius - 250) < 5 and abs(field.cx - 400) < 5
    assert fundus.preprocess(image, size=64).shape == (64, 64, 3)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.float32),
                                 np.zeros((2, 4, 4, 3), np.uint8)])
def test_to_rgb_rejects_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        fundus.to_rgb(bad)


def _speck() -> np.ndarray:
    img = np.zeros((500, 500, 3), np.uint8)
    cv2.circle(img, (250, 250), 12, (200, 100, 40), -1)
    return img


@pytest.mark.parametrize("make", [
    lambda: np.zeros((300, 400, 3), np.uint8),
    lambda: np.full((300, 400, 3), 128, np.uint8),
    lambda: np.random.default_rng(0).integers(120, 126, (300, 400, 3)).astype(np.uint8),
    lambda: np.random.default_rng(0).integers(0, 10, (300, 400, 3)).astype(np.uint8),
    lambda: np.broadcast_to(np.linspace(100, 108, 400).astype(np.uint8)[None, :, None],
                            (300, 400, 3)).copy(),
    _speck,
], ids=["black", "grey", "noisy-grey", "noisy-black", "faint-gradient", "speck"])
def test_no_field_raises(make) -> None:
    with pytest.raises(NoFieldError) as info:
        fundus.find_field(make())
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)
    with pytest.raises(NoFieldError):
        fundus.preprocess(make())


def test_explicit_threshold_overrides_automatic_level() -> None:
    img = _synthetic(600, 800, 400.0, 300.0, 250.0)
    assert abs(fundus.find_field(img, threshold=30).radius - 250) < 5
    with pytest.raises(NoFieldError):  # brighter than any field pixel: only the label remains
        fundus.find_field(img, threshold=200)


def test_graham_normalize_flattens_illumination_and_keeps_border_black() -> None:
    raw = fundus.preprocess(_synthetic(600, 800, 400.0, 300.0, 250.0), size=256)
    out = fundus.preprocess(_synthetic(600, 800, 400.0, 300.0, 250.0), size=256, normalize="graham")
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    yy, xx = np.ogrid[:256, :256]
    d = np.hypot(xx - 127.5, yy - 127.5)
    assert out[d > 0.92 * 128 + 1].max() == 0
    centre, rim = (d < 20), (d > 105) & (d < 115)
    # Raw: the rim is much darker than the centre; Graham: both sit near grey 128.
    assert raw[centre, 0].mean() - raw[rim, 0].mean() > 30
    assert abs(out[centre].mean() - 128) < 20 and abs(out[rim].mean() - 128) < 20
    assert (out[d < 100].max(axis=1) > 0).mean() > 0.99  # nothing inside is masked


def test_graham_normalize_has_no_halo_where_frame_clips_field() -> None:
    out = fundus.preprocess(_synthetic(2848, 4288, 2100.0, 1424.0, 1600.0), size=256,
                            normalize="graham")
    rows = np.flatnonzero(out.max(axis=(1, 2)) > 0)
    assert rows[0] > 10 and rows[-1] < 245  # clipped rows stay black
    # A blur that averaged in the black padding would make the first field rows glow.
    for row in (out[rows[0], 100:156], out[rows[-1], 100:156]):
        assert abs(row.mean() - 128) < 25


def test_graham_normalize_rejects_bad_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        fundus.graham_normalize(np.zeros((32, 32, 3), np.uint8), scale=1.5)


def test_unknown_normalization_names_allowed_values() -> None:
    with pytest.raises(ValueError, match="none, graham") as info:
        fundus.preprocess(_synthetic(600, 800, 400.0, 300.0, 250.0), normalize="clahe")
    assert "clahe" in str(info.value)
    assert fundus.NORMALIZATIONS == ("none", "graham")


def test_preprocess_full_size() -> None:
    # ~40 ms on 2 CPU cores (not asserted: a busy machine would fail a wall-clock bound).
    out = fundus.preprocess(_synthetic(2848, 4288, 2100.0, 1424.0, 1600.0))
    assert out.ndim == 3 and out.shape[0] == out.shape[1] and out.dtype == np.uint8


def _samples_dir() -> Path:
    env = os.environ.get("DRTUNE_FUNDUS_SAMPLES")
    return Path(env) if env else shared_dir("fundus-samples")


def _sample_paths() -> list[Path]:
    images = _samples_dir() / "images"
    return sorted(images.glob("*.jpg")) if images.is_dir() else []


@pytest.mark.parametrize("path", _sample_paths() or [None], ids=lambda p: p.stem if p else "absent")
def test_real_samples_crop_whole_field(path: Path | None) -> None:
    if path is None:
        pytest.skip(f"real fundus samples not found in {_samples_dir()}")
    photo = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_4)
    assert photo is not None
    field = fundus.find_field(photo)
    # These cameras clip the field top and bottom only: its width is the diameter.
    assert abs(2 * field.radius - (field.x1 - field.x0)) < 0.02 * field.radius
    # Padding with black moves the field fully inside the frame: same circle, shifted.
    padded = fundus.find_field(cv2.copyMakeBorder(photo, 120, 40, 30, 0, cv2.BORDER_CONSTANT,
                                                  value=0))
    assert abs(padded.cx - field.cx - 30) < 2 and abs(padded.cy - field.cy - 120) < 2
    assert abs(padded.radius - field.radius) < 2
    out = fundus.preprocess(photo, size=256)
    level = out.max(axis=2)
    bright = level > 20
    assert bright.mean() > 0.6  # the field fills most of the crop
    for corner in (level[:16, :16], level[:16, -16:], level[-16:, :16], level[-16:, -16:]):
        assert corner.max() < 10
    # Thin strips at the left and right edge of the middle band: a disc that touches both sides
    # covers a small, equal part of each; a cut or off-centre disc fills one and misses the other.
    left, right = bright[96:160, :4].mean(), bright[96:160, -4:].mean()
    assert 0.05 < left < 0.8 and 0.05 < right < 0.8 and abs(left - right) < 0.2
    # The frame clipped the field symmetrically: equal black bands above and below.
    dark_rows = level[:, 96:160].mean(axis=1) < 10
    top = int(np.argmin(dark_rows))
    bottom = int(np.argmin(dark_rows[::-1]))
    assert 5 < top < 60 and abs(top - bottom) <= 4
