"""Fine-tune the best trial of a study, evaluate it on the test split, show where it looks.

``drtune finetune --best``: the best COMPLETE trial is trained further from its ``model.keras``
with the ``[finetune]`` settings (a small learning rate, usually stronger augmentation), then
evaluated once on the test split. The summary is recorded on the study (``finetune`` user
attribute, which ``drtune status`` and ``drtune report`` read), its plots go to the artifact
store, and with ``finetune.gradcam`` Grad-CAM galleries of both models go there too. The study
also gets the test metrics as numeric attributes and a note (:mod:`drtune.notes`) that states the
result with its plots and links the model card (``drtune report``). Running it again for the same
best trial does nothing.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import optuna
from absl import logging
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import FrozenTrial

from drtune import config as config_lib
# Used as modules (train.train_and_evaluate, ...) so that tests can replace their functions.
from drtune import evaluate, gradcam, metrics, notes, report, runs, train
from drtune.config import Config
from drtune.errors import DrtuneError, InputError
from drtune.study import artifact_dir, load_study, redact_config


def finetune_best(cfg: Config, storage: str | None = None, name: str | None = None,
                  data_dir: Path | str | None = None) -> dict[str, Any]:
    """Retrain the best COMPLETE trial from its best checkpoint with the [finetune] settings,
    evaluate on the test split and record the result on the study."""
    study = load_study(cfg, storage, name)
    try:
        best = study.best_trial
    except ValueError:
        raise InputError(f"study {study.study_name!r} has no completed trial to fine-tune; "
                         "run 'drtune search' until one completes") from None
    run = Path(best.user_attrs["run_dir"])
    model, run_config = run / runs.MODEL_KERAS, run / runs.CONFIG_JSON
    if not model.is_file() or not run_config.is_file():
        raise InputError(f"{run}: best trial {best.number} has no model.keras/config.json to start from")
    trial_cfg = config_lib.from_dict(json.loads(run_config.read_text()), str(run_config))
    ft = cfg.finetune
    ft_cfg = config_lib.replace(trial_cfg, **{"train.lr": ft.lr, "train.epochs": ft.epochs,
                                              "data.augment": ft.augment, "finetune.lr": ft.lr,
                                              "finetune.epochs": ft.epochs, "finetune.augment": ft.augment})
    ft_cfg = redact_config(ft_cfg)  # trials run before storage URLs were redacted kept passwords
    data = Path(data_dir) if data_dir else Path(trial_cfg.data.dir)
    out = Path(cfg.search.workdir) / study.study_name / f"finetune-trial-{best.number:04d}"
    test_dir = runs.eval_dir(out, "test")
    done = study.user_attrs.get("finetune")
    if done and done.get("trial") == best.number and done.get("run_dir") == str(out) \
            and (test_dir / runs.METRICS_JSON).is_file():
        # Already fine-tuned and recorded: uploading its artifacts again would list them twice.
        logging.info("trial %d is already fine-tuned (%s); delete that folder to redo it", best.number, out)
        return done
    logging.info("fine-tuning trial %d (value %.4f) from %s: lr %g, %d epochs, %s augmentation -> %s",
                 best.number, best.value, model, ft.lr, ft.epochs, ft.augment, out)
    keras.backend.clear_session()
    result = train.train_and_evaluate(ft_cfg, data, out, init_model=model)
    test = evaluate.evaluate_run(out, data, "test")
    summary = {
        "trial": best.number, "run_dir": str(out), "params": best.params,
        "val_balanced_accuracy": result["val_balanced_accuracy"], "threshold": result["threshold"],
        "test": {k: test[k] for k in ("balanced_accuracy", "accuracy", "auc", "sensitivity",
                                      "specificity", "n", "confusion_matrix", "ci95")},
    }
    summary["settings"] = {"lr": ft.lr, "epochs": ft.epochs, "augment": ft.augment}
    _plot_reliability(test_dir)
    store = FileSystemArtifactStore(str(artifact_dir(cfg)))
    # finetuned_*: the study's artifact list sorts the result files together, before the
    # galleries (gradcam-*), and each name says whose file it is.
    plots = {"confusion_matrix": test_dir / "confusion_matrix.png", "roc": test_dir / "roc.png",
             "reliability": test_dir / "reliability.png", "history": out / "history.png"}
    ids = {key: notes.upload_as(store, study, path, f"finetuned_{path.name}") for key, path in plots.items()}
    notes.upload_as(store, study, test_dir / runs.METRICS_JSON, "finetuned_metrics.json")
    if ft.gradcam:
        summary["gradcam"] = _galleries(study, best, run, out, data, ft.gradcam, store)
    study.set_user_attr("finetune", summary)
    notes.record_test_metrics(study, {**summary["test"], "threshold": summary["threshold"]})
    card, report_id = _model_card(cfg, storage, study, out, data, store)
    notes.write_finetune_note(study, summary, ids, card.get("operating_points"), card.get("calibration"),
                              report_id)
    return summary


def _plot_reliability(test_dir: Path) -> None:
    """The reliability diagram of the test predictions, beside evaluate's ROC and confusion matrix."""
    with (test_dir / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    y, p = [int(r["label"]) for r in rows], [float(r["p_rdr"]) for r in rows]
    metrics.plot_reliability(y, p, test_dir / "reliability.png", title=f"Reliability on test (n={len(y)})")


def _model_card(cfg: Config, storage: str | None, study: optuna.Study, out: Path, data: Path,
                store: FileSystemArtifactStore) -> tuple[dict[str, Any], str | None]:
    """Write the fine-tuned model's card (``drtune report``) to ``OUT/report`` and upload it to the
    study; (the card, its artifact id). The fine-tune is recorded already: a card that cannot be
    made is a warning, and the note then goes without operating points."""
    try:
        card = report.report_study(cfg, out / "report", storage, study.study_name, data)
    except DrtuneError as exc:
        logging.warning("no model card for the study note: %s", exc)
        return {}, None
    return card, notes.upload_as(store, study, out / "report" / "report.html", "finetuned_report.html")


def _galleries(study: optuna.Study, best: FrozenTrial, run: Path, out: Path, data: Path, n: int,
               store: FileSystemArtifactStore) -> dict[str, str]:
    """Grad-CAM galleries of the best trial's and the fine-tuned model, uploaded to the study so
    that the dashboard shows where each looks (a finished trial takes no more artifacts, so
    both go to the study, their files prefixed ``gradcam-trial-NNNN_`` and ``gradcam-finetuned_``)."""
    dirs = {}
    for key, prefix, run_dir in (("trial", f"gradcam-trial-{best.number:04d}_", run),
                                 ("finetune", "gradcam-finetuned_", out)):
        gallery = run_dir / "gradcam-test"
        gradcam.run_gradcam(run_dir, gallery, data_dir=data, split="test", n=n)
        with tempfile.TemporaryDirectory() as tmp:
            # The PNGs only: the dashboard stores artifacts under ids, so the gallery's
            # index.html could not find its images there (it is in the run directory).
            for path in (p for p in gradcam.gallery_artifacts(gallery) if p.suffix == ".png"):
                named = Path(tmp) / f"{prefix}{path.name}"
                shutil.copyfile(path, named)
                upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)
        dirs[key] = str(gallery / "index.html")
    return dirs
