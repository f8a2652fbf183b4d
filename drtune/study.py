"""Where studies live and how they are opened: storage URLs, redaction, samplers, pruners.

Everything ``drtune status`` and ``drtune dashboard`` need, and nothing that imports TensorFlow,
so those commands answer in a second while workers train elsewhere. Studies live in a SQL store
(SQLite by default, PostgreSQL for many workers) with heartbeats: a killed trial is failed and
retried with the same parameters (see :mod:`drtune.grid` for how workers share a study).
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from drtune import config as config_lib
from drtune.config import Config
from drtune.errors import DrtuneError, InputError
from drtune.grid import RetryUnlessDone

STORAGE_ENV = "DRTUNE_STORAGE"
WORKER_ENV = "DRTUNE_WORKER"  # set by `drtune search --workers N`; set it by hand on other machines

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
                heartbeat_stale_trial_callback=RetryUnlessDone(cfg.search.max_retry))
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


def study_name(cfg: Config, override: str | None = None) -> str:
    """``--study``, else ``search.study``, else the config's name."""
    return override or cfg.search.study or cfg.name


def artifact_dir(cfg: Config) -> Path:
    """The artifact store (plots, histories, galleries) that the dashboard serves with the study."""
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


def upload(store: FileSystemArtifactStore, target: Any, paths: list[Path]) -> None:
    """Upload the files of ``paths`` that exist to a trial or study (what the dashboard shows)."""
    for path in paths:
        if path.is_file():
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=target)


# --------------------------------------------------------------------------- sampling


def no_space(cfg: Config, want: str) -> InputError:
    """The error for a study without the section (``[search.grid]`` or ``[search.space]``) it needs."""
    other = "[search.space]" if want == "[search.grid]" else "[search.grid]"
    has_other = bool(cfg.search.space if want == "[search.grid]" else cfg.search.grid)
    hint = (f"drop --grid to sample its {other} with TPE" if want == "[search.grid]" else
            f"pass --grid to run its {other}") if has_other else \
        "add [search.grid] (lists, for --grid) or [search.space] (ranges, for TPE) to the study file"
    return InputError(f"study {cfg.name!r} has no {want} section; {hint}")


def grid_space(cfg: Config) -> dict[str, list[Any]]:
    """The grid of the study (``[search.grid]``) as GridSampler takes it."""
    if not cfg.search.grid:
        raise no_space(cfg, "[search.grid]")
    return {k: list(v) for k, v in cfg.search.grid.items()}


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
        # Steps are epochs counted from 1, and the pruner spares steps < n_warmup_steps: + 1
        # spares the first pruner_warmup_epochs epochs themselves.
        return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                           n_warmup_steps=s.pruner_warmup_epochs + 1)
    if s.pruner == "hyperband":
        pruner = _Hyperband(min_resource=max(1, s.pruner_warmup_epochs), max_resource=cfg.train.epochs)
    elif s.pruner == "successive_halving":
        pruner = _SuccessiveHalving(min_resource=max(1, s.pruner_warmup_epochs))
    else:
        return optuna.pruners.NopPruner()
    pruner.n_startup = s.pruner_startup_trials  # type: ignore[attr-defined]
    return pruner


def worker_id() -> str:
    """This worker's identity for seeding: ``$DRTUNE_WORKER``, else host and process id."""
    return os.environ.get(WORKER_ENV) or f"{socket.gethostname()}:{os.getpid()}"


def tpe_seed(sampler_seed: int, worker: str) -> int:
    """A TPE seed for one worker: reproducible for a given (seed, worker), different across workers.

    Workers seeded alike draw the same start-up points in lockstep, running each one N times.
    """
    return zlib.crc32(f"{sampler_seed}/{worker}".encode()) & 0x7FFFFFFF


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, which also accepts the points ``grid.requeue_failed`` queues again.

    A queued trial (``enqueue_trial``) carries fixed parameters and no ``grid_id`` system
    attribute; Optuna's ``after_trial`` looks that attribute up whenever one unvisited point is
    left, and the worker died with a ``KeyError`` at the end of a re-run interrupted point.
    """

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        if "grid_id" in study._storage.get_trial_system_attrs(trial._trial_id):
            super().after_trial(study, trial, state, values)
        elif not self._get_unvisited_grid_ids(study):
            study.stop()


def make_sampler(cfg: Config, grid: bool, worker: str | None = None) -> optuna.samplers.BaseSampler:
    """The grid sampler (one seed on every worker, or points are skipped), or TPE seeded per worker
    with ``constant_liar`` so that workers avoid the points that others are running."""
    if grid:
        return GridSampler(grid_space(cfg), seed=cfg.search.sampler_seed)
    seed = tpe_seed(cfg.search.sampler_seed, worker_id() if worker is None else worker)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def create_study(cfg: Config, grid: bool, storage: str | None = None, name: str | None = None) -> optuna.Study:
    """Create (or load) the study with its sampler and pruner; what every worker starts with."""
    if grid:
        grid_space(cfg)
    elif not cfg.search.space:
        raise no_space(cfg, "[search.space]")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # drtune logs each trial itself
    return optuna.create_study(study_name=study_name(cfg, name), storage=open_storage(cfg, storage),
                               direction="maximize", sampler=make_sampler(cfg, grid),
                               pruner=make_pruner(cfg), load_if_exists=True)


def check_budget(n_trials: int | None, timeout: float | None) -> None:
    """``--n-trials``/``--timeout`` that would do nothing are usage errors."""
    if n_trials is not None and n_trials < 1:
        raise InputError(f"--n-trials {n_trials}: must be >= 1")
    if timeout is not None and not timeout > 0:
        raise InputError(f"--timeout {timeout:g}: must be > 0 seconds")

