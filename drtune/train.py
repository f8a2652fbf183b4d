"""One training run: ``train_and_evaluate(cfg, data_dir, workdir, callbacks) -> metrics``.

The run directory is the unit of work (flax style): it holds the resolved config, the
best-by-validation model, periodic checkpoints, the history and TensorBoard logs, and a run
killed at any point resumes from it when started again with the same config. This module never
imports Optuna: the search passes its pruning callback in through ``callbacks``.

Epochs are numbered as people count them, from 1, in everything a run writes: the ``epoch``
column of ``history.csv``, ``best_epoch`` and ``epochs_run`` in ``metrics.json``,
``checkpoints/epoch-NNNN.keras``, ``epochs_done`` in ``checkpoints/state.json`` (the last
finished epoch, hence also how many are done), the TensorBoard steps, the learning-curve plot,
the log lines, and the steps at which the search reports to Optuna. Keras counts from 0 inside
``fit``, so the callbacks that write (:mod:`drtune.callbacks`) add one. A ``history.csv`` of a
run written before this (0-based) is read through :func:`drtune.metrics.read_history`, which
shifts it, and is rewritten 1-based when such a run resumes.

The callbacks themselves, and the order in which :func:`_callbacks` installs them, are
described in :mod:`drtune.callbacks`.
"""

from __future__ import annotations

import csv
import errno
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from drtune import config as config_lib
from drtune import data, devices, metrics, runs
# The callbacks live in drtune.callbacks; the names other modules, scripts and tests import from
# here (RunOwnershipLost, RunOwner, MONITOR, LAST, seconds_per_epoch) stay importable, and so does
# write_json, whose home is drtune.runs.
from drtune.callbacks import (CHANCE_LOSS, LAST, MONITOR, STATE, BestModel, ChanceLevel, Checkpoints, CSVLogger,
                              EMAWeights, EpochLog, ResumableEarlyStopping, RunOwner, RunOwnershipLost,
                              StuckAtChance, TensorBoard, ValidationMetrics, grade_chance_loss, seconds_per_epoch)
from drtune.config import GRADE_HEADS, Config
from drtune.errors import DrtuneError, InputError
from drtune.metrics import read_history
from drtune.model import as_float32, build_model, compile_model, head_kind
from drtune.runs import (CHECKPOINTS_DIR, CONFIG_JSON, DATA_JSON, HISTORY_CSV, METRICS_JSON, MODEL_KERAS, TRAIN,
                         write_json)
from drtune.tta import tta_model


# Seed offset of each restart (train.chance_restarts): a prime, so restarts of neighbouring
# train.seed values do not land on each other's seeds.
RESTART_SEED_STEP = 1_000_003


class TrainingDiverged(DrtuneError):
    """The loss became NaN or infinite."""


def _trim_history(path: Path, epochs_done: int) -> list[dict[str, str]]:
    """Keep only rows of finished epochs (a kill can land between the CSV and the checkpoint).

    The file is rewritten with epochs counted from 1, also when an older run wrote it 0-based,
    so that the rows appended on resume continue its numbering.
    """
    # A row cut short by a full disk or a kill has no parsable epoch: it is not a finished one.
    rows = [r for r in read_history(path)
            if (r.get("epoch") or "").isdigit() and int(r["epoch"]) <= epochs_done]
    if path.is_file():
        with path.open("w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return rows


def _best(rows: list[dict[str, str]], monitor: str = MONITOR) -> tuple[int, float]:
    """(epoch, value) of the best ``monitor`` value in history rows; (0, -inf) when there is none."""
    values = [float(r.get(monitor, "nan") or "nan") for r in rows]
    if not values or all(math.isnan(v) for v in values):
        return 0, -math.inf
    i = int(np.nanargmax(values))
    return int(rows[i]["epoch"]), values[i]


def _check_workdir(cfg_dict: dict[str, Any], workdir: Path) -> None:
    path = workdir / CONFIG_JSON
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    try:
        # A run written before a config key existed holds no value for it: read it back through
        # the config, so a new key at its default still matches and the run resumes.
        old = config_lib.to_dict(config_lib.from_dict(old, str(path)))
    except InputError:
        pass  # a key this version no longer knows: the comparison below names it
    if old != cfg_dict:
        flat_old, flat_new = _flatten(old), _flatten(cfg_dict)
        diff = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
        raise InputError(f"{workdir}: holds a run with a different config ({', '.join(diff)}); "
                         "use another output directory or the same settings to resume")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _finite(value: float) -> float | None:
    """JSON has no NaN: undefined values (AUC of a one-class split) are stored as null."""
    return value if math.isfinite(value) else None


def resolve_data_dir(cfg: Config, data_dir: Path | str | None) -> Path:
    """The data directory from the argument or the config's ``data.dir``."""
    chosen = data_dir or cfg.data.dir
    if not chosen:
        raise InputError("no data directory: pass --data DATA or set data.dir in the config")
    return Path(chosen)


def _errors_as_messages(train: Any) -> Any:
    """Turn what a full disk or a damaged shard raises into one-line errors that say what to do.

    (A decorator, so that the training code keeps its shape.) Nothing else is caught: the
    search's ``TrialPruned`` and :class:`RunOwnershipLost` pass through unchanged.
    """
    @functools.wraps(train)
    def wrapper(cfg: Config, data_dir: Path | str | None, workdir: Path | str, *args: Any,
                **kwargs: Any) -> dict[str, Any]:
        full = (f"{workdir}: no space left on the device; free some space (or use another "
                "output directory), then run the same command again: it resumes from the last "
                "finished epoch")
        try:
            return train(cfg, data_dir, workdir, *args, **kwargs)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
                raise DrtuneError(full) from exc
            raise
        except tf.errors.ResourceExhaustedError as exc:  # TensorFlow's writers (TensorBoard)
            if "No space left" in str(exc):
                raise DrtuneError(full) from exc
            raise
        except tf.errors.DataLossError as exc:
            where = data_dir or cfg.data.dir
            detail = str(exc.message).strip().splitlines()[0][:160]
            raise InputError(f"{where}: a TFRecord shard is damaged or truncated ({detail}); run "
                             "`drtune prepare` again to rewrite this data directory") from exc

    return wrapper


@_errors_as_messages
def train_and_evaluate(
    cfg: Config,
    data_dir: Path | str | None,
    workdir: Path | str,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    init_model: Path | str | None = None,
) -> dict[str, Any]:
    """Train one model, resuming from ``workdir`` if it holds an unfinished run; return metrics.

    ``init_model`` warm-starts from a saved model (fine-tuning) instead of random weights (see
    :func:`_initial_model`). The decision threshold is chosen on the validation split and
    frozen into ``metrics.json``.
    """
    data_dir = resolve_data_dir(cfg, data_dir).resolve()
    meta = runs.load_meta(data_dir)
    config_lib.check_prepared(cfg, meta, data_dir)
    cfg = config_lib.replace(cfg, **{"data.dir": str(data_dir)})
    workdir = Path(workdir)
    cfg_dict = config_lib.to_dict(cfg)
    if (workdir / METRICS_JSON).is_file():
        _check_workdir(cfg_dict, workdir)
        logging.info("%s: run already complete; delete it to train again", workdir)
        return json.loads((workdir / METRICS_JSON).read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir(cfg_dict, workdir)
    owner = RunOwner(workdir)
    owner.claim()
    logging.info("%s: training on %s, %s", workdir, devices.configure(), cfg.train.precision)
    input_size = _write_run_files(workdir, cfg_dict, cfg, data_dir, meta)
    state_path = workdir / CHECKPOINTS_DIR / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    t0 = time.monotonic()
    while True:
        try:
            epoch_log, val_ds, y_val = _fit(cfg, workdir, data_dir, meta, owner, state, callbacks,
                                            init_model, input_size)
            break
        except StuckAtChance as exc:
            state = _restart(cfg, workdir, owner, int(state.get("restarts", 0)) + 1, str(exc))
    seconds = time.monotonic() - t0
    owner.check()  # a run taken over after its last epoch must not write metrics.json either
    history = read_history(workdir / HISTORY_CSV)
    _check_converged(cfg, workdir, history)
    return _finish(cfg, workdir, data_dir, meta, val_ds, y_val, history, seconds, epoch_log.seconds,
                   int(state.get("restarts", 0)))


def _fit(cfg: Config, workdir: Path, data_dir: Path, meta: dict[str, Any], owner: RunOwner,
         state: dict[str, Any], callbacks: Sequence[keras.callbacks.Callback], init_model: Path | str | None,
         input_size: int) -> tuple[EpochLog, tf.data.Dataset, np.ndarray]:
    """Run (or resume) ``fit`` from the committed ``state``; (epoch log, validation data, labels)."""
    epochs_done = int(state.get("epochs_done", 0))
    restarts = int(state.get("restarts", 0))
    # A restarted run draws new initial weights (and dropout masks); the data stream, seeded by
    # train.seed itself in drtune.data, stays the same. NumPy and Keras take 32-bit seeds.
    keras.utils.set_random_seed((cfg.train.seed + RESTART_SEED_STEP * restarts) % 2**32)
    train_ds, steps, val_ds, y_val = _datasets(cfg, data_dir, meta, epochs_done)
    history = _trim_history(workdir / HISTORY_CSV, epochs_done)
    model = _initial_model(cfg, workdir, epochs_done, init_model, input_size, steps,
                           int(meta.get("rdr_grade", 2)))
    epoch_log = EpochLog(cfg.train.epochs)
    early_stopping = (ResumableEarlyStopping(cfg.train.patience, state.get("early_stopping"), cfg.train.monitor)
                      if cfg.train.patience else None)
    # Restarting re-draws random weights, which a warm start (fine-tuning) does not have.
    chance = (ChanceLevel(cfg.train.chance_check_epoch,
                          cfg.train.chance_restarts - restarts if init_model is None else 0,
                          chance_loss=_chance_loss(cfg, meta))
              if cfg.train.chance_check_epoch else None)
    cbs = _callbacks(workdir, cfg, owner, val_ds, y_val, _best(history, cfg.train.monitor)[1],
                     bool(history), epoch_log, early_stopping, chance, restarts, callbacks)
    logging.info("training %s: %d epochs x %d steps, batch %d, lr %g, %d parameters%s",
                 workdir, cfg.train.epochs, steps, cfg.train.batch_size, cfg.train.lr, model.count_params(),
                 f" (restart {restarts})" if restarts else "")
    if epochs_done < cfg.train.epochs:
        model.fit(train_ds, epochs=cfg.train.epochs, initial_epoch=epochs_done, steps_per_epoch=steps,
                  callbacks=cbs, verbose=0, shuffle=False, class_weight=_class_weights(cfg, data_dir, meta))
    return epoch_log, val_ds, y_val


def _class_weights(cfg: Config, data_dir: Path, meta: dict[str, Any]) -> dict[int, float] | None:
    """``train.class_weights``: n / (2 n_class) per class, so both classes weigh half the loss."""
    if not cfg.train.class_weights:
        return None
    counts = data.class_counts(data_dir, meta, "weight classes")
    return {label: sum(counts) / (2.0 * count) for label, count in enumerate(counts)}


def _restart(cfg: Config, workdir: Path, owner: RunOwner, restarts: int, why: str) -> dict[str, Any]:
    """Start the run over from new random weights; returns the committed state of the restart.

    The new ``state.json`` (no epoch done, the restart count) is written first: it commits the
    restart, so a kill at any point after it resumes the restarted run (``history.csv`` is trimmed
    to the committed epochs), and a kill before it re-runs the stuck epoch and restarts again.
    Then what the abandoned start wrote is removed: its models, checkpoints and TensorBoard logs.
    """
    logging.warning("%s: %s; restart %d of %d from new random weights (train.chance_restarts)",
                    workdir, why, restarts, cfg.train.chance_restarts)
    state = {"epochs_done": 0, "restarts": restarts}
    owner.check()
    write_json(workdir / CHECKPOINTS_DIR / STATE, state)
    for path in [workdir / MODEL_KERAS, workdir / CHECKPOINTS_DIR / LAST,
                 *(workdir / CHECKPOINTS_DIR).glob("epoch-*.keras")]:
        path.unlink(missing_ok=True)
    shutil.rmtree(workdir / "tensorboard", ignore_errors=True)
    return state


def _write_run_files(workdir: Path, cfg_dict: dict[str, Any], cfg: Config, data_dir: Path,
                     meta: dict[str, Any]) -> int:
    """``config.json``, ``data.json`` and ``checkpoints/``; returns the model's input size."""
    write_json(workdir / CONFIG_JSON, cfg_dict)
    input_size = cfg.data.image_size or int(meta["size"])
    write_json(workdir / DATA_JSON, {
        "data_dir": str(data_dir), "size": int(meta["size"]), "input_size": input_size,
        "normalize": meta.get("normalize", "none"), "jpeg_quality": meta.get("jpeg_quality", 95),
        "rdr_grade": meta.get("rdr_grade", 2)})
    (workdir / CHECKPOINTS_DIR).mkdir(exist_ok=True)
    return input_size


def _datasets(cfg: Config, data_dir: Path, meta: dict[str, Any],
              epochs_done: int) -> tuple[tf.data.Dataset, int, tf.data.Dataset, np.ndarray]:
    """(training dataset, steps per epoch, validation dataset, validation labels).

    The training dataset starts at epoch ``epochs_done``, so a resumed run sees the batches
    the uninterrupted run would have seen.
    """
    image_size = cfg.data.image_size or None
    train_ds, steps = data.train_dataset(data_dir, cfg.train.batch_size, cfg.data.augment, cfg.train.seed,
                                         balance=cfg.data.balance, cache=cfg.data.cache,
                                         image_size=image_size, meta=meta,
                                         steps_per_epoch=cfg.train.steps_per_epoch,
                                         initial_epoch=min(epochs_done, cfg.train.epochs),
                                         borderline=cfg.train.borderline, grades=cfg.model.head in GRADE_HEADS)
    val_ds = data.eval_dataset(data_dir, "val", cfg.train.eval_batch_size, cache=cfg.data.cache,
                               image_size=image_size, meta=meta)
    y_val = data.split_labels(data_dir, "val", meta)
    if len(set(y_val.tolist())) < 2:
        logging.warning("%s: the validation split holds only %s images: balanced accuracy and AUC "
                        "on it say nothing, and the best model and threshold are arbitrary",
                        data_dir, ("NRDR", "RDR")[int(y_val[0])])
    return train_ds, steps, val_ds, y_val


def _initial_model(cfg: Config, workdir: Path, epochs_done: int, init_model: Path | str | None,
                   input_size: int, steps: int, rdr_grade: int = 2) -> keras.Model:
    """The model training starts from, in this order of precedence:

    1. the run's own checkpoint (``checkpoints/last.keras``) when an epoch is done: a resumed
       run continues with its weights and optimizer state, whatever ``init_model`` says;
    2. else ``init_model`` (a warm start, as fine-tuning does), compiled afresh;
    3. else a new model built from ``cfg.model`` (from scratch), compiled.
    """
    if epochs_done:
        logging.info("%s: resuming after epoch %d", workdir, epochs_done)
        return keras.models.load_model(workdir / CHECKPOINTS_DIR / LAST)
    if init_model is not None:
        model = keras.models.load_model(init_model)
        logging.info("warm start from %s", init_model)
    else:
        model = build_model(cfg.model, input_size, cfg.train.precision, rdr_grade)
    if head_kind(model) != cfg.model.head:
        # The pipeline's targets follow the config, the loss follows the model: they must agree.
        raise InputError(f"{init_model}: its classifier ({head_kind(model)}) does not match model.head = "
                         f"{cfg.model.head!r}; warm-start a model trained with the same head")
    compile_model(model, cfg.train.lr, cfg.train, steps, cfg.train.precision, cfg.train.jit_compile)
    return model


def _chance_loss(cfg: Config, meta: dict[str, Any]) -> float:
    """The training loss of a run at chance level: ln 2, or for a grade head the entropy of the
    training grades as the stream draws them (class weights balance the loss as sampling would)."""
    if cfg.model.head not in GRADE_HEADS:
        return CHANCE_LOSS
    grades = meta["splits"][TRAIN]["grades"]
    return grade_chance_loss([int(grades[str(g)]) for g in range(5)], int(meta.get("rdr_grade", 2)),
                             cfg.data.balance or cfg.train.class_weights, cfg.train.label_smoothing)


def _check_converged(cfg: Config, workdir: Path, history: list[dict[str, str]]) -> None:
    """Raise :class:`TrainingDiverged` when no epoch was logged or a training loss is not finite."""
    losses = [float(r["loss"]) for r in history]
    if not history or not all(math.isfinite(v) for v in losses):
        raise TrainingDiverged(
            f"{workdir}: training diverged (loss {losses[-1] if losses else 'nan'} at epoch {len(history)}) "
            f"with train.lr={cfg.train.lr:g}; try a smaller learning rate")


def _callbacks(workdir: Path, cfg: Config, owner: RunOwner, val_ds: tf.data.Dataset, y_val: np.ndarray,
               best_value: float, resumed: bool, epoch_log: EpochLog,
               early_stopping: ResumableEarlyStopping | None, chance: ChanceLevel | None, restarts: int,
               user: Sequence[keras.callbacks.Callback]) -> list[keras.callbacks.Callback]:
    """The callbacks of ``fit``, in the order their ``on_epoch_end`` must run.

    The owner check first (nothing is written by a process that lost the run), the swap to the
    averaged weights (``train.ema``), the validation metrics next (everything after reads them),
    then the chance-level check (a restart it asks for comes before anything of the epoch is
    written), the caller's callbacks (the search's pruning report) after every other writer and
    before :class:`Checkpoints`, which commits the epoch:
    a kill or an exception anywhere before the commit re-runs the whole epoch on resume, so no
    reported value is lost and ``history.csv`` is trimmed back to the committed epochs.
    """
    cbs: list[keras.callbacks.Callback] = [
        owner,
        # The averaged weights (train.ema) are what every callback below validates and saves.
        *([EMAWeights(resumed)] if cfg.train.ema else []),
        ValidationMetrics(val_ds, y_val, workdir / "tensorboard" / "validation"),
        *([chance] if chance is not None else []),
        keras.callbacks.TerminateOnNaN(),
        BestModel(workdir / MODEL_KERAS, owner, best_value, cfg.train.monitor),
        CSVLogger(str(workdir / HISTORY_CSV), append=resumed),
        TensorBoard(str(workdir / "tensorboard"), write_graph=False, profile_batch=0),
        epoch_log,
    ]
    if early_stopping is not None:
        cbs.append(early_stopping)
    cbs.extend(user)
    cbs.append(Checkpoints(workdir, cfg.train.checkpoint_every, owner, early_stopping, restarts))
    return cbs


def _finish(cfg: Config, workdir: Path, data_dir: Path, meta: dict[str, Any], val_ds: tf.data.Dataset,
            y_val: np.ndarray, history: list[dict[str, str]], seconds: float,
            epoch_seconds: list[float], restarts: int = 0) -> dict[str, Any]:
    """Freeze the threshold on validation, write metrics.json and the learning-curve plot."""
    best_model = as_float32(keras.models.load_model(workdir / MODEL_KERAS))  # as evaluate sees it
    # The threshold is frozen on the predictions evaluate/predict will make: with the TTA views.
    p_val = tta_model(best_model, cfg.train.tta).predict(val_ds, verbose=0)[:, 1]
    threshold = metrics.choose_threshold(y_val, p_val, cfg.train.threshold)
    best_epoch, best_value = _best(history, cfg.train.monitor)
    at_best = next((r for r in history if int(r["epoch"]) == best_epoch), {})
    result = {
        # What the search optimises and pruning saw: the best per-epoch value of the monitor.
        "monitor": cfg.train.monitor,
        "objective": best_value,
        # The best epoch's per-epoch values (balanced accuracy at threshold 0.5, AUC).
        "val_balanced_accuracy": _finite(float(at_best.get("val_balanced_accuracy") or "nan")),
        "val_auc": _finite(float(at_best.get("val_auc") or "nan")),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        # Starts abandoned at chance level (train.chance_restarts); epochs_run counts the last only.
        "restarts": restarts,
        "threshold": threshold,
        "val": metrics.binary_metrics(y_val, p_val, threshold),
        "seconds": seconds,
        "seconds_per_epoch": seconds_per_epoch(epoch_seconds),
        "params": best_model.count_params(),
        "data_dir": str(data_dir),
        "n_train": meta["splits"]["train"]["n"],
    }
    try:
        metrics.plot_history(workdir / HISTORY_CSV, workdir / "history.png")
    except ValueError as exc:  # pragma: no cover - history exists at this point
        logging.warning("no learning-curve plot: %s", exc)
    write_json(workdir / METRICS_JSON, result)
    logging.info("done in %.0fs: best %s %.3f at epoch %d; threshold %.3f",
                 seconds, cfg.train.monitor, best_value, best_epoch, threshold)
    return result
