"""Training throughput of the full input pipeline versus a compute-only baseline.

    python scripts/bench_train.py [--data DATA] --batch-size 32 --epochs 4 [--image-size S]
                                  [--augment base] [--steps-per-epoch N] [--rounds 3]

Both runs train the same network (``build_model(ModelConfig())``, Adam, sparse categorical
cross-entropy) with ``model.fit`` for the same number of steps:
- pipeline: ``drtune.data.train_dataset`` (read, decode, cache, balance, augment, prefetch);
- compute-only: one already augmented float32 batch repeated from memory.
The first epoch of each (tracing, cache filling, warm-up) is not timed. A ratio near 1 means
the input pipeline keeps up with the train step on this machine. Without ``--data`` a
synthetic set (64 training photos at 640x426, prepared at 256) is made in a temporary folder.
The last line printed is ``train_images_per_s=<float>`` (the pipeline figure).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  (after the log-level setting, which TF reads at import)
import tensorflow as tf  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Records the wall and process CPU time of every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._start = self._cpu = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._cpu)


def synthetic_data(folder: Path) -> Path:
    """64 synthetic training photos at 640x426, prepared at 256 px."""
    from drtune.prepare import PrepareOptions, find_idrid, prepare
    from drtune.synth import make_synthetic

    make_synthetic(folder / "idrid", n_train=64, n_test=8, width=640, height=426, seed=0)
    out = folder / "data"
    prepare(find_idrid(folder / "idrid"), out, PrepareOptions(size=256, workers=2))
    return out


def fit_rate(model: keras.Model, dataset: tf.data.Dataset, steps: int, epochs: int,
             batch_size: int) -> tuple[float, float]:
    """(images/s, process CPU ms per image) of ``model.fit`` over epochs 2..E (1 is warm-up).

    CPU time per image is much less sensitive than wall time to other processes on the machine,
    so it shows the pipeline's own cost even when the wall-clock figures are noisy.
    """
    timer = EpochTimer()
    model.fit(dataset, steps_per_epoch=steps, epochs=epochs, callbacks=[timer], verbose=0)
    images = (epochs - 1) * steps * batch_size
    return images / sum(timer.times[1:]), 1000 * sum(timer.cpu[1:]) / images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="prepared DATA dir (default: synthetic set)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (first is warm-up)")
    parser.add_argument("--image-size", type=int, default=0, help="0: as prepared")
    parser.add_argument("--augment", default="base")
    parser.add_argument("--steps-per-epoch", type=int, default=0,
                        help="0: one balanced pass over the training split, but >= 256 images")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate compute-only and pipeline runs this often; best of each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is not timed)")
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch-size must be >= 1")

    from drtune.config import ModelConfig
    from drtune.data import train_dataset
    from drtune.model import build_model
    from drtune.runs import load_meta

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = args.data or synthetic_data(Path(tmp))
        meta = load_meta(data)
        size = args.image_size or int(meta["size"])
        train_ds, steps = train_dataset(data, args.batch_size, args.augment, seed=args.seed,
                                        image_size=size, meta=meta)
        # A tiny set gives epochs too short to time: make each at least 256 images.
        steps = args.steps_per_epoch or max(steps, math.ceil(256 / args.batch_size))

        def new_model() -> keras.Model:
            keras.utils.set_random_seed(args.seed)
            model = build_model(ModelConfig(), input_size=size)
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss=keras.losses.SparseCategoricalCrossentropy())
            return model

        images, labels = next(iter(train_ds))  # one augmented float32 batch
        memory_ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
        print(f"data={data} size={size} batch={args.batch_size} steps/epoch={steps} "
              f"epochs={args.epochs} (first untimed) augment={args.augment} "
              f"cpus={os.cpu_count()}", flush=True)
        # Alternating runs and keeping the best of each damps the effect of other processes
        # that come and go on a shared machine. Each mode keeps its model (traced once).
        models = {"compute-only": new_model(), "pipeline": new_model()}
        results: dict[str, list[tuple[float, float]]] = {"compute-only": [], "pipeline": []}
        for r in range(args.rounds):
            for mode, ds in (("compute-only", memory_ds), ("pipeline", train_ds)):
                rate, cpu = fit_rate(models[mode], ds, steps, args.epochs, args.batch_size)
                results[mode].append((rate, cpu))
                print(f"round {r + 1} {mode:12s}: {rate:7.1f} images/s, {cpu:6.2f} CPU ms/image",
                      flush=True)
        compute = max(rate for rate, _ in results["compute-only"])
        pipeline = max(rate for rate, _ in results["pipeline"])
        cpu_c = min(cpu for _, cpu in results["compute-only"])
        cpu_p = min(cpu for _, cpu in results["pipeline"])
        print(f"compute-only: {compute:.1f} images/s ({cpu_c:.2f} CPU ms/image)")
        print(f"pipeline:     {pipeline:.1f} images/s ({cpu_p:.2f} CPU ms/image)")
        # The CPU-time ratio is what the wall ratio would be if training kept every core busy
        # (nothing left to hide the pipeline in); it is also steadier on a shared machine.
        print(f"ratio pipeline/compute-only: {pipeline / compute:.3f} "
              f"(CPU time per image: {cpu_c / cpu_p:.3f})", flush=True)
    print(f"train_images_per_s={pipeline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
