"""How several workers share one study (processes here, or machines on one database).

The protocol, on top of Optuna's RDB storage with heartbeats:

1. Every worker opens the same study with the same sampler seed (a grid skips points otherwise).
2. A worker that stops beating for ``search.grace_period`` is dead: its RUNNING trial is failed
   by whichever worker looks first (:class:`StaleWatcher`, every heartbeat interval), and
   :class:`RetryUnlessDone` queues it again with the same parameters (up to ``search.max_retry``)
   unless another trial has those parameters. The retry reuses the run directory and resumes.
3. A grid point runs once: a trial that drew a point another trial finished, or runs and started
   first, fails as ``duplicate_of`` (:func:`check_duplicate`); :class:`StopWhenGridTaken` stops a
   worker once every point has a trial, and the search loop waits for points running elsewhere.
   A failed or pruned point counts as done, except an interrupted one (Ctrl-C marks its trial
   ``interrupted``): any worker queues it again (:func:`requeue_failed`), and a new
   ``drtune search --grid`` queues every failed point once.
4. ``--n-trials`` is the study's budget, counted over :data:`BUDGET_STATES` across all workers.
5. A worker that stalled past the grace period finds its trial taken over: it raises
   :class:`TrialTakenOver` and leaves the trial (and its run directory) to the new owner.

No TensorFlow here: :mod:`drtune.study` installs the retry callback on every storage it opens.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Protocol

import optuna
from absl import logging
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from drtune.config import Config

# Trials that count against the study's budget; a dead worker's trial stops counting when it is
# failed as stale (and its retry counts once it runs).
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class DuplicateTrial(Exception):
    """This trial drew a grid point that another worker's trial already runs or ran."""


class TrialTakenOver(Exception):
    """This worker's trial was failed as stale and retried elsewhere while it was stalled."""


# --------------------------------------------------------------------------- dead workers


class RetryUnlessDone:
    """Retry a dead trial with the same parameters, unless they already ran elsewhere.

    A trial killed just before a re-run may be seen as alive until its grace period ends, so a
    grid can hand its point to another trial meanwhile; retrying it then would run it twice.
    """

    def __init__(self, max_retry: int) -> None:
        self._retry = RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        if _twin(study, trial.number, trial.params, live) is not None:
            logging.info("trial %d died; its parameters ran in another trial, not retrying", trial.number)
            return
        logging.warning("trial %d died (no heartbeat); retrying it with the same parameters", trial.number)
        self._retry(study, trial)


def _twin(study: optuna.Study, number: int, params: dict[str, Any],
          states: tuple[TrialState, ...]) -> FrozenTrial | None:
    """Another trial in ``states`` with the same parameters."""
    for other in study.get_trials(deepcopy=False, states=states):
        if other.number != number and other.params == params:
            return other
    return None


class _RunsTrial(Protocol):
    current: int | None  # storage id of the trial that this process runs, if any


class StaleWatcher:
    """Fail (and queue for retry) trials whose worker died, every heartbeat interval.

    Optuna itself looks for dead trials only when a worker starts its next trial, which can be
    a whole trial's time away; this thread notices them one interval after the grace period.
    """

    def __init__(self, study: optuna.Study, interval: float, objective: _RunsTrial | None = None) -> None:
        self.study, self.interval, self.objective = study, interval, objective
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="drtune-stale-watcher", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                # This process is alive, so its own trial is not stale even if its heartbeat
                # thread was starved (an overloaded machine): beat for it before judging others.
                current = self.objective.current if self.objective is not None else None
                if current is not None:
                    self.study._storage.record_heartbeat(current)
                optuna.storages.fail_stale_trials(self.study)
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the worker
                logging.debug("stale-trial check failed: %s", exc)

    def __enter__(self) -> StaleWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- grid points


def requeue_failed(study: optuna.Study, cfg: Config, interrupted_only: bool) -> None:
    """Queue again each grid point whose trial failed and that no other trial has finished, runs
    or waits to run: a point interrupted by Ctrl-C is not done. The new trial resumes the failed
    one's run directory.

    While workers run, only interrupted trials are queued (a trial that a dead worker left is
    retried by the heartbeat callback, up to ``search.max_retry``); a new ``drtune search`` queues
    every failed point once.
    """
    trials = study.get_trials(deepcopy=False)
    keys = list(cfg.search.grid)
    points = set(grid_points(cfg))
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    taken = {tuple(t.params.get(k) for k in keys) for t in trials if t.state in live}
    for t in sorted(trials, key=lambda t: -t.number):  # the latest failure of a point
        point = tuple(t.params.get(k) for k in keys)
        if t.state != TrialState.FAIL or "duplicate_of" in t.user_attrs or point in taken \
                or point not in points or (interrupted_only and not t.user_attrs.get("interrupted")):
            continue
        attrs = {"retry_of": t.number}
        if t.user_attrs.get("run_dir"):
            attrs["run_dir"] = t.user_attrs["run_dir"]
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        taken.add(point)
        logging.info("grid point %s: trial %d %s and no other trial finished it; queued again%s",
                     " ".join(f"{k}={v}" for k, v in t.params.items()), t.number,
                     "was interrupted" if t.user_attrs.get("interrupted") else "failed",
                     f" (resuming {attrs['run_dir']})" if "run_dir" in attrs else "")


class StopWhenGridTaken:
    """Stop a worker when every grid point has a trial and none waits for a retry.

    GridSampler alone would hand a worker the points that other workers are still running,
    duplicating them near the end of a grid.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not untouched_points(study, self.cfg) and not waiting_trials(study):
            study.stop()


def check_duplicate(trial: optuna.Trial) -> None:
    """Fail this trial (as a recorded duplicate) if another trial finished its grid point, or
    runs it and started first (a queued retry may start after a later twin)."""
    me = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    mine = (me.datetime_start, me.number)
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.RUNNING)):
        if other.number == trial.number or other.params != trial.params:
            continue
        if other.state == TrialState.RUNNING and other.datetime_start is not None \
                and me.datetime_start is not None and (other.datetime_start, other.number) > mine:
            continue
        trial.set_user_attr("duplicate_of", other.number)
        logging.info("trial %d: grid point already taken by trial %d; skipping it",
                     trial.number, other.number)
        raise DuplicateTrial(f"duplicate of trial {other.number}")


def waiting_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials queued (retries, interrupted points) that no worker has started yet."""
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def grid_points(cfg: Config) -> list[tuple[Any, ...]]:
    """Every point of the grid, as tuples of values in ``[search.grid]`` key order."""
    return list(itertools.product(*cfg.search.grid.values()))


def points_of(study: optuna.Study, cfg: Config, states: tuple[TrialState, ...]) -> set[tuple[Any, ...]]:
    """The grid points of the trials in ``states``."""
    keys = list(cfg.search.grid)
    return {tuple(t.params.get(k) for k in keys) for t in study.get_trials(deepcopy=False, states=states)}


def untouched_points(study: optuna.Study, cfg: Config) -> list[tuple[Any, ...]]:
    """Grid points that no trial has drawn yet."""
    taken = points_of(study, cfg, tuple(TrialState))
    return [p for p in grid_points(cfg) if p not in taken]


def running_points(study: optuna.Study, cfg: Config) -> list[tuple[Any, ...]]:
    """Grid points being run (maybe by a dead worker) that have no finished trial yet."""
    done = points_of(study, cfg, (TrialState.COMPLETE, TrialState.PRUNED))
    running = points_of(study, cfg, (TrialState.RUNNING,))
    return [p for p in grid_points(cfg) if p in running and p not in done]

