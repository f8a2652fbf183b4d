"""Several local workers on one study (`drtune search --workers N --gpus ...`) on SQLite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import SIX_POINTS, check_grid_once, study_file
from drtune.config import load_config
from drtune.errors import InputError
from drtune.study import storage_url
from drtune.workers import parse_gpus, strip_worker_flags, worker_envs


def test_worker_environments() -> None:
    envs = worker_envs(3, parse_gpus("0,1"), base={"PATH": "/bin"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    host = socket.gethostname()
    assert [e["DRTUNE_WORKER"] for e in envs] == [f"{host}/0", f"{host}/1", f"{host}/2"]
    # A name given to the parent (one per machine) keeps workers apart across machines.
    assert [e["DRTUNE_WORKER"] for e in worker_envs(2, [], base={"DRTUNE_WORKER": "b"})] == ["b.0", "b.1"]
    assert all(e["PATH"] == "/bin" for e in envs)
    assert "CUDA_VISIBLE_DEVICES" not in worker_envs(2, [], base={})[0]
    # Two workers per GPU: each grows its GPU memory instead of reserving all of it.
    shared = worker_envs(4, parse_gpus("0,0,1,1"), base={})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in shared] == ["0", "0", "1", "1"]
    assert all(e["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" for e in shared)
    with pytest.raises(InputError, match="--gpus 'a,b'"):
        parse_gpus("a,b")
    with pytest.raises(InputError, match="--workers 0"):
        worker_envs(0, [])
    argv = ["search", "--grid", "--workers", "3", "--gpus=0,1", "--config", "x.toml"]
    assert strip_worker_flags(argv) == ["search", "--grid", "--config", "x.toml"]


@pytest.mark.slow
def test_three_workers_share_a_sqlite_grid(prepared: Path, tmp_path: Path) -> None:
    path = study_file(tmp_path, prepared, epochs=2, lrs=SIX_POINTS)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "drtune", "search", "--grid", "--config", str(path),
                           "--workers", "3", "--gpus", "0,1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[w0]" in proc.stderr and "[w2]" in proc.stderr
    study = optuna.load_study(study_name="tiny", storage=storage_url(load_config(path)))
    check_grid_once(study, [3e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4])
    ran = [t for t in study.trials if "worker" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    assert len({t.user_attrs["worker"] for t in ran}) >= 2, "the grid was shared between workers"
    assert {t.user_attrs["cuda_visible_devices"] for t in ran} <= {"0", "1"}


@pytest.mark.slow
def test_two_tpe_workers_share_the_study_budget(prepared: Path, tmp_path: Path) -> None:
    """`search.n_trials` is the study's budget: two workers run 3 trials between them, not 3
    each, and do not start on the same point."""
    path = study_file(tmp_path, prepared, epochs=1)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "drtune", "search", "--config", str(path), "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage_url(load_config(path)))
    # Two workers finishing at the same moment may each start one more (documented).
    assert 3 <= len(study.trials) <= 4, [t.state for t in study.trials]
    by_worker: dict[str, list] = {}
    for t in sorted(study.trials, key=lambda t: t.number):
        by_worker.setdefault(t.user_attrs["worker"], []).append(t.params)
    assert len(by_worker) == 2
    first = [params[0] for params in by_worker.values()]
    assert first[0] != first[1]
