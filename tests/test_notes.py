"""Study notes, objective names and test attributes, read back through a real optuna-dashboard.

The study is demo-like (the demo's grid of learning rate x batch size, sampled by the search's
own ``sample`` on a real SQLite study) without training: each trial's value is a number, so the
test takes seconds. The fine-tune result is real metrics of known predictions, with real plots
uploaded to a real artifact store.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest

from drtune import metrics, notes
from drtune.config import load_config
from drtune.study import artifact_dir, create_study

DEMO_LIKE = """\
# drtune search --grid --config {path}   (test study, no training)
name = "demo"

[data]
dir = "{data}"

[train]
epochs = 4

[search]
workdir = "{workdir}"
pruner = "median"

[search.grid]
"train.lr" = [1e-2, 1e-3, 1e-4, 1e-5]
"train.batch_size" = [2, 4]
"""

META = {"splits": {"train": {"n": 26, "nrdr": 13, "rdr": 13}, "val": {"n": 6, "nrdr": 3, "rdr": 3},
                   "test": {"n": 32, "nrdr": 16, "rdr": 16}},
        "size": 256, "rdr_grade": 2, "source": "IDRiD layout at /somewhere/idrid"}


def _demo_like(tmp_path: Path) -> tuple[Path, optuna.Study]:
    from drtune.objective import sample

    path = tmp_path / "demo.toml"
    path.write_text(DEMO_LIKE.format(path=path, data=tmp_path / "data", workdir=tmp_path / "runs"))
    cfg = load_config(path)
    study = create_study(cfg, grid=True)
    notes.name_objective(study, "val_balanced_accuracy")
    notes.write_search_note(study, cfg, META, tmp_path / "data", grid=True)

    def objective(trial: optuna.Trial) -> float:
        run = sample(trial, cfg, grid=True)
        return 0.75 - abs(np.log10(run.train.lr) + 3) / 8 + run.train.batch_size / 100

    study.optimize(objective)
    notes.write_search_note(study, cfg, META, tmp_path / "data", grid=True)
    return path, study


def _finetune(study: optuna.Study, cfg_path: Path, tmp_path: Path) -> dict:
    """Record a fine-tune result as finetune_best does, from known test/val predictions."""
    from optuna.artifacts import FileSystemArtifactStore

    rng = np.random.default_rng(0)
    y_val, y = np.repeat([0, 1], 8), np.repeat([0, 1], 16)
    p_val = np.clip(0.3 + 0.4 * y_val + rng.normal(0, 0.15, 16), 0, 1)
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.15, 32), 0, 1)
    threshold = metrics.choose_threshold(y_val, p_val)
    test = metrics.report(y, p, threshold, n_boot=200)
    test["threshold"] = threshold
    points = [metrics.operating_point("validation-frozen threshold", y, p, threshold)]
    t85 = metrics.threshold_for_sensitivity(y_val, p_val, 0.85)
    points.append(metrics.operating_point("sensitivity >= 85% on validation", y, p, t85))
    best = study.best_trial
    summary = {"trial": best.number, "params": best.params, "threshold": threshold,
               "val_balanced_accuracy": 0.875, "test": test, "run_dir": str(tmp_path / "ft"),
               "settings": {"lr": 1e-5, "epochs": 6, "augment": "strong"}}
    plots = tmp_path / "plots"
    plots.mkdir()
    metrics.plot_confusion_matrix(test["confusion_matrix"], plots / "confusion_matrix.png", "test")
    metrics.plot_roc(y, p, plots / "roc.png", threshold=threshold, title="test")
    metrics.plot_reliability(y, p, plots / "reliability.png")
    (plots / "report.html").write_text("<!doctype html><title>model card</title>")
    artifacts = artifact_dir(load_config(cfg_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifacts))
    ids = {k: notes.upload_as(store, study, plots / f"{k}.png", f"finetuned_{k}.png")
           for k in ("confusion_matrix", "roc", "reliability", "history")}
    assert ids["history"] is None  # a missing file is left out, not an error
    report = notes.upload_as(store, study, plots / "report.html", "finetuned_report.html")
    notes.record_test_metrics(study, test)
    notes.write_finetune_note(study, summary, ids, points, metrics.calibration(y, p), report)
    return {"summary": summary, "ids": ids, "report": report}


def test_note_sections_keep_the_users_text(tmp_path: Path) -> None:
    from optuna_dashboard import get_note, save_note

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    notes.set_section(study, "search", "the study")
    save_note(study, get_note(study) + "\nmy own remark\n")
    notes.set_section(study, "finetune", "the result")
    notes.set_section(study, "search", "the study, updated")
    body = get_note(study)
    # Result first, then the study, then the user's text; markers render as nothing.
    assert body.index("the result") < body.index("the study, updated") < body.index("my own remark")
    assert "the study\n" not in body and body.count("drtune:search:end") == 1
    # Every marker stands between blank lines: one inside a paragraph would show as text.
    for line in (n for n, text in enumerate(body.splitlines()) if text.startswith("[//]: #")):
        assert body.splitlines()[line - 1:line] in ([], [""]) and body.splitlines()[line + 1:line + 2] in ([], [""])
    with pytest.raises(ValueError, match="note section 'other'"):
        notes.set_section(study, "other", "x")


def test_objective_name_is_set_once(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", direction="maximize")
    notes.name_objective(study, "val_balanced_accuracy")
    assert study.metric_names == ["val balanced accuracy"]
    study.set_metric_names(["mine"])
    notes.name_objective(study, "val_auc")
    assert optuna.load_study(study_name=study.study_name, storage=study._storage).metric_names == ["mine"]
    assert notes.objective_name("val_auc") == "val AUC"


def test_grid_values_are_numeric_and_keep_grid_semantics(tmp_path: Path) -> None:
    _, study = _demo_like(tmp_path)
    trials = study.get_trials()
    # Every point of the 4 x 2 grid ran exactly once, with the grid's own values.
    points = sorted((t.params["train.lr"], t.params["train.batch_size"]) for t in trials)
    assert points == sorted((lr, b) for lr in (1e-2, 1e-3, 1e-4, 1e-5) for b in (2, 4))
    lr, batch = trials[0].distributions["train.lr"], trials[0].distributions["train.batch_size"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    assert (lr.low, lr.high) == (1e-5, 1e-2)
    assert isinstance(batch, optuna.distributions.IntDistribution) and not batch.log
    assert all(type(t.params["train.batch_size"]) is int for t in trials)


def test_a_categorical_study_stays_categorical(tmp_path: Path) -> None:
    """A study that recorded grid values as categories (before they became numbers) resumes."""
    from drtune.objective import sample

    path = tmp_path / "demo.toml"
    path.write_text(DEMO_LIKE.format(path=path, data=tmp_path / "data", workdir=tmp_path / "runs"))
    cfg = load_config(path)
    study = create_study(cfg, grid=True)
    old = study.ask()
    old.suggest_categorical("train.lr", [1e-2, 1e-3, 1e-4, 1e-5])
    old.suggest_categorical("train.batch_size", [2, 4])
    study.tell(old, 0.5)
    study.optimize(lambda t: float(sample(t, cfg, grid=True).train.lr))
    assert len(study.trials) == 8
    assert all(isinstance(d, optuna.distributions.CategoricalDistribution)
               for t in study.trials for d in t.distributions.values())


def test_the_note_names_the_grade_head_and_its_referral_grade() -> None:
    from drtune.config import load_config

    assert notes._head(load_config(None, ["model.head=grade"]), {"rdr_grade": 3}) == (
        "5-grade head (P(RDR) = the sum over grades ≥ 3)")
    assert notes._head(load_config(None), {"rdr_grade": 3}) == "2-class head"
    assert notes._head(load_config(None, ["model.head=ordinal"]), {}) == (
        "ordinal grade head (one severity score; P(RDR) = P(grade ≥ 2))")


def test_search_and_finetune_notes(tmp_path: Path) -> None:
    from optuna_dashboard import get_note

    path, study = _demo_like(tmp_path)
    body = get_note(study)
    for text in ("## Study `demo`: what it is", "val balanced accuracy", "| test | 32 | 16 | 16 |",
                 "| total | 64 | 32 | 32 |", "`train.lr` | 0.01, 0.001, 0.0001, 1e-05", "median",
                 "Trials so far:** 8 trial(s): 8 complete", "**Best on validation:** trial",
                 "with 1 block(s) per stage and a 2-class head, input"):
        assert text in body, text
    got = _finetune(study, path, tmp_path)
    body = get_note(study)
    assert body.index("## Result") < body.index("## Study")
    test = got["summary"]["test"]
    ci = test["ci95"]["balanced_accuracy"]
    assert f"**Test balanced accuracy {test['balanced_accuracy']:.3f} (95% CI {ci[0]:.3f}–{ci[1]:.3f})" in body
    assert "n = 32 photographs (16 RDR, 16 NRDR)" in body
    assert f"decision threshold {test['threshold']:.3f}" in body
    (tn, fp), (fn, tp) = test["confusion_matrix"]
    assert f"| RDR | {fn} | {tp} |" in body and f"({tp}/{tp + fn})" in body
    assert "sensitivity >= 85% on validation" in body and "Calibration on test" in body
    sid = study._study_id
    for key in ("confusion_matrix", "roc", "reliability"):
        assert f"](/artifacts/{sid}/{got['ids'][key]})" in body
    assert "Fine-tuning history" not in body
    assert f"[finetuned_report.html](/artifacts/{sid}/{got['report']})" in body
    attrs = study.user_attrs
    assert attrs["test_n"] == 32 and attrs["test_auc"] == pytest.approx(test["auc"], abs=1e-4)
    assert attrs["test_sensitivity_ci95"] == [round(v, 3) for v in test["ci95"]["sensitivity"]]
    # Writing the result again replaces it, and the study section stays.
    notes.write_finetune_note(study, got["summary"])
    body = get_note(study)
    assert body.count("## Result") == 1 and "## Study `demo`" in body and "/artifacts/" not in body


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def test_dashboard_serves_note_names_and_plots(tmp_path: Path) -> None:
    from optuna_dashboard import get_note

    path, study = _demo_like(tmp_path)
    got = _finetune(study, path, tmp_path)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "drtune", "dashboard", "--config", str(path),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, summaries = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                summaries = json.loads(_get(f"http://127.0.0.1:{port}/api/studies")[2])
                break
            except OSError:
                time.sleep(0.3)
        assert summaries is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        sid = next(s["study_id"] for s in summaries["study_summaries"] if s["study_name"] == "demo")
        detail = json.loads(_get(f"http://127.0.0.1:{port}/api/studies/{sid}?after=0")[2])
        assert detail["objective_names"] == ["val balanced accuracy"]
        body = detail["note"]["body"]
        assert body == get_note(study)
        assert "## Result: the fine-tuned model of trial" in body and "## Study `demo`" in body
        attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
        assert attrs["test_n"] == "32" and float(attrs["test_auc"]) == pytest.approx(
            got["summary"]["test"]["auc"], abs=1e-4)
        names = sorted(a["filename"] for a in detail["artifacts"])
        assert names == ["finetuned_confusion_matrix.png", "finetuned_reliability.png",
                         "finetuned_report.html", "finetuned_roc.png"]
        # The plots the note embeds are served, as images, at the URLs it names.
        embedded = re.findall(r"!\[[^\]]*\]\((/artifacts/[^)]+)\)", body)
        assert len(embedded) == 3
        for url in embedded:
            status, kind, data = _get(f"http://127.0.0.1:{port}{url}")
            assert status == 200 and kind == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n"
        # Numeric grid values reach the dashboard as numeric distributions (log for lr).
        space = {s["name"]: s["distribution"] for s in detail["union_search_space"]}
        assert space["train.lr"]["type"] == "FloatDistribution" and space["train.lr"]["log"]
        assert space["train.batch_size"]["type"] == "IntDistribution"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
