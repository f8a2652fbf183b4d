"""The Keras callbacks of one training run (:func:`drtune.train.train_and_evaluate`).

What each does:

- :class:`RunOwner`: one writer per run directory. A token in ``checkpoints/owner.json``; the
  later claimant wins, and every write of the run checks the token first, so a process that
  lost the directory (a stalled worker whose trial was retried elsewhere) stops with
  :class:`RunOwnershipLost` before writing anything.
- :class:`ValidationMetrics`: ``val_loss``, ``val_balanced_accuracy`` and ``val_auc`` from one
  prediction pass over the validation split, added to the epoch logs (and the validation
  confusion matrix to TensorBoard).
- :class:`BestModel`: ``model.keras``, the model of the best epoch by ``train.monitor``, saved
  atomically.
- :class:`CSVLogger`, :class:`TensorBoard`: Keras' own, writing epochs counted from 1
  (``history.csv``, ``tensorboard/``).
- :class:`ChanceLevel`: a check, at epoch ``train.chance_check_epoch``, that training has left
  chance level; a run that has not is restarted from new random weights
  (``train.chance_restarts``) or warned about.
- :class:`EpochLog`: one log line per epoch and the epoch durations behind
  :func:`seconds_per_epoch`.
- :class:`ResumableEarlyStopping`: early stopping whose patience survives a resume.
- :class:`Checkpoints`: ``checkpoints/epoch-NNNN.keras``, ``last.keras`` and ``state.json``;
  writing ``state.json`` commits the epoch.

The order in which ``train.py`` installs them (``_callbacks``) is the order Keras runs their
``on_epoch_end``, all on one ``logs`` dict, and it matters:

1. :class:`RunOwner` — the token check comes before any write of the epoch;
2. :class:`ValidationMetrics` — everything after reads the keys it adds;
3. :class:`ChanceLevel` — a restart it asks for comes before the epoch is written anywhere;
4. Keras' ``TerminateOnNaN``, :class:`BestModel`, :class:`CSVLogger`, :class:`TensorBoard`,
   :class:`EpochLog`, then :class:`ResumableEarlyStopping` when ``train.patience`` is set;
5. the caller's callbacks (the search's progress attributes and pruning report), after every
   writer of the run;
6. :class:`Checkpoints` last, because it commits the epoch: a kill or an exception anywhere
   before the commit (a pruned trial included) re-runs the whole epoch end on resume, so no
   reported value is lost, and ``history.csv`` is trimmed back to the committed epochs.

Keras counts epochs from 0 inside ``fit``; every callback here that writes an epoch number adds
one (see the module docstring of :mod:`drtune.train`).
"""

from __future__ import annotations

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

from drtune import metrics
from drtune.errors import DrtuneError
from drtune.runs import CHECKPOINTS_DIR, temp_sibling, write_json

# The default of ``train.monitor``: what checkpoints, early stopping and pruning follow (also the
# key under which ValidationMetrics logs balanced accuracy, whatever the monitor).
MONITOR = "val_balanced_accuracy"
# In checkpoints/ (the run's own business, so not in drtune.runs):
LAST = "last.keras"  # the resume point, rewritten every epoch
STATE = "state.json"  # the committed epoch and early stopping's state
OWNER = "owner.json"  # the token of the one process allowed to write the run


class RunOwnershipLost(DrtuneError):
    """Another process claimed the run directory (a retried trial, a second ``train --out``).

    Raised at the first write after the claim; this process has written nothing since. The new
    owner resumes from the last finished epoch, so the caller should just stop.
    """


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
        tmp = temp_sibling(path)
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


# Cross-entropy of a network that predicts 0.5 for every image of the balanced training stream
# (label smoothing does not change it): where a run stuck at chance level sits.
CHANCE_LOSS = math.log(2.0)


def grade_chance_loss(grade_counts: Sequence[int], rdr_grade: int, balance: bool,
                      label_smoothing: float) -> float:
    """Where a grade-head run stuck at chance level sits: the entropy of the training stream's
    grade distribution (smoothed as the targets are), the loss of a network that answers that
    distribution for every image. With ``balance`` the stream draws NRDR and RDR half each."""
    counts = np.asarray(grade_counts, float)
    if balance:
        sides = [counts[:rdr_grade], counts[rdr_grade:]]
        p = np.concatenate([0.5 * side / side.sum() if side.sum() else side for side in sides])
    else:
        p = counts / counts.sum()
    q = (1.0 - label_smoothing) * p + label_smoothing / len(counts)
    return float(-np.sum(q[q > 0] * np.log(q[q > 0])))


class StuckAtChance(DrtuneError):
    """Raised by :class:`ChanceLevel` to have ``train_and_evaluate`` restart from new weights."""


class ChanceLevel(keras.callbacks.Callback):
    """At epoch ``check_epoch`` (counted from 1), is training still at chance level?

    On CPU, training is not bit-for-bit repeatable, and one or two runs in 16 of the ``real``
    study sat at chance level far longer than the rest, one of them for all 50 epochs: the
    training loss stayed at ln 2 (the network answers 0.5 for every image), while the identical
    configuration learned in other runs. Such a run is recognisable early: its training loss is
    not yet ``tolerance`` below ln 2 (a stuck run's epoch losses wander 0.68-0.71, above ln 2 as
    often as below) and its validation AUC is below ``max_auc``, ``check_epoch`` epochs in. Then, while
    ``restarts_left`` > 0, :class:`StuckAtChance` is raised (before anything of the epoch is
    written) and training starts again from new random weights; otherwise a warning says so.
    Regularisation penalties (``model.l2``) are taken out of the loss before the comparison.
    A grade-head model's chance level is not ln 2 but ``chance_loss`` (:func:`grade_chance_loss`).
    """

    def __init__(self, check_epoch: int, restarts_left: int, tolerance: float = 0.01,
                 max_auc: float = 0.6, chance_loss: float = CHANCE_LOSS) -> None:
        super().__init__()
        self.check_epoch, self.restarts_left = check_epoch, restarts_left
        self.tolerance, self.max_auc, self.chance_loss = tolerance, max_auc, chance_loss

    def stuck(self, logs: dict[str, Any]) -> bool:
        """Whether these epoch logs are those of a run at chance level."""
        penalty = sum(float(keras.ops.convert_to_numpy(v)) for v in self.model.losses) if self.model else 0.0
        loss = float(logs.get("loss", math.nan)) - penalty
        auc = float(logs.get("val_auc", math.nan))
        # A NaN AUC (one-class validation split) judges nothing, and a NaN loss is TerminateOnNaN's.
        return loss > self.chance_loss - self.tolerance and auc < self.max_auc

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch + 1 != self.check_epoch or not self.stuck(logs or {}):
            return
        logs = logs or {}
        what = (f"training has not left chance level after {epoch + 1} epochs (loss {logs['loss']:.4f}, "
                f"chance level {self.chance_loss:.4f}; validation AUC {logs['val_auc']:.3f})")
        if self.restarts_left > 0:
            raise StuckAtChance(what)
        logging.warning("%s: this run is unlikely to learn; train again (train.chance_restarts restarts "
                        "such a run from new random weights) or change train.lr or train.seed", what)


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


class EpochTimer(keras.callbacks.Callback):
    """``seconds``: how long each epoch run in this process took, from its start to the
    subclass's :meth:`lap` in ``on_epoch_end`` (what :func:`seconds_per_epoch` averages).

    Both the run's log (:class:`EpochLog`) and the search's trial attributes time epochs; each
    is its own callback at its own place in the order, so each laps where it stands.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._t0 = time.monotonic()

    def lap(self) -> float:
        """Record the epoch's duration so far; returns it."""
        self.seconds.append(time.monotonic() - self._t0)
        return self.seconds[-1]


class EpochLog(EpochTimer):
    """One absl log line per epoch, and the seconds each epoch took (see :func:`seconds_per_epoch`)."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        self.lap()
        logging.info("epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_bacc %.3f  val_auc %.3f  (%.1fs)",
                     epoch + 1, self.epochs, logs.get("loss", math.nan), logs.get("accuracy", math.nan),
                     logs.get("val_loss", math.nan), logs.get(MONITOR, math.nan),
                     logs.get("val_auc", math.nan), self.seconds[-1])


class EMAWeights(keras.callbacks.SwapEMAWeights):
    """Keras' ``SwapEMAWeights(swap_on_epoch=True)`` (``train.ema``), resumable.

    At each epoch's end the optimizer's moving average of the weights goes into the model, so
    the callbacks after it validate, keep (``model.keras``) and checkpoint the averaged model; the
    optimizer then holds the raw weights, which training continues from after the swap back at
    the next epoch's beginning. A checkpoint is therefore written swapped: ``resumed`` says that a
    run continuing from one must swap back before its first epoch too.
    """

    def __init__(self, resumed: bool = False) -> None:
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed


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
                 early_stopping: ResumableEarlyStopping | None = None, restarts: int = 0) -> None:
        super().__init__()
        self.workdir, self.every, self.owner = workdir, every, owner
        self.early_stopping, self.restarts = early_stopping, restarts

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        ckpt = self.workdir / CHECKPOINTS_DIR
        if (epoch + 1) % self.every == 0:
            self.owner.save(self.model, ckpt / f"epoch-{epoch + 1:04d}.keras")
        self.owner.save(self.model, ckpt / LAST)
        state: dict[str, Any] = {"epochs_done": epoch + 1}
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping.state()
        if self.restarts:
            state["restarts"] = self.restarts  # see ChanceLevel
        self.owner.check()
        write_json(ckpt / STATE, state)

