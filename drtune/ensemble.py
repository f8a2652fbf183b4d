"""An ensemble of finished runs, written as a run directory of its own.

``drtune finetune --best --top-k K`` averages the fine-tuned models of the K best trials. So
that ``evaluate``, ``predict``, ``gradcam`` and ``report`` need nothing new, the ensemble is an
ordinary run directory (``STUDY/finetune-topK/``):

- ``model.keras``: one Keras functional model. Each member is a nested sub-model named
  ``member_<label>`` (``member_trial_0003``); it sees the photograph through its own test-time
  augmentation views (``tta.View`` layers, its ``train.tta``) and its probabilities are
  averaged over them (by ``tta.mean_over_views``, as ``tta.tta_model`` does for a single run); the
  members' softmax outputs are then averaged (``keras.layers.Average``). P(RDR) of the ensemble is thus
  the mean of the members' P(RDR), each as that member's own run reports it.
- ``config.json``: the first member's config with ``train.tta = "none"``, since the views are
  inside the model already (``evaluate.predictor`` must not apply them a second time).
- ``data.json``: the first member's; members trained on data prepared differently (size,
  normalisation, RDR grade, input size) are refused (:func:`check_same_data`).
- ``ensemble.json``: the members (label, run directory, TTA mode), in order.
- ``metrics.json``: the threshold frozen on the *ensemble's* validation predictions, with the
  validation metrics at it; the test split chooses nothing.

The folder is built in a temporary sibling and moved into place, so a crash never leaves half
an ensemble. ``tta.View`` is registered with Keras: :func:`drtune.evaluate.load_run` imports
``drtune.tta`` so that any run's ``model.keras`` loads.
Grad-CAM has no single feature map here: :func:`member_models` gives the members, whose maps
``gradcam`` averages.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import keras
from absl import logging
from keras import layers

from drtune import data, metrics, runs
from drtune.errors import InputError
from drtune.tta import mean_over_views

MEMBER_PREFIX = "member_"
ENSEMBLE_JSON = "ensemble.json"


def build_model(members: Mapping[str, tuple[keras.Model, str]]) -> keras.Model:
    """The ensemble of ``{label: (model, tta mode)}``: mean over members of each member's mean
    over its TTA views. The members' weights are shared, not copied."""
    shapes = {label: tuple(m.input_shape[1:]) for label, (m, _) in members.items()}
    if len(set(shapes.values())) > 1:
        raise InputError("ensemble members take different input sizes: "
                         + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    heads = {label: int(m.output.shape[-1]) for label, (m, _) in members.items()}
    if len(set(heads.values())) > 1:
        # Columns 0-1 (P(NRDR), P(RDR)) mean the same in both, but a mean over outputs of different
        # widths has no meaning: an ensemble is of one kind of classifier (model.head).
        raise InputError("ensemble members have different classifiers (model.head): "
                         + ", ".join(f"{k} {'grade' if v > 2 else 'referral'}" for k, v in heads.items()))
    inputs = keras.Input(next(iter(shapes.values())), name="image")
    outs = []
    for label, (model, mode) in members.items():
        name = f"{MEMBER_PREFIX}{label}"
        # A fresh functional wrapper gives the member a unique name inside the ensemble (every
        # drtune model has the same one) while sharing its layers.
        member = keras.Model(model.input, model.output, name=name)
        outs.append(mean_over_views(member, inputs, mode, name))
    mean = outs[0] if len(outs) == 1 else layers.Average(name="ensemble_mean")(outs)
    return keras.Model(inputs, mean, name="ensemble")


def member_models(model: keras.Model) -> list[keras.Model]:
    """The members of an ensemble model (nested sub-models, in label order); ``[]`` for a single
    run's model."""
    found = [layer for layer in model.layers
             if isinstance(layer, keras.Model) and layer.name.startswith(MEMBER_PREFIX)]
    return sorted(found, key=lambda m: m.name)


def is_ensemble(run_dir: Path | str) -> bool:
    return (Path(run_dir) / ENSEMBLE_JSON).is_file()


def check_same_data(members: Mapping[str, Path | str]) -> None:
    """``InputError`` naming the members of ``{label: run directory}`` whose ``data.json`` differs
    from the first member's in a ``prepare`` option (``runs.prepared_differences``) or the input size:
    averaging models that expect differently prepared photographs has no meaning."""
    infos = {}
    for label, run in members.items():
        path = Path(run) / runs.DATA_JSON
        if not path.is_file():
            raise InputError(f"{run}: ensemble member {label} has no {runs.DATA_JSON} (is the run finished?)")
        infos[label] = json.loads(path.read_text())
    (first, want), *rest = infos.items()
    for label, have in rest:
        diff = [f"{d.key}={d.expected} vs {d.found}"
                for d in runs.prepared_differences(runs.prepared_options(want), have)]
        # The input size is the study's (data.image_size), not a `prepare` option, so it is
        # compared here rather than in runs.PREPARED_WITH (whose differences name a prepare flag).
        if _input_size(have) != _input_size(want):
            diff.append(f"input_size={_input_size(want)} vs {_input_size(have)}")
        if diff:
            raise InputError(
                f"ensemble members {first} and {label} were trained on data prepared differently: "
                + ", ".join(diff) + f" ({members[first]}, {members[label]}); an ensemble needs one kind of input")


def _input_size(info: Mapping[str, Any]) -> int:
    """The side of the model's input of a data.json (older ones without it: the prepared size)."""
    return int(info.get("input_size", info["size"]))


def _read_member(label: str, run: Path) -> tuple[keras.Model, str, dict[str, Any], dict[str, Any]]:
    """(model, TTA mode, config.json, data.json) of a finished member run."""
    for name in (runs.MODEL_KERAS, runs.CONFIG_JSON, runs.DATA_JSON, runs.METRICS_JSON):
        if not (run / name).is_file():
            raise InputError(f"{run}: ensemble member {label} has no {name} (is the run finished?)")
    cfg = json.loads((run / runs.CONFIG_JSON).read_text())
    info = json.loads((run / runs.DATA_JSON).read_text())
    model = keras.models.load_model(run / runs.MODEL_KERAS)
    return model, cfg.get("train", {}).get("tta", "none"), cfg, info


def _freeze_threshold(model: keras.Model, data_dir: Path, meta: dict[str, Any], info: dict[str, Any],
                      rule: str) -> tuple[float, dict[str, Any]]:
    """(threshold, validation metrics at it) from the ensemble's validation predictions, as
    ``train._finish`` freezes a single run's."""
    image_size = info["input_size"] if info["input_size"] != info["size"] else None
    val = data.eval_dataset(data_dir, "val", 32, cache=False, image_size=image_size, meta=meta)
    y_val = data.split_labels(data_dir, "val", meta)
    p_val = model.predict(val, verbose=0)[:, 1]
    threshold = metrics.choose_threshold(y_val, p_val, rule)
    return threshold, metrics.binary_metrics(y_val, p_val, threshold)


def write_run(out: Path | str, members: Mapping[str, Path | str],
              data_dir: Path | str | None = None) -> dict[str, Any]:
    """Build the ensemble run directory ``out`` of ``{label: run directory}`` (labels name the
    member sub-models, e.g. ``trial_0003``); return its metrics.json. The threshold is frozen on
    the validation split of ``data_dir`` (default: the first member's data). An existing ``out``
    is replaced as a whole once the new one is complete."""
    if len(members) < 1:
        raise InputError("an ensemble needs at least one member run")
    out = Path(out)
    check_same_data(members)
    loaded = {label: _read_member(label, Path(run)) for label, run in members.items()}
    first_cfg, first_info = next(iter(loaded.values()))[2:]
    data_dir = Path(data_dir or first_info["data_dir"]).resolve()
    meta = runs.load_meta(data_dir)
    diffs = runs.prepared_differences(runs.prepared_options(first_info), meta)
    if diffs:  # the threshold would be frozen on photographs the members never saw the like of
        raise InputError(runs.prepared_refusal(data_dir, diffs, "the ensemble members were trained on"))
    model = build_model({label: (m, mode) for label, (m, mode, _, _) in loaded.items()})
    rule = first_cfg.get("train", {}).get("threshold", "balanced_accuracy")
    threshold, val = _freeze_threshold(model, data_dir, meta, first_info, rule)
    result = {
        # ``val``: the ensemble's validation metrics at the frozen threshold (a single run's
        # ``val_balanced_accuracy`` is its best epoch's at 0.5, so it is not repeated here).
        "ensemble": list(members), "threshold": threshold, "threshold_rule": rule, "val": val,
        "val_auc": val["auc"],
        "params": model.count_params(), "data_dir": str(data_dir), "n_train": meta["splits"]["train"]["n"],
    }
    cfg = {**first_cfg, "train": {**first_cfg.get("train", {}), "tta": "none"}}
    described = [{"label": label, "run_dir": str(Path(members[label]).resolve()), "tta": mode}
                 for label, (_, mode, _, _) in loaded.items()]
    with runs.atomic_dir(out, install=_replace_dir) as tmp:
        model.save(tmp / runs.MODEL_KERAS)
        for name, obj in ((runs.CONFIG_JSON, cfg), (runs.DATA_JSON, {**first_info, "data_dir": str(data_dir)}),
                          (ENSEMBLE_JSON, {"members": described}), (runs.METRICS_JSON, result)):
            (tmp / name).write_text(json.dumps(obj, indent=2, default=float) + "\n")
        tmp.chmod(0o755)
    logging.info("wrote the ensemble of %s to %s: validation balanced accuracy %.3f at threshold %.3f "
                 "(frozen on validation)", ", ".join(members), out, val["balanced_accuracy"], threshold)
    return result


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing an older ``out`` (``os.replace`` cannot replace a folder
    that is not empty, so the old one is renamed aside first and removed last)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
