#!/usr/bin/env python3
"""Training-step throughput by precision and XLA, on whatever device is present.

    python scripts/bench_gpu.py [--size 256] [--batches 4,32,128] [--steps 5] [--width 16]

For each batch size, the drtune network (``build_model``/``compile_model``, AdamW, the study's
loss) runs ``train_on_batch`` on one in-memory batch: float32 and mixed precision, each without
and with XLA (``jit_compile``). Mixed precision means ``mixed_float16`` on a GPU (tensor cores)
and ``mixed_bfloat16`` on a CPU, where float16 has no fast kernels. The first steps of each
setting (tracing, XLA compilation, autotuning) are not timed; the best of ``--repeats`` timed
rounds is kept, so a busy machine slows the figures less. Every figure is printed with its ratio
to float32 without XLA at the same batch size, measured in the same run.

On a machine without a GPU it says so and measures the CPU: the figures then show what the
settings cost here (XLA measured 2.3x slower on this CPU), not what they gain on a GPU.
The last line is ``device=... float32_images_per_s=... mixed_images_per_s=...`` (the largest
batch, each precision with its faster XLA setting).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from drtune import devices  # noqa: E402


def images_per_second(precision: str, jit: bool, batch: int, size: int, width: int, steps: int,
                      repeats: int) -> float:
    """Best-of-``repeats`` images/s of ``steps`` train steps on one random batch."""
    import keras

    from drtune.config import ModelConfig, TrainConfig
    from drtune.model import build_model, compile_model

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(width=width), size, precision)
    train = TrainConfig(lr=1e-3, batch_size=batch, optimizer="adamw", weight_decay=1e-4, label_smoothing=0.1)
    compile_model(model, train.lr, train, steps_per_epoch=steps, precision=precision, jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = (np.arange(batch) % 2).astype(np.int32)
    for _ in range(2):  # tracing, XLA compilation, kernel autotuning
        model.train_on_batch(x, y)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        best = min(best, time.perf_counter() - t0)
    return batch * steps / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="input size in pixels (the study's prepare size)")
    ap.add_argument("--batches", default="4,32,128", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per round")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds; the best is kept")
    ap.add_argument("--width", type=int, default=16, help="model.width")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1 or args.steps < 1 or args.repeats < 1:
        ap.error("--batches, --steps and --repeats must be positive")

    device = devices.configure()
    mixed = "mixed_bfloat16" if device == "cpu" else "mixed_float16"
    print(f"bench_gpu: device {device}; {args.size}px, width {args.width}, {args.steps} steps x "
          f"{args.repeats} rounds; mixed = {mixed}", flush=True)
    if device == "cpu":
        print("bench_gpu: no GPU visible: measuring the CPU (what the settings cost here, "
              "not what they gain on a GPU)", flush=True)
    best: dict[str, float] = {}
    for batch in batches:
        base = None
        for precision in ("float32", mixed):
            for jit in (False, True):
                rate = images_per_second(precision, jit, batch, args.size, args.width, args.steps, args.repeats)
                base = base or rate
                print(f"batch {batch:4d}  {precision:15s} xla={'on ' if jit else 'off'}  "
                      f"{rate:9.1f} images/s  x{rate / base:.2f} vs float32 without XLA", flush=True)
                if batch == batches[-1]:
                    key = "float32" if precision == "float32" else "mixed"
                    best[key] = max(best.get(key, 0.0), rate)
    print(f"device={device.replace(' ', '_')} float32_images_per_s={best['float32']:.1f} "
          f"mixed_images_per_s={best['mixed']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
