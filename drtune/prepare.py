"""Fundus photographs + grades -> TFRecord shards + meta.json, written once, read by training.

The expensive work (JPEG decode, field detection, crop, resize, re-encode) runs in a pool of
worker threads using OpenCV/numpy, which release the GIL; TensorFlow only serialises the
shards. Output is built in a temporary directory beside the destination and renamed into place
only when complete, so a failed or interrupted run never leaves half a data set.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from drtune import __version__, runs
from drtune.config import NORMALIZATIONS
from drtune.errors import DrtuneError, InputError
from drtune.fundus import NoFieldError, preprocess
from drtune.labels import (
    LabelRow,
    Problem,
    compile_group_pattern,
    group_key,
    list_images,
    match,
    read_labels,
)
from drtune.runs import META_JSON, SPLITS, TEST, TRAIN, VAL

# TensorFlow alone is imported inside the functions that write shards: `drtune prepare` checks
# its options, reads the labels and decodes every photograph without it, so bad input is
# refused before TensorFlow's start-up of several seconds.

ON_ERROR: tuple[str, ...] = ("fail", "skip")


@dataclass(frozen=True)
class Source:
    """Where the photographs and grade CSVs are.

    Test images are optional; training images are too, for a test-only folder (external
    validation of a trained model on another site's photographs).
    """

    train_images: Path | None
    train_labels: Path | None
    test_images: Path | None = None
    test_labels: Path | None = None
    description: str = ""

    def inputs(self) -> list[Path]:
        """Every file or folder ``prepare`` reads; an output folder must hold none of them."""
        return [p for p in (self.train_images, self.train_labels, self.test_images, self.test_labels)
                if p is not None]


@dataclass(frozen=True)
class PrepareOptions:
    """Settings of one ``prepare`` run (all recorded in meta.json)."""

    size: int = 256
    val_fraction: float = 0.2
    rdr_grade: int = 2
    group_pattern: str | None = None
    seed: int = 0
    workers: int = 0  # 0: one per CPU core
    on_error: str = "fail"
    normalize: str = "none"
    jpeg_quality: int = 95
    shard_size: int = 512  # examples per shard: a few MB each at 256 px
    overwrite: bool = False

    def validate(self) -> None:
        """``InputError`` naming the flag (or field) of the first bad setting."""
        if not 32 <= self.size <= 4096:
            raise InputError(f"--size {self.size}: must be between 32 and 4096")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"--val-fraction {self.val_fraction}: must be between 0 and 1 (exclusive)")
        if not 1 <= self.rdr_grade <= 4:
            raise InputError(f"--rdr-grade {self.rdr_grade}: must be 1-4")
        if self.workers < 0:
            raise InputError(f"--workers {self.workers}: must be >= 0 (0 = all cores)")
        if self.on_error not in ON_ERROR:
            raise InputError(f"--on-error {self.on_error!r}: must be one of {', '.join(ON_ERROR)}")
        if self.normalize not in NORMALIZATIONS:
            raise InputError(
                f"--normalize {self.normalize!r}: must be one of {', '.join(NORMALIZATIONS)}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"--jpeg-quality {self.jpeg_quality}: must be 1-100")
        if self.shard_size < 1:  # no command-line flag: library callers and tests set it
            raise InputError(f"PrepareOptions.shard_size {self.shard_size}: must be >= 1")
        compile_group_pattern(self.group_pattern)


# --------------------------------------------------------------------------- sources


def _one(parent: Path, pattern: str, what: str) -> Path:
    hits = sorted(p for p in parent.glob(pattern))
    if len(hits) != 1:
        raise InputError(
            f"{parent}: expected one {what} matching {pattern!r}, found {len(hits)}"
        )
    return hits[0]


def find_idrid(root: Path) -> Source:
    """Locate IDRiD's "B. Disease Grading" layout at or below ``root``.

    Accepts the data set root (which holds ``B. Disease Grading``) or that folder itself, so users
    can point at whatever they unzipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: source folder not found")
    base = root
    if not any(base.glob("*Original Images*")):
        nested = [p for p in root.glob("*Disease Grading*") if p.is_dir()]
        if len(nested) != 1 or not any(nested[0].glob("*Original Images*")):
            raise InputError(
                f"{root}: not an IDRiD 'Disease Grading' folder (no '1. Original Images'); "
                "use --images DIR --labels CSV for other layouts"
            )
        base = nested[0]
    images = _one(base, "*Original Images*", "'Original Images' folder")
    truth = _one(base, "*Groundtruths*", "'Groundtruths' folder")
    train_images = _one(images, "a.*Train*", "training image folder")
    train_labels = _one(truth, "a.*Train*.csv", "training label CSV")
    test_dirs = sorted(images.glob("b.*Test*"))
    test_csvs = sorted(truth.glob("b.*Test*.csv"))
    return Source(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_dirs[0] if test_dirs and test_csvs else None,
        test_labels=test_csvs[0] if test_dirs and test_csvs else None,
        description=f"IDRiD layout at {base}",
    )


def resolve_source(
    src: Path | None,
    images: Path | None = None,
    labels: Path | None = None,
    test_images: Path | None = None,
    test_labels: Path | None = None,
) -> Source:
    """Turn the command-line arguments into a :class:`Source` (IDRiD auto-detection or explicit)."""
    if images is not None or labels is not None:
        if images is None or labels is None:
            raise InputError("--images and --labels must be given together")
        if (test_images is None) != (test_labels is None):
            raise InputError("--test-images and --test-labels must be given together")
        return Source(Path(images), Path(labels), test_images and Path(test_images),
                      test_labels and Path(test_labels), f"images {images}, labels {labels}")
    if src is None and test_images is not None and test_labels is not None:
        return Source(None, None, Path(test_images), Path(test_labels),
                      f"test images {test_images}, labels {test_labels}")
    if src is None:
        if (test_images is None) != (test_labels is None):
            raise InputError("--test-images and --test-labels must be given together")
        raise InputError("give a source folder (IDRiD layout), --images DIR --labels CSV, or "
                         "--test-images DIR --test-labels CSV alone for a test-only folder")
    return find_idrid(Path(src))


# --------------------------------------------------------------------------- images


class ImageError(ValueError):
    """An image file that cannot be turned into a crop; the message says why."""


def _reduce_flag(width: int, height: int, size: int) -> int:
    """The OpenCV decode flag that shrinks the most while keeping the field >= ``size`` pixels.

    libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, so a 4288x2848 photo decodes at 536x356
    several times faster than at full size — the main speed-up of ``prepare``.
    """
    short = min(width, height)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if short / factor >= size:
            return flag
    return cv2.IMREAD_COLOR


def _jpeg_has_end(data: bytes) -> bool:
    """Whether a JPEG's image data is followed by an end-of-image marker (FFD9).

    Walks the marker segments to the first start-of-scan, so an EXIF thumbnail's own end marker
    (inside APP1) does not count, then looks for FFD9 anywhere after it: inside entropy-coded
    data every FF byte is followed by 00 or a restart marker, so the first FFD9 is the image's
    end, however much is appended after it (motion photos carry a whole video there).
    """
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break  # not a marker where one must be: let the decoder judge the damage
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xDA:
            return data.find(b"\xff\xd9", i + 2) != -1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return data.find(b"\xff\xd9", 2) != -1


def decode_photo(data: bytes, size: int) -> np.ndarray:
    """Decode a photograph's file bytes to RGB uint8 at the smallest resolution that still
    serves ``size`` (not to be confused with ``data.decode_image``, which decodes a prepared
    record's JPEG inside TensorFlow).

    Every way the bytes can be bad raises :class:`ImageError`, so that one hostile file (a
    truncated upload, a header claiming 30000x30000 pixels) stays that file's problem.
    """
    if not data:
        raise ImageError("file is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size  # reads the header only
    except Image.DecompressionBombError as exc:
        # PIL refuses headers above 2x its pixel limit (~179 Mpx) before allocating anything;
        # no fundus camera comes near that, so it is a damaged or malicious file.
        raise ImageError(f"image too large (header claims more than {2 * Image.MAX_IMAGE_PIXELS} "
                         "pixels; a damaged file or a decompression bomb)") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError("not an image file (cannot identify format)") from exc
    if data[:2] == b"\xff\xd8" and not _jpeg_has_end(data):
        # libjpeg fills a truncated scan with grey and only prints a warning, so check the end
        # marker ourselves rather than train on half-grey photos.
        raise ImageError("truncated JPEG (no end-of-image marker)")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, _reduce_flag(width, height, size))
    except (cv2.error, MemoryError) as exc:  # OpenCV's own pixel limit, or no memory for it
        raise ImageError(f"cannot be decoded ({width}x{height}: {str(exc).strip()[:200]})") from exc
    if bgr is None:
        raise ImageError("cannot be decoded (corrupt image data)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def preprocess_file(path: Path | str, size: int = 256, normalize: str = "none") -> np.ndarray:
    """Read a photograph and apply exactly the ``prepare`` preprocessing; RGB uint8 size x size x 3.

    ``predict`` and ``gradcam`` call this on raw photographs so that a model always sees images
    prepared the way its training data was.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})") from exc
    rgb = decode_photo(data, size)
    try:
        return preprocess(rgb, size=size, normalize=normalize)
    except NoFieldError as exc:
        raise ImageError(str(exc)) from exc  # NoFieldError says "no retina field found: why"


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """RGB uint8 -> JPEG bytes (what the TFRecord ``image`` feature holds)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover - OpenCV only fails here on invalid arrays
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def _work(job: tuple[str, int, str, int]) -> tuple[bytes | None, str | None]:
    """Worker entry point: one photo -> (JPEG crop, None) or (None, reason)."""
    path, size, normalize, quality = job
    try:
        return encode_jpeg(preprocess_file(path, size, normalize), quality), None
    except ImageError as exc:
        return None, str(exc)


def _process(jobs: list[tuple[str, int, str, int]], workers: int) -> Iterator[tuple[bytes | None, str | None]]:
    """Run :func:`_work` over ``jobs`` in order, in ``workers`` threads (1: in this thread).

    Threads, not processes: OpenCV releases the GIL in decode, resize and encode, which are
    nearly all of the work, and threads are immune to the ways worker processes fail (a forked
    child deadlocking on OpenCV's or TensorFlow's thread pools; a spawned child re-running a
    script that lacks a ``__main__`` guard).
    """
    # Each job is single-threaded inside OpenCV; parallelism comes from the pool alone, which
    # avoids nested thread pools oversubscribing the cores.
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        if workers <= 1 or len(jobs) < 2:
            yield from map(_work, jobs)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(_work, jobs)
    finally:
        cv2.setNumThreads(previous)


class Progress:
    """A line every few seconds (and at the end) with count, rate and ETA."""

    def __init__(self, total: int, what: str, every_s: float = 5.0) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.start = self.last = time.monotonic()
        self.done = 0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logging.info("%s: %d/%d (%.1f/s, ETA %.0fs)", self.what, self.done, self.total, rate, eta)


# --------------------------------------------------------------------------- splits


def split_train_val(
    rows: list[LabelRow], val_fraction: float, rdr_grade: int, group_pattern: str | None, seed: int
) -> tuple[list[LabelRow], list[LabelRow]]:
    """Carve a validation split from the training rows, stratified by label, grouping by pattern.

    Groups (e.g. both eyes of one patient) are the unit that is split, so no group straddles
    train and val; a group counts as referable if any of its images is, which keeps the RDR
    share of both splits close to the whole set's.
    """
    pattern = compile_group_pattern(group_pattern)
    groups: dict[str, list[LabelRow]] = {}
    for row in rows:
        groups.setdefault(group_key(row.name, pattern), []).append(row)
    if pattern is not None and len(groups) == len(rows):
        logging.warning("--group-pattern %r groups no two images (matched %d of %d names): "
                        "every image is its own group", group_pattern,
                        sum(bool(pattern.search(r.name)) for r in rows), len(rows))
    keys = sorted(groups)
    if len(keys) < 2:
        raise InputError(
            f"only {len(keys)} image group(s) in the training set: cannot carve a validation split"
        )
    y = [int(any(r.grade >= rdr_grade for r in groups[k])) for k in keys]
    n_val = max(1, round(len(keys) * val_fraction))
    n_val = min(n_val, len(keys) - 1)
    counts = Counter(y)
    stratify = y if len(counts) > 1 and min(counts.values()) >= 2 and n_val >= len(counts) else None
    if stratify is None:
        logging.warning("validation split is not stratified: too few images (or groups) of one class")
    train_keys, val_keys = train_test_split(keys, test_size=n_val, stratify=stratify, random_state=seed)
    return ([r for k in sorted(train_keys) for r in groups[k]],
            [r for k in sorted(val_keys) for r in groups[k]])


# --------------------------------------------------------------------------- output


# One example of a TFRecord shard: (JPEG crop, label 0 NRDR / 1 RDR, ICDR grade, image name).
_Example = tuple[bytes, int, int, str]


def serialize_example(image: bytes, label: int, grade: int, name: str) -> bytes:
    """One TFRecord example with the stable feature names of docs/architecture.md."""
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "grade": tf.train.Feature(int64_list=tf.train.Int64List(value=[grade])),
        "name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(folder: Path, split: str, examples: list[_Example], shard_size: int) -> list[str]:
    """Write ``examples`` to ``split-XXXXX-of-YYYYY.tfrecord`` files; return their names."""
    import tensorflow as tf

    if not examples:
        return []
    n_shards = math.ceil(len(examples) / shard_size)
    names = []
    for s in range(n_shards):
        name = f"{split}-{s:05d}-of-{n_shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for ex in examples[s * shard_size:(s + 1) * shard_size]:
                writer.write(serialize_example(*ex))
        names.append(name)
    return names


@dataclass
class _Plan:
    """The graded photographs of one split, in the order they are written."""

    split: str
    rows: list[tuple[LabelRow, Path]] = field(default_factory=list)


def _bad_rows(problems: list[Problem]) -> set[str]:
    """Image names (stems) of CSV rows already reported as bad."""
    return {Path(p.name).stem for p in problems if p.name}


def _plan(source: Source, opts: PrepareOptions) -> tuple[list[_Plan], list[Problem]]:
    """Every split's photographs, and every problem of the input, found before any decoding so
    that ``--on-error fail`` can name them all at once."""
    if source.train_images is None or source.train_labels is None:
        plans, problems = [_Plan(TRAIN), _Plan(VAL)], []  # a test-only folder
    else:
        plans, problems = _plan_train(source.train_images, source.train_labels, opts)
    if source.test_images is None or source.test_labels is None:
        logging.warning("no test images given: the test split is empty")
        return plans + [_Plan(TEST)], problems
    test, test_problems = _plan_split(TEST, source.test_images, source.test_labels)
    return plans + [test], problems + test_problems


def _plan_split(split: str, images: Path, labels: Path) -> tuple[_Plan, list[Problem]]:
    """The rows of a grade CSV matched to the files of an image folder, in CSV order.

    A test CSV may have no rows (the test split is then empty); a training CSV may not. An
    image whose row was already reported as bad is not reported again as having no row.
    """
    rows, problems = read_labels(labels, allow_empty=split == TEST)
    if not rows and not problems:
        logging.warning("%s has no rows: the %s split is empty", labels, split)
        return _Plan(split), []
    found, p = list_images(images)
    problems += p
    pairs, p = match(rows, found, labels, images, _bad_rows(problems))
    return _Plan(split, pairs), problems + p


def _plan_train(images: Path, labels: Path, opts: PrepareOptions) -> tuple[list[_Plan], list[Problem]]:
    """The training photographs, with a validation split carved out (``split_train_val``)."""
    whole, problems = _plan_split(TRAIN, images, labels)
    if not whole.rows:
        raise InputError(f"{labels}: no row matches an image in {images}")
    by_name = {row.name: (row, path) for row, path in whole.rows}
    tr, va = split_train_val([r for r, _ in whole.rows], opts.val_fraction, opts.rdr_grade,
                             opts.group_pattern, opts.seed)
    # Training examples are shuffled once on disk so that every shard mixes classes; the
    # input pipeline shuffles again at read time.
    rng = np.random.default_rng(opts.seed)
    tr_pairs = [by_name[r.name] for r in tr]
    tr_pairs = [tr_pairs[i] for i in rng.permutation(len(tr_pairs))]
    return [_Plan(TRAIN, tr_pairs), _Plan(VAL, [by_name[r.name] for r in va])], problems


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def check_output(out: Path, source: Source, overwrite: bool) -> None:
    """Refuse an ``out`` that would destroy anything but an earlier ``prepare`` output.

    ``--overwrite`` on a folder that holds the photographs (``--out`` equal to, or above, the
    input) would delete them, so such an ``out`` is refused whatever the flags; an existing
    ``out`` is replaced only when it is empty or has a ``meta.json`` (a drtune data folder).
    """
    real_out = out.resolve()  # symlinks and '..' must not hide that out holds an input
    for path in source.inputs():
        real = path.resolve()
        if real == real_out or real_out in real.parents:
            raise InputError(f"--out {out}: is or contains the input {path}; choose a new folder "
                             "for the prepared data")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    _check_replaceable(out, overwrite)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """An existing ``out`` is replaced only with ``--overwrite`` and only if it is an earlier
    ``prepare`` output (or empty): checked before the work and again just before the swap."""
    if not overwrite:
        raise InputError(f"{out}: output directory already exists (use --overwrite to replace it)")
    if not (out / META_JSON).is_file() and any(out.iterdir()):
        raise InputError(f"{out}: not a 'drtune prepare' output (no {META_JSON}); --overwrite "
                         "replaces only those: remove it yourself or choose another --out")


def _write_failed(exc: BaseException, out: Path) -> DrtuneError:
    """A one-line error for a failed write (disk full, permissions) that says what to do."""
    tf = sys.modules.get("tensorflow")
    full = (tf is not None and isinstance(exc, tf.errors.ResourceExhaustedError)
            or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT))
    if full:
        return DrtuneError(f"{out.parent}: no space left on device while writing {out.name}; "
                           "nothing was written: free space there or choose another --out")
    detail = getattr(exc, "strerror", None) or getattr(exc, "message", None) or str(exc)
    where = getattr(exc, "filename", None) or out.parent
    return DrtuneError(f"{where}: cannot write ({detail}); nothing was written: fix that or "
                       "choose another --out")


def _is_tf_error(exc: BaseException) -> bool:
    """A TensorFlow I/O error (``ResourceExhaustedError`` on a full disk), without importing TF
    when it was never loaded."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(exc, tf.errors.OpError)


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is removed only after the swap."""
    if out.exists():
        _check_replaceable(out, overwrite)  # again: another process may have created it meanwhile
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_output(tmp: Path, examples: dict[str, list[_Example]],
                  problems: list[Problem], source: Source, opts: PrepareOptions) -> dict[str, Any]:
    """Write the shards of every split and ``meta.json`` into ``tmp``; return the meta dict."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        exs = examples.get(split, [])
        files = write_shards(tmp, split, exs, opts.shard_size)
        grades = Counter(g for _, _, g, _ in exs)
        splits[split] = {
            "n": len(exs),
            "nrdr": sum(1 for _, lab, _, _ in exs if lab == 0),
            "rdr": sum(1 for _, lab, _, _ in exs if lab == 1),
            "grades": {str(g): grades.get(g, 0) for g in range(5)},
            "files": files,
            "names": [n for _, _, _, n in exs],
        }
    meta = {
        "version": 1,
        "splits": splits,
        "size": opts.size,
        "rdr_grade": opts.rdr_grade,
        "normalize": opts.normalize,
        "jpeg_quality": opts.jpeg_quality,
        "val_fraction": opts.val_fraction,
        "group_pattern": opts.group_pattern,
        "seed": opts.seed,
        "source": source.description or str(source.train_images or source.test_images),
        "skipped": [{"name": p.name, "where": p.where, "reason": p.message} for p in problems],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "drtune_version": __version__,
        "bytes": 0,
    }
    meta["bytes"] = _dir_bytes(tmp)
    (tmp / META_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _make_examples(plans: list[_Plan], source: Source, opts: PrepareOptions
                   ) -> tuple[dict[str, list[_Example]], list[Problem]]:
    """Decode, crop and encode every planned photograph in the worker threads; a photograph
    that cannot be used becomes a problem, so the caller can fail on or skip all of them alike."""
    jobs = [(str(path), opts.size, opts.normalize, opts.jpeg_quality)
            for plan in plans for _, path in plan.rows]
    workers = opts.workers or os.cpu_count() or 1
    logging.info("preparing %d images (%s) with %d worker(s) at %dx%d",
                 len(jobs), source.description or source.train_images or source.test_images, workers,
                 opts.size, opts.size)
    progress = Progress(len(jobs), "prepare")
    results = iter(_process(jobs, workers))  # in job order, which is plan order
    examples: dict[str, list[_Example]] = {}
    problems: list[Problem] = []
    for plan in plans:
        examples[plan.split] = []
        for row, path in plan.rows:
            data, reason = next(results)
            progress.step()
            if data is None:
                problems.append(Problem(str(path), reason or "unreadable", row.name))
                continue
            examples[plan.split].append((data, int(row.grade >= opts.rdr_grade), row.grade, row.name))
    return examples, problems


def _check_usable(examples: dict[str, list[_Example]], problems: list[Problem], source: Source,
                  on_error: str) -> None:
    """Apply ``--on-error`` to the problems, then refuse a data set that cannot serve its use:
    training needs train and val images, a test-only folder needs test images."""
    if problems and on_error == "fail":
        for p in problems:
            logging.error("bad input: %s", p)
        raise InputError(
            f"{len(problems)} problem(s) in the input, nothing written (first: {problems[0]}); "
            "fix them or pass --on-error skip to leave those items out"
        )
    for p in problems:
        logging.warning("skipped: %s", p)
    if source.train_images is None:
        if not examples[TEST]:
            raise InputError(f"{source.test_labels}: no usable test images, nothing to prepare")
    elif not examples[TRAIN] or not examples[VAL]:
        raise InputError("no usable training or validation images left after skipping bad input")


def prepare(source: Source, out: Path | str, opts: PrepareOptions = PrepareOptions()) -> dict[str, Any]:
    """Build ``out`` (TFRecord shards + meta.json) from ``source``; return the meta dict.

    With ``on_error='fail'`` every problem in the input is logged and an :class:`InputError`
    is raised without writing anything; with ``'skip'`` bad items are left out and listed under
    ``skipped`` in meta.json.
    """
    opts.validate()
    out = Path(out)
    check_output(out, source, opts.overwrite)
    plans, problems = _plan(source, opts)
    examples, unusable = _make_examples(plans, source, opts)
    problems += unusable
    _check_usable(examples, problems, source, opts.on_error)
    try:
        with runs.atomic_dir(out, install=functools.partial(_install, overwrite=opts.overwrite)) as tmp:
            meta = _write_output(tmp, examples, problems, source, opts)
    except BaseException as exc:
        if isinstance(exc, OSError) or _is_tf_error(exc):
            raise _write_failed(exc, out) from exc
        raise
    for split in SPLITS:
        s = meta["splits"][split]
        logging.info("%-5s %4d images (NRDR %d, RDR %d) in %d shard(s)",
                     split, s["n"], s["nrdr"], s["rdr"], len(s["files"]))
    logging.info("wrote %s (%.1f MB)", out, meta["bytes"] / 1e6)
    return meta
