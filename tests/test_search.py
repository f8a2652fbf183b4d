"""The Optuna search service against a real SQLite file: grid, pruning, kill + resume,
artifacts, finetune, status and a real optuna-dashboard server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna.trial import TrialState

from conftest import default_sigint, study_file
from drtune.cli import main
from drtune.config import load_config
from drtune.errors import InputError
from drtune.finetune import finetune_best
from drtune.search import search
from drtune.study import artifact_dir, open_storage, storage_url


def trials_by_lr(study: optuna.Study) -> dict[float, list[optuna.trial.FrozenTrial]]:
    out: dict[float, list] = {}
    for t in study.get_trials():
        out.setdefault(t.params["train.lr"], []).append(t)
    return out


@pytest.fixture(scope="module")
def grid_study(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, optuna.Study]:
    tmp = tmp_path_factory.mktemp("search")
    path = study_file(tmp, prepared)
    return path, search(load_config(path), grid=True)


@pytest.mark.slow
def test_grid_runs_every_point_once_with_attrs_and_artifacts(grid_study) -> None:
    path, study = grid_study
    cfg = load_config(path)
    assert storage_url(cfg).startswith("sqlite:///") and (Path(cfg.search.workdir) / "optuna.db").is_file()
    by_lr = trials_by_lr(study)
    assert sorted(by_lr) == [3e-3, 1e30] and all(len(v) == 1 for v in by_lr.values())
    good = by_lr[3e-3][0]
    assert good.state == TrialState.COMPLETE
    assert 0.0 <= good.value <= 1.0
    assert good.value == pytest.approx(max(good.intermediate_values.values()))
    assert sorted(good.intermediate_values) == [1, 2, 3]  # reported every epoch, counted from 1
    attrs = good.user_attrs
    assert attrs["epochs_run"] == 3 and Path(attrs["run_dir"]).is_dir()
    assert attrs["seconds_per_epoch"] > 0 and "threshold" in attrs
    assert (Path(attrs["run_dir"]) / "checkpoints" / "epoch-0002.keras").is_file()
    store = FileSystemArtifactStore(str(artifact_dir(cfg)))
    storage = open_storage(cfg)
    metas = get_all_artifact_meta(good, storage=storage)
    names = sorted(m.filename for m in metas)
    assert names == ["config.json", "history.csv", "history.png", "val_confusion_matrix.png"]
    config_meta = next(m for m in metas if m.filename == "config.json")
    download_artifact(artifact_store=store, file_path=str(path.parent / "dl.json"),
                      artifact_id=config_meta.artifact_id)
    downloaded = json.loads((path.parent / "dl.json").read_text())
    assert downloaded["train"]["lr"] == 3e-3
    # TensorBoard HParams summaries, one run per trial.
    hparams = Path(cfg.search.workdir) / "tiny" / "hparams"
    assert sorted(p.name for p in hparams.iterdir()) == [f"trial-{t.number:04d}" for t in study.trials]


@pytest.mark.slow
def test_bad_learning_rate_is_pruned(grid_study) -> None:
    _, study = grid_study
    bad = trials_by_lr(study)[1e30][0]
    assert bad.state == TrialState.PRUNED
    assert bad.user_attrs["epochs_run"] < 3


@pytest.mark.slow
def test_rerun_of_finished_grid_runs_nothing(grid_study) -> None:
    path, study = grid_study
    before = len(study.trials)
    again = search(load_config(path), grid=True)
    assert len(again.trials) == before


@pytest.mark.slow
def test_status_lists_trials(grid_study, capsys) -> None:
    path, study = grid_study
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "study 'tiny'" in out and "PRUNED" in out and "COMPLETE" in out
    assert f"best: trial {study.best_trial.number}" in out
    assert "finetune: not run yet" in out


@pytest.mark.slow
def test_finetune_best_writes_test_metrics(grid_study, capsys) -> None:
    path, study = grid_study
    assert main(["finetune", "--best", "--config", str(path)]) == 0
    assert "fine-tuned trial" in capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage=storage_url(load_config(path)))
    ft = study.user_attrs["finetune"]
    assert ft["trial"] == study.best_trial.number
    run = Path(ft["run_dir"])
    m = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert m["n"] == ft["test"]["n"] > 0 and m["balanced_accuracy"] == ft["test"]["balanced_accuracy"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["lr"] == 1e-5 and cfg["data"]["augment"] == "strong" and cfg["train"]["epochs"] == 2
    assert cfg["model"]["width"] == 4
    names = sorted(m.filename for m in get_all_artifact_meta(study))
    # The result files first, named for the fine-tuned model, the model card among them.
    for name in ("confusion_matrix.png", "roc.png", "reliability.png", "metrics.json", "report.html"):
        assert f"finetuned_{name}" in names
    # Grad-CAM galleries of both models, on the study (a finished trial takes no artifacts).
    best = f"gradcam-trial-{ft['trial']:04d}_"
    assert not any(n.endswith("index.html") for n in names)  # its links would not resolve there
    assert sum(n.startswith("gradcam-finetuned_") and n.endswith(".png") for n in names) == 4
    assert sum(n.startswith(best) and n.endswith(".png") for n in names) == 4
    # The dashboard's view: a named objective, test numbers as attributes, and the note.
    from optuna_dashboard import get_note

    assert study.metric_names == ["val balanced accuracy"]
    assert study.user_attrs["test_n"] == ft["test"]["n"]
    assert study.user_attrs["test_balanced_accuracy"] == round(ft["test"]["balanced_accuracy"], 4)
    note = get_note(study)
    assert f"## Result: the fine-tuned model of trial {ft['trial']}" in note and "## Study `tiny`" in note
    assert "**Operating points**" in note and note.count("](/artifacts/") >= 4
    assert Path(ft["gradcam"]["finetune"]).is_file() and Path(ft["gradcam"]["trial"]).is_file()
    assert main(["status", "--config", str(path)]) == 0
    assert f"finetune of trial {ft['trial']}: test balanced accuracy" in capsys.readouterr().out
    # A second run finds the recorded result and uploads nothing twice.
    assert main(["finetune", "--best", "--config", str(path)]) == 0
    assert len(get_all_artifact_meta(optuna.load_study(study_name="tiny", storage=storage_url(
        load_config(path))))) == len(names)


@pytest.mark.slow
def test_finetune_without_completed_trial(prepared: Path, tmp_path: Path, capsys) -> None:
    path = study_file(tmp_path, prepared, lrs="[1e30]")
    search(load_config(path), grid=True)
    assert main(["finetune", "--best", "--config", str(path)]) == 2
    assert "has no completed trial" in capsys.readouterr().err
    with pytest.raises(InputError, match="no study 'other'.*studies: tiny"):
        finetune_best(load_config(path), name="other")


@pytest.mark.slow
def test_tpe_search_runs_n_trials(prepared: Path, tmp_path: Path) -> None:
    path = study_file(tmp_path, prepared, epochs=2)
    study = search(load_config(path), grid=False, n_trials=2)
    assert len(study.trials) == 2
    for t in study.trials:
        assert set(t.params) == {"train.lr", "model.dropout", "data.augment"}
        assert 1e-4 <= t.params["train.lr"] <= 1e-2
    # n_trials is the study's budget, not this run's: a spent budget runs nothing, a larger one
    # adds to the same study instead of starting over.
    assert len(search(load_config(path), grid=False, n_trials=2).trials) == 2
    assert len(search(load_config(path), grid=False, n_trials=3).trials) == 3


def _drtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "drtune", *args]


@pytest.mark.slow
def test_killed_search_resumes_and_completes_grid(prepared: Path, tmp_path: Path) -> None:
    path = study_file(tmp_path, prepared, epochs=40, lrs="[3e-3, 1e-3]")
    cfg = load_config(path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = _drtune("search", "--grid", "--config", str(path))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = Path(cfg.search.workdir) / "tiny"
    deadline = time.monotonic() + 900  # generous: a busy machine's first epochs are slow
    killed_run = None
    while time.monotonic() < deadline and proc.poll() is None and killed_run is None:
        for state in runs.glob("trial-*/checkpoints/state.json"):
            try:
                if json.loads(state.read_text())["epochs_done"] >= 3:
                    killed_run = state.parents[1]
            except (json.JSONDecodeError, OSError):
                pass
        time.sleep(0.05)
    assert killed_run is not None and proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="tiny", storage=storage_url(cfg))
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    time.sleep(cfg.search.grace_period + 1)  # the dead trial's heartbeat goes stale
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage_url(cfg))
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.params["train.lr"] for t in finished) == [1e-3, 3e-3]  # each point once
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].number == 0
    retry = next(t for t in finished if t.params == failed[0].params)
    # The retry reused the dead trial's run directory and resumed its training.
    assert retry.user_attrs["run_dir"] == str(killed_run)
    assert "resuming after epoch" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_on_a_busy_port_is_a_clear_error(grid_study, capsys) -> None:
    path, _ = grid_study
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", "--config", str(path), "--port", str(port)]) == 1
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_dashboard_serves_the_study(grid_study) -> None:
    path, study = grid_study
    port = _free_port()
    proc = subprocess.Popen(_drtune("dashboard", "--config", str(path), "--port", str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.3)
        assert body is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        studies = {s["study_name"]: s for s in body["study_summaries"]}
        assert "tiny" in studies
        sid = studies["tiny"]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}?after=0", timeout=10) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == len(study.trials)
        artifacts = [a for t in detail["trials"] for a in t.get("artifacts", [])]
        assert any(a["filename"] == "history.png" for a in artifacts)
        trial = next(t for t in detail["trials"] if t.get("artifacts"))
        art = trial["artifacts"][0]
        url = f"http://127.0.0.1:{port}/artifacts/{sid}/{trial['trial_id']}/{art['artifact_id']}"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and len(r.read()) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"http://127.0.0.1:{port}/" in proc.stdout.read()


def test_storage_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert main(["status", "--storage", "nosuchdb://x", "--study", "s"]) == 2
    assert "not a usable database URL" in capsys.readouterr().err
    assert main(["status", "--storage", "mysql://u:pw@127.0.0.1/db", "--study", "s"]) == 2
    err = capsys.readouterr().err
    assert "database driver is not installed" in err and "pw" not in err.replace("postgresql", "")
    # A typo in a SQLite path must not create an empty database.
    missing = tmp_path / "nope" / "optuna.db"
    assert main(["status", "--storage", f"sqlite:///{missing}", "--study", "s"]) == 2
    assert "no such database file" in capsys.readouterr().err and not missing.parent.exists()
    # Plain postgresql:// means the installed psycopg2 driver.
    assert main(["status", "--storage", "postgresql://u:pw@127.0.0.1:1/db", "--study", "s"]) == 1
    assert "cannot connect" in capsys.readouterr().err
    url = "postgresql+psycopg2://drtune:s3cret@127.0.0.1:1/optuna"
    assert main(["status", "--storage", url, "--study", "s"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "cannot connect" in err and "s3cret" not in err


# --------------------------------------------------------------------------- many workers, faults


def test_tpe_workers_draw_different_first_points(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    """Two workers (as `--workers 2` names them) on one study do not suggest the same points."""
    from drtune.objective import sample
    from drtune.study import make_sampler, tpe_seed
    from drtune.workers import worker_envs

    cfg = load_config(study_file(tmp_path, prepared))
    url = open_storage(cfg)
    optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    studies = []
    for env in worker_envs(2, [], base={}):
        monkeypatch.setenv("DRTUNE_WORKER", env["DRTUNE_WORKER"])
        studies.append(optuna.load_study(study_name="tiny", storage=url, sampler=make_sampler(cfg, grid=False)))
    drawn: list[list[dict]] = [[], []]
    for _ in range(3):
        for i, study in enumerate(studies):
            trial = study.ask()
            sample(trial, cfg, grid=False)
            drawn[i].append(trial.params)
    assert all(a != b for a, b in zip(drawn[0], drawn[1])), drawn
    # Reproducible for a given worker, different across workers.
    assert tpe_seed(0, "h/0") == tpe_seed(0, "h/0") != tpe_seed(0, "h/1")
    assert studies[0].sampler._constant_liar


def test_pruner_startup_trials_applies_to_every_pruner(tmp_path: Path) -> None:
    from drtune.study import make_pruner

    url = f"sqlite:///{tmp_path / 'p.db'}"
    for pruner in ("successive_halving", "hyperband", "median"):
        cfg = load_config(None, [f"search.pruner={pruner}", "search.pruner_startup_trials=2",
                                 "search.pruner_warmup_epochs=1", "train.epochs=8"])
        study = optuna.create_study(study_name=pruner, storage=url, direction="maximize",
                                    pruner=make_pruner(cfg))

        def run(value: float) -> tuple[optuna.Trial, bool]:
            """Report every epoch and ask the pruner each time, as the Keras callback does."""
            trial, pruned = study.ask(), False
            for step in range(1, 5):  # epochs, counted from 1
                trial.report(value, step)
                pruned = pruned or trial.should_prune()
            return trial, pruned

        good, _ = run(0.9)
        study.tell(good, 0.9)
        bad, pruned = run(0.1)
        assert not pruned, f"{pruner} pruned with 1 of 2 start-up trials finished"
        study.tell(bad, 0.1)
        assert run(0.05)[1], f"{pruner} never prunes"


def test_median_pruner_spares_the_warm_up_epochs() -> None:
    from drtune.study import make_pruner

    cfg = load_config(None, ["search.pruner=median", "search.pruner_startup_trials=1",
                             "search.pruner_warmup_epochs=3"])
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg))
    good = study.ask()
    for epoch in range(1, 6):
        good.report(0.9, epoch)
    study.tell(good, 0.9)
    bad, verdicts = study.ask(), []
    for epoch in range(1, 6):
        bad.report(0.1, epoch)
        verdicts.append(bad.should_prune())
    assert verdicts == [False, False, False, True, True]  # epochs 1-3 spared, then pruned


def test_budget_flags_that_do_nothing_are_refused(capsys) -> None:
    assert main(["search", "--n-trials", "-1"]) == 2
    assert "drtune: error: --n-trials -1: must be >= 1" in capsys.readouterr().err
    assert main(["search", "--timeout", "-5"]) == 2
    assert "drtune: error: --timeout -5: must be > 0" in capsys.readouterr().err
    assert main(["search", "--workers", "0"]) == 2


def test_sqlite_memory_url_makes_no_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--storage", "sqlite://", "--study", "s"]) == 2
    assert "has no study 's'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://drtune:s3cret@db.example:5432/optuna",
    "postgresql://drtune:s3c@ret@db.example/optuna",  # an unescaped '@' in the password
    "postgresql://drtune@db.example/optuna?sslmode=require&password=s3cret",
    "postgresql://db.example/optuna?PGPASSWORD=s3cret&user=drtune",
])
def test_redact_masks_every_password(url: str) -> None:
    from argparse import Namespace

    from drtune.cli import _cfg_flag
    from drtune.study import redact

    shown = redact(url)
    assert "s3c" not in shown and "ret" not in shown.replace("require", "") and "db.example" in shown
    hint = _cfg_flag(Namespace(config=None, storage=url, study=None, set=[f"search.storage={url}"]))
    assert "s3c" not in hint and "--set 'search.storage=postgresql" in hint


@pytest.mark.slow
def test_closing_hint_keeps_set_flags(grid_study, capsys) -> None:
    path, _ = grid_study
    workdir = load_config(path).search.workdir
    assert main(["search", "--grid", "--config", str(path), "--set", f"search.workdir={workdir}"]) == 0
    out = capsys.readouterr().out
    assert f"drtune status --config {path} --set search.workdir={workdir}" in out


def test_status_fails_a_dead_workers_trial(prepared: Path, tmp_path: Path, capsys) -> None:
    path = study_file(tmp_path, prepared)
    cfg = load_config(path)
    study = optuna.create_study(study_name="tiny", storage=open_storage(cfg), direction="maximize")
    trial = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    # What a worker's heartbeat thread does, then the worker dies: no beat for the grace period.
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(cfg.search.grace_period + 1)
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "RUNNING" not in out and "FAIL" in out and "WAITING" in out  # failed and queued for retry


def _recorded_test(balanced_accuracy: float, ci: list[float], auc: float, n: int) -> dict:
    """A ``test`` entry as finetune records it (finetune.TEST_KEYS)."""
    return {"balanced_accuracy": balanced_accuracy, "accuracy": balanced_accuracy + 0.01, "auc": auc,
            "sensitivity": 0.8125, "specificity": 0.75, "n": n, "confusion_matrix": [[12, 4], [3, 13]],
            "ci95": {"balanced_accuracy": ci, "auc": [auc - 0.1, min(auc + 0.1, 1.0)]}}


def test_status_shows_the_finetune_ensemble(tmp_path: Path, capsys) -> None:
    """``finetune --top-k K`` records an ``ensemble`` beside the fine-tuned model; status shows both."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for number, (lr, value) in enumerate(((3e-3, 0.81), (1e-3, 0.86), (5e-4, 0.78))):
        study.add_trial(optuna.trial.create_trial(params={"train.lr": lr}, distributions=dist, value=value,
                                                  user_attrs={"run_dir": str(tmp_path / f"s/trial-{number:04d}")}))
    finetune = {"trial": 1, "run_dir": str(tmp_path / "s/finetune-trial-0001"), "params": {"train.lr": 1e-3},
                "val_balanced_accuracy": 0.86, "threshold": 0.42, "test": _recorded_test(0.78125, [0.65, 0.9], 0.84, 32),
                "settings": {"lr": 1e-4, "epochs": 3, "augment": "strong"}}
    study.set_user_attr("finetune", finetune)
    assert main(["status", "--storage", url, "--study", "s"]) == 0
    out = capsys.readouterr().out
    assert ("finetune of trial 1: test balanced accuracy 0.7812 (95% CI 0.650-0.900), AUC 0.840, "
            "sensitivity 0.812, specificity 0.750, n=32") in out
    assert "ensemble" not in out  # top-k 1: no ensemble line

    run_dir = tmp_path / "s/finetune-top2"
    study.set_user_attr("finetune", {**finetune, "ensemble": {
        "trials": [1, 0], "run_dir": str(run_dir),
        "members": [str(tmp_path / "s/finetune-trial-0001"), str(tmp_path / "s/finetune-trial-0000")],
        "threshold": 0.47, "val": {"balanced_accuracy": 0.88, "auc": 0.9, "sensitivity": 0.9, "specificity": 0.86, "n": 20},
        "test": _recorded_test(0.84375, [0.72, 0.95], 0.905, 32), "artifacts": {"roc": "a1", "confusion_matrix": "a2"}}})
    assert main(["status", "--storage", url, "--study", "s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("finetune of trial 1:"))
    assert lines[at + 2] == ("ensemble of trials 1, 0: test balanced accuracy 0.8438 (95% CI 0.720-0.950), "
                             "AUC 0.905, sensitivity 0.812, specificity 0.750, n=32")
    assert lines[at + 3].split() == ["run", "directory", str(run_dir)]


@pytest.mark.slow
def test_interrupted_grid_point_runs_again(prepared: Path, tmp_path: Path) -> None:
    """Ctrl-C mid-trial: one line, no traceback; the next search resumes the point and finishes it."""
    path = study_file(tmp_path, prepared, epochs=20, lrs="[3e-3]")
    cfg = load_config(path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = _drtune("search", "--grid", "--config", str(path))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    state = Path(cfg.search.workdir) / "tiny" / "trial-0000" / "checkpoints" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["epochs_done"] >= 2:
                break
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "drtune: error: interrupted" in err
    study = optuna.load_study(study_name="tiny", storage=storage_url(cfg))
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage_url(cfg))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 1 and finished[0].user_attrs["run_dir"] == str(state.parents[1])
    assert "resuming after epoch" in done.stderr and "grid: 1 of 1 points finished" in done.stderr


@pytest.mark.parametrize("noticed_by", ["optuna", "owner token"])
@pytest.mark.slow
def test_stalled_worker_leaves_its_taken_over_trial(prepared: Path, tmp_path: Path, monkeypatch, caplog,
                                                    noticed_by: str) -> None:
    """A worker that comes back after its trial was failed as stale and handed to another worker
    stops that trial quietly: no traceback, no artifacts, and it goes on with the study. It
    notices either when Optuna refuses to update the failed trial, or first, through the run
    directory's owner token (train.RunOwnershipLost)."""
    import drtune.train

    if noticed_by == "owner token" and not hasattr(drtune.train, "RunOwnershipLost"):
        pytest.skip("drtune.train has no owner token yet")

    path = study_file(tmp_path, prepared, lrs="[3e-3]")
    cfg = load_config(path)
    url = storage_url(cfg)

    def stalled_train(cfg, data_dir, workdir, callbacks=(), init_model=None):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / "history.csv").write_text("the other worker's\n")
        # Meanwhile another worker failed this trial as stale (and resumes its run directory).
        other = optuna.load_study(study_name="tiny", storage=url)
        running = other.get_trials(states=(TrialState.RUNNING,))[0]
        other._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
        if noticed_by == "owner token":
            raise drtune.train.RunOwnershipLost(f"{workdir}: another process owns this run now")
        for cb in callbacks:  # the paused worker finishes its epoch
            cb.on_epoch_begin(0)
            cb.on_epoch_end(0, {"val_balanced_accuracy": 0.5})
        raise AssertionError("the callbacks should have stopped this trial")

    monkeypatch.setattr(drtune.train, "train_and_evaluate", stalled_train)
    study = search(cfg, grid=True)
    [trial] = study.trials
    assert trial.state == TrialState.FAIL
    assert get_all_artifact_meta(trial, storage=open_storage(cfg)) == []
    assert (Path(trial.user_attrs["run_dir"]) / "history.csv").read_text() == "the other worker's\n"
    text = caplog.text
    assert "another worker took over its run directory" in text
    assert "Traceback" not in text and "Trial 0 failed" not in text


@pytest.mark.slow
def test_demo_keeps_everything_in_its_workdir(prepared: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An exported $DRTUNE_STORAGE (a production database) is not the demo's: the demo uses its
    workdir's SQLite file, and prints no password."""
    import shutil

    from drtune.demo import run_demo

    work = tmp_path / "demo"
    (work / "synth").mkdir(parents=True)  # finished steps are reused: skip synth and prepare
    shutil.copytree(prepared, work / "data")
    monkeypatch.setenv("DRTUNE_STORAGE", "postgresql+psycopg2://drtune:hunter2@127.0.0.1:1/production")
    summary = run_demo(work, study_file(tmp_path, prepared, epochs=2, lrs="[3e-3]"))
    assert summary["test"]["n"] > 0
    assert (work / "runs" / "optuna.db").is_file()
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and f"--storage sqlite:///{work / 'runs'}" in out.out
    # The dashboard hint finds the demo's artifacts (the study file's own workdir is elsewhere).
    hint = next(line for line in out.out.splitlines() if "drtune dashboard" in line)
    assert f"--set search.workdir={work / 'runs'}" in hint and any((work / "runs" / "artifacts").iterdir())


def test_grid_sampler_accepts_a_requeued_point_when_one_point_is_left() -> None:
    """A re-queued grid point (enqueue_trial: no grid_id) finishing while one point is still
    unvisited: Optuna's own GridSampler dies with KeyError 'grid_id'; ours carries on."""
    import logging as std_logging

    import optuna

    from drtune.study import GridSampler

    optuna.logging.set_verbosity(std_logging.ERROR)
    space = {"x": [1.0, 2.0]}
    for cls, ok in ((optuna.samplers.GridSampler, False), (GridSampler, True)):
        study = optuna.create_study(sampler=cls(space, seed=0))
        first = study.ask()
        first.suggest_float("x", 1.0, 2.0)
        study.tell(first, state=optuna.trial.TrialState.FAIL)  # interrupted: counted as visited
        study.enqueue_trial({"x": first.params["x"]})

        def objective(trial: optuna.Trial) -> float:
            return trial.suggest_float("x", 1.0, 2.0)

        if not ok:
            with pytest.raises(KeyError, match="grid_id"):
                study.optimize(objective, n_trials=3)
            continue
        study.optimize(objective, n_trials=3)
        done = [t.params["x"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(done) == [1.0, 2.0]  # the re-queued point and the last unvisited one
