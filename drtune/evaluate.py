"""Evaluate a run on a split, and predict on raw photographs, with the run's frozen threshold.

``evaluate`` writes ``RUN/eval-<split>/`` (metrics.json with 95% CIs, confusion_matrix.png,
roc.png, predictions.csv); ``predict`` applies exactly the ``prepare`` preprocessing to raw
photographs and writes one CSV row per image, an error row for any it cannot read.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from drtune import data, metrics
from drtune.errors import InputError
from drtune.model import as_float32
from drtune.prepare import ImageError, encode_jpeg, preprocess_file
from drtune.runs import (CLASS_NAMES, CONFIG_JSON, DATA_JSON, METRICS_JSON, MODEL_KERAS, PREDICTIONS_CSV, SPLITS,
                         TEST, eval_dir, load_meta, prepared_differences, prepared_options, prepared_refusal,
                         write_json)
# Importing drtune.tta also registers tta.View with Keras, the layer ensemble runs' models hold,
# so that load_run loads any run's model.keras.
from drtune.tta import tta_model


def load_run(run_dir: Path | str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model, data.json, metrics.json) of a finished run, with clear errors for anything missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: run directory not found")
    model_path = run / MODEL_KERAS
    if not model_path.is_file():
        raise InputError(f"{run}: no {MODEL_KERAS} (is the run finished? run 'drtune train' first)")
    for name in (DATA_JSON, METRICS_JSON):
        if not (run / name).is_file():
            raise InputError(f"{run}: missing {name}; the run did not finish")
    # A model trained in mixed precision is evaluated, thresholded and explained in float32.
    model = as_float32(keras.models.load_model(model_path))
    return model, json.loads((run / DATA_JSON).read_text()), json.loads((run / METRICS_JSON).read_text())


def predictor(model: Any, run_dir: Path | str) -> Any:
    """The run's model as evaluate, predict and gradcam apply it: with the test-time
    augmentation of its config (``train.tta``), the same views its threshold was frozen with."""
    path = Path(run_dir) / CONFIG_JSON
    tta = json.loads(path.read_text()).get("train", {}).get("tta", "none") if path.is_file() else "none"
    return tta_model(model, tta)


def check_data_matches_run(meta: dict[str, Any], info: dict[str, Any], data_dir: Path | str,
                           run_dir: Path | str) -> None:
    """``InputError`` naming each ``prepare`` option (``runs.PREPARED_WITH``) on which
    ``DATA/meta.json`` and the run's ``data.json`` disagree; evaluate and gradcam call it before
    any work, since such data decodes fine and only the metrics would be wrong."""
    diffs = prepared_differences(prepared_options(info), meta)
    if diffs:
        raise InputError(prepared_refusal(data_dir, diffs, f"{run_dir} was trained on"))


def evaluate_run(run_dir: Path | str, data_dir: Path | str | None = None, split: str = TEST,
                 n_boot: int = 1000, batch_size: int = 32) -> dict[str, Any]:
    """Metrics of a run on ``split`` at its frozen threshold; writes ``RUN/eval-<split>/``."""
    if split not in SPLITS:
        raise InputError(f"--split {split!r}: must be {', '.join(SPLITS[:-1])} or {SPLITS[-1]}")
    if n_boot < 1:
        raise InputError(f"--n-boot {n_boot}: must be >= 1")
    run = Path(run_dir)
    model, info, run_metrics = load_run(run)
    data_dir = Path(data_dir or info["data_dir"])
    meta = load_meta(data_dir)
    check_data_matches_run(meta, info, data_dir, run)
    if meta["splits"].get(split, {}).get("n", 0) == 0:
        raise InputError(f"{data_dir}: split {split!r} is empty; nothing to evaluate")
    image_size = info["input_size"] if info["input_size"] != info["size"] else None
    ds = data.eval_dataset(data_dir, split, batch_size, image_size=image_size, meta=meta)
    y = data.split_labels(data_dir, split, meta)
    names = data.split_names(data_dir, split, meta)
    grades = data.split_grades(data_dir, split, meta)  # per-grade sensitivity in the model card
    p_rdr = predictor(model, run).predict(ds, verbose=0)[:, 1]
    threshold = float(run_metrics["threshold"])
    result = metrics.report(y, p_rdr, threshold, n_boot=n_boot)
    result.update(split=split, data_dir=str(data_dir), run=str(run))

    out = eval_dir(run, split)
    out.mkdir(exist_ok=True)
    title = f"{run.name}: {split} (n={len(y)}, threshold {threshold:.3f})"
    metrics.plot_confusion_matrix(result["confusion_matrix"], out / "confusion_matrix.png", title)
    metrics.plot_roc(y, p_rdr, out / "roc.png", threshold=threshold, title=title)
    _write_csv(out / PREDICTIONS_CSV, ["name", "label", "p_rdr", "decision", "grade"],
               [[n, int(t), f"{p:.6f}", CLASS_NAMES[int(p >= threshold)], int(g)]
                for n, t, p, g in zip(names, y, p_rdr, grades)])
    write_json(out / METRICS_JSON, result)
    ci = result["ci95"]
    logging.info("%s %s: balanced accuracy %.3f (95%% CI %s), AUC %s, sensitivity %s, specificity %s",
                 run, split, result["balanced_accuracy"], _fmt_ci(ci.get("balanced_accuracy")),
                 _fmt(result["auc"]), _fmt(result["sensitivity"]), _fmt(result["specificity"]))
    logging.info("wrote %s", out)
    return result


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _fmt_ci(ci: Sequence[float] | None) -> str:
    return "n/a" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def model_inputs(paths: Sequence[Path | str], info: dict[str, Any]) -> tuple[np.ndarray, list[str | None]]:
    """Raw photographs -> model input batch exactly as training saw them, plus per-image errors.

    Preprocess as ``prepare`` did, round-trip through JPEG at the data set's quality and decode
    and resize with TensorFlow like the input pipeline, so predictions on a photo match the
    prediction on its prepared record. Unreadable images get a zero image and an error string.
    """
    size, input_size = int(info["size"]), int(info["input_size"])
    batch = np.zeros((len(paths), input_size, input_size, 3), np.float32)
    errors: list[str | None] = []
    for i, path in enumerate(paths):
        try:
            crop = preprocess_file(path, size, info.get("normalize", "none"))
        except ImageError as exc:
            errors.append(str(exc))
            continue
        jpeg = encode_jpeg(crop, int(info.get("jpeg_quality", 95)))
        batch[i] = data.decode_image(tf.constant(jpeg), size, input_size).numpy().astype(np.float32)
        errors.append(None)
    return batch, errors


def predict_files(run_dir: Path | str, images: Sequence[Path | str],
                  out_csv: Path | str | None = None) -> list[dict[str, Any]]:
    """P(RDR) and decision for each raw photograph; writes ``out_csv`` when given."""
    if not images:
        raise InputError("no images given")
    model, info, run_metrics = load_run(run_dir)
    threshold = float(run_metrics["threshold"])
    batch, errors = model_inputs(images, info)
    ok = [i for i, e in enumerate(errors) if e is None]
    probs = predictor(model, run_dir).predict(batch[ok], verbose=0)[:, 1] if ok else np.zeros(0)
    p_of = dict(zip(ok, probs))
    rows = []
    for i, path in enumerate(images):
        if errors[i] is not None:
            logging.warning("%s: %s", path, errors[i])
            rows.append({"name": Path(path).stem, "file": str(path), "p_rdr": "", "decision": "",
                         "threshold": threshold, "error": errors[i]})
        else:
            p = float(p_of[i])
            rows.append({"name": Path(path).stem, "file": str(path), "p_rdr": round(p, 6),
                         "decision": CLASS_NAMES[int(p >= threshold)], "threshold": threshold, "error": ""})
    if out_csv is not None:
        header = ["name", "file", "p_rdr", "decision", "threshold", "error"]
        _write_csv(Path(out_csv), header, [[r[h] for h in header] for r in rows])
        logging.info("wrote %d prediction(s) to %s", len(rows), out_csv)
    return rows
