"""The Optuna search service: storage, samplers, pruners, the objective, artifacts, finetune.

Each trial samples its parameters in one place (:func:`sample`), trains through
``train_and_evaluate`` with a pruning callback, and returns its best validation balanced
accuracy. Studies live in a SQL store (SQLite by default, PostgreSQL for many workers) with
heartbeats, so a killed trial is failed and retried — and, because a trial's run directory is
reused by its retry, the retry resumes training where the dead one stopped.
"""

from __future__ import annotations

import json
import logging as logging_std
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from absl import logging
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from drtune import config as config_lib
from drtune.config import Config
from drtune.errors import DrtuneError, InputError

MONITOR = "val_balanced_accuracy"
STORAGE_ENV = "DRTUNE_STORAGE"

# Heartbeats and the retry callback are what make killed trials recoverable; Optuna still labels
# them experimental, which is worth knowing once, not at every command.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# --------------------------------------------------------------------------- storage


def storage_url(cfg: Config, override: str | None = None) -> str:
    """``--storage``, else ``$DRTUNE_STORAGE``, else the config, else SQLite under the workdir.

    ``postgresql://`` and ``postgres://`` mean the psycopg2 driver that drtune installs
    (SQLAlchemy 2 would otherwise look for psycopg 3).
    """
    url = override or os.environ.get(STORAGE_ENV) or cfg.search.storage
    url = url or f"sqlite:///{Path(cfg.search.workdir) / 'optuna.db'}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg2://" + url[len(plain):]
    return url


# Query parameters that carry secrets (libpq's password/sslpassword, and common spellings).
_SECRET_PARAM = re.compile(r"([?&][^=&#]*(?:pass|pwd|secret|token)[^=&#]*=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with every password masked (``***``), for anything printed, logged or stored.

    The user part ends at the URL's last ``@`` (a password may hold an unescaped ``@``, which
    SQLAlchemy would read as part of the host), and ``?password=...``-style query parameters are
    masked too.
    """
    m = re.match(r"^(.*?://)(.*)@([^@]*)$", url)  # also inside "--set search.storage=URL"
    if m:
        scheme, userinfo, rest = m.groups()
        user, sep, _ = userinfo.partition(":")
        url = f"{scheme}{user}{':***' if sep else ''}@{rest}"
    return _SECRET_PARAM.sub(r"\1***", url)


def redact_config(cfg: Config) -> Config:
    """``cfg`` with its storage URL redacted: what the study, run directories and artifacts keep
    (the dashboard serves the study's ``config`` attribute without authentication)."""
    if not cfg.search.storage or redact(cfg.search.storage) == cfg.search.storage:
        return cfg
    return config_lib.replace(cfg, **{"search.storage": redact(cfg.search.storage)})


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for in-memory databases and other back ends."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - open_storage reports unparsable URLs
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    # "sqlite://" and ":memory:" live in memory; "file:" URIs are SQLite's own business.
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def open_storage(cfg: Config, override: str | None = None, create: bool = True) -> RDBStorage:
    """An RDB storage with heartbeats and retry of dead trials; clear errors for bad URLs.

    ``create=False`` (status, dashboard, finetune) refuses a SQLite file that does not exist
    instead of silently creating an empty database from a typo.
    """
    import sqlalchemy.exc

    url = storage_url(cfg, override)
    engine_kwargs: dict[str, Any]
    if url.startswith("sqlite"):
        # Several processes may share the file: wait for the lock rather than fail at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
        path = sqlite_path(url)
        if path is not None:
            if not create and not path.is_file():
                raise InputError(f"storage {redact(url)}: no such database file (run 'drtune search' "
                                 "first, or pass --config/--storage for another study)")
            path.parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            return RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.search.heartbeat_interval,
                grace_period=cfg.search.grace_period,
                heartbeat_stale_trial_callback=_RetryUnlessDone(cfg.search.max_retry))
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as exc:
            raise InputError(f"storage {redact(url)}: not a usable database URL ({exc})") from None
        except ImportError as exc:
            raise InputError(f"storage {redact(url)}: its database driver is not installed ({exc.name or exc}); "
                             "drtune supports sqlite:/// and postgresql+psycopg2://") from None
        except sqlalchemy.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "connection failed"
            raise DrtuneError(f"storage {redact(url)}: cannot connect ({reason})") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Workers that start together on a new database race to create Optuna's tables;
            # the losers find them made on a second look.
            if attempt == 2:
                raise DrtuneError(f"storage {redact(url)}: cannot set up Optuna's tables ({exc.orig})") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")  # pragma: no cover


class _RetryUnlessDone:
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


def study_name(cfg: Config, override: str | None = None) -> str:
    return override or cfg.search.study or cfg.name


def artifact_dir(cfg: Config) -> Path:
    return Path(cfg.search.workdir) / "artifacts"


def load_study(cfg: Config, storage: str | None = None, name: str | None = None) -> optuna.Study:
    """An existing study, or a clear error listing the studies that the storage holds."""
    store = open_storage(cfg, storage, create=False)
    name = study_name(cfg, name)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        raise InputError(f"storage {redact(storage_url(cfg, storage))} has no study {name!r} "
                         f"(studies: {', '.join(names) or 'none'}); run 'drtune search' first") from None


# --------------------------------------------------------------------------- sampling


def _no_space(cfg: Config, want: str) -> InputError:
    other = "[search.space]" if want == "[search.grid]" else "[search.grid]"
    has_other = bool(cfg.search.space if want == "[search.grid]" else cfg.search.grid)
    hint = (f"drop --grid to sample its {other} with TPE" if want == "[search.grid]" else
            f"pass --grid to run its {other}") if has_other else \
        "add [search.grid] (lists, for --grid) or [search.space] (ranges, for TPE) to the study file"
    return InputError(f"study {cfg.name!r} has no {want} section; {hint}")


def grid_space(cfg: Config) -> dict[str, list[Any]]:
    if not cfg.search.grid:
        raise _no_space(cfg, "[search.grid]")
    return {k: list(v) for k, v in cfg.search.grid.items()}


def sample(trial: optuna.Trial, cfg: Config, grid: bool) -> Config:
    """The one place where a trial's parameters are drawn; returns the trial's config."""
    values: dict[str, Any] = {}
    if grid:
        for key, choices in cfg.search.grid.items():
            values[key] = trial.suggest_categorical(key, choices)
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
            raise _no_space(cfg, "[search.space]")
    return config_lib.replace(cfg, **values)


class _StartupMixin:
    """No pruning until ``n_startup`` trials have finished: what ``search.pruner_startup_trials``
    means for every pruner. Hyperband and successive halving have no such setting of their own
    (their ``bootstrap_count`` prunes the first trials instead of sparing them)."""

    n_startup = 0

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        # Asked even during start-up: successive halving records each trial's rung values as it
        # is asked, and the start-up trials must compete in the rungs later.
        pruned = super().prune(study, trial)  # type: ignore[misc]
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return bool(pruned) and len(finished) >= self.n_startup


class _Hyperband(_StartupMixin, optuna.pruners.HyperbandPruner):
    pass


class _SuccessiveHalving(_StartupMixin, optuna.pruners.SuccessiveHalvingPruner):
    pass


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    s = cfg.search
    pruner: optuna.pruners.BasePruner
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                           n_warmup_steps=s.pruner_warmup_epochs)
    if s.pruner == "hyperband":
        pruner = _Hyperband(min_resource=max(1, s.pruner_warmup_epochs), max_resource=cfg.train.epochs)
    elif s.pruner == "successive_halving":
        pruner = _SuccessiveHalving(min_resource=max(1, s.pruner_warmup_epochs))
    else:
        return optuna.pruners.NopPruner()
    pruner.n_startup = s.pruner_startup_trials  # type: ignore[attr-defined]
    return pruner


WORKER_ENV = "DRTUNE_WORKER"  # set by `drtune search --workers N`; set it by hand on other machines


def worker_id() -> str:
    """This worker's identity for seeding: ``$DRTUNE_WORKER``, else host and process id."""
    return os.environ.get(WORKER_ENV) or f"{socket.gethostname()}:{os.getpid()}"


def tpe_seed(sampler_seed: int, worker: str) -> int:
    """A TPE seed for one worker: reproducible for a given (seed, worker), different across workers.

    Workers seeded alike draw the same start-up points in lockstep, running each one N times.
    """
    import zlib

    return zlib.crc32(f"{sampler_seed}/{worker}".encode()) & 0x7FFFFFFF


def make_sampler(cfg: Config, grid: bool, worker: str | None = None) -> optuna.samplers.BaseSampler:
    """The grid sampler (one seed on every worker, or points are skipped), or TPE seeded per worker
    with ``constant_liar`` so that workers avoid the points that others are running."""
    if grid:
        return optuna.samplers.GridSampler(grid_space(cfg), seed=cfg.search.sampler_seed)
    seed = tpe_seed(cfg.search.sampler_seed, worker_id() if worker is None else worker)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


# --------------------------------------------------------------------------- objective


def _trial_attrs_callback(trial: optuna.Trial) -> Any:
    """A Keras callback recording progress on the trial each epoch, so pruned trials keep it."""
    import keras

    class TrialAttrs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.t0 = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = logs or {}
            trial.set_user_attr("epochs_run", epoch + 1)
            trial.set_user_attr("seconds_per_epoch", round(time.monotonic() - self.t0, 3))
            auc = logs.get("val_auc")
            if auc is not None and auc == auc:  # NaN when one class is missing
                trial.set_user_attr("val_auc", float(auc))

    return TrialAttrs()


def _pruning_callback(trial: optuna.Trial, epochs: int) -> Any:
    """Optuna's Keras pruning callback, except at the last epoch: a trial that ran every epoch
    is complete, and pruning it then would only hide its result from ``finetune --best``."""
    from optuna_integration import KerasPruningCallback

    class Pruning(KerasPruningCallback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if epoch + 1 < epochs:
                super().on_epoch_end(epoch, logs)
            elif logs and logs.get(MONITOR) is not None:
                trial.report(float(logs[MONITOR]), step=epoch)

    return Pruning(trial, MONITOR)


def _run_dir(trial: optuna.Trial, cfg: Config, name: str) -> Path:
    """The trial's run directory; a retried trial reuses its dead predecessor's to resume."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    if frozen.user_attrs.get("run_dir"):  # a retry (stale or interrupted) inherits it
        return Path(frozen.user_attrs["run_dir"])
    history = frozen.system_attrs.get("retry_history", [])  # set by the retry callback
    number = history[0] if history else trial.number
    return Path(cfg.search.workdir) / name / f"trial-{number:04d}"


def _upload(store: FileSystemArtifactStore, target: Any, paths: list[Path]) -> None:
    for path in paths:
        if path.is_file():
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=target)


def _hparams(cfg: Config, name: str, trial: optuna.Trial, value: float, state: str) -> None:
    """TensorBoard HParams summary of a trial, the original project's way to compare a grid."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    logdir = Path(cfg.search.workdir) / name / "hparams" / f"trial-{trial.number:04d}"
    with tf.summary.create_file_writer(str(logdir)).as_default():
        hp.hparams({k: v for k, v in trial.params.items()}, trial_id=f"trial-{trial.number:04d}")
        tf.summary.scalar(MONITOR, value, step=1)
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
    # failure is reported in one line here, not with Optuna's traceback (see _QuietFailures).
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
        import keras

        from drtune import metrics
        from drtune.train import TrainingDiverged, train_and_evaluate

        cfg = sample(trial, self.cfg, self.grid)
        if self.grid:
            _check_duplicate(trial)
        keras.backend.clear_session()  # one process runs many trials: free the last graph
        run = _run_dir(trial, cfg, self.name)
        trial.set_user_attr("run_dir", str(run))
        # Which worker ran it: useful in the dashboard when many machines share a study.
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            trial.set_user_attr("cuda_visible_devices", os.environ["CUDA_VISIBLE_DEVICES"])
        logging.info("trial %d: %s -> %s", trial.number,
                     " ".join(f"{k}={v}" for k, v in trial.params.items()), run)
        callbacks = [_trial_attrs_callback(trial), _pruning_callback(trial, cfg.train.epochs)]
        try:
            result = train_and_evaluate(cfg, self.data_dir, run, callbacks=callbacks)
        except optuna.TrialPruned:
            last = trial.user_attrs.get("epochs_run", 0)
            self._artifacts(trial, run)
            _hparams(self.cfg, self.name, trial, _last_value(run), "pruned")
            logging.info("trial %d pruned after %d epoch(s)", trial.number, last)
            raise
        except TrainingDiverged as exc:
            # A diverging learning rate is a bad point of the space, not a broken worker:
            # record it as pruned so the study goes on and the reason stays visible.
            trial.set_user_attr("diverged", str(exc))
            _hparams(self.cfg, self.name, trial, float("nan"), "diverged")
            logging.warning("trial %d diverged; pruned", trial.number)
            raise optuna.TrialPruned(str(exc)) from None
        value = float(result["val_balanced_accuracy"])
        trial.set_user_attr("epochs_run", result["epochs_run"])
        trial.set_user_attr("best_epoch", result["best_epoch"])
        trial.set_user_attr("threshold", result["threshold"])
        trial.set_user_attr("seconds", round(result["seconds"], 1))
        if result.get("val_auc") is not None:
            trial.set_user_attr("val_auc", result["val_auc"])
        metrics.plot_confusion_matrix(result["val"]["confusion_matrix"], run / "val_confusion_matrix.png",
                                      f"trial {trial.number}: validation at threshold {result['threshold']:.3f}")
        self._artifacts(trial, run)
        _hparams(self.cfg, self.name, trial, value, "complete")
        return value

    def _artifacts(self, trial: optuna.Trial, run: Path) -> None:
        from drtune import metrics

        if (run / "history.csv").is_file() and not (run / "history.png").is_file():
            try:
                metrics.plot_history(run / "history.csv", run / "history.png")
            except ValueError:
                pass
        _upload(self.store, trial, [run / "val_confusion_matrix.png", run / "history.png",
                                    run / "history.csv", run / "config.json"])


def _last_value(run: Path) -> float:
    from drtune.train import read_history

    try:
        return float(read_history(run / "history.csv")[-1][MONITOR])
    except (OSError, IndexError, KeyError, ValueError):
        return float("nan")


class TrialTakenOver(Exception):
    """This worker's trial was failed as stale and retried elsewhere while it was stalled."""


def _ownership_errors() -> tuple[type[BaseException], ...]:
    """What a stalled worker meets when it comes back: Optuna refusing updates to its (now failed)
    trial, or train.py's owner token of the run directory, when train.py provides one."""
    from drtune import train

    lost = getattr(train, "RunOwnershipLost", None)
    return (optuna.exceptions.UpdateFinishedTrialError,) + ((lost,) if isinstance(lost, type) else ())


class _QuietFailures(logging_std.Filter):
    """Drop Optuna's "Trial N failed ..." warnings (with traceback) for trials that the objective
    abandoned on purpose; drtune says what happened in one line instead."""

    def __init__(self, abandoned: dict[int, str]) -> None:
        super().__init__()
        self.abandoned = abandoned

    def filter(self, record: logging_std.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.abandoned)


# --------------------------------------------------------------------------- search


def _log_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    best = "-"
    try:
        best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        pass
    logging.info("trial %d %s: value %s, %s epoch(s); best so far %s", trial.number,
                 trial.state.name, value, trial.user_attrs.get("epochs_run", 0), best)


def create_study(cfg: Config, grid: bool, storage: str | None = None, name: str | None = None) -> optuna.Study:
    """Create (or load) the study with its sampler and pruner; what every worker starts with."""
    if grid:
        grid_space(cfg)
    elif not cfg.search.space:
        raise _no_space(cfg, "[search.space]")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # drtune logs each trial itself
    return optuna.create_study(study_name=study_name(cfg, name), storage=open_storage(cfg, storage),
                               direction="maximize", sampler=make_sampler(cfg, grid),
                               pruner=make_pruner(cfg), load_if_exists=True)


def search(cfg: Config, data_dir: Path | str | None = None, grid: bool = False,
           storage: str | None = None, name: str | None = None, n_trials: int | None = None,
           timeout: float | None = None) -> optuna.Study:
    """Run (or resume) a study; a grid stops when every point has finished once.

    ``n_trials`` (default ``search.n_trials`` for TPE, none for a grid) is the study's budget, not
    this process's: every worker stops once that many trials have finished or are running,
    counted across all workers and earlier runs (Optuna's ``MaxTrialsCallback``).
    """
    from drtune.prepare import load_meta
    from drtune.train import resolve_data_dir

    check_budget(n_trials, timeout)
    data = resolve_data_dir(cfg, data_dir).resolve()
    load_meta(data)  # fail now, not in the first trial
    name = study_name(cfg, name)
    study = create_study(cfg, grid, storage, name)
    _warn_if_config_changed(study, cfg)
    # What the study, the run directories and the artifacts keep must carry no password.
    public = redact_config(cfg)
    study.set_user_attr("config", config_lib.to_dict(public))
    study.set_user_attr("data_dir", str(data))
    artifacts = artifact_dir(cfg)
    artifacts.mkdir(parents=True, exist_ok=True)
    objective = Objective(public, data, grid, name, FileSystemArtifactStore(str(artifacts)))
    budget = n_trials if n_trials is not None else (None if grid else cfg.search.n_trials)
    timeout = timeout if timeout is not None else (cfg.search.timeout or None)
    logging.info("study %r in %s: %s, pruner %s", name, redact(storage_url(cfg, storage)),
                 f"grid of {len(_grid_points(cfg))} points" if grid else
                 f"TPE (worker {worker_id()}), {budget} trial(s) in the study", cfg.search.pruner)
    started = time.monotonic()
    callbacks = [_log_trial] + ([_StopWhenGridTaken(cfg)] if grid else [])
    with _StaleWatcher(study, cfg.search.heartbeat_interval, objective):
        _loop(study, cfg, objective, grid, budget, timeout, started, callbacks)
    _summary(study, grid, cfg)
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


class _StaleWatcher:
    """Fail (and queue for retry) trials whose worker died, every heartbeat interval.

    Optuna itself looks for dead trials only when a worker starts its next trial, which can be
    a whole trial's time away; this thread notices them one interval after the grace period.
    """

    def __init__(self, study: optuna.Study, interval: float, objective: Objective | None = None) -> None:
        import threading

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

    def __enter__(self) -> "_StaleWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def check_budget(n_trials: int | None, timeout: float | None) -> None:
    """``--n-trials``/``--timeout`` that would do nothing are usage errors."""
    if n_trials is not None and n_trials < 1:
        raise InputError(f"--n-trials {n_trials}: must be >= 1")
    if timeout is not None and not timeout > 0:
        raise InputError(f"--timeout {timeout:g}: must be > 0 seconds")


# Trials that count against the study's budget; a dead worker's trial stops counting when it is
# failed as stale (and its retry counts once it runs).
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


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
            _requeue_failed(study, cfg, interrupted_only=False)
        while True:
            # Dead trials (of this or another worker) are failed, and queued for retry, here and
            # at the start of every trial.
            optuna.storages.fail_stale_trials(study)
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None and left <= 0:
                break
            if grid:
                _requeue_failed(study, cfg, interrupted_only=True)
            if budget is not None:
                spent = len(study.get_trials(deepcopy=False, states=BUDGET_STATES))
                if spent >= budget:
                    logging.info("study %r has %d finished or running trial(s) of its budget of %d; "
                                 "pass a larger --n-trials to run more", study.study_name, spent, budget)
                    break
            waiting, untouched, running = _waiting(study), _untouched_points(study, cfg), _running_points(study, cfg)
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


def _requeue_failed(study: optuna.Study, cfg: Config, interrupted_only: bool) -> None:
    """Queue again each grid point whose trial failed and that no other trial has finished, runs
    or waits to run: a point interrupted by Ctrl-C is not done. The new trial resumes the failed
    one's run directory.

    While workers run, only interrupted trials are queued (a trial that a dead worker left is
    retried by the heartbeat callback, up to ``search.max_retry``); a new ``drtune search`` queues
    every failed point once.
    """
    trials = study.get_trials(deepcopy=False)
    keys = list(cfg.search.grid)
    points = set(_grid_points(cfg))
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


class DuplicateTrial(Exception):
    """This trial drew a grid point that another worker's trial already runs or ran."""


class _StopWhenGridTaken:
    """Stop a worker when every grid point has a trial and none waits for a retry.

    GridSampler alone would hand a worker the points that other workers are still running,
    duplicating them near the end of a grid.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not _untouched_points(study, self.cfg) and not _waiting(study):
            study.stop()


def _check_duplicate(trial: optuna.Trial) -> None:
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


def _waiting(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def _grid_points(cfg: Config) -> list[tuple[Any, ...]]:
    import itertools

    return list(itertools.product(*cfg.search.grid.values()))


def _points_of(study: optuna.Study, cfg: Config, states: tuple[TrialState, ...]) -> set[tuple[Any, ...]]:
    keys = list(cfg.search.grid)
    return {tuple(t.params.get(k) for k in keys) for t in study.get_trials(deepcopy=False, states=states)}


def _untouched_points(study: optuna.Study, cfg: Config) -> list[tuple[Any, ...]]:
    """Grid points that no trial has drawn yet."""
    taken = _points_of(study, cfg, tuple(TrialState))
    return [p for p in _grid_points(cfg) if p not in taken]


def _running_points(study: optuna.Study, cfg: Config) -> list[tuple[Any, ...]]:
    """Grid points being run (maybe by a dead worker) that have no finished trial yet."""
    done = _points_of(study, cfg, (TrialState.COMPLETE, TrialState.PRUNED))
    running = _points_of(study, cfg, (TrialState.RUNNING,))
    return [p for p in _grid_points(cfg) if p in running and p not in done]


def _summary(study: optuna.Study, grid: bool, cfg: Config) -> None:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name: states.count(s) for s in TrialState if states.count(s)}
    logging.info("study %r: %s", study.study_name, ", ".join(f"{n} {k.lower()}" for k, n in counts.items()))
    if grid:
        done = _points_of(study, cfg, (TrialState.COMPLETE, TrialState.PRUNED))
        logging.info("grid: %d of %d points finished", len(done), len(_grid_points(cfg)))
    try:
        best = study.best_trial
        logging.info("best: trial %d, value %.4f, %s", best.number, best.value,
                     " ".join(f"{k}={v}" for k, v in best.params.items()))
    except ValueError:
        logging.warning("no trial completed")


# --------------------------------------------------------------------------- finetune


def finetune_best(cfg: Config, storage: str | None = None, name: str | None = None,
                  data_dir: Path | str | None = None) -> dict[str, Any]:
    """Retrain the best COMPLETE trial from its best checkpoint with the [finetune] settings,
    evaluate on the test split and record the result on the study."""
    from drtune.evaluate import evaluate_run
    from drtune.train import train_and_evaluate

    study = load_study(cfg, storage, name)
    try:
        best = study.best_trial
    except ValueError:
        raise InputError(f"study {study.study_name!r} has no completed trial to fine-tune; "
                         "run 'drtune search' until one completes") from None
    run = Path(best.user_attrs["run_dir"])
    if not (run / "model.keras").is_file() or not (run / "config.json").is_file():
        raise InputError(f"{run}: best trial {best.number} has no model.keras/config.json to start from")
    trial_cfg = config_lib.from_dict(json.loads((run / "config.json").read_text()), str(run / "config.json"))
    ft = cfg.finetune
    ft_cfg = config_lib.replace(trial_cfg, **{"train.lr": ft.lr, "train.epochs": ft.epochs,
                                              "data.augment": ft.augment, "finetune.lr": ft.lr,
                                              "finetune.epochs": ft.epochs, "finetune.augment": ft.augment})
    ft_cfg = redact_config(ft_cfg)  # trials run before storage URLs were redacted kept passwords
    data = Path(data_dir) if data_dir else Path(trial_cfg.data.dir)
    out = Path(cfg.search.workdir) / study.study_name / f"finetune-trial-{best.number:04d}"
    done = study.user_attrs.get("finetune")
    if done and done.get("trial") == best.number and done.get("run_dir") == str(out) \
            and (out / "eval-test" / "metrics.json").is_file():
        # Already fine-tuned and recorded: uploading its artifacts again would list them twice.
        logging.info("trial %d is already fine-tuned (%s); delete that folder to redo it", best.number, out)
        return done
    logging.info("fine-tuning trial %d (value %.4f) from %s: lr %g, %d epochs, %s augmentation -> %s",
                 best.number, best.value, run / "model.keras", ft.lr, ft.epochs, ft.augment, out)
    import keras

    keras.backend.clear_session()
    result = train_and_evaluate(ft_cfg, data, out, init_model=run / "model.keras")
    test = evaluate_run(out, data, "test")
    summary = {
        "trial": best.number, "run_dir": str(out), "params": best.params,
        "val_balanced_accuracy": result["val_balanced_accuracy"], "threshold": result["threshold"],
        "test": {k: test[k] for k in ("balanced_accuracy", "accuracy", "auc", "sensitivity",
                                      "specificity", "n", "confusion_matrix", "ci95")},
    }
    store = FileSystemArtifactStore(str(artifact_dir(cfg)))
    _upload(store, study, [out / "eval-test" / "confusion_matrix.png", out / "eval-test" / "roc.png",
                           out / "eval-test" / "metrics.json", out / "history.png"])
    if ft.gradcam:
        summary["gradcam"] = _galleries(study, best, run, out, data, ft.gradcam, store)
    study.set_user_attr("finetune", summary)
    return summary


def _galleries(study: optuna.Study, best: FrozenTrial, run: Path, out: Path, data: Path, n: int,
               store: FileSystemArtifactStore) -> dict[str, str]:
    """Grad-CAM galleries of the best trial's and the fine-tuned model, uploaded to the study so
    that the dashboard shows where each looks (a finished trial takes no more artifacts, so
    both go to the study, their files prefixed ``trial-NNNN_`` and ``finetuned_``)."""
    import shutil
    import tempfile

    from drtune.gradcam import gallery_artifacts, run_gradcam

    dirs = {}
    for key, prefix, run_dir in (("trial", f"trial-{best.number:04d}_", run), ("finetune", "finetuned_", out)):
        gallery = run_dir / "gradcam-test"
        run_gradcam(run_dir, gallery, data_dir=data, split="test", n=n)
        with tempfile.TemporaryDirectory() as tmp:
            # The PNGs only: the dashboard stores artifacts under ids, so the gallery's
            # index.html could not find its images there (it is in the run directory).
            for path in (p for p in gallery_artifacts(gallery) if p.suffix == ".png"):
                named = Path(tmp) / f"{prefix}{path.name}"
                shutil.copyfile(path, named)
                upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)
        dirs[key] = str(gallery / "index.html")
    return dirs
