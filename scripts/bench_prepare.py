#!/usr/bin/env python3
"""Benchmark `drtune prepare` on full-size (4288x2848) synthetic photographs.

Compares, in one run on the same files:
  naive   : the original project's path, one process: full JPEG decode + tf.image.resize to
            SIZE x SIZE, JPEG re-encode, TFRecord write;
  drtune  : `prepare` (reduced-resolution decode, field detection, crop, resize, all cores).
Prints images/s for both and their ratio; the last line is `prepare_images_per_s=<float>`.

    python scripts/bench_prepare.py [--n 24] [--size 256] [--workers 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def naive(images: list[Path], out: Path, size: int) -> float:
    """The baseline: decode everything at full size, resize with TensorFlow; returns seconds."""
    import tensorflow as tf

    from drtune.prepare import serialize_example

    t0 = time.perf_counter()
    with tf.io.TFRecordWriter(str(out)) as writer:
        for path in images:
            img = tf.io.decode_jpeg(tf.io.read_file(str(path)), channels=3)
            img = tf.cast(tf.image.resize(img, (size, size)), tf.uint8)
            writer.write(serialize_example(tf.io.encode_jpeg(img, quality=95).numpy(), 0, 0, path.stem))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="training photographs (default 24)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="prepare workers (0: all cores)")
    parser.add_argument("--keep", type=Path, help="reuse/keep the synthetic set in this folder")
    args = parser.parse_args()

    from drtune.prepare import PrepareOptions, find_idrid, prepare
    from drtune.synth import TRAIN_IMAGES, make_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    root = args.keep or tmp / "synth"
    try:
        if not (root / TRAIN_IMAGES).is_dir():
            t0 = time.perf_counter()
            make_synthetic(root, n_train=args.n, n_test=0, width=4288, height=2848, seed=0)
            print(f"made {args.n} synthetic 4288x2848 photographs in {time.perf_counter() - t0:.1f}s")
        images = sorted((root / TRAIN_IMAGES).glob("*.jpg"))
        # Warm the page cache so both paths read from memory, not disk.
        for p in images:
            p.read_bytes()

        # Import TensorFlow before timing: both paths use it (to write shards), and its import
        # (seconds) is not image processing.
        import tensorflow as tf  # noqa: F401

        t0 = time.perf_counter()
        prepare(find_idrid(root), tmp / "data", PrepareOptions(size=args.size, workers=args.workers))
        ours = time.perf_counter() - t0
        base = naive(images, tmp / "naive.tfrecord", args.size)

        n = len(images)
        print(f"images: {n} x 4288x2848 JPEG -> {args.size}x{args.size}, cores: {os.cpu_count()}")
        print(f"naive  (full decode + tf.image.resize, 1 process): {n / base:7.2f} images/s ({base:.1f}s)")
        print(f"drtune (reduced decode + field crop, {args.workers or os.cpu_count()} workers):"
              f"   {n / ours:7.2f} images/s ({ours:.1f}s, includes split and shard writing)")
        print(f"ratio drtune/naive: {base / ours:.2f}x (target >= 4x)")
        print(f"prepare_images_per_s={n / ours:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
