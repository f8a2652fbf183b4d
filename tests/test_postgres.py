"""Many workers on one PostgreSQL study: grid coverage, kill -9 failover, load, bad URLs.

Runs against the real server (``DRTUNE_TEST_PG``, default the local one at 127.0.0.1:5432). In
CI (``CI`` set) an unreachable server fails these tests; on a machine without PostgreSQL they
skip with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from conftest import SIX_POINTS, check_grid_once, default_sigint, study_file
from drtune.cli import main

PG_URL = os.environ.get("DRTUNE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@functools.cache
def store(url: str) -> RDBStorage:
    """One storage, so one connection pool, per URL for the whole module. A URL string makes
    Optuna open a new pool on every call, and the tests that poll a study five times a second
    ran the server out of connections ("too many clients already")."""
    return RDBStorage(url)


@pytest.fixture(scope="module")
def pg() -> str:
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(PG_URL).connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "no server here"
        reason = f"PostgreSQL at {PG_URL} unreachable: {str(exc).splitlines()[0]}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run these tests; .ci/run starts the server)")
        pytest.skip(reason)
    return PG_URL


@pytest.fixture()
def study_name(pg: str):
    name = f"drtune-test-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=store(pg))
    except KeyError:
        pass


def _search(path: Path, pg: str, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "drtune", "search", "--grid", "--config", str(path),
            "--storage", pg, "--study", name, *extra]


@pytest.mark.slow
def test_three_workers_cover_the_grid_once(prepared: Path, tmp_path: Path, pg: str, study_name: str) -> None:
    path = study_file(tmp_path, prepared, epochs=2, lrs=SIX_POINTS)
    proc = subprocess.run(_search(path, pg, study_name, "--workers", "3"), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=study_name, storage=store(pg))
    check_grid_once(study, [3e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4])
    workers = {t.user_attrs["worker"] for t in study.trials if "duplicate_of" not in t.user_attrs}
    print(f"3 workers, {len(study.trials)} trials for 6 grid points, "
          f"{sum('duplicate_of' in t.user_attrs for t in study.trials)} duplicate draws skipped, "
          f"{len(workers)} workers ran trials")
    assert len(workers) >= 2


@pytest.mark.slow
def test_kill9_worker_trial_fails_over(prepared: Path, tmp_path: Path, pg: str, study_name: str) -> None:
    path = study_file(tmp_path, prepared, epochs=25, lrs="[3e-3, 1e-3, 5e-4]")
    procs = [subprocess.Popen(_search(path, pg, study_name), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        # Wait until two trials are training (so another worker is mid-trial when one dies) and
        # one of them is a few epochs in, then kill -9 the worker that runs it.
        deadline, victim, others = time.monotonic() + 240, None, []
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name=study_name, storage=store(pg))
            except KeyError:  # the workers have not created the study yet
                continue
            training = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                        if t.user_attrs.get("epochs_run", 0) >= 1]
            ahead = [t for t in training if t.user_attrs["epochs_run"] >= 3]
            if len(training) >= 2 and ahead:
                victim = ahead[0]
                others = [t.number for t in training if t.number != victim.number]
        assert victim is not None, "no two trials got going"
        pid = int(victim.user_attrs["worker"].split(":")[1])
        killed = next(p for p in procs if p.pid == pid)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        failed_after = None
        while time.monotonic() - t_kill < 60:  # a timeout only: the order of events is checked below
            state = optuna.load_study(study_name=study_name, storage=store(pg)).trials[victim.number].state
            if state == TrialState.FAIL:
                failed_after = time.monotonic() - t_kill
                break
            time.sleep(0.2)
        assert failed_after is not None, "killed trial never marked FAIL"
        for p in procs:
            if p is not killed:
                assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:] if p.stderr else ""
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    study = optuna.load_study(study_name=study_name, storage=store(pg))
    check_grid_once(study, [3e-3, 1e-3, 5e-4])
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL
    retry = next(t for t in study.trials if t.number > victim.number and t.params == victim.params
                 and t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
    assert retry.user_attrs["run_dir"] == victim.user_attrs["run_dir"]  # resumed, not restarted
    # The order of events, which no load on the machine changes: the dead trial was failed while
    # the trials training beside it were still running (by the heartbeat watcher, not when a
    # worker finished its trial and asked for the next), and its retry started after that.
    for number in others:
        other = study.trials[number]
        assert other.state in (TrialState.COMPLETE, TrialState.PRUNED), (number, other.state)
        assert dead.datetime_complete < other.datetime_complete, (number, dead.datetime_complete,
                                                                  other.datetime_complete)
    assert dead.datetime_complete < retry.datetime_start
    # For information only (grace period 2 s, heartbeat interval 1 s): not asserted, a loaded
    # machine stretches it.
    print(f"kill -9 of worker {pid}: trial {victim.number} FAIL after {failed_after:.1f}s "
          f"(grace period 2s), retried as trial {retry.number}")


LOAD_WORKER = textwrap.dedent("""
    import sys
    import optuna
    from drtune.config import load_config
    from drtune.study import open_storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(None, ["search.heartbeat_interval=1", "search.grace_period=5"])
    study = optuna.load_study(study_name=sys.argv[1], storage=open_storage(cfg, sys.argv[2]))
    study.optimize(lambda t: t.suggest_float("x", -10, 10) ** 2, n_trials=10)
""")


@pytest.mark.slow
def test_four_workers_forty_trials_nothing_lost(pg: str, study_name: str) -> None:
    optuna.create_study(study_name=study_name, storage=store(pg))
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_WORKER, study_name, pg], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:] if p.stderr else ""
    seconds = time.monotonic() - t0
    trials = optuna.load_study(study_name=study_name, storage=store(pg)).trials
    assert len(trials) == 40
    assert sorted(t.number for t in trials) == list(range(40))
    assert len({t._trial_id for t in trials}) == 40
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(t.value == pytest.approx(t.params["x"] ** 2) for t in trials)
    print(f"4 workers x 10 trials: 40 complete, 0 lost, 0 duplicated, {seconds:.1f}s")


def test_unreachable_or_wrong_database_names_host_not_password(capsys, pg: str) -> None:
    url = "postgresql+psycopg2://drtune:hunter2@127.0.0.1:1/optuna"
    assert main(["status", "--storage", url, "--study", "x"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "cannot connect" in err and "hunter2" not in err
    # The local server trusts every connection, so a wrong password cannot be shown failing;
    # a user that does not exist fails the same way, at authentication.
    bad_user = pg.replace("postgres@", "nosuchuser:hunter2@")
    assert main(["status", "--storage", bad_user, "--study", "x"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1" in err and "nosuchuser" in err and "hunter2" not in err
    assert err.startswith("drtune: error: storage ") and err.count("\n") == 1


@pytest.mark.slow
def test_sqlite_and_postgres_studies_look_alike(prepared: Path, tmp_path: Path, pg: str, study_name: str) -> None:
    """The same grid on both storages: same points, same states (tests parametrised over storages)."""
    path = study_file(tmp_path, prepared, epochs=2, lrs="[3e-3, 1e30]")
    for storage in (pg, f"sqlite:///{tmp_path / 'alike.db'}"):
        proc = subprocess.run(_search(path, storage, study_name), env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = optuna.load_study(study_name=study_name, storage=store(pg)).trials
    b = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path / 'alike.db'}").trials
    assert sorted((t.params["train.lr"], t.state) for t in a) == sorted((t.params["train.lr"], t.state) for t in b)
    assert json.dumps(sorted(t.params["train.lr"] for t in a)) == "[0.003, 1e+30]"


@pytest.mark.slow
def test_password_is_stored_and_printed_nowhere(prepared: Path, tmp_path: Path, pg: str, study_name: str) -> None:
    """A storage URL with a password given in --set (the server trusts every login, so any
    password connects): not in the study's attributes, config.json, artifacts, logs or hints."""
    path = study_file(tmp_path, prepared, epochs=1, lrs="[3e-3]")
    secret = pg.replace("postgres@", "postgres:hunter2@", 1)
    assert "hunter2" in secret
    cmd = [sys.executable, "-m", "drtune", "search", "--grid", "--config", str(path), "--study", study_name,
           "--set", f"search.storage={secret}"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hunter2" not in proc.stdout + proc.stderr
    assert "drtune status" in proc.stdout and "--set 'search.storage=postgresql+psycopg2://postgres:***@" in proc.stdout
    study = optuna.load_study(study_name=study_name, storage=store(pg))
    assert "hunter2" not in json.dumps(study.user_attrs) + json.dumps([t.user_attrs for t in study.trials])
    assert study.user_attrs["config"]["search"]["storage"].startswith("postgresql+psycopg2://postgres:***@")
    leaks = [f for f in (tmp_path / "runs").rglob("*") if f.is_file() and b"hunter2" in f.read_bytes()]
    assert leaks == []
    assert any((tmp_path / "runs" / "artifacts").iterdir())  # config.json etc. were uploaded


@pytest.mark.slow
def test_killed_and_interrupted_workers_leave_a_complete_grid(prepared: Path, tmp_path: Path, pg: str,
                                                               study_name: str) -> None:
    """Four workers on a grid; one is killed (SIGKILL) and one interrupted (SIGINT) mid-trial.
    The two others finish the grid: each point once, nothing left RUNNING, and the killed trial's
    retry resumes from the epoch of its last checkpoint."""
    path = study_file(tmp_path, prepared, epochs=10, lrs=SIX_POINTS)
    logs = [tmp_path / f"worker-{i}.log" for i in range(4)]
    procs = [subprocess.Popen(_search(path, pg, study_name, "--set", "search.pruner=none"), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=log.open("w"), preexec_fn=default_sigint)
             for log in logs]
    by_pid = {p.pid: p for p in procs}
    try:
        deadline, victims = time.monotonic() + 600, []
        while time.monotonic() < deadline and len(victims) < 2:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name=study_name, storage=store(pg))
            except KeyError:  # the workers have not created the study yet
                continue
            victims = []
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                pid = int(t.user_attrs.get("worker", "-:0").split(":")[1])
                if t.user_attrs.get("epochs_run", 0) >= 2 and pid in by_pid \
                        and pid not in [int(v.user_attrs["worker"].split(":")[1]) for v in victims]:
                    victims.append(t)
            victims = victims[:2]
        assert len(victims) == 2, "no two trials got going"
        killed, interrupted = (by_pid[int(v.user_attrs["worker"].split(":")[1])] for v in victims)
        killed.send_signal(signal.SIGKILL)
        interrupted.send_signal(signal.SIGINT)
        killed.wait(timeout=60)
        assert interrupted.wait(timeout=120) == 130
        # The checkpoint the killed trial left: its retry must start from here.
        run_dir = Path(victims[0].user_attrs["run_dir"])
        epochs_done = json.loads((run_dir / "checkpoints" / "state.json").read_text())["epochs_done"]
        for p in procs:
            if p not in (killed, interrupted):
                assert p.wait(timeout=1200) == 0, logs[procs.index(p)].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    study = optuna.load_study(study_name=study_name, storage=store(pg))
    check_grid_once(study, [3e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4])
    for victim in victims:
        redo = [t for t in study.trials if t.params == victim.params and t.number != victim.number
                and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(redo) == 1 and redo[0].user_attrs["run_dir"] == victim.user_attrs["run_dir"]
        assert redo[0].user_attrs["worker"] != victim.user_attrs["worker"]
    survivors = "".join(logs[procs.index(p)].read_text() for p in procs if p not in (killed, interrupted))
    assert f"{run_dir}: resuming after epoch {epochs_done}" in survivors
    assert "Traceback" not in logs[procs.index(interrupted)].read_text()
    print(f"SIGKILL: trial {victims[0].number} resumed after epoch {epochs_done}; SIGINT: trial "
          f"{victims[1].number} run again; {len(study.trials)} trials for 6 points")
