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
``fit``, so the callbacks that write add one. A ``history.csv`` of a run written before this
(0-based) is read through :func:`drtune.metrics.read_history`, which shifts it, and is rewritten
1-based when such a run resumes.
"""

from __future__ import annotations

import csv
import errno
import functools
import json
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from drtune import config as config_lib
from drtune import data, devices, metrics, runs
from drtune.config import Config
from drtune.errors import DrtuneError, InputError
from drtune.metrics import read_history
from drtune.model import as_float32, build_model, compile_model
from drtune.runs import CHECKPOINTS_DIR, CONFIG_JSON, DATA_JSON, HISTORY_CSV, METRICS_JSON, MODEL_KERAS
from drtune.tta import tta_model

# The default of ``train.monitor``: what checkpoints, early stopping and pruning follow.
MONITOR = "val_balanced_accuracy"
# In checkpoints/ (train's own business, so not in drtune.runs):
LAST = "last.keras"  # the resume point, rewritten every epoch
STATE = "state.json"  # the committed epoch and early stopping's state
OWNER = "owner.json"  # the token of the one process allowed to write the run


class TrainingDiverged(DrtuneError):
    """The loss became NaN or infinite."""


class RunOwnershipLost(DrtuneError):
    """Another process claimed the run directory (a retried trial, a second ``train --out``).

    Raised at the first write after the claim; this process has written nothing since. The new
    owner resumes from the last finished epoch, so the caller should just stop.
    """


def _tmp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` unique to this process, with the same suffix (Keras
    requires ``.keras``): two processes saving the same file never write the same temp file."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename) so readers never see half a file."""
    tmp = _tmp_name(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunOwner(keras.callbacks.Callback):
    """One writer per run directory: a token in ``checkpoints/owner.json``, the later claimant wins.

    A worker paused past the search's grace period (SIGSTOP, a suspended laptop) comes back
    while another worker is resuming its trial; without this both would append to the same
    history and overwrite each other's checkpoints. Every write of the run goes through
    :meth:`save` or :meth:`check`, and the check is the first thing each epoch end does (this
    callback comes first), so a process that lost the directory stops before writing anything.
    A file lock would not do: run directories live on shared filesystems, and a stopped process
    holds its lock forever.
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir
        self.path = workdir / CHECKPOINTS_DIR / OWNER
        self.token = uuid.uuid4().hex

    def claim(self) -> None:
        """Take the run directory over (atomically) and remove temp files of earlier owners."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                               "claimed": time.time()})
        for folder in (self.workdir, self.path.parent):
            for tmp in folder.glob(".*.tmp*"):
                # Left by a killed or stale owner: a stale one checks the token before
                # renaming, so removing its file cannot break a rename that is still allowed.
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise :class:`RunOwnershipLost` unless the run directory is still ours."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("token") != self.token:
            who = f" ({owner.get('pid')}@{owner.get('host')})" if owner else ""
            raise RunOwnershipLost(f"{self.workdir}: another process{who} took over this run "
                                   "directory; this one stops without writing to it")

    def save(self, model: keras.Model, path: Path) -> None:
        """Save ``model`` to ``path`` atomically, if the run is still ours.

        Written to a temp file and renamed, so a full disk or a kill leaves the previous good
        file in place, never a truncated one; the token is checked again just before the rename
        because a save takes long enough to be paused in.
        """
        tmp = _tmp_name(path)
        try:
            model.save(tmp)
            self.check()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.check()


class ValidationMetrics(keras.callbacks.Callback):
    """Adds ``val_loss``, ``val_balanced_accuracy`` and ``val_auc`` to the epoch logs.

    Balanced accuracy and AUC are not Keras metrics over a whole split, so they are computed here
    with scikit-learn from one prediction pass over the validation set. It must come first in the
    callback list: later callbacks (checkpoints, CSV, TensorBoard, pruning) read these keys.
    """

    def __init__(self, val_ds: tf.data.Dataset, y_val: np.ndarray, tb_dir: Path | None = None) -> None:
        super().__init__()
        self.val_ds, self.y_val = val_ds, y_val
        self.writer = tf.summary.create_file_writer(str(tb_dir)) if tb_dir else None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        probs = self.model.predict(self.val_ds, verbose=0)
        p_rdr = probs[:, 1]
        if not np.all(np.isfinite(p_rdr)):
            # Diverged weights predict NaN: stop here; train_and_evaluate reports it clearly.
            logs.update({"val_loss": math.nan, MONITOR: math.nan, "val_auc": math.nan})
            self.model.stop_training = True
            return
        picked = np.clip(probs[np.arange(len(self.y_val)), self.y_val], 1e-7, 1.0)
        m = metrics.binary_metrics(self.y_val, p_rdr, 0.5)
        logs["val_loss"] = float(-np.mean(np.log(picked)))
        logs[MONITOR] = float(m["balanced_accuracy"])
        logs["val_auc"] = float("nan") if m["auc"] is None else float(m["auc"])
        if self.writer is not None:
            image = metrics.confusion_matrix_image(m["confusion_matrix"], f"validation, epoch {epoch + 1}")
            with self.writer.as_default():
                tf.summary.image("confusion_matrix", image[None], step=epoch + 1)
            self.writer.flush()


class _CountFromOne:
    """Mixin for a Keras callback that writes epoch numbers: it writes them counted from 1."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch + 1, logs)  # type: ignore[misc]


class CSVLogger(_CountFromOne, keras.callbacks.CSVLogger):
    """Keras' CSVLogger with ``history.csv``'s ``epoch`` column counted from 1."""


class TensorBoard(_CountFromOne, keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback with epoch summaries at steps counted from 1."""


def seconds_per_epoch(durations: Sequence[float]) -> float | None:
    """What ``seconds_per_epoch`` means wherever it is recorded (``metrics.json``, a trial's
    user attributes), from the wall-clock durations of the epochs run in this process.

    Each epoch is timed from its start to the end of its validation pass and best-model save
    (what its log line shows; the checkpoint save that commits it is left out). The mean leaves
    out the first epoch run in this process when others follow: it also traces and compiles
    the training and prediction graphs and fills the data cache, several steady epochs' worth
    on a CPU, and says nothing of what the next epochs cost. None when no epoch ran here.
    """
    steady = list(durations[1:]) or list(durations)
    return float(np.mean(steady)) if steady else None


class EpochLog(keras.callbacks.Callback):
    """One absl log line per epoch, and the seconds each epoch took (see :func:`seconds_per_epoch`)."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs, self.seconds, self._t0 = epochs, [], 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._t0 = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        self.seconds.append(time.monotonic() - self._t0)
        logging.info("epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_bacc %.3f  val_auc %.3f  (%.1fs)",
                     epoch + 1, self.epochs, logs.get("loss", math.nan), logs.get("accuracy", math.nan),
                     logs.get("val_loss", math.nan), logs.get(MONITOR, math.nan),
                     logs.get("val_auc", math.nan), self.seconds[-1])


class BestModel(keras.callbacks.Callback):
    """``model.keras``: the model of the best epoch by ``monitor``, replaced atomically.

    Keras' ``ModelCheckpoint`` writes the file in place, so a full disk or a kill mid-save left a
    truncated model where the good one was; this saves through :meth:`RunOwner.save` instead.
    """

    def __init__(self, path: Path, owner: RunOwner, best: float = -math.inf, monitor: str = MONITOR) -> None:
        super().__init__()
        self.path, self.owner, self.best, self.monitor = path, owner, best, monitor

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        current = (logs or {}).get(self.monitor)
        if current is not None and current > self.best:  # NaN never improves
            self.owner.save(self.model, self.path)
            self.best = float(current)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping on ``monitor`` whose patience survives a resume.

    Keras resets ``wait`` and ``best`` in ``on_train_begin``; a resumed run restores them from
    the checkpoint state, so it stops at the epoch the uninterrupted run would have stopped at.
    """

    def __init__(self, patience: int, state: dict[str, Any] | None = None, monitor: str = MONITOR) -> None:
        super().__init__(monitor=monitor, mode="max", patience=patience)
        self.resume_state = state or {}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self.resume_state:
            self.wait = int(self.resume_state["wait"])
            self.best = self.resume_state["best"]

    def state(self) -> dict[str, Any]:
        """What :class:`Checkpoints` stores to restore this callback."""
        return {"wait": self.wait, "best": None if self.best is None else float(self.best)}


class Checkpoints(keras.callbacks.Callback):
    """``checkpoints/epoch-NNNN.keras`` every ``every`` epochs, and ``last.keras`` + state each epoch.

    ``state.json``'s ``epochs_done`` is the number of the last finished epoch, counted from 1
    (so also how many are done); ``fit(initial_epoch=epochs_done)`` resumes with the next one.

    ``last.keras`` holds the optimizer state, so a killed run restarts exactly where its last
    finished epoch left it (what ``BackupAndRestore`` does, but with the epoch number in a file we
    can read to trim ``history.csv`` before appending to it). Writing ``state.json`` commits the
    epoch, so this callback must come last: a kill before it re-runs the whole epoch end on
    resume (every other callback, the search's pruning report included), a kill after it has
    nothing left to lose.
    """

    def __init__(self, workdir: Path, every: int, owner: RunOwner,
                 early_stopping: ResumableEarlyStopping | None = None) -> None:
        super().__init__()
        self.workdir, self.every, self.owner = workdir, every, owner
        self.early_stopping = early_stopping

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        ckpt = self.workdir / CHECKPOINTS_DIR
        if (epoch + 1) % self.every == 0:
            self.owner.save(self.model, ckpt / f"epoch-{epoch + 1:04d}.keras")
        self.owner.save(self.model, ckpt / LAST)
        state: dict[str, Any] = {"epochs_done": epoch + 1}
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping.state()
        self.owner.check()
        write_json(ckpt / STATE, state)


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
    epochs_done = int(state.get("epochs_done", 0))

    keras.utils.set_random_seed(cfg.train.seed)
    train_ds, steps, val_ds, y_val = _datasets(cfg, data_dir, meta, epochs_done)
    history = _trim_history(workdir / HISTORY_CSV, epochs_done)
    model = _initial_model(cfg, workdir, epochs_done, init_model, input_size, steps)
    epoch_log = EpochLog(cfg.train.epochs)
    early_stopping = (ResumableEarlyStopping(cfg.train.patience, state.get("early_stopping"), cfg.train.monitor)
                      if cfg.train.patience else None)
    cbs = _callbacks(workdir, cfg, owner, val_ds, y_val, _best(history, cfg.train.monitor)[1],
                     bool(history), epoch_log, early_stopping, callbacks)

    t0 = time.monotonic()
    logging.info("training %s: %d epochs x %d steps, batch %d, lr %g, %d parameters",
                 workdir, cfg.train.epochs, steps, cfg.train.batch_size, cfg.train.lr, model.count_params())
    if epochs_done < cfg.train.epochs:
        model.fit(train_ds, epochs=cfg.train.epochs, initial_epoch=epochs_done, steps_per_epoch=steps,
                  callbacks=cbs, verbose=0, shuffle=False)
    seconds = time.monotonic() - t0
    owner.check()  # a run taken over after its last epoch must not write metrics.json either
    history = read_history(workdir / HISTORY_CSV)
    _check_converged(cfg, workdir, history)
    return _finish(cfg, workdir, data_dir, meta, val_ds, y_val, history, seconds, epoch_log.seconds)


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
                                         initial_epoch=min(epochs_done, cfg.train.epochs))
    val_ds = data.eval_dataset(data_dir, "val", cfg.train.eval_batch_size, cache=cfg.data.cache,
                               image_size=image_size, meta=meta)
    y_val = data.split_labels(data_dir, "val", meta)
    if len(set(y_val.tolist())) < 2:
        logging.warning("%s: the validation split holds only %s images: balanced accuracy and AUC "
                        "on it say nothing, and the best model and threshold are arbitrary",
                        data_dir, ("NRDR", "RDR")[int(y_val[0])])
    return train_ds, steps, val_ds, y_val


def _initial_model(cfg: Config, workdir: Path, epochs_done: int, init_model: Path | str | None,
                   input_size: int, steps: int) -> keras.Model:
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
        model = build_model(cfg.model, input_size, cfg.train.precision)
    compile_model(model, cfg.train.lr, cfg.train, steps, cfg.train.precision, cfg.train.jit_compile)
    return model


def _check_converged(cfg: Config, workdir: Path, history: list[dict[str, str]]) -> None:
    """Raise :class:`TrainingDiverged` when no epoch was logged or a training loss is not finite."""
    losses = [float(r["loss"]) for r in history]
    if not history or not all(math.isfinite(v) for v in losses):
        raise TrainingDiverged(
            f"{workdir}: training diverged (loss {losses[-1] if losses else 'nan'} at epoch {len(history)}) "
            f"with train.lr={cfg.train.lr:g}; try a smaller learning rate")


def _callbacks(workdir: Path, cfg: Config, owner: RunOwner, val_ds: tf.data.Dataset, y_val: np.ndarray,
               best_value: float, resumed: bool, epoch_log: EpochLog,
               early_stopping: ResumableEarlyStopping | None,
               user: Sequence[keras.callbacks.Callback]) -> list[keras.callbacks.Callback]:
    """The callbacks of ``fit``, in the order their ``on_epoch_end`` must run.

    The owner check first (nothing is written by a process that lost the run), the validation
    metrics next (everything after reads them), the caller's callbacks (the search's pruning
    report) after every other writer and before :class:`Checkpoints`, which commits the epoch:
    a kill or an exception anywhere before the commit re-runs the whole epoch on resume, so no
    reported value is lost and ``history.csv`` is trimmed back to the committed epochs.
    """
    cbs: list[keras.callbacks.Callback] = [
        owner,
        ValidationMetrics(val_ds, y_val, workdir / "tensorboard" / "validation"),
        keras.callbacks.TerminateOnNaN(),
        BestModel(workdir / MODEL_KERAS, owner, best_value, cfg.train.monitor),
        CSVLogger(str(workdir / HISTORY_CSV), append=resumed),
        TensorBoard(str(workdir / "tensorboard"), write_graph=False, profile_batch=0),
        epoch_log,
    ]
    if early_stopping is not None:
        cbs.append(early_stopping)
    cbs.extend(user)
    cbs.append(Checkpoints(workdir, cfg.train.checkpoint_every, owner, early_stopping))
    return cbs


def _finish(cfg: Config, workdir: Path, data_dir: Path, meta: dict[str, Any], val_ds: tf.data.Dataset,
            y_val: np.ndarray, history: list[dict[str, str]], seconds: float,
            epoch_seconds: list[float]) -> dict[str, Any]:
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
