"""``drtune demo``: the whole service on built-in synthetic data, in minutes on a CPU.

synth -> prepare -> search --grid (``studies/demo.toml``) -> finetune --best (which evaluates on
the test split). Finished steps are reused, so re-running the demo is cheap.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from absl import logging

from drtune import config as config_lib
from drtune.errors import InputError
from drtune.finetune import finetune_best
from drtune.metrics import fmt_or_na
from drtune.prepare import PrepareOptions, find_idrid, prepare
from drtune.runs import META_JSON, eval_dir
from drtune.search import search
from drtune.study import redact
from drtune.synth import make_synthetic

DEMO_STUDY = Path("studies") / "demo.toml"


def run_demo(workdir: Path | str = "demo-work", study: Path | str | None = None) -> dict[str, Any]:
    """Run the demo with all its files under ``workdir``; return the fine-tuned test summary."""
    study = config_lib.resolve_study_path(study or DEMO_STUDY)
    if not study.is_file():
        raise InputError(f"{study}: demo study not found; run from the repository root or pass --config")
    workdir = Path(workdir)
    synth, data, runs = workdir / "synth", workdir / "data", workdir / "runs"
    # The demo keeps everything in its workdir, whatever the study file or $DRTUNE_STORAGE say
    # (the storage is passed explicitly because the variable outranks the config).
    storage = f"sqlite:///{runs / 'optuna.db'}"
    cfg = config_lib.load_config(study, extra={"data.dir": str(data), "search.workdir": str(runs),
                                    "search.storage": storage})
    if not synth.is_dir():
        logging.info("[1/4] synthetic photographs -> %s", synth)
        make_synthetic(synth, n_train=96, n_test=32, width=640, height=426, seed=0)
    if not (data / META_JSON).is_file():
        logging.info("[2/4] prepare -> %s", data)
        prepare(find_idrid(synth), data, PrepareOptions(size=256))
    logging.info("[3/4] grid search (%s)", study)
    search(cfg, grid=True, storage=storage)
    logging.info("[4/4] fine-tune the best trial and evaluate it on the test split")
    summary = finetune_best(cfg, storage=storage)
    test = summary["test"]
    flags = f"--config {shlex.quote(str(study))} --storage {shlex.quote(redact(storage))}"
    # The dashboard serves the artifacts from search.workdir, which is the demo's, not the study's.
    where = f"--set {shlex.quote(f'search.workdir={runs}')}"
    print(f"\nDemo finished. Fine-tuned trial {summary['trial']} "
          f"({' '.join(f'{k}={v}' for k, v in summary['params'].items())}): test balanced accuracy "
          f"{test['balanced_accuracy']:.3f}, AUC {fmt_or_na(test['auc'])}, n={test['n']}.\n"
          f"  trials        : drtune status {flags}\n"
          f"  dashboard     : drtune dashboard {flags} {where}   (then open http://127.0.0.1:8080/)\n"
          f"  test report   : {eval_dir(summary['run_dir'], 'test')} (metrics.json, confusion_matrix.png, roc.png)\n"
          f"  TensorBoard   : tensorboard --logdir {runs / cfg.name}")
    return summary
