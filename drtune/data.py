"""TFRecord shards -> tf.data pipelines for training and evaluation (TensorFlow ops only).

Training: parse -> decode (cached in memory) -> balance classes by sampling -> batch ->
augment the whole batch with per-image random parameters -> prefetch.
Evaluation: parse -> decode (cached) -> batch -> float32 -> prefetch, in meta.json order.

Augmentation runs after batching, on uint8 batches, as one XLA-compiled kernel per batch with
per-image parameters: far cheaper on a 2-core CPU than B per-image maps. Everything is
stateless and seeded, so a given seed reproduces the same batches.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from drtune.config import AUGMENT_LEVELS  # the names; their strengths live here (_PARAMS)
from drtune.errors import InputError
from drtune.runs import CLASS_NAMES, META_JSON, TRAIN, load_meta

# Strengths. ``base`` reproduces the original project's ImageDataGenerator ranges, except that
# shear is in radians here: Keras read ``shear_range=0.05`` as degrees, which is a no-op.
# ``strong`` is for fine-tuning: a fundus has no "up", so any rotation is a valid view.
# ``rotate`` trains on that fact with milder everything else: any angle, but a little shift, zoom,
# shear and brightness (``base``'s brightness 0.5-1.3 moves a Graham-normalised image's grey
# background by up to half, and its zoom 0.7 crops the periphery off).
_PARAMS: dict[str, dict[str, Any]] = {
    "none": dict(rotation_deg=0.0, shift=0.0, zoom=(1.0, 1.0), shear_rad=0.0,
                 brightness=(1.0, 1.0), flip=False, contrast=0.0, saturation=0.0),
    "base": dict(rotation_deg=5.0, shift=0.15, zoom=(0.7, 1.2), shear_rad=0.05,
                 brightness=(0.5, 1.3), flip=True, contrast=0.0, saturation=0.0),
    "rotate": dict(rotation_deg=180.0, shift=0.05, zoom=(0.9, 1.1), shear_rad=0.02,
                   brightness=(0.9, 1.1), flip=True, contrast=0.0, saturation=0.0),
    "strong": dict(rotation_deg=180.0, shift=0.1, zoom=(0.85, 1.15), shear_rad=0.1,
                   brightness=(0.6, 1.4), flip=True, contrast=0.1, saturation=0.1),
}

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "name": tf.io.FixedLenFeature([], tf.string),
}
# Features read beside the images (and by the training pipeline for soft targets only). A
# record without a grade (written by hand, not by `prepare`) reads -1 rather than failing.
_SIDE_FEATURES = {"grade": tf.io.FixedLenFeature([], tf.int64, default_value=-1)}


def augment_params(level: str) -> dict[str, Any]:
    """The strengths of augmentation ``level`` (a copy).

    Keys: ``rotation_deg`` (uniform +-; 180 means any angle), ``shift`` (fraction of the side,
    uniform +-), ``zoom`` (sampling-scale range: >1 shows more of the image, smaller, as in
    Keras; one factor for both axes where Keras drew two), ``shear_rad`` (uniform +-, radians),
    ``brightness`` (multiplier range), ``flip`` (horizontal and vertical, p=0.5 each),
    ``contrast``/``saturation`` (jitter factor 1 +- this).
    """
    if level not in _PARAMS:
        raise InputError(f"augment level {level!r}: must be one of {', '.join(AUGMENT_LEVELS)}")
    return dict(_PARAMS[level])


def _transforms(u: tf.Tensor, p: dict[str, Any], height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """[B, 8] projective transforms (output pixel -> input pixel) from uniforms ``u`` [B, >=6].

    The sampling matrix is M = R(theta) @ Shear(phi) @ diag(z*fx, z*fy), which multiplies out to
    [[a cos t, -b sin(t+phi)], [a sin t, b cos(t+phi)]] with a = z*fx, b = z*fy; it acts about
    the image centre, and the shift is added in input coordinates (Keras' convention).
    """
    def rng(col: int, lo: float, hi: float) -> tf.Tensor:
        return lo + (hi - lo) * u[:, col]

    rot = math.radians(p["rotation_deg"])
    theta = rng(0, -rot, rot)
    phi = rng(1, -p["shear_rad"], p["shear_rad"])
    zoom = rng(2, *p["zoom"])
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    tx = rng(3, -p["shift"], p["shift"]) * w
    ty = rng(4, -p["shift"], p["shift"]) * h
    if p["flip"]:
        # Two independent fair coins from one uniform: its halves and the parity of its quarters.
        fx = tf.where(u[:, 5] < 0.5, -1.0, 1.0)
        fy = tf.where(tf.math.floormod(u[:, 5] * 4.0, 2.0) < 1.0, -1.0, 1.0)
    else:
        fx = fy = tf.ones_like(theta)
    a, b = zoom * fx, zoom * fy
    m00, m01 = a * tf.cos(theta), -b * tf.sin(theta + phi)
    m10, m11 = a * tf.sin(theta), b * tf.cos(theta + phi)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a2 = cx + tx - m00 * cx - m01 * cy
    b2 = cy + ty - m10 * cx - m11 * cy
    zero = tf.zeros_like(theta)
    return tf.stack([m00, m01, a2, m10, m11, b2, zero, zero], axis=1)


def _warp(images: tf.Tensor, transforms: tf.Tensor, brightness: tf.Tensor) -> tf.Tensor:
    """Affine bilinear warp with zero fill, times ``brightness`` [B], clipped (for XLA).

    Computes what ``ImageProjectiveTransformV3(interpolation='BILINEAR', fill_mode='CONSTANT',
    fill_value=0)`` computes for affine transforms (the tests check it), but 3-4x cheaper on
    CPU: that kernel evaluates the coordinate mapping once per channel on one thread, while XLA
    fuses the mapping, four gathers of whole RGB pixels and the blend into one loop. (Unlike the
    model, this is faster under XLA on a 2-core CPU: ~0.5 vs ~2.1 CPU ms per 256 px image.)
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    # One flat pixel table for the whole batch: cheaper under XLA than a batched gather.
    flat = tf.reshape(images, [batch * height * width, 3])
    first = (tf.range(batch) * height * width)[:, None, None]
    t = transforms[:, :, None, None]
    xs = tf.cast(tf.range(width), tf.float32)[None, None, :]
    ys = tf.cast(tf.range(height), tf.float32)[None, :, None]
    x_in = t[:, 0] * xs + t[:, 1] * ys + t[:, 2]
    y_in = t[:, 3] * xs + t[:, 4] * ys + t[:, 5]
    x0, y0 = tf.floor(x_in), tf.floor(y_in)

    def neighbours(i0: tf.Tensor, frac: tf.Tensor, n: tf.Tensor) -> tuple[tf.Tensor, ...]:
        # A neighbour outside the image gets weight 0 (the fill) and a harmless clamped index.
        i0 = tf.cast(i0, tf.int32)
        i1 = i0 + 1
        w0 = tf.where((i0 >= 0) & (i0 < n), 1.0 - frac, 0.0)
        w1 = tf.where((i1 >= 0) & (i1 < n), frac, 0.0)
        return tf.clip_by_value(i0, 0, n - 1), tf.clip_by_value(i1, 0, n - 1), w0, w1

    xa, xb, wxa, wxb = neighbours(x0, x_in - x0, width)
    ya, yb, wya, wyb = neighbours(y0, y_in - y0, height)
    b = brightness[:, None, None]  # folded into the weights: the blend is linear

    def tap(y: tf.Tensor, x: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
        pixel = tf.gather(flat, first + y * width + x)
        return tf.cast(pixel, tf.float32) * (weight * b)[..., None]

    out = (tap(ya, xa, wya * wxa) + tap(ya, xb, wya * wxb)
           + tap(yb, xa, wyb * wxa) + tap(yb, xb, wyb * wxb))
    return tf.clip_by_value(out, 0.0, 255.0)


@tf.function(jit_compile=True)
def _jitter(images: tf.Tensor, saturation: tf.Tensor, contrast: tf.Tensor) -> tf.Tensor:
    """Per-image saturation and contrast factors [B] applied to the unwarped images.

    Done before the warp, in its own kernel: the warp is linear, so saturation commutes with
    it, and cross-channel maths fused into the warp made XLA redo the gathers per channel.
    Contrast is about the mean of the retina field, and fades out below grey level 16, so that
    lowering contrast does not lift the black surround (or its JPEG noise) towards grey.
    """
    x = tf.cast(images, tf.float32)
    gray = tf.reduce_mean(x, axis=-1, keepdims=True)
    field = tf.cast(gray > 16.0, tf.float32)
    mean = tf.reduce_sum(gray * field, axis=[1, 2, 3], keepdims=True) / tf.maximum(
        tf.reduce_sum(field, axis=[1, 2, 3], keepdims=True), 1.0)
    x = gray + saturation[:, None, None, None] * (x - gray)
    contrasted = mean + contrast[:, None, None, None] * (x - mean)
    return x + tf.clip_by_value(gray / 16.0, 0.0, 1.0) * (contrasted - x)


@tf.function(jit_compile=True)
def _geometry(images: tf.Tensor, u: tf.Tensor, level: str) -> tf.Tensor:
    # Transforms and warp in one XLA call: run op by op, the small ops that build the
    # transforms added ~10% to the augmentation cost at batch 4.
    p = _PARAMS[level]
    shape = tf.shape(images)
    lo, hi = p["brightness"]
    return _warp(images, _transforms(u, p, shape[1], shape[2]), lo + (hi - lo) * u[:, 8])


def augment(images: tf.Tensor, level: str, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Augment a BATCH [B,H,W,3] float32 0..255 with per-image random parameters; works eagerly and inside tf.data/tf.function.

    Rotation, shift, zoom, shear and flips form one affine transform per image, applied in a
    single bilinear resampling whose fill is 0, so the black surround stays black; a brightness
    factor and clipping to 0..255 follow. ``strong`` first jitters saturation and contrast.
    ``seed``: int shape-[2] tensor for stateless, repeatable draws; None draws a fresh one.
    uint8 input is accepted (and cast inside the fused kernel); a single image [H,W,3] too.
    Returns float32; ``level='none'`` returns the input unchanged (cast to float32).
    """
    p = augment_params(level)
    images = tf.convert_to_tensor(images)
    if level == "none":
        return tf.cast(images, tf.float32)
    single = images.shape.rank == 3
    if single:
        images = images[tf.newaxis]
    if seed is None:
        seed = tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    shape = tf.shape(images)
    # One stateless draw of every per-image parameter, outside XLA (whose random bit generator
    # may differ): columns are independent streams.
    u = tf.random.stateless_uniform([shape[0], 9], seed=tf.cast(seed, tf.int64))
    if p["saturation"] or p["contrast"]:
        images = _jitter(images, 1.0 + p["saturation"] * (2.0 * u[:, 6] - 1.0),
                         1.0 + p["contrast"] * (2.0 * u[:, 7] - 1.0))
    out = _geometry(images, u, level)
    return out[0] if single else out


# --------------------------------------------------------------------------- reading


def _split_meta(data_dir: Path, split: str, meta: dict | None) -> tuple[dict, int, list[str]]:
    """(split entry, image size, shard paths) with clear errors; empty split -> InputError."""
    meta = meta if meta is not None else load_meta(data_dir)
    if split not in meta["splits"]:
        raise InputError(f"{data_dir}: no split {split!r} in {META_JSON} "
                         f"(have {', '.join(meta['splits'])})")
    entry = meta["splits"][split]
    if not entry.get("n") or not entry.get("files"):
        raise InputError(f"{data_dir}: split {split!r} is empty")
    files = [str(data_dir / f) for f in entry["files"]]
    for f in files:
        if not os.path.isfile(f):
            raise InputError(f"{f}: shard listed in {META_JSON} is missing")
    return entry, int(meta["size"]), files


def _records(files: list[str]) -> tf.data.Dataset:
    # Files are read one after another, not interleaved: eval order must equal meta order.
    return tf.data.TFRecordDataset(files, buffer_size=1 << 22)


def _options(deterministic: bool = True) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    return options


def _cache_budget() -> int:
    """Bytes of decoded images we are willing to hold in RAM: min(4 GiB, RAM/4)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # non-POSIX: assume a small machine
        ram = 8 << 30
    return min(4 << 30, ram // 4)


def decode_image(jpeg: tf.Tensor | bytes, size: int, out: int | None = None) -> tf.Tensor:
    """JPEG bytes of a ``size`` crop -> uint8 [out, out, 3]; the one decode every consumer uses.

    ``predict`` and ``gradcam`` call this too, so a raw photograph reaches the model exactly as
    its prepared record would.
    """
    out = out or size
    img = tf.io.decode_jpeg(jpeg, channels=3)
    img = tf.ensure_shape(img, [size, size, 3])
    if out != size:
        method = "area" if out < size else "bilinear"
        img = tf.image.resize(img, [out, out], method=method)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
    return img


def _label(ex: dict) -> tf.Tensor:
    return tf.cast(ex["label"], tf.int32)


def _grade(ex: dict) -> tf.Tensor:
    return tf.cast(ex["grade"], tf.int32)


def _check_graded(data_dir: Path, entry: dict) -> None:
    """Every training record has an ICDR grade (``prepare`` writes one; meta.json counts them)."""
    graded = sum(int(v) for v in entry.get("grades", {}).values())
    if graded != int(entry["n"]):
        raise InputError(f"{data_dir}: split {TRAIN!r} has {graded} graded of {entry['n']} "
                         "records (meta.json 'grades'): model.head = \"grade\" trains on ICDR grades; "
                         "prepare the data with `drtune prepare` from a grade CSV, or use model.head = \"referral\"")


def borderline_targets(borderline: float, rdr_grade: int = 2) -> tf.Tensor:
    """float32 [5, 2] training targets (P(NRDR), P(RDR)) of ICDR grades 0-4.

    The grade just below the referral grade gets P(RDR) = ``borderline`` and the referral grade
    itself 1 - ``borderline``; every other grade keeps its hard label. Grades 1 and 2 are where
    graders disagree most, and a mild eye's microaneurysms are the first sign of what makes an
    eye referable: soft targets there tell the network so, instead of asking it for certainty.
    """
    p_rdr = [float(g >= rdr_grade) for g in range(5)]
    p_rdr[rdr_grade - 1], p_rdr[rdr_grade] = borderline, 1.0 - borderline
    return tf.constant([[1.0 - p, p] for p in p_rdr], tf.float32)


def _target(table: tf.Tensor) -> Any:
    """Parsed example -> its row of :func:`borderline_targets` (a record without grade: its label)."""
    def target(ex: dict) -> tf.Tensor:
        hard = tf.one_hot(tf.cast(ex["label"], tf.int32), 2)
        soft = tf.gather(table, tf.clip_by_value(tf.cast(ex["grade"], tf.int32), 0, 4))
        return tf.where(ex["grade"] >= 0, soft, hard)
    return target


def _decoded(ds: tf.data.Dataset, size: int, image_size: int | None, n: int, cache: bool,
             what: str, target: Any = _label) -> tuple[tf.data.Dataset, int]:
    """Parsed examples -> (uint8 image [S,S,3], ``target(example)``), resized and cached if it fits.

    ``target`` is the int32 label by default (soft targets: :func:`_target`). Also returns a
    shuffle buffer size: the whole set when cached (the buffer then holds references to cached
    tensors), else a bounded one. Resizing happens before the cache, so the (deterministic)
    resize runs once per image rather than once per epoch.
    """
    out = image_size or size

    def decode(ex: dict) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_image(ex["image"], size, out), target(ex)

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    need, budget = n * out * out * 3, _cache_budget()
    if cache and need <= budget:
        return ds.cache(), min(n, 1 << 16)
    if cache:
        logging.info("%s: not caching decoded images (%.2f GB > budget %.2f GB)",
                     what, need / 2**30, budget / 2**30)
    return ds, min(n, 1024)


def _parse(raw: tf.Tensor) -> dict:
    return tf.io.parse_single_example(raw, _FEATURES)


def class_counts(data_dir: Path | str, meta: dict, why: str) -> list[int]:
    """[NRDR, RDR] image counts of the training split (meta.json's ``nrdr``, ``rdr``).

    Balancing needs both classes: a missing one is an InputError that names the data folder,
    the class, and what could not be done (``why``).
    """
    entry = meta["splits"][TRAIN]
    counts = [int(entry[name.lower()]) for name in CLASS_NAMES]
    for label, count in enumerate(counts):
        if count == 0:
            raise InputError(f"{data_dir}: split {TRAIN!r} has no {CLASS_NAMES[label]} images; cannot {why}")
    return counts


def train_dataset(
    data_dir: Path | str,
    batch_size: int,
    augment_level: str = "base",
    seed: int = 0,
    balance: bool = True,
    cache: bool = True,
    image_size: int | None = None,
    meta: dict | None = None,
    steps_per_epoch: int = 0,
    initial_epoch: int = 0,
    borderline: float = 0.0,
    grades: bool = False,
) -> tuple[tf.data.Dataset, int]:
    """Infinite (repeat) dataset of (float32 images 0..255 [B,S,S,3], int32 labels [B]) and steps_per_epoch.

    ``borderline`` > 0: the targets are float32 [B, 2] class probabilities instead, soft for the
    grades either side of the referral grade (:func:`borderline_targets`). ``grades``: the
    targets are the int32 ICDR grades 0-4 (a grade-head model's); every record must carry one.

    ``balance``: draw NRDR and RDR with probability 0.5 each (the minority class is oversampled
    at read time); an epoch is then ceil(2 * majority / batch_size) steps, i.e. the majority
    class seen once, as if the minority had been duplicated on disk. Without balancing an epoch
    is ceil(n / batch_size). The same ``seed`` gives the same sequence of batches.

    ``steps_per_epoch`` (0: the pass above) and ``initial_epoch`` mean what they mean to Keras'
    ``fit``, which must get the same values: the first batch is the one at global step
    ``initial_epoch * steps_per_epoch``, so a resumed run sees exactly the batches (images,
    classes, augmentation) an uninterrupted run would see from there on. The augmentation seed
    is the global step, and the consumed elements are skipped before batching and augmentation:
    only references pass when the decoded images are cached; without the cache they are decoded.
    """
    augment_params(augment_level)  # validate before any IO
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: must be >= 1")
    if steps_per_epoch < 0 or initial_epoch < 0:
        raise InputError(f"steps per epoch {steps_per_epoch}, initial epoch {initial_epoch}: must be >= 0")
    data_dir = Path(data_dir)
    meta = meta if meta is not None else load_meta(data_dir)
    entry, size, files = _split_meta(data_dir, TRAIN, meta)
    if borderline:
        table = borderline_targets(borderline, int(meta.get("rdr_grade", 2)))
        spec, target = {**_FEATURES, **_SIDE_FEATURES}, _target(table)
    elif grades:
        _check_graded(data_dir, entry)
        spec, target = {**_FEATURES, **_SIDE_FEATURES}, _grade
    else:
        spec, target = _FEATURES, _label
    parsed = _records(files).map(lambda raw: tf.io.parse_single_example(raw, spec),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if balance:
        counts = class_counts(data_dir, meta, "balance classes (use balance=False)")
        branches = []
        for label, count in enumerate(counts):
            # Filter on the parsed label before decoding, so each JPEG is decoded once and each
            # class keeps its own cache (and a shuffle buffer as large as the class).
            ds = parsed.filter(lambda ex, lab=label: tf.equal(ex["label"], lab))
            ds, buffer = _decoded(ds, size, image_size, count, cache, f"{data_dir}:{TRAIN}[{label}]", target)
            branches.append(ds.shuffle(buffer, seed=seed + 1 + label).repeat())
        ds = tf.data.Dataset.sample_from_datasets(branches, weights=[0.5, 0.5], seed=seed)
        steps = math.ceil(2 * max(counts) / batch_size)
    else:
        ds, buffer = _decoded(parsed, size, image_size, entry["n"], cache, f"{data_dir}:{TRAIN}", target)
        ds = ds.shuffle(buffer, seed=seed + 1).repeat()
        steps = math.ceil(entry["n"] / batch_size)
    steps = steps_per_epoch or steps
    initial_step = initial_epoch * steps
    if initial_step:
        # The shuffles and the class sampling are one seeded stream over the whole run, so a
        # resumed run continues it by position rather than re-seeding it.
        ds = ds.skip(initial_step * batch_size)
    ds = ds.batch(batch_size, drop_remainder=True).enumerate(start=initial_step)

    def aug(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        # The global step makes each batch's stateless seed distinct yet repeatable, and the
        # same in a resumed run as in an uninterrupted one.
        images, labels = batch
        return augment(images, augment_level, tf.stack([tf.constant(seed, tf.int64), step])), labels

    ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options()), steps


def eval_dataset(
    data_dir: Path | str,
    split: str,
    batch_size: int = 32,
    cache: bool = True,
    image_size: int | None = None,
    meta: dict | None = None,
) -> tf.data.Dataset:
    """Finite dataset of (float32 images 0..255 [b,S,S,3], int32 labels [b]) of ``split``.

    Deterministic, unaugmented, unbalanced, in meta.json ``names`` order; the last batch may be
    smaller. The same order as :func:`split_labels` and :func:`split_names`.
    """
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: must be >= 1")
    data_dir = Path(data_dir)
    entry, size, files = _split_meta(data_dir, split, meta)
    ds = _records(files).map(_parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _decoded(ds, size, image_size, entry["n"], cache, f"{data_dir}:{split}")[0]
    # meta.json knows the count: stating it lets Keras size predict() instead of warning that
    # the input "ran out of data" at the end of every pass.
    ds = ds.apply(tf.data.experimental.assert_cardinality(int(entry["n"])))
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y),
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _field(data_dir: Path | str, split: str, meta: dict | None, key: str) -> list:
    """One small feature of every example of ``split``, in eval order (images are not decoded)."""
    data_dir = Path(data_dir)
    _, _, files = _split_meta(data_dir, split, meta)
    spec = {key: _FEATURES.get(key) or _SIDE_FEATURES[key]}
    ds = _records(files).map(lambda raw: tf.io.parse_single_example(raw, spec)[key],
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return list(ds.batch(4096).with_options(_options()).as_numpy_iterator())


def split_labels(data_dir: Path | str, split: str, meta: dict | None = None) -> np.ndarray:
    """int32 labels of ``split`` in :func:`eval_dataset` order."""
    return np.concatenate(_field(data_dir, split, meta, "label")).astype(np.int32)


def split_names(data_dir: Path | str, split: str, meta: dict | None = None) -> list[str]:
    """Image names of ``split`` in :func:`eval_dataset` order."""
    return [n.decode("utf-8") for chunk in _field(data_dir, split, meta, "name") for n in chunk]


def split_grades(data_dir: Path | str, split: str, meta: dict | None = None) -> np.ndarray:
    """int32 ICDR grades (0-4; -1 when a record has none) of ``split`` in :func:`eval_dataset` order."""
    return np.concatenate(_field(data_dir, split, meta, "grade")).astype(np.int32)
