"""``drtune search``: run (or resume) a study in this process until its budget or grid is done.

The entry point ties the parts together; read them in this order:

- :mod:`drtune.study` — where the study lives (storage URL, sampler, pruner); no TensorFlow.
- :mod:`drtune.objective` — what one trial does (sample, train, report, artifacts).
- :mod:`drtune.grid` — how workers share the study (dead workers, retries, grid points once).
- :mod:`drtune.finetune` — what happens after the search (``drtune finetune --best``).

Each trial trains through ``train_and_evaluate`` with a pruning callback and returns its best
validation balanced accuracy. Studies live in a SQL store with heartbeats, so a killed trial is
failed and retried — and, because a trial's run directory is reused by its retry, the retry
resumes training where the dead one stopped.
"""

from __future__ import annotations

import logging as logging_std
import time
from pathlib import Path
from typing import Any

import optuna
from absl import logging
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState

from drtune import config as config_lib
from drtune import notes
from drtune.config import Config
from drtune.grid import (BUDGET_STATES, DuplicateTrial, StaleWatcher, StopWhenGridTaken, TrialTakenOver,
                         grid_points, points_of, requeue_failed, running_points, untouched_points,
                         waiting_trials)
from drtune.objective import Objective
from drtune.runs import load_meta
from drtune.study import (artifact_dir, check_budget, create_study, redact, redact_config, storage_url,
                          study_name, worker_id)
from drtune.train import resolve_data_dir


def search(cfg: Config, data_dir: Path | str | None = None, grid: bool = False,
           storage: str | None = None, name: str | None = None, n_trials: int | None = None,
           timeout: float | None = None) -> optuna.Study:
    """Run (or resume) a study; a grid stops when every point has finished once.

    ``n_trials`` (default ``search.n_trials`` for TPE, none for a grid) is the study's budget, not
    this process's: every worker stops once that many trials have finished or are running,
    counted across all workers and earlier runs (Optuna's ``MaxTrialsCallback``).
    """
    check_budget(n_trials, timeout)
    data = resolve_data_dir(cfg, data_dir).resolve()
    meta = load_meta(data)  # fail now, not in the first trial
    name = study_name(cfg, name)
    study = create_study(cfg, grid, storage, name)
    _warn_if_config_changed(study, cfg)
    # What the study, the run directories and the artifacts keep must carry no password.
    public = redact_config(cfg)
    study.set_user_attr("config", config_lib.to_dict(public))
    study.set_user_attr("data_dir", str(data))
    # What the dashboard shows first: the objective's name and what this study is.
    notes.name_objective(study, cfg.train.monitor)
    notes.write_search_note(study, public, meta, data, grid, cfg.train.monitor)
    artifacts = artifact_dir(cfg)
    artifacts.mkdir(parents=True, exist_ok=True)
    objective = Objective(public, data, grid, name, FileSystemArtifactStore(str(artifacts)))
    budget = n_trials if n_trials is not None else (None if grid else cfg.search.n_trials)
    timeout = timeout if timeout is not None else (cfg.search.timeout or None)
    logging.info("study %r in %s: %s, pruner %s", name, redact(storage_url(cfg, storage)),
                 f"grid of {len(grid_points(cfg))} points" if grid else
                 f"TPE (worker {worker_id()}), {budget} trial(s) in the study", cfg.search.pruner)
    started = time.monotonic()
    callbacks = [_log_trial] + ([StopWhenGridTaken(cfg)] if grid else [])
    with StaleWatcher(study, cfg.search.heartbeat_interval, objective):
        _loop(study, cfg, objective, grid, budget, timeout, started, callbacks)
    _summary(study, grid, cfg)
    notes.write_search_note(study, public, meta, data, grid, cfg.train.monitor)  # now with trials and the best
    return study


def _warn_if_config_changed(study: optuna.Study, cfg: Config) -> None:
    """Resuming a study with other fixed settings mixes incomparable trials: say so."""
    old = study.user_attrs.get("config")
    if not old:
        return
    new = config_lib.to_dict(cfg)
    keys = sorted(f"{s}.{k}" for s in ("data", "model", "train") for k in new[s]
                  if old.get(s, {}).get(k) != new[s][k] and f"{s}.{k}" not in cfg.search.grid
                  and f"{s}.{k}" not in cfg.search.space)
    if keys:
        logging.warning("study %r ran so far with other settings for %s; its trials will not be "
                        "comparable (use --study NAME for a new study)", study.study_name, ", ".join(keys))



def _loop(study: optuna.Study, cfg: Config, objective: Objective, grid: bool, budget: int | None,
          timeout: float | None, started: float, callbacks: list[Any]) -> None:
    """Run trials until the budget is spent, or the grid is done (waiting out other workers)."""
    quiet = _QuietFailures(objective.abandoned)
    # Optuna logs a failed trial (with its traceback) from the module that runs trials.
    loggers = [logging_std.getLogger(n) for n in ("optuna", "optuna.study._optimize")]
    for logger in loggers:
        logger.addFilter(quiet)
    if budget is not None:
        callbacks = callbacks + [optuna.study.MaxTrialsCallback(budget, states=BUDGET_STATES)]
    try:
        if grid:
            requeue_failed(study, cfg, interrupted_only=False)
        while True:
            # Dead trials (of this or another worker) are failed, and queued for retry, here and
            # at the start of every trial.
            optuna.storages.fail_stale_trials(study)
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None and left <= 0:
                break
            if grid:
                requeue_failed(study, cfg, interrupted_only=True)
            if budget is not None:
                spent = len(study.get_trials(deepcopy=False, states=BUDGET_STATES))
                if spent >= budget:
                    logging.info("study %r has %d finished or running trial(s) of its budget of %d; "
                                 "pass a larger --n-trials to run more", study.study_name, spent, budget)
                    break
            waiting = waiting_trials(study)
            untouched, running = untouched_points(study, cfg), running_points(study, cfg)
            if not grid or waiting or untouched:
                try:
                    study.optimize(objective, n_trials=None, timeout=left, callbacks=callbacks,
                                   catch=(DuplicateTrial, TrialTakenOver), gc_after_trial=True)
                except ValueError:
                    # Optuna cannot record the end of a trial that another worker took over
                    # ("Cannot tell a FAIL trial"): that trial is not this worker's any more.
                    if not objective.take_lost():
                        raise
                    continue
                if not grid or budget is not None:
                    break
                continue
            if not running:
                break
            # The grid's last points run in other workers (or in one that died: its heartbeat
            # stops and the trial is retried here once the grace period has passed).
            logging.info("waiting for %d grid point(s) running elsewhere", len(running))
            time.sleep(cfg.search.heartbeat_interval)
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _QuietFailures(logging_std.Filter):
    """Drop Optuna's "Trial N failed ..." warnings (with traceback) for trials that the objective
    abandoned on purpose; drtune says what happened in one line instead."""

    def __init__(self, abandoned: dict[int, str]) -> None:
        super().__init__()
        self.abandoned = abandoned

    def filter(self, record: logging_std.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.abandoned)


def _log_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    best = "-"
    try:
        best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        pass
    logging.info("trial %d %s: value %s, %s epoch(s); best so far %s", trial.number,
                 trial.state.name, value, trial.user_attrs.get("epochs_run", 0), best)


def _summary(study: optuna.Study, grid: bool, cfg: Config) -> None:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name: states.count(s) for s in TrialState if states.count(s)}
    logging.info("study %r: %s", study.study_name, ", ".join(f"{n} {k.lower()}" for k, n in counts.items()))
    if grid:
        done = points_of(study, cfg, (TrialState.COMPLETE, TrialState.PRUNED))
        logging.info("grid: %d of %d points finished", len(done), len(grid_points(cfg)))
    try:
        best = study.best_trial
        logging.info("best: trial %d, value %.4f, %s", best.number, best.value,
                     " ".join(f"{k}={v}" for k, v in best.params.items()))
    except ValueError:
        logging.warning("no trial completed")
