"""`drtune report`: the model card of a tiny real run, checked against its evaluation files."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from sklearn.metrics import brier_score_loss

from drtune.cli import main


@pytest.fixture(scope="module")
def fresh_run(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared tiny run without any evaluation, so the report has to make them."""
    out = tmp_path_factory.mktemp("report-run") / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("eval-*", "gradcam*"))
    return out


@pytest.fixture(scope="module")
def card(fresh_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report") / "card"
    assert main(["report", str(fresh_run), "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def _predictions(run: Path) -> list[dict[str, str]]:
    with (run / "eval-test" / "predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_report_numbers_are_the_evaluation(card: tuple[Path, dict], fresh_run: Path) -> None:
    _, c = card
    m = json.loads((fresh_run / "eval-test" / "metrics.json").read_text())  # written by the report
    assert (fresh_run / "eval-val" / "metrics.json").is_file()
    assert c["test"] == m
    for key in ("test", "operating_points", "calibration", "per_grade", "data", "training", "versions",
                "intended_use", "selection_rule", "caveats"):
        assert key in c, key
    frozen = c["operating_points"][0]
    assert frozen["threshold"] == m["threshold"] == json.loads((fresh_run / "metrics.json").read_text())["threshold"]
    assert (frozen["sensitivity"], frozen["specificity"]) == (m["sensitivity"], m["specificity"])
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    assert (frozen["tp"], frozen["fn"], frozen["tn"], frozen["fp"]) == (tp, fn, tn, fp)
    for op in c["operating_points"]:
        assert {"name", "threshold", "sensitivity", "specificity"} <= set(op)
    rows = _predictions(fresh_run)
    y, p = [int(r["label"]) for r in rows], [float(r["p_rdr"]) for r in rows]
    assert c["calibration"]["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-6)
    assert 0.0 <= c["calibration"]["ece"] <= 1.0
    assert sum(b["n"] for b in c["calibration"]["bins"]) == m["n"]


@pytest.mark.slow
def test_sensitivity_target_point_is_chosen_on_validation(card: tuple[Path, dict], fresh_run: Path) -> None:
    ops = card[1]["operating_points"]
    with (fresh_run / "eval-val" / "predictions.csv").open(newline="") as f:
        val = list(csv.DictReader(f))
    if not any(r["label"] == "1" for r in val):
        pytest.skip("no RDR photograph in this validation split")
    target = ops[1]
    called = [float(r["p_rdr"]) >= target["threshold"] for r in val if r["label"] == "1"]
    assert np.mean(called) >= 0.85
    assert target["val_sensitivity"] == pytest.approx(np.mean(called))
    rows = _predictions(fresh_run)
    test_rdr = [float(r["p_rdr"]) >= target["threshold"] for r in rows if r["label"] == "1"]
    assert target["sensitivity"] == pytest.approx(np.mean(test_rdr))


@pytest.mark.slow
def test_proportion_intervals_do_not_collapse(card: tuple[Path, dict]) -> None:
    ci = card[1]["test"]["ci95"]
    for k in ("sensitivity", "specificity", "accuracy"):
        lo, hi = ci[k]
        assert lo < hi, k  # Wilson: even 8/8 found has a lower bound below 1
    assert card[1]["test"]["ci_method"]["sensitivity"] == "Wilson"


@pytest.mark.slow
def test_per_grade_counts_add_up(card: tuple[Path, dict], fresh_run: Path, prepared: Path) -> None:
    c = card[1]
    meta = json.loads((prepared / "meta.json").read_text())["splits"]["test"]
    rows = _predictions(fresh_run)
    # The grade column of predictions.csv is the TFRecords' grade: counts as prepare recorded them.
    assert {g: sum(r["grade"] == g for r in rows) for g in meta["grades"]} == meta["grades"]
    assert {str(g["grade"]): g["n"] for g in c["per_grade"]} == {g: n for g, n in meta["grades"].items() if n}
    (tn, fp), (fn, tp) = c["test"]["confusion_matrix"]
    assert sum(g["called_rdr"] for g in c["per_grade"] if g["referable"]) == tp
    assert sum(g["n"] for g in c["per_grade"] if g["referable"]) == tp + fn == meta["rdr"]
    assert sum(g["called_rdr"] for g in c["per_grade"] if not g["referable"]) == fp
    for g in c["per_grade"]:
        called = sum(r["decision"] == "RDR" for r in rows if r["grade"] == str(g["grade"]))
        assert g["called_rdr"] == called, g


@pytest.mark.slow
def test_html_is_self_contained_and_shows_the_numbers(card: tuple[Path, dict]) -> None:
    out, c = card
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://|<link|<script|@import|url\(", page, re.I)
    srcs = re.findall(r"""src=["']([^"']*)""", page)
    assert len(srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    t = c["test"]
    assert f"n={t['n']}" in page
    assert f"{100 * t['sensitivity']:.1f}%" in page and f"{100 * t['specificity']:.1f}%" in page
    lo, hi = t["ci95"]["sensitivity"]
    assert f"{100 * lo:.1f}% – {100 * hi:.1f}%" in page
    for text in ("not a medical device", "ICDR grade &gt;= 2", "85.0%", "82.5%", "Brier", "Caveats",
                 "Selection rule", c["versions"]["tensorflow"]):
        assert text in page, text
    assert not list(out.glob(".*tmp"))  # atomic writes left no temp files


@pytest.mark.slow
def test_gradcam_gallery_is_linked(card: tuple[Path, dict], fresh_run: Path, tmp_path: Path) -> None:
    assert "No Grad-CAM gallery" in (card[0] / "report.html").read_text()
    gallery = fresh_run / "gradcam-test"
    gallery.mkdir()
    (gallery / "index.html").write_text("<html></html>")
    try:
        assert main(["report", str(fresh_run), "--out", str(tmp_path / "r")]) == 0
        page = (tmp_path / "r" / "report.html").read_text()
        href = re.search(r"<a href='([^']+)'", page).group(1)
        assert (tmp_path / "r" / href).resolve() == (gallery / "index.html").resolve()
    finally:
        shutil.rmtree(gallery)


@pytest.mark.slow
def test_report_of_a_study_finetuned_model(fresh_run: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 1e-3}, distributions=dist, value=0.8))
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 1e-2}, distributions=dist,
                                              state=optuna.trial.TrialState.PRUNED))
    study.set_user_attr("finetune", {"trial": 0, "run_dir": str(fresh_run)})
    out = tmp_path / "card"
    assert main(["report", "--config", "demo", "--storage", url, "--study", "s", "--out", str(out)]) == 0
    c = json.loads((out / "report.json").read_text())
    s = c["study"]
    assert (s["trials"]["complete"], s["trials"]["pruned"], s["trials"]["fail"]) == (1, 1, 0)
    assert s["best_trial"]["number"] == 0 and s["finetuned_trial"] == 0
    assert "hyperparameters" in c["selection_rule"]
    page = (out / "report.html").read_text()
    assert "<h2>Search</h2>" in page and "complete 1" in page


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run directory not found" in err
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert main(["report", str(half), "--out", str(tmp_path / "o")]) == 2
    assert "not finished" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "o")]) == 2
    assert "RUN or --config" in capsys.readouterr().err
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url)
    assert main(["report", "--config", "demo", "--storage", url, "--study", "s", "--out", str(tmp_path / "o")]) == 2
    assert "finetune --best" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_selection_rule_names_the_runs_own_monitor() -> None:
    """The card says which validation value picked the weights (and the trial): AUC for a run
    trained with train.monitor = "val_auc", balanced accuracy otherwise."""
    from drtune.report import _selection_rule

    by_auc = _selection_rule("val_auc", "fixed", from_study=True)
    assert "best validation AUC" in by_auc and "study by validation AUC" in by_auc
    assert "balanced accuracy" not in by_auc
    by_bacc = _selection_rule("val_balanced_accuracy", "balanced_accuracy", from_study=False)
    assert "best validation balanced accuracy (threshold 0.5)" in by_bacc and "hyperparameters" not in by_bacc
