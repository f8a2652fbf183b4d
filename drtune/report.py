"""``drtune report``: a model card of a run (or of a study's fine-tuned model).

Writes ``DIR/report.json`` and a self-contained ``DIR/report.html`` (images embedded as base64
PNG, no external resources) with the minimal items of TRIPOD+AI, CLAIM and Model Cards: intended
use and limits, data, training and search, the selection rule, test metrics with 95% CIs,
operating points beside the IDx-DR endpoints, per-grade sensitivity, calibration, caveats and
versions. Every number comes from ``RUN/eval-test`` and ``RUN/eval-val`` (written by
``evaluate_run`` when missing or stale); the test split chooses nothing. This module gathers the
card (``report.json``); :mod:`drtune.report_html` renders it as HTML.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from drtune import __version__, metrics
from drtune import config as config_lib
from drtune.runs import (CLASS_NAMES, CONFIG_JSON, DATA_JSON, METRICS_JSON, MODEL_KERAS, PREDICTIONS_CSV,
                         eval_dir, load_meta)
from drtune.errors import InputError
from drtune.report_html import fig_png, png, render_html

# The pivotal trial of the first autonomous DR system (IDx-DR, Abramoff et al., npj Digit Med
# 2018) had pre-specified superiority endpoints of sensitivity > 85% and specificity > 82.5%.
IDX_DR = {"sensitivity": 0.85, "specificity": 0.825}
TARGET_SENSITIVITY = IDX_DR["sensitivity"]


# --------------------------------------------------------------------------- inputs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def check_run(run: Path) -> None:
    """``InputError`` unless ``run`` is a finished run directory (cheap: no TensorFlow)."""
    if not run.is_dir():
        raise InputError(f"{run}: run directory not found")
    for name in (MODEL_KERAS, CONFIG_JSON, DATA_JSON, METRICS_JSON):
        if not (run / name).is_file():
            raise InputError(f"{run}: no {name}; the run is not finished (run 'drtune train' to the end first)")


def _stale(run: Path, split: str, data_dir: Path, threshold: float) -> str | None:
    """Why ``RUN/eval-<split>`` cannot be used as it is, or None when it can."""
    out = eval_dir(run, split)
    if not (out / METRICS_JSON).is_file() or not (out / PREDICTIONS_CSV).is_file():
        return "not evaluated yet"
    m = json.loads((out / METRICS_JSON).read_text())
    with (out / PREDICTIONS_CSV).open(newline="") as f:
        header = next(csv.reader(f), [])
    if "grade" not in header or "ci_method" not in m:
        return "evaluated by an older drtune (no grades / bootstrap CIs of proportions)"
    if float(m.get("threshold", -1)) != threshold:
        return "evaluated at another threshold"
    if Path(m.get("data_dir", "")).resolve() != data_dir.resolve():
        return f"evaluated on {m.get('data_dir')}"
    if (run / MODEL_KERAS).stat().st_mtime > (out / METRICS_JSON).stat().st_mtime:
        return "model.keras is newer than the evaluation"
    return None


def _evaluation(run: Path, split: str, data_dir: Path, threshold: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metrics.json, predictions as arrays) of ``split``, evaluating the run first if needed."""
    why = _stale(run, split, data_dir, threshold)
    if why is not None:
        # TensorFlow: a report whose evaluation is current never loads it.
        from drtune.evaluate import evaluate_run

        logging.info("%s: evaluating on %s (%s)", run, split, why)
        evaluate_run(run, data_dir, split)
    out = eval_dir(run, split)
    with (out / PREDICTIONS_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    preds = {
        "label": np.array([int(r["label"]) for r in rows], dtype=int),
        "p_rdr": np.array([float(r["p_rdr"]) for r in rows]),
        # The decision column was computed from unrounded scores: exact at the frozen threshold.
        "called": np.array([r["decision"] == CLASS_NAMES[1] for r in rows], dtype=float),
        "grade": np.array([int(r["grade"]) for r in rows], dtype=int),
    }
    return _read_json(out / METRICS_JSON), preds


def _git_commit() -> str | None:
    """The commit of the drtune source at report time (``+dirty`` with uncommitted changes)."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a checkout (an installed wheel) or no git
    return head + ("+dirty" if dirty else "")


def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    # Package metadata, not imports: the report needs no TensorFlow when evaluations exist.
    return {"drtune": __version__, "python": sys.version.split()[0], "tensorflow": version("tensorflow"),
            "keras": version("keras"), "optuna": version("optuna"), "scikit-learn": version("scikit-learn"),
            "git_commit": _git_commit()}


def _gradcam_links(run: Path, extra: dict[str, str] | None) -> list[str]:
    found = sorted(str(p) for p in run.glob("gradcam*/index.html"))
    for path in (extra or {}).values():
        if Path(path).is_file() and str(path) not in found:
            found.append(str(path))
    return found


# --------------------------------------------------------------------------- the card


def build_card(run_dir: Path | str, data_dir: Path | str | None = None,
               study: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``report.json`` for a finished run (evaluating it on val/test if needed).

    ``study`` holds the search facts of ``study_facts`` when the run is a study's fine-tuned model.
    """
    run = Path(run_dir)
    check_run(run)
    cfg = _read_json(run / CONFIG_JSON)
    info = _read_json(run / DATA_JSON)
    run_metrics = _read_json(run / METRICS_JSON)
    data = Path(data_dir or info["data_dir"])
    meta = load_meta(data)
    threshold = float(run_metrics["threshold"])
    rdr_grade = int(info.get("rdr_grade", meta.get("rdr_grade", 2)))
    test, tp = _evaluation(run, "test", data, threshold)
    _, vp = _evaluation(run, "val", data, threshold)
    criterion = cfg.get("train", {}).get("threshold", "balanced_accuracy")
    # Runs written before train.monitor existed picked their epoch by balanced accuracy.
    monitor = run_metrics.get("monitor", "val_balanced_accuracy")
    card: dict[str, Any] = {
        "model_card_version": 1,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(run.resolve()),
        "intended_use": {
            "use": "research tool to compare referable-DR classifiers and their hyperparameters",
            "not": "not a medical device; not for diagnosis, screening or treatment decisions",
            "target": f"Referable DR = ICDR grade >= {rdr_grade} on one colour fundus photograph",
            "out_of_scope": "diabetic macular edema (DME), OCT, other eye disease, image quality grading",
        },
        "test": test,
        "operating_points": _operating_points(test, tp, vp, threshold, criterion),
        "reference_endpoints": {"name": "IDx-DR pivotal trial (Abramoff 2018)", **IDX_DR},
        "calibration": {**metrics.calibration(tp["label"], tp["p_rdr"]), "split": "test"},
        "per_grade": metrics.per_grade(tp["grade"], tp["called"], 0.5, rdr_grade),
        "data": _data_facts(data, meta, info, rdr_grade),
        "training": {"config": cfg, "best_epoch": run_metrics.get("best_epoch"),
                     "epochs_run": run_metrics.get("epochs_run"), "params": run_metrics.get("params"),
                     "seconds": run_metrics.get("seconds"),
                     "val_balanced_accuracy": run_metrics.get("val_balanced_accuracy"),
                     "val_auc": run_metrics.get("val_auc"), "threshold_criterion": criterion,
                     "monitor": monitor},
        "selection_rule": _selection_rule(monitor, criterion, bool(study)),
        "caveats": _caveats(test),
        "gradcam": _gradcam_links(run, (study or {}).get("gradcam")),
        "versions": _versions(),
    }
    if study:
        card["study"] = {k: v for k, v in study.items() if k != "gradcam"}
    return card


def _operating_points(test: dict[str, Any], tp: dict[str, np.ndarray], vp: dict[str, np.ndarray],
                      threshold: float, criterion: str) -> list[dict[str, Any]]:
    """The test metrics at the validation-frozen threshold and, when validation can reach it, at
    the threshold chosen on validation for sensitivity >= TARGET_SENSITIVITY; each says whether
    it clears the IDx-DR endpoints."""
    frozen = metrics.operating_point(f"validation-frozen threshold ({criterion})", tp["label"], tp["called"], 0.5)
    frozen["threshold"] = threshold
    val_frozen = metrics.binary_metrics(vp["label"], vp["p_rdr"], threshold)
    frozen.update(val_sensitivity=val_frozen["sensitivity"], val_specificity=val_frozen["specificity"])
    frozen.update(sensitivity=test["sensitivity"], specificity=test["specificity"])  # exact, as metrics.json
    points = [frozen]
    t85 = metrics.threshold_for_sensitivity(vp["label"], vp["p_rdr"], TARGET_SENSITIVITY)
    if t85 is not None:
        op = metrics.operating_point(f"sensitivity >= {TARGET_SENSITIVITY:.0%} on validation",
                                     tp["label"], tp["p_rdr"], t85)
        v = metrics.binary_metrics(vp["label"], vp["p_rdr"], t85)
        op.update(val_sensitivity=v["sensitivity"], val_specificity=v["specificity"])
        points.append(op)
    for op in points:
        op["meets_idx_dr_endpoints"] = bool(
            op["sensitivity"] is not None and op["specificity"] is not None
            and op["sensitivity"] > IDX_DR["sensitivity"] and op["specificity"] > IDX_DR["specificity"])
    return points


def _data_facts(data: Path, meta: dict[str, Any], info: dict[str, Any], rdr_grade: int) -> dict[str, Any]:
    """Where the photographs came from, how they were split and prepared."""
    splits = {s: {k: v for k, v in e.items() if k not in ("files", "names")} for s, e in meta["splits"].items()}
    return {
        "dir": str(data), "source": meta.get("source"), "splits": splits, "rdr_grade": rdr_grade,
        "group_pattern": meta.get("group_pattern"), "val_fraction": meta.get("val_fraction"),
        "split_seed": meta.get("seed"), "skipped": len(meta.get("skipped", [])),
        "preprocessing": {"size": info.get("size"), "input_size": info.get("input_size"),
                          "normalize": info.get("normalize", "none"),
                          "jpeg_quality": info.get("jpeg_quality")},
    }


def _selection_rule(monitor: str, criterion: str, from_study: bool) -> str:
    """What was chosen on validation (and so nothing on test), in the run's own terms."""
    value = "AUC" if monitor == "val_auc" else "balanced accuracy (threshold 0.5)"
    return ("Chosen on the validation split only: the weights of the epoch with the best validation "
            f"{value}, the decision threshold ({criterion} on validation, then frozen), the "
            "sensitivity-target operating point"
            + (f", and the hyperparameters (the best trial of the study by validation {value})"
               if from_study else "")
            + ". The test split was used for nothing but the numbers in this report.")


def _caveats(test: dict[str, Any]) -> list[str]:
    """What a reader must keep in mind, with the test split's own size."""
    cm = test["confusion_matrix"]
    return [
        f"Small test set (n={test['n']}: {cm[1][0] + cm[1][1]} RDR, {cm[0][0] + cm[0][1]} NRDR): read the "
        "95% CIs, not the point estimates; an endpoint is shown to be met only when the CI's "
        "lower bound clears it.",
        "Camera, site and population shift: performance on photographs from other cameras, "
        "clinics or populations than the data above is unknown until tested there.",
        "Grad-CAM heatmaps are qualitative: they show where the model's evidence lies, not "
        "that it is clinically right, and they are not a validated lesion detector.",
        "Calibration was measured on the test split and not corrected: P(RDR) is a score, not "
        "a risk, unless the reliability diagram says otherwise.",
    ]


def study_facts(cfg: Any, storage: str | None = None, name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(fine-tuned run directory, search facts) of a study, read from its storage (read-only)."""
    # Optuna: only a study's report needs it, not a run directory's.
    from optuna.trial import TrialState

    from drtune.study import load_study

    study = load_study(cfg, storage, name)
    ft = study.user_attrs.get("finetune")
    if not ft or not ft.get("run_dir"):
        raise InputError(f"study {study.study_name!r} has no fine-tuned model; run 'drtune finetune --best' first")
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    search = study.user_attrs.get("config", {}).get("search") or config_lib.to_dict(cfg)["search"]
    grid = any("grid_id" in t.system_attrs for t in trials)
    try:
        best = study.best_trial
        best_facts = {"number": best.number, "value": best.value, "params": best.params}
    except ValueError:
        best_facts = None
    facts = {
        "name": study.study_name,
        "objective": f"validation balanced accuracy ({study.direction.name.lower()})",
        "trials": {"total": len(trials), **counts,
                   "retried": sum("retry_of" in t.user_attrs or "failed_trial" in t.system_attrs for t in trials)},
        "sampler": "grid" if grid else f"TPE (seed {search.get('sampler_seed')})",
        "space": search.get("grid") if grid else search.get("space"),
        "pruner": f"{search.get('pruner')} (startup trials {search.get('pruner_startup_trials')}, "
                  f"warm-up epochs {search.get('pruner_warmup_epochs')})",
        "best_trial": best_facts,
        "finetuned_trial": ft.get("trial"),
        "gradcam": ft.get("gradcam") or {},
    }
    return Path(ft["run_dir"]), facts


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dir: Path | str, out_dir: Path | str, data_dir: Path | str | None = None,
                 study: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``OUT/report.json`` and ``OUT/report.html`` for a finished run; return the card."""
    run, out = Path(run_dir), Path(out_dir)
    card = build_card(run, data_dir, study)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None
    # Links are relative to the report, so the report and the run can move together.
    card["gradcam_links"] = [os.path.relpath(p, out.resolve()) for p in card["gradcam"]]
    test_dir = eval_dir(run, "test")
    tp_path = test_dir / PREDICTIONS_CSV
    with tp_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    y = [int(r["label"]) for r in rows]
    p = [float(r["p_rdr"]) for r in rows]
    images = {
        "confusion_matrix": png(test_dir / "confusion_matrix.png"),
        "roc": png(test_dir / "roc.png"),
        "reliability": fig_png(metrics.plot_reliability(y, p, title=f"Reliability on test (n={len(y)})")),
        "history": png(run / "history.png"),
    }
    _write_atomic(out / "report.json", json.dumps(card, indent=2) + "\n")
    _write_atomic(out / "report.html", render_html(card, images))
    logging.info("wrote %s and %s", out / "report.html", out / "report.json")
    return card


def report_study(cfg: Any, out_dir: Path | str, storage: str | None = None, name: str | None = None,
                 data_dir: Path | str | None = None) -> dict[str, Any]:
    """The model card of a study's fine-tuned model (``finetune --best``), with the search facts."""
    run, facts = study_facts(cfg, storage, name)
    return write_report(run, out_dir, data_dir, facts)
