#!/usr/bin/env python3
"""Does pruning pay? The demo grid on synthetic data, with and without the pruner, in one run.

Prints, for each, the epochs trained over all trials, the best validation balanced accuracy
and the wall time, then the ratio of epochs (target: pruning spends <= 60% of the epochs for
the same best value, within 0.02). The last line is `pruning_epoch_ratio=<float>`.

    python scripts/bench_pruning.py [--config studies/demo.toml] [--data DATA] [--pruner median]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(config: Path, data: Path, workdir: Path, pruner: str) -> tuple[int, float, float, int]:
    """(epochs trained, best value, seconds, pruned trials) of one full grid."""
    from optuna.trial import TrialState

    from drtune.config import load_config
    from drtune.search import search

    cfg = load_config(config, [f"search.pruner={pruner}"],
                      extra={"data.dir": str(data), "search.workdir": str(workdir),
                             "search.storage": f"sqlite:///{workdir / 'optuna.db'}"})
    t0 = time.perf_counter()
    study = search(cfg, grid=True)
    seconds = time.perf_counter() - t0
    epochs = sum(int(t.user_attrs.get("epochs_run", 0)) for t in study.trials)
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    return epochs, study.best_value, seconds, pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("studies/demo.toml"))
    parser.add_argument("--data", type=Path, help="prepared data (default: the demo's synthetic set)")
    parser.add_argument("--pruner", default="median", help="pruner to compare against none")
    args = parser.parse_args()

    from absl import logging

    from drtune.prepare import PrepareOptions, find_idrid, prepare
    from drtune.synth import make_synthetic

    logging.set_verbosity(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    try:
        data = args.data
        if data is None:
            make_synthetic(tmp / "synth", n_train=96, n_test=32, width=640, height=426, seed=0)
            data = tmp / "data"
            prepare(find_idrid(tmp / "synth"), data, PrepareOptions(size=256))
        results = {p: run(args.config, data, tmp / p, p) for p in ("none", args.pruner)}
        for pruner, (epochs, best, seconds, pruned) in results.items():
            print(f"pruner {pruner:>18}: {epochs:4d} epochs, {pruned} trial(s) pruned, "
                  f"best val balanced accuracy {best:.4f}, {seconds:.0f}s")
        (e0, b0, s0, _), (e1, b1, s1, _) = results["none"], results[args.pruner]
        ratio = e1 / e0
        print(f"epochs with pruning / without: {ratio:.2f} (target <= 0.60); "
              f"best value difference {b1 - b0:+.4f} (target within 0.02); time ratio {s1 / s0:.2f}")
        print(f"pruning_epoch_ratio={ratio:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
