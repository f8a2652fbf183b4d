"""``drtune demo``: the whole pipeline on built-in synthetic data, in a few minutes on a CPU.

synth -> prepare -> train (``studies/demo.toml``) -> evaluate on the test split. Each step
skips work that a previous demo in the same folder already finished, so re-running is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import logging

DEMO_STUDY = Path(__file__).resolve().parents[1] / "studies" / "demo.toml"


def run_demo(workdir: Path | str = "demo-work", study: Path | str | None = None) -> dict[str, Any]:
    """Run the demo in ``workdir``; return the test metrics."""
    from drtune.config import load_config
    from drtune.evaluate import evaluate_run
    from drtune.prepare import PrepareOptions, find_idrid, prepare
    from drtune.synth import make_synthetic
    from drtune.train import train_and_evaluate

    workdir = Path(workdir)
    synth, data, run = workdir / "synth", workdir / "data", workdir / "run"
    cfg = load_config(study or DEMO_STUDY, extra={"data.dir": str(data)})
    if not synth.is_dir():
        logging.info("[1/4] synthetic photographs -> %s", synth)
        make_synthetic(synth, n_train=96, n_test=32, width=640, height=426, seed=0)
    if not (data / "meta.json").is_file():
        logging.info("[2/4] prepare -> %s", data)
        prepare(find_idrid(synth), data, PrepareOptions(size=256))
    logging.info("[3/4] train -> %s", run)
    train_and_evaluate(cfg, data, run)
    logging.info("[4/4] evaluate on the test split")
    result = evaluate_run(run, data, "test")
    print(f"\nDemo finished. Test balanced accuracy {result['balanced_accuracy']:.3f}, "
          f"AUC {result['auc'] if result['auc'] is None else round(result['auc'], 3)} (n={result['n']}).\n"
          f"  run directory : {run}\n"
          f"  test report   : {run / 'eval-test'} (metrics.json, confusion_matrix.png, roc.png)\n"
          f"  learning curve: {run / 'history.png'}\n"
          f"  TensorBoard   : tensorboard --logdir {run / 'tensorboard'}")
    return result
