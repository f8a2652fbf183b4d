"""One trial of a study: sample its parameters, train it, report each epoch, keep its artifacts.

:class:`Objective` is what ``study.optimize`` calls. A trial draws its parameters in one place
(:func:`sample`), trains through :func:`drtune.train.train_and_evaluate` with two Keras callbacks
(progress attributes, and pruning on ``train.monitor``), and returns the best per-epoch value of
``train.monitor``. Its intermediate values are reported at steps that are epochs counted from 1,
as in the run's ``history.csv`` and ``best_epoch`` (see :mod:`drtune.train`); a pruned trial
says why in its user attributes ``pruned_at_epoch`` and ``pruned_reason``. Its run directory is
``WORKDIR/STUDY/trial-NNNN``; a retried trial reuses its dead predecessor's directory, so
training resumes where the dead one stopped.
Plots, the history and the config go to the study's artifact store for the dashboard.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
import tensorflow as tf
from absl import logging
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState
from tensorboard.plugins.hparams import api as hp

from drtune import config as config_lib
from drtune import devices, metrics, runs
# train is used as a module (train.train_and_evaluate) so that tests can replace its functions.
from drtune import train
from drtune.callbacks import MONITOR, EpochTimer
from drtune.config import Config
from drtune.grid import TrialTakenOver, check_duplicate
from drtune.study import no_space, upload


def sample(trial: optuna.Trial, cfg: Config, grid: bool) -> Config:
    """The one place where a trial's parameters are drawn; returns the trial's config."""
    values: dict[str, Any] = {}
    if grid:
        for key, choices in cfg.search.grid.items():
            values[key] = suggest_grid(trial, key, choices, isinstance(config_lib._get(cfg, key), int))
    else:
        for key, spec in cfg.search.space.items():
            if "choices" in spec:
                values[key] = trial.suggest_categorical(key, spec["choices"])
            elif isinstance(config_lib._get(cfg, key), int):
                values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]),
                                                step=int(spec.get("step", 1)), log=bool(spec.get("log", False)))
            else:
                values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                                  step=spec.get("step"), log=bool(spec.get("log", False)))
        if not values:
            raise no_space(cfg, "[search.space]")
    return config_lib.replace(cfg, **values)


def suggest_grid(trial: optuna.Trial, key: str, choices: list[Any], integer: bool) -> Any:
    """The trial's grid value of ``key`` (GridSampler fixes it), suggested as a number when every
    choice is one, so that the dashboard plots it on a numeric axis (log when the values are
    positive and span a factor of 10 or more, or grow geometrically) instead of as unordered
    categories. Studies that already recorded ``key`` as categorical keep it so: Optuna refuses
    another distribution kind for a parameter of the same study."""
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
    if not numeric or _recorded_as_categorical(trial, key):
        return trial.suggest_categorical(key, choices)
    low, high = min(choices), max(choices)
    if integer and all(float(c).is_integer() for c in choices):
        return trial.suggest_int(key, int(low), int(high), log=_log_axis(choices))
    return trial.suggest_float(key, float(low), float(high), log=_log_axis(choices))


def _log_axis(choices: list[float]) -> bool:
    values = sorted(set(float(c) for c in choices))
    if values[0] <= 0 or len(values) < 2:
        return False
    ratios = [b / a for a, b in zip(values, values[1:])]
    return values[-1] / values[0] >= 10 or (len(ratios) > 1 and max(ratios) / min(ratios) < 1.01)


def _recorded_as_categorical(trial: optuna.Trial, key: str) -> bool:
    for t in trial.study.get_trials(deepcopy=False):
        if key in t.distributions:
            return isinstance(t.distributions[key], optuna.distributions.CategoricalDistribution)
    return False


# --------------------------------------------------------------------------- Keras callbacks


class TrialAttrs(EpochTimer):
    """Records progress on the trial each epoch, so pruned trials keep it: ``epochs_run``
    (epochs counted from 1), ``seconds_per_epoch`` (as :func:`drtune.train.seconds_per_epoch`
    defines it, over the epochs run so far in this process) and ``val_auc``."""

    def __init__(self, trial: optuna.Trial) -> None:
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        self.lap()
        self.trial.set_user_attr("epochs_run", epoch + 1)
        self.trial.set_user_attr("seconds_per_epoch", round(train.seconds_per_epoch(self.seconds) or 0.0, 3))
        auc = logs.get("val_auc")
        if auc is not None and auc == auc:  # NaN when one class is missing
            self.trial.set_user_attr("val_auc", float(auc))


class PruneBeforeLastEpoch(keras.callbacks.Callback):
    """Reports ``monitor`` at each epoch and prunes the trial when the study's pruner says so,
    except at the last epoch: a trial that ran every epoch is complete, and pruning it then
    would only hide its result from ``finetune --best``.

    What Optuna's ``KerasPruningCallback`` does, but at steps counted from 1 (it reports at
    Keras' 0-based epoch index) and recording why it pruned: the trial's user attributes
    ``pruned_at_epoch`` and ``pruned_reason`` (see :func:`prune_reason`).

    A run restarted from new weights (``train.chance_restarts``) runs its first epochs again:
    Optuna keeps the first value reported at a step (it ignores, with a warning, a second one),
    so those epochs are neither reported nor judged again; the trial's curve shows the abandoned
    start up to the restart and the new start after it, and its ``restarts`` user attribute
    counts the restarts.
    """

    def __init__(self, trial: optuna.Trial, epochs: int, monitor: str = MONITOR) -> None:
        super().__init__()
        self.trial, self.epochs, self.monitor = trial, epochs, monitor
        self.reported = 0  # the last step reported by this process
        self.restarts = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            logging.warning("%r is not in the epoch logs (%s): nothing reported to the trial",
                            self.monitor, ", ".join(sorted(logs or {})))
            return
        step = epoch + 1
        if step <= self.reported:
            if step == 1:  # the dashboard shows that the trial's curve has two starts
                self.restarts += 1
                self.trial.set_user_attr("restarts", self.restarts)
            return
        self.reported = step
        self.trial.report(float(value), step=step)
        if step < self.epochs and self.trial.should_prune():
            reason = prune_reason(self.trial.study, self.trial.number, step, self.monitor)
            self.trial.set_user_attr("pruned_at_epoch", step)
            self.trial.set_user_attr("pruned_reason", reason)
            raise optuna.TrialPruned(f"pruned at epoch {step}: {reason}")


def prune_reason(study: optuna.Study, number: int, step: int, monitor: str) -> str:
    """Why the pruner stopped trial ``number`` at epoch ``step``, in one line.

    Optuna's pruners answer yes or no. For the median pruner the reference is recomputed as it
    computes it: the trial's best value up to ``step`` against the median of the completed
    trials' values at ``step`` (a trial whose values are all NaN is always pruned). Other
    pruners (Hyperband, successive halving: rungs of several trials) are named with the value.
    """
    trials = study.get_trials(deepcopy=False)
    values = next(t for t in trials if t.number == number).intermediate_values
    value = values[step]
    pruner = study.pruner
    name = next(c.__name__ for c in type(pruner).__mro__ if c.__module__.startswith("optuna."))
    so_far = [v for k, v in values.items() if k <= step and not np.isnan(v)]
    if not so_far:
        return f"{monitor} is NaN at epoch {step} (diverged or undefined); {name} prunes such a trial"
    here = f"{monitor} {value:.4g} at epoch {step}"
    if max(so_far) != value:
        here += f" (best so far {max(so_far):.4g})"
    if not isinstance(pruner, optuna.pruners.MedianPruner):
        return f"{here}; pruned by {name}"
    others = [t.intermediate_values[step] for t in trials
              if t.state == TrialState.COMPLETE and step in t.intermediate_values]
    median = float(np.nanmedian(others)) if others and not np.all(np.isnan(others)) else float("nan")
    return (f"{here} below the median of {len(others)} completed trial(s) at epoch {step} "
            f"({median:.4g}); {name}")


# --------------------------------------------------------------------------- the trial


def _run_dir(trial: optuna.Trial, cfg: Config, name: str) -> Path:
    """The trial's run directory; a retried trial reuses its dead predecessor's to resume."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    if frozen.user_attrs.get("run_dir"):  # a retry (stale or interrupted) inherits it
        return Path(frozen.user_attrs["run_dir"])
    history = frozen.system_attrs.get("retry_history", [])  # set by the retry callback
    number = history[0] if history else trial.number
    return Path(cfg.search.workdir) / name / f"trial-{number:04d}"


def _hparams(cfg: Config, name: str, trial: optuna.Trial, value: float, state: str) -> None:
    """TensorBoard HParams summary of a trial, the original project's way to compare a grid."""
    logdir = Path(cfg.search.workdir) / name / "hparams" / f"trial-{trial.number:04d}"
    with tf.summary.create_file_writer(str(logdir)).as_default():
        hp.hparams({k: v for k, v in trial.params.items()}, trial_id=f"trial-{trial.number:04d}")
        tf.summary.scalar(cfg.train.monitor, value, step=1)
        tf.summary.text("state", state, step=1)


@dataclass
class Objective:
    """Callable objective of a study: trains one trial, returns best val balanced accuracy."""

    cfg: Config
    data_dir: Path
    grid: bool
    name: str
    store: FileSystemArtifactStore
    # Trials this worker gave up: interrupted (Ctrl-C) or taken over by another worker. Their
    # failure is reported in one line here, not with Optuna's traceback (see search._QuietFailures).
    abandoned: dict[int, str] = field(default_factory=dict)
    current: int | None = None  # storage id of the trial running here (for the stale watcher)

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial._trial_id
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            self.abandoned[trial.number] = "interrupted"
            if self.grid:
                logging.warning("trial %d interrupted; the next 'drtune search --grid' runs its point "
                                "again, resuming its run directory", trial.number)
            try:
                # The next `drtune search` (or another worker) runs this point again.
                trial.set_user_attr("interrupted", True)
            except Exception:  # noqa: BLE001 - interrupted again, or the database is gone
                pass
            raise
        except _ownership_errors() as exc:
            # This worker was paused past the grace period: its trial was failed as stale and
            # handed to another worker, which now owns the run directory. Stop touching it.
            self.abandoned[trial.number] = "lost"
            logging.warning("trial %d: another worker took over its run directory while this one "
                            "was stalled (%s); leaving the trial to it", trial.number,
                            type(exc).__name__)
            self._lost = True
            raise TrialTakenOver(str(exc)) from None
        finally:
            self.current = None

    def take_lost(self) -> bool:
        """Whether the last trial was taken over by another worker (and forget it)."""
        lost, self._lost = getattr(self, "_lost", False), False
        return lost

    def _run(self, trial: optuna.Trial) -> float:
        cfg = sample(trial, self.cfg, self.grid)
        if self.grid:
            check_duplicate(trial)
        keras.backend.clear_session()  # one process runs many trials: free the last graph
        run = _run_dir(trial, cfg, self.name)
        trial.set_user_attr("run_dir", str(run))
        # Which worker ran it: useful in the dashboard when many machines share a study.
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("gpu", devices.configure())  # "cpu", or the GPU's model name
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            trial.set_user_attr("cuda_visible_devices", os.environ["CUDA_VISIBLE_DEVICES"])
        logging.info("trial %d: %s -> %s", trial.number,
                     " ".join(f"{k}={v}" for k, v in trial.params.items()), run)
        callbacks = [TrialAttrs(trial), PruneBeforeLastEpoch(trial, cfg.train.epochs, cfg.train.monitor)]
        try:
            result = train.train_and_evaluate(cfg, self.data_dir, run, callbacks=callbacks)
        except optuna.TrialPruned as exc:
            last = trial.user_attrs.get("epochs_run", 0)
            self._artifacts(trial, run)
            _hparams(self.cfg, self.name, trial, _last_value(run, cfg.train.monitor), "pruned")
            logging.info("trial %d pruned after %d epoch(s): %s", trial.number, last, exc)
            raise
        except train.TrainingDiverged as exc:
            # A diverging learning rate is a bad point of the space, not a broken worker:
            # record it as pruned so the study goes on and the reason stays visible.
            trial.set_user_attr("diverged", str(exc))
            trial.set_user_attr("pruned_at_epoch", trial.user_attrs.get("epochs_run", 0))
            trial.set_user_attr("pruned_reason", str(exc))
            _hparams(self.cfg, self.name, trial, float("nan"), "diverged")
            logging.warning("trial %d diverged; pruned", trial.number)
            raise optuna.TrialPruned(str(exc)) from None
        # The best per-epoch value of train.monitor (runs finished before it existed: balanced accuracy).
        value = float(result.get("objective", result["val_balanced_accuracy"]))
        trial.set_user_attr("epochs_run", result["epochs_run"])
        trial.set_user_attr("best_epoch", result["best_epoch"])
        trial.set_user_attr("threshold", result["threshold"])
        trial.set_user_attr("seconds", round(result["seconds"], 1))
        if result.get("seconds_per_epoch") is not None:  # the whole run's, as metrics.json has it
            trial.set_user_attr("seconds_per_epoch", round(result["seconds_per_epoch"], 3))
        if result.get("val_auc") is not None:
            trial.set_user_attr("val_auc", result["val_auc"])
        metrics.plot_confusion_matrix(result["val"]["confusion_matrix"], run / "val_confusion_matrix.png",
                                      f"trial {trial.number}: validation at threshold {result['threshold']:.3f}")
        self._artifacts(trial, run)
        _hparams(self.cfg, self.name, trial, value, "complete")
        return value

    def _artifacts(self, trial: optuna.Trial, run: Path) -> None:
        if (run / runs.HISTORY_CSV).is_file() and not (run / "history.png").is_file():
            try:
                metrics.plot_history(run / runs.HISTORY_CSV, run / "history.png")
            except ValueError:
                pass
        upload(self.store, trial, [run / "val_confusion_matrix.png", run / "history.png",
                                   run / runs.HISTORY_CSV, run / runs.CONFIG_JSON])


def _last_value(run: Path, monitor: str = MONITOR) -> float:
    try:
        return float(train.read_history(run / runs.HISTORY_CSV)[-1][monitor])
    except (OSError, IndexError, KeyError, ValueError):
        return float("nan")


def _ownership_errors() -> tuple[type[BaseException], ...]:
    """What a stalled worker meets when it comes back: Optuna refusing updates to its (now failed)
    trial, or train.py's owner token of the run directory, when train.py provides one."""
    lost = getattr(train, "RunOwnershipLost", None)
    return (optuna.exceptions.UpdateFinishedTrialError,) + ((lost,) if isinstance(lost, type) else ())


