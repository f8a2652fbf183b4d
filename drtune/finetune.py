"""Fine-tune the best trials of a study, evaluate on the test split, show where the models look.

``drtune finetune --best``: the best COMPLETE trial is trained further from its ``model.keras``
with the ``[finetune]`` settings (a small learning rate, usually stronger augmentation), then
evaluated once on the test split. The summary is recorded on the study (``finetune`` user
attribute, which ``drtune status`` and ``drtune report`` read), its plots go to the artifact
store, and with ``finetune.gradcam`` Grad-CAM galleries of both models go there too, on the same
photographs (chosen with the fine-tuned model) so that they compare pair by pair. The study
also gets the test metrics as numeric attributes and a note (:mod:`drtune.notes`) that states the
result with its plots and links the model card (``drtune report``). Running it again for the same
best trial does nothing.

``--top-k K`` (K > 1) also fine-tunes the next K-1 COMPLETE trials the same way and averages the
K fine-tuned models into an ensemble run (:mod:`drtune.ensemble`, ``STUDY/finetune-topK``) with
its own threshold frozen on validation; it is evaluated once on test, recorded as the
``ensemble`` entry of the ``finetune`` attribute, its plots uploaded as ``ensemble_*``, and the
note sets its test metrics beside the best single model's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import keras
import optuna
from absl import logging
from optuna.artifacts import FileSystemArtifactStore
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from drtune import config as config_lib
# Used as modules (train.train_and_evaluate, ...) so that tests can replace their functions.
from drtune import ensemble, evaluate, gradcam, metrics, notes, report, runs, train
from drtune.config import Config
from drtune.errors import DrtuneError, InputError
from drtune.study import artifact_dir, load_study, redact_config

# The test metrics recorded on the study, of the fine-tuned model and of the ensemble.
TEST_KEYS = ("balanced_accuracy", "accuracy", "auc", "sensitivity", "specificity", "n", "confusion_matrix", "ci95")


def finetune_best(cfg: Config, storage: str | None = None, name: str | None = None,
                  data_dir: Path | str | None = None, top_k: int = 1) -> dict[str, Any]:
    """Retrain the best COMPLETE trial from its best checkpoint with the [finetune] settings,
    evaluate on the test split and record the result on the study; with ``top_k`` > 1, also the
    ensemble of the ``top_k`` best trials' fine-tuned models (fewer if fewer have completed)."""
    if top_k < 1:
        raise InputError(f"--top-k {top_k}: must be >= 1")
    study = load_study(cfg, storage, name)
    trials = best_trials(study, top_k)
    summary = _finetune_best_trial(cfg, storage, study, trials[0], data_dir)
    if top_k > 1:
        summary = _finetune_ensemble(cfg, study, trials, summary, data_dir, top_k)
    return summary


def best_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """Up to ``k`` COMPLETE trials, best first by the study's direction; the first is
    ``study.best_trial`` (whichever of tied trials Optuna calls best)."""
    try:
        best = study.best_trial
    except ValueError:
        raise InputError(f"study {study.study_name!r} has no completed trial to fine-tune; "
                         "run 'drtune search' until one completes") from None
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and t.number != best.number]
    done.sort(key=lambda t: (-t.value if study.direction == StudyDirection.MAXIMIZE else t.value, t.number))
    return [best, *done][:k]


def _plan(cfg: Config, study: optuna.Study, trial: FrozenTrial,
          data_dir: Path | str | None) -> tuple[Config, Path, Path, Path]:
    """(fine-tuning config, data folder, model to start from, output run) of one trial."""
    run = Path(trial.user_attrs["run_dir"])
    model, run_config = run / runs.MODEL_KERAS, run / runs.CONFIG_JSON
    if not model.is_file() or not run_config.is_file():
        raise InputError(f"{run}: trial {trial.number} has no model.keras/config.json to start from")
    trial_cfg = config_lib.from_dict(json.loads(run_config.read_text()), str(run_config))
    ft = cfg.finetune
    ft_cfg = config_lib.replace(trial_cfg, **{"train.lr": ft.lr, "train.epochs": ft.epochs,
                                              "data.augment": ft.augment, "finetune.lr": ft.lr,
                                              "finetune.epochs": ft.epochs, "finetune.augment": ft.augment})
    ft_cfg = redact_config(ft_cfg)  # trials run before storage URLs were redacted kept passwords
    data = Path(data_dir) if data_dir else Path(trial_cfg.data.dir)
    out = Path(cfg.search.workdir) / study.study_name / f"finetune-trial-{trial.number:04d}"
    return ft_cfg, data, model, out


def _finetune(trial: FrozenTrial, ft_cfg: Config, data: Path, model: Path, out: Path) -> dict[str, Any]:
    """Train one trial on from ``model`` into ``out`` (a finished ``out`` is kept as it is)."""
    ft = ft_cfg.finetune
    logging.info("fine-tuning trial %d (value %.4f) from %s: lr %g, %d epochs, %s augmentation -> %s",
                 trial.number, trial.value, model, ft.lr, ft.epochs, ft.augment, out)
    keras.backend.clear_session()
    return train.train_and_evaluate(ft_cfg, data, out, init_model=model)


def _finetune_best_trial(cfg: Config, storage: str | None, study: optuna.Study, best: FrozenTrial,
                         data_dir: Path | str | None) -> dict[str, Any]:
    """Fine-tune, test and record the best trial (nothing if it is recorded already)."""
    ft_cfg, data, model, out = _plan(cfg, study, best, data_dir)
    test_dir = runs.eval_dir(out, "test")
    done = study.user_attrs.get("finetune")
    if done and done.get("trial") == best.number and done.get("run_dir") == str(out) \
            and (test_dir / runs.METRICS_JSON).is_file():
        # Already fine-tuned and recorded: uploading its artifacts again would list them twice.
        logging.info("trial %d is already fine-tuned (%s); delete that folder to redo it", best.number, out)
        return done
    result = _finetune(best, ft_cfg, data, model, out)
    test = evaluate.evaluate_run(out, data, "test")
    ft = cfg.finetune
    summary = {
        "trial": best.number, "run_dir": str(out), "params": best.params,
        "val_balanced_accuracy": result["val_balanced_accuracy"], "threshold": result["threshold"],
        "test": {k: test[k] for k in TEST_KEYS},
        "settings": {"lr": ft.lr, "epochs": ft.epochs, "augment": ft.augment},
    }
    _plot_reliability(test_dir)
    store = FileSystemArtifactStore(str(artifact_dir(cfg)))
    # finetuned_*: the study's artifact list sorts the result files together, before the
    # galleries (gradcam-*), and each name says whose file it is.
    plots = {"confusion_matrix": test_dir / "confusion_matrix.png", "roc": test_dir / "roc.png",
             "reliability": test_dir / "reliability.png", "history": out / "history.png"}
    ids = {key: notes.upload_as(store, study, path, f"finetuned_{path.name}") for key, path in plots.items()}
    notes.upload_as(store, study, test_dir / runs.METRICS_JSON, "finetuned_metrics.json")
    if ft.gradcam:
        summary["gradcam"] = _galleries(study, best, Path(best.user_attrs["run_dir"]), out, data, ft.gradcam, store)
    study.set_user_attr("finetune", summary)
    notes.record_test_metrics(study, {**summary["test"], "threshold": summary["threshold"]})
    ids["report"] = _model_card(cfg, storage, study, out, data, store)
    # The artifact ids, so that a later ensemble can write the note again with the same plots.
    summary["artifacts"] = ids
    study.set_user_attr("finetune", summary)
    _write_note(study, summary)
    return summary


def _finetune_ensemble(cfg: Config, study: optuna.Study, trials: list[FrozenTrial], summary: dict[str, Any],
                       data_dir: Path | str | None, top_k: int) -> dict[str, Any]:
    """Fine-tune the other trials of ``trials``, average them with the fine-tuned best trial into
    an ensemble run, test it once and record it in the ``finetune`` attribute (as ``ensemble``)."""
    if len(trials) < top_k:
        logging.warning("--top-k %d: study %r has only %d completed trial(s); using %s", top_k,
                        study.study_name, len(trials), "them all" if len(trials) > 1 else "no ensemble")
    if len(trials) < 2:
        return summary
    numbers = [t.number for t in trials]
    out = Path(cfg.search.workdir) / study.study_name / f"finetune-top{len(trials)}"
    done = summary.get("ensemble")
    if done and done.get("trials") == numbers and done.get("run_dir") == str(out) \
            and (runs.eval_dir(out, "test") / runs.METRICS_JSON).is_file():
        logging.info("the ensemble of trials %s is already built and tested (%s); delete it to redo it",
                     numbers, out)
        return summary
    # Refuse differently prepared trials before hours of fine-tuning, not after.
    ensemble.check_same_data({f"trial_{t.number:04d}": t.user_attrs["run_dir"] for t in trials})
    members = {f"trial_{trials[0].number:04d}": Path(summary["run_dir"])}
    for trial in trials[1:]:
        ft_cfg, data, model, ft_out = _plan(cfg, study, trial, data_dir)
        _finetune(trial, ft_cfg, data, model, ft_out)
        members[f"trial_{trial.number:04d}"] = ft_out
    logging.info("building the ensemble of trials %s -> %s", ", ".join(map(str, numbers)), out)
    built = ensemble.write_run(out, members, data_dir)
    test = evaluate.evaluate_run(out, data_dir, "test")
    test_dir = runs.eval_dir(out, "test")
    store = FileSystemArtifactStore(str(artifact_dir(cfg)))
    ids = {key: notes.upload_as(store, study, test_dir / f"{key}.png", f"ensemble_{key}.png")
           for key in ("confusion_matrix", "roc")}
    notes.upload_as(store, study, test_dir / runs.METRICS_JSON, "ensemble_metrics.json")
    summary = {**summary, "ensemble": {
        "trials": numbers, "run_dir": str(out), "members": [str(p) for p in members.values()],
        "threshold": built["threshold"],
        "val": {k: built["val"][k] for k in ("balanced_accuracy", "auc", "sensitivity", "specificity", "n")},
        "test": {k: test[k] for k in TEST_KEYS}, "artifacts": ids}}
    study.set_user_attr("finetune", summary)
    _write_note(study, summary)
    logging.info("ensemble of trials %s: test balanced accuracy %.3f (best single model, trial %d: %.3f)",
                 numbers, test["balanced_accuracy"], summary["trial"], summary["test"]["balanced_accuracy"])
    return summary


def _write_note(study: optuna.Study, summary: dict[str, Any]) -> None:
    """The study note's result section, from the summary and the model card (``OUT/report``)."""
    card_path = Path(summary["run_dir"]) / "report" / "report.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    ids = dict(summary.get("artifacts") or {})
    ids.update({f"ensemble_{k}": v for k, v in (summary.get("ensemble", {}).get("artifacts") or {}).items()})
    notes.write_finetune_note(study, summary, ids, card.get("operating_points"), card.get("calibration"),
                              ids.get("report"))


def _plot_reliability(test_dir: Path) -> None:
    """The reliability diagram of the test predictions, beside evaluate's ROC and confusion matrix."""
    with (test_dir / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    y, p = [int(r["label"]) for r in rows], [float(r["p_rdr"]) for r in rows]
    metrics.plot_reliability(y, p, test_dir / "reliability.png", title=f"Reliability on test (n={len(y)})")


def _model_card(cfg: Config, storage: str | None, study: optuna.Study, out: Path, data: Path,
                store: FileSystemArtifactStore) -> str | None:
    """Write the fine-tuned model's card (``drtune report``) to ``OUT/report`` and upload it to the
    study; its artifact id. The fine-tune is recorded already: a card that cannot be made is a
    warning, and the note then goes without operating points."""
    try:
        report.report_study(cfg, out / "report", storage, study.study_name, data)
    except DrtuneError as exc:
        logging.warning("no model card for the study note: %s", exc)
        return None
    return notes.upload_as(store, study, out / "report" / "report.html", "finetuned_report.html")


def _galleries(study: optuna.Study, best: FrozenTrial, run: Path, out: Path, data: Path, n: int,
               store: FileSystemArtifactStore) -> dict[str, str]:
    """Grad-CAM galleries of the fine-tuned model and of the best trial, uploaded to the study so
    that the dashboard shows where each looks (a finished trial takes no more artifacts, so
    both go to the study, their files prefixed ``gradcam-finetuned_`` and ``gradcam-trial-NNNN_``).

    Both show the same photographs in the same order, chosen once with the fine-tuned model's
    predictions and threshold (``gradcam.SELECTION``: its errors first), so that the two maps of
    a photograph compare pair by pair; each caption keeps its own model's P(RDR) and group."""
    dirs, names = {}, None
    for key, prefix, run_dir in (("finetune", "gradcam-finetuned_", out),
                                 ("trial", f"gradcam-trial-{best.number:04d}_", run)):
        gallery = run_dir / "gradcam-test"
        shown = gradcam.run_gradcam(run_dir, gallery, data_dir=data, split="test", n=n, names=names)
        names = names or [r["name"] for r in shown["images"]]
        # The PNGs only: the dashboard stores artifacts under ids, so the gallery's
        # index.html could not find its images there (it is in the run directory).
        for path in (p for p in gradcam.gallery_artifacts(gallery) if p.suffix == ".png"):
            notes.upload_as(store, study, path, f"{prefix}{path.name}")
        dirs[key] = str(gallery / "index.html")
    return {"trial": dirs["trial"], "finetune": dirs["finetune"]}
