"""Synthetic colour fundus photographs with lesions and lesion masks, in IDRiD layout.

The photographs imitate IDRiD "Disease Grading" images well enough to run the real pipeline
(field detection, cropping, training, Grad-CAM) without the licensed data: a black background,
a circular field clipped at top and bottom, an unevenly lit orange-red fundus, an optic disc,
a darker macula, branching vessels and, with the grade, more microaneurysms, haemorrhages,
hard exudates, cotton-wool spots and new vessels. Sizes are fractions of the field diameter,
so thumbnails and full 4288x2848 frames share one vectorised numpy/OpenCV code path.

The lesion mask (0/255) marks every lesion drawn, microaneurysms included: grade 0 masks are
empty, grade 1 masks tiny; new vessels count as lesions, normal vessels do not.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from drtune.errors import DrtuneError, InputError
from drtune.runs import TEST, TRAIN, atomic_dir

TRAIN_IMAGES = Path("1. Original Images/a. Training Set")
TEST_IMAGES = Path("1. Original Images/b. Testing Set")
TRAIN_LABELS = Path("2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv")
TEST_LABELS = Path("2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv")
TRAIN_MASKS = Path("3. Lesion Masks/a. Training Set")
TEST_MASKS = Path("3. Lesion Masks/b. Testing Set")
LABEL_HEADER = ("Image name", "Retinopathy grade", "Risk of macular edema")
# split -> (images dir, labels csv, masks dir), relative to the data-set root. IDRiD's training
# set becomes the train and val splits of a data folder, its testing set the test split.
SYNTH_LAYOUT: dict[str, tuple[Path, Path, Path]] = {
    TRAIN: (TRAIN_IMAGES, TRAIN_LABELS, TRAIN_MASKS),
    TEST: (TEST_IMAGES, TEST_LABELS, TEST_MASKS),
}

_SPLIT_IDS = {TRAIN: 0, TEST: 1}
# Separate seed streams, so grade blocks, image pixels and label extras never share draws.
_GRADE_STREAM, _IMAGE_STREAM, _LABEL_STREAM = 0, 1, 2


@dataclass(frozen=True)
class SynthSummary:
    """What `make_synthetic` wrote: the root and each split's grades in file order."""

    root: Path
    n_train: int
    n_test: int
    grades: dict[str, list[int]]


def mask_path(root: Path, split: str, name: str) -> Path:
    """Lesion mask of image `name` ("IDRiD_001" or "IDRiD_001.jpg") in `split` under `root`."""
    if split not in SYNTH_LAYOUT:
        raise InputError(f"split: must be one of {sorted(SYNTH_LAYOUT)}, got {split!r}")
    return Path(root) / SYNTH_LAYOUT[split][2] / f"{Path(name).stem}.png"


@dataclass(frozen=True)
class _Geometry:
    width: int
    height: int
    cx: float  # field centre
    cy: float
    radius: float  # field radius; diameter is `2 * radius`
    disc: tuple[float, float]
    disc_radius: float
    fovea: tuple[float, float]
    side: int  # +1 when the disc lies right of the centre (a left/right eye)


def _geometry(rng: np.random.Generator, width: int, height: int) -> _Geometry:
    # IDRiD's field is a little taller than the frame (clipped top and bottom) and not centred;
    # the vertical offset stays below the overhang so both the top and bottom rows hold retina.
    radius = 0.5 * height * rng.uniform(1.06, 1.12)
    overhang = radius - 0.5 * height
    cx = 0.5 * width + rng.uniform(-0.03, 0.03) * width
    cy = 0.5 * height + rng.uniform(-0.6, 0.6) * overhang
    d = 2 * radius
    side = 1 if rng.random() < 0.5 else -1
    disc_radius = d / 14 * rng.uniform(0.9, 1.1)  # disc diameter ~ 1/7 of the field
    disc = (cx + side * d * rng.uniform(0.2, 0.25), cy + d * rng.uniform(-0.04, 0.02))
    # The fovea sits ~2.5 disc diameters temporal to the disc and slightly below it.
    fovea_dist = 2.5 * 2 * disc_radius
    fovea = (disc[0] - side * fovea_dist, disc[1] + d * rng.uniform(0.01, 0.04))
    return _Geometry(width, height, cx, cy, radius, disc, disc_radius, fovea, side)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise: a tiny random grid upsampled bicubically."""
    h, w = shape
    small = rng.standard_normal((max(2, round(cells * h / w)), cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _shading(rng: np.random.Generator, g: _Geometry) -> np.ndarray:
    """Fundus colour with illumination, texture, macula and vignette, as float32 HxWx3.

    Everything here is smooth, so it is computed at 1/8 resolution and upsampled once; this is
    what keeps a 4288x2848 render fast.
    """
    f = 8
    h, w = math.ceil(g.height / f), math.ceil(g.width / f)
    # Low-res pixel centres in full-res coordinates, exactly as cv2.resize maps them back.
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs, ys = (xs + 0.5) * g.width / w - 0.5, (ys + 0.5) * g.height / h - 0.5
    d = 2 * g.radius
    rn = np.hypot(xs - g.cx, ys - g.cy) / g.radius
    base = np.array([rng.uniform(185, 225), rng.uniform(75, 105), rng.uniform(25, 50)], np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    tilt = ((xs - g.cx) * math.cos(angle) + (ys - g.cy) * math.sin(angle)) / g.radius
    illum = 0.72 + 0.33 * np.clip(1 - rn**2, 0, 1) + rng.uniform(0.05, 0.15) * tilt
    # Real fields darken over the outer ~20% of the radius (lens vignetting).
    vignette = 1 - 0.65 * np.clip((rn - 0.78) / 0.22, 0, 1) ** 1.5
    texture = 1 + 0.06 * _smooth_noise(rng, (h, w), 5) + 0.035 * _smooth_noise(rng, (h, w), 40)
    macula = np.exp(-((xs - g.fovea[0]) ** 2 + (ys - g.fovea[1]) ** 2) / (2 * (0.07 * d) ** 2))
    fovea = np.exp(-((xs - g.fovea[0]) ** 2 + (ys - g.fovea[1]) ** 2) / (2 * (0.015 * d) ** 2))
    shade = (illum * vignette * texture)[..., None]
    # The macula is darker and browner: red drops less than green/blue (xanthophyll pigment).
    dark = 1 - macula[..., None] * np.array([0.25, 0.4, 0.35], np.float32)
    dark = dark * (1 - 0.15 * fovea[..., None])
    # Choroidal red varies on its own scale, so the red channel gets extra texture.
    red = np.ones((h, w, 3), np.float32)
    red[..., 0] += 0.05 * _smooth_noise(rng, (h, w), 12)
    small = base * shade * dark * red
    return cv2.resize(small, (g.width, g.height), interpolation=cv2.INTER_LINEAR)


def _fx(point: np.ndarray) -> tuple[int, ...]:
    """Fixed-point coordinates for OpenCV drawing with shift=4 (subpixel antialiasing)."""
    return tuple(int(v) for v in np.round(np.asarray(point) * 16))


def _draw_disc(img: np.ndarray, rng: np.random.Generator, g: _Geometry) -> None:
    """Blend a pale yellow optic disc with a brighter cup into `img` (in place, in its bbox)."""
    (dx, dy), r = g.disc, g.disc_radius
    rx, ry = r, r * rng.uniform(1.0, 1.12)  # discs are slightly vertically oval
    x0, x1 = max(0, int(dx - 2 * rx)), min(g.width, int(dx + 2 * rx) + 1)
    y0, y1 = max(0, int(dy - 2 * ry)), min(g.height, int(dy + 2 * ry) + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    rho = np.hypot((xx - dx) / rx, (yy - dy) / ry).astype(np.float32)
    rim = np.clip((1 - rho) / 0.08 + 0.5, 0, 1)[..., None]
    cup_r = rng.uniform(0.3, 0.5)
    cup = np.clip((cup_r - rho) / 0.2 + 0.5, 0, 1)[..., None]
    halo = (0.08 * np.exp(-np.maximum(rho - 1, 0) ** 2 / 0.02))[..., None]  # peripapillary pallor
    disc_col = np.array([rng.uniform(240, 255), rng.uniform(180, 210), rng.uniform(115, 150)],
                        np.float32)
    cup_col = np.array([255, 235, 190], np.float32)
    patch = img[y0:y1, x0:x1]
    patch *= 1 + halo * (1 - rim) * np.array([0.1, 0.35, 0.35], np.float32)
    col = disc_col * (1 - cup) + cup_col * cup
    img[y0:y1, x0:x1] = patch * (1 - rim) + col * rim


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float,
          step: float, turn: float) -> np.ndarray:
    """Random-walk polyline (n x 2) with persistent curvature, as for a vessel branch."""
    n = max(2, int(length / step))
    bend = rng.normal(0, 0.03)
    headings = heading + np.cumsum(bend + rng.normal(0, turn, n))
    steps = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def _vessel_tree(rng: np.random.Generator, g: _Geometry) -> list[tuple[np.ndarray, float, int]]:
    """Vessels as (polyline, start width in px, darkness 0-255) from the optic disc.

    The two temporal arcades (artery + vein each) arch around the macula as in real fundi;
    nasal vessels and side branches are random walks.
    """
    d = 2 * g.radius
    disc = np.array(g.disc, np.float64)
    ax = abs(g.disc[0] - g.fovea[0])
    mains: list[tuple[np.ndarray, float, int]] = []
    for up in (-1, 1):
        for width, dark in ((0.0085 * d, 255), (0.0065 * d, 185)):  # vein, then artery
            # Quarter-ellipse over the macula, then a free walk on towards the periphery.
            ay = ax * rng.uniform(0.75, 1.05)
            t = np.linspace(0, rng.uniform(0.45, 0.6) * math.pi, 40)
            wiggle = cv2.GaussianBlur(rng.normal(0, 0.01 * d, (t.size, 1)), (0, 0), 3).ravel()
            pts = np.stack([g.fovea[0] + g.side * (ax + wiggle) * np.cos(t),
                            g.fovea[1] + up * (ay + wiggle) * np.sin(t)], axis=1)
            heading = math.atan2(*(pts[-1] - pts[-2])[::-1])
            tail = _walk(rng, pts[-1], heading, rng.uniform(0.15, 0.3) * d, 0.01 * d, 0.05)
            mains.append((np.vstack([disc, pts, tail[1:]]), width, dark))
        for width, dark in ((0.007 * d, 255), (0.0055 * d, 185)):
            heading = (0 if g.side > 0 else math.pi) + g.side * up * rng.uniform(-1.3, -0.5)
            mains.append((_walk(rng, disc, heading, rng.uniform(0.3, 0.45) * d, 0.01 * d, 0.06),
                          width, dark))
    vessels, parents = list(mains), mains
    for per_vessel in ((2, 6), (0, 3), (0, 2)):  # branches of branches give the fine ends
        vessels_next = []
        for pts, width, dark in parents:
            for _ in range(int(rng.integers(*per_vessel))):
                k = int(rng.integers(len(pts) // 5 + 1, len(pts) - 1))
                heading = math.atan2(*(pts[k + 1] - pts[k])[::-1])
                heading += rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
                child_w = width * (1 - 0.5 * k / len(pts)) * rng.uniform(0.45, 0.65)
                child = _walk(rng, pts[k], heading, rng.uniform(0.08, 0.22) * d, 0.008 * d, 0.09)
                vessels_next.append((child, child_w, dark))
        vessels += vessels_next
        parents = vessels_next
    return vessels


def _draw_polyline(layer: np.ndarray, pts: np.ndarray, width: float, value: int,
                   taper: float = 0.5) -> None:
    """Draw a polyline whose thickness falls linearly to `taper` x `width` (antialiased)."""
    n = len(pts) - 1
    for i in range(n):
        thick = max(1, round(width * (1 - (1 - taper) * i / n)))
        cv2.line(layer, _fx(pts[i]), _fx(pts[i + 1]), value, thick, cv2.LINE_AA, 4)


def _lesion_sites(rng: np.random.Generator, g: _Geometry, n: int,
                  near_fovea: float = 0.0) -> np.ndarray:
    """`n` lesion centres inside the visible field, away from the disc (n x 2)."""
    d, out = 2 * g.radius, []
    # Keep lesions clear of the frame (the field is clipped) so each is wholly visible.
    my, mx = min(0.03 * d, 0.1 * g.height), min(0.03 * d, 0.1 * g.width)
    for _ in range(100):  # bounded: a pathological aspect ratio yields fewer lesions, not a hang
        if len(out) >= n:
            break
        r = 0.85 * g.radius * np.sqrt(rng.random(64))
        a = rng.uniform(0, 2 * math.pi, 64)
        pts = np.stack([g.cx + r * np.cos(a), g.cy + r * np.sin(a)], axis=1)
        # Exudates gather around the macula (circinate rings); pull some sites towards it.
        pull = (rng.random(64) < near_fovea)[:, None] * rng.uniform(0.4, 0.8, (64, 1))
        pts = pts * (1 - pull) + np.array(g.fovea) * pull
        ok = ((pts[:, 1] > my) & (pts[:, 1] < g.height - my)
              & (pts[:, 0] > mx) & (pts[:, 0] < g.width - mx)
              & (np.hypot(pts[:, 0] - g.cx, pts[:, 1] - g.cy) < 0.85 * g.radius)
              & (np.hypot(pts[:, 0] - g.disc[0], pts[:, 1] - g.disc[1]) > 1.4 * g.disc_radius))
        out.extend(pts[ok][: n - len(out)])
    return np.array(out).reshape(-1, 2)


def _blobs(layer: np.ndarray, rng: np.random.Generator, centre: np.ndarray, radius: float,
           value: int, parts: int) -> None:
    """An irregular filled blob: the union of a few jittered, rotated ellipses."""
    for _ in range(parts):
        c = centre + rng.normal(0, 0.35 * radius, 2)
        axes = np.maximum(radius * rng.uniform(0.45, 1.0, 2), 0.6)
        cv2.ellipse(layer, _fx(c), _fx(axes), rng.uniform(0, 180), 0, 360, value, -1,
                    cv2.LINE_AA, 4)


# grade -> (microaneurysms, haemorrhages, exudate clusters, cotton-wool spots, new-vessel tufts)
_LESION_COUNTS = {
    0: ((0, 0), (0, 0), (0, 0), (0, 0), (0, 0)),
    1: ((1, 4), (0, 0), (0, 0), (0, 0), (0, 0)),
    2: ((4, 10), (2, 5), (1, 3), (0, 0), (0, 0)),
    3: ((8, 16), (6, 12), (3, 5), (1, 3), (0, 0)),
    4: ((12, 24), (12, 20), (5, 8), (2, 5), (1, 2)),
}


def _lesion_layers(rng: np.random.Generator, g: _Geometry,
                   grade: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 alpha layers: (red lesions, hard exudates, cotton-wool spots, new vessels)."""
    d = 2 * g.radius
    counts = [int(rng.integers(lo, hi + 1)) for lo, hi in _LESION_COUNTS[grade]]
    n_ma, n_haem, n_ex, n_cws, n_nv = counts
    red, exudates, cotton, new_vessels = (np.zeros((g.height, g.width), np.uint8) for _ in range(4))
    for centre in _lesion_sites(rng, g, n_nv) if n_nv else []:
        # New vessels: a tangle of thin, tortuous loops (thickness ~1/3 of a main vessel).
        for _ in range(int(rng.integers(4, 8))):
            loop = _walk(rng, centre, rng.uniform(0, 2 * math.pi), 0.06 * d, 0.004 * d, 0.6)
            _draw_polyline(new_vessels, loop, 0.003 * d, 230, taper=1.0)
    for c in _lesion_sites(rng, g, n_ma):  # microaneurysms: tiny round dots
        radius = int(round(rng.uniform(0.0025, 0.0055) * d * 16))
        cv2.circle(red, _fx(c), radius, int(rng.integers(200, 256)), -1, cv2.LINE_AA, 4)
    for c in _lesion_sites(rng, g, n_haem):  # blot haemorrhages
        _blobs(red, rng, c, rng.uniform(0.01, 0.025) * d, int(rng.integers(190, 250)),
               int(rng.integers(2, 6)))
    for c in _lesion_sites(rng, g, n_ex, near_fovea=0.6):  # hard exudates come in clusters
        for _ in range(int(rng.integers(3, 9))):
            _blobs(exudates, rng, c + rng.normal(0, 0.025 * d, 2), rng.uniform(0.006, 0.015) * d,
                   int(rng.integers(210, 256)), int(rng.integers(1, 4)))
    for c in _lesion_sites(rng, g, n_cws):
        _blobs(cotton, rng, c, rng.uniform(0.02, 0.035) * d, int(rng.integers(150, 200)), 3)
    return red, exudates, cotton, new_vessels


def _blend(img: np.ndarray, layer: np.ndarray, sigma: float, *,
           colour: tuple[float, ...] | np.ndarray | None = None,
           darken: np.ndarray | None = None) -> np.ndarray:
    """Soften `layer` (uint8 alpha) and blend it into `img` in place; return the soft alpha.

    Only pixels under the layer are touched: lesions and vessels cover a few % of the frame,
    and full-frame float arithmetic is what makes 4288x2848 renders slow.
    """
    soft = cv2.GaussianBlur(layer, (0, 0), sigma)
    idx = np.flatnonzero(soft)
    a = soft.ravel()[idx, None].astype(np.float32) / 255
    flat = img.reshape(-1, 3)  # a view: img is C-contiguous
    px = flat[idx]
    if darken is not None:
        flat[idx] = px * (1 - a * darken)
    else:
        flat[idx] = px + (np.asarray(colour, np.float32) - px) * a
    return soft


def render_fundus(rng: np.random.Generator, grade: int, width: int,
                  height: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one fundus photograph of ICDR `grade` (0-4).

    Returns (RGB uint8 image HxWx3, lesion mask HxW uint8 with 0/255). The mask marks every
    lesion drawn (see the module docstring); it is empty for grade 0. All randomness comes
    from `rng`, so the same generator state gives the same image.
    """
    if grade not in _LESION_COUNTS:
        raise InputError(f"grade: must be 0-4, got {grade!r}")
    if width < 64 or height < 64:
        raise InputError(f"width/height: must be >= 64, got {width}x{height}")
    g = _geometry(rng, width, height)
    d = 2 * g.radius
    img = _shading(rng, g)
    _draw_disc(img, rng, g)

    blur = max(0.5, 0.0012 * d)  # optics soften every drawn edge by about this many px
    vessels = np.zeros((height, width), np.uint8)
    for pts, w, dark in _vessel_tree(rng, g):
        _draw_polyline(vessels, pts, w, dark)
    red, exudates, cotton, new_vessels = _lesion_layers(rng, g, grade)

    # Vessels darken the underlying fundus (veins more than arteries); lesions replace it.
    red_col = np.array([rng.uniform(90, 130), rng.uniform(10, 30), rng.uniform(8, 20)], np.float32)
    vessel_tint = np.array([0.38, 0.62, 0.55], np.float32)  # red darkens least: vessels look red
    _blend(img, cv2.max(vessels, new_vessels), blur, darken=vessel_tint)
    mask = np.zeros((height, width), np.uint8)
    for layer, sigma, colour in ((red, blur, red_col), (exudates, blur, (250, 235, 140)),
                                 (cotton, 4 * blur, (235, 215, 185)), (new_vessels, blur, None)):
        if colour is None:  # new vessels: already blended with the vessels
            soft = cv2.GaussianBlur(layer, (0, 0), sigma)
        else:
            soft = _blend(img, layer, sigma, colour=colour)
        mask[soft > 64] = 255  # lesion pixels: where the lesion contributes > 25% of the colour

    # A sharp-ish field edge (a few px soft) with multiplicative sensor noise inside it; one
    # full-frame float op, because full-size frames make every such op cost ~0.1 s.
    ys, xs = np.ogrid[0:height, 0:width]
    r = np.sqrt((xs.astype(np.float32) - g.cx) ** 2 + (ys.astype(np.float32) - g.cy) ** 2)
    field = np.clip((g.radius - r) / max(1.0, 0.003 * d), 0, 1)
    img *= (field * (1 + 0.02 * rng.standard_normal(field.shape, dtype=np.float32)))[..., None]
    mask[field < 0.5] = 0
    return np.clip(img, 0, 255, out=img).astype(np.uint8), mask


def _block_grades(seed: int, split_id: int, block: int) -> list[int]:
    """Grades of images 4*block .. 4*block+3: two NRDR (0-1) and two RDR (2-4), shuffled.

    Blocks of four keep every split of >= 4 images balanced between the classes, and seeding
    per block keeps an image's grade independent of the split size.
    """
    rng = np.random.default_rng([seed, split_id, _GRADE_STREAM, block])
    grades = [int(rng.choice([0, 1], p=[0.7, 0.3])) for _ in range(2)]
    grades += [int(rng.choice([2, 3, 4], p=[0.4, 0.35, 0.25])) for _ in range(2)]
    return [grades[i] for i in rng.permutation(4)]


def _write_image(path: Path, image: np.ndarray, params: list[int]) -> None:
    """Encode `image` by the suffix of `path` (.jpg/.png) and write it."""
    # imencode + write_bytes instead of imwrite: imwrite only returns False on failure and
    # mishandles non-ASCII paths on Windows; this raises a real OSError naming the file.
    ok, buf = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise DrtuneError(f"{path}: OpenCV could not encode the image")
    path.write_bytes(buf.tobytes())


def make_synthetic(out: Path | str, n_train: int = 48, n_test: int = 12, width: int = 640,
                   height: int = 426, seed: int = 0, jpeg_quality: int = 92, *,
                   progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Write a synthetic data set in IDRiD "Disease Grading" layout under `out`.

    Contract: `out` must not exist or be an empty directory (else InputError, nothing touched);
    the set is built in a hidden temporary sibling directory and renamed into place, so a
    crash never leaves a half-written `out`. The same arguments give byte-identical files.
    `progress(done, total)` is called after each image, for a progress bar.
    """
    checks = [("n_train", n_train, n_train >= 1, ">= 1"), ("n_test", n_test, n_test >= 0, ">= 0"),
              ("width", width, width >= 64, ">= 64"), ("height", height, height >= 64, ">= 64"),
              ("seed", seed, seed >= 0, ">= 0"),
              ("jpeg_quality", jpeg_quality, 1 <= jpeg_quality <= 100, "in 1..100")]
    for name, value, ok, rule in checks:
        if not ok or not isinstance(value, int) or isinstance(value, bool):
            flag = "--" + name.replace("_", "-")  # the command-line spelling users typed
            raise InputError(f"{flag}: must be an integer {rule}, got {value!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists and is not empty; choose another directory")
    total, done = n_train + n_test, 0
    grades: dict[str, list[int]] = {}
    # mkdtemp makes the folder private (0700); the data set should be readable as usual.
    # os.replace (rename(2)) replaces an empty directory atomically; a non-empty one raced in fails.
    with atomic_dir(out, mode=0o755) as tmp:
        for split, n in ((TRAIN, n_train), (TEST, n_test)):
            images_dir, labels_csv, masks_dir = (tmp / p for p in SYNTH_LAYOUT[split])
            for p in (images_dir, labels_csv.parent, masks_dir):
                p.mkdir(parents=True, exist_ok=True)
            split_id, rows = _SPLIT_IDS[split], []
            grades[split] = [_block_grades(seed, split_id, i // 4)[i % 4] for i in range(n)]
            for i, grade in enumerate(grades[split]):
                name = f"IDRiD_{i + 1:03d}"
                rng = np.random.default_rng([seed, split_id, _IMAGE_STREAM, i])
                image, mask = render_fundus(rng, grade, width, height)
                _write_image(images_dir / f"{name}.jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                             [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                _write_image(masks_dir / f"{name}.png", mask, [])
                # Macular-edema risk is not used by drtune; IDRiD has it, so fill it plausibly.
                label_rng = np.random.default_rng([seed, split_id, _LABEL_STREAM, i])
                rows.append((name, grade, int(label_rng.integers(0, 3)) if grade >= 2 else 0))
                done += 1
                if progress is not None:
                    progress(done, total)
            with labels_csv.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(LABEL_HEADER)
                writer.writerows(rows)
    return SynthSummary(root=out, n_train=n_train, n_test=n_test, grades=grades)
