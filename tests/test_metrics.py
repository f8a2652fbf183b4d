"""Tests for drtune.metrics: values against hand counts and scikit-learn, threshold choice,
bootstrap intervals and the plots (written, readable, labelled)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from drtune import metrics
from drtune.metrics import (
    METRIC_KEYS,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    confusion_matrix_image,
    plot_confusion_matrix,
    plot_history,
    plot_roc,
    report,
)

# 6 NRDR, 4 RDR. At threshold 0.5 (RDR when p >= 0.5): NRDR 0.5 and 0.7 are false positives
# (TN 4, FP 2); RDR 0.3 is missed (TP 3, FN 1).
Y = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
P = [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9, 0.8, 0.5, 0.3]
# AUC by hand over the 24 (RDR, NRDR) pairs, ties counting one half: 6 + 6 + 4.5 + 2.5 = 19.
AUC = 19 / 24


def _scores(n: int, seed: int, shift: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping scores, RDR shifted up by ``shift``; about a third RDR."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    return y, np.clip(rng.random(n) * 0.7 + shift * y, 0.0, 1.0)


# --- binary_metrics -------------------------------------------------------------------------


def test_binary_metrics_hand_computed() -> None:
    m = binary_metrics(Y, P, 0.5)
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]  # rows true [NRDR, RDR], cols predicted
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["auc"] == pytest.approx(AUC)
    assert m["threshold"] == 0.5
    assert m["n"] == 10


def test_threshold_is_inclusive() -> None:
    # Two cases sit exactly at 0.5: both are RDR at 0.5 and both NRDR just above it.
    assert binary_metrics(Y, P, 0.5)["confusion_matrix"] == [[4, 2], [1, 3]]
    assert binary_metrics(Y, P, 0.5000001)["confusion_matrix"] == [[5, 1], [2, 2]]


def test_binary_metrics_plain_json_types() -> None:
    m = binary_metrics(np.array(Y, dtype=np.int64), np.array(P, dtype=np.float32), np.float64(0.5))
    assert set(METRIC_KEYS) | {"threshold", "confusion_matrix", "n"} == set(m)
    json.dumps(m)
    for k in (*METRIC_KEYS, "threshold"):
        assert type(m[k]) is float, k
    assert type(m["n"]) is int
    assert all(type(c) is int for row in m["confusion_matrix"] for c in row)


def test_keras_column_predictions_accepted() -> None:
    assert binary_metrics(Y, np.array(P)[:, None]) == binary_metrics(Y, P)


@pytest.mark.parametrize(
    ("y", "present", "absent"),
    [([0, 0, 0, 0], "specificity", "sensitivity"), ([1, 1, 1, 1], "sensitivity", "specificity")],
)
def test_single_class(y: list[int], present: str, absent: str) -> None:
    m = binary_metrics(y, [0.2, 0.4, 0.6, 0.8])
    assert m["auc"] is None and m[absent] is None
    assert m[present] == pytest.approx(0.5) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert json.loads(json.dumps(m))["auc"] is None


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 1, 1], [0.1, 0.9], "2 labels|3 labels"),
        ([0, 1, 2], [0.1, 0.5, 0.9], "0 \\(NRDR\\) or 1"),
        ([0, 1], [0.1, float("nan")], "non-finite"),
        ([], [], "need as many"),
    ],
)
def test_bad_input_rejected(y: list[int], p: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, p)


# --- choose_threshold -----------------------------------------------------------------------


def test_choose_threshold_separable_takes_the_middle_of_the_gap() -> None:
    y, p = [0, 0, 0, 1, 1, 1], [0.05, 0.2, 0.3, 0.6, 0.7, 0.95]
    t = choose_threshold(y, p)
    assert binary_metrics(y, p, t)["balanced_accuracy"] == 1.0
    assert t == pytest.approx(0.45)


def test_choose_threshold_separates_adjacent_floats() -> None:
    # The middle of (0.5, nextafter(0.5)] rounds to 0.5, which would call both cases RDR.
    y, p = [0, 1], [0.5, float(np.nextafter(0.5, 1.0))]
    assert binary_metrics(y, p, choose_threshold(y, p))["balanced_accuracy"] == 1.0


def test_choose_threshold_beats_half_when_scores_are_low() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 20)
    p = np.where(y == 1, rng.uniform(0.2, 0.3, 40), rng.uniform(0.1, 0.2, 40))
    assert binary_metrics(y, p, 0.5)["balanced_accuracy"] == 0.5  # everything called NRDR
    t = choose_threshold(y, p)
    assert 0.1 <= t <= 0.3
    assert binary_metrics(y, p, t)["balanced_accuracy"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_choose_threshold_reaches_best_balanced_accuracy(seed: int) -> None:
    y, p = _scores(60, seed)
    p = np.round(p, 1)  # ties
    t = choose_threshold(y, p)
    assert 0.0 <= t <= 1.0
    best = max(binary_metrics(y, p, c)["balanced_accuracy"] for c in [*np.unique(p), 1.01])
    assert binary_metrics(y, p, t)["balanced_accuracy"] == pytest.approx(best)
    assert choose_threshold(y, p, "youden") == t


@pytest.mark.parametrize(
    ("p", "expected"),
    [([0.3, 0.4], 0.7), ([0.6, 0.7], 0.3)],  # middles of (0.4, 1] / (0, 0.6]: nearer 0.5 wins
)
def test_choose_threshold_ties_prefer_closest_to_half(p: list[float], expected: float) -> None:
    # Inverted scores: calling everyone NRDR or everyone RDR ties at J = 0 (the split between
    # the two cases is worse), so the tie-break decides.
    assert choose_threshold([1, 0], p) == pytest.approx(expected)


def test_choose_threshold_fixed_single_class_and_unknown() -> None:
    assert choose_threshold(Y, P, "fixed") == 0.5
    assert choose_threshold([1, 1, 1], [0.1, 0.2, 0.3]) == 0.5
    with pytest.raises(ValueError, match="balanced_accuracy, youden, fixed"):
        choose_threshold(Y, P, "f1")


# --- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_contains_point_estimate_and_is_deterministic() -> None:
    y, p = _scores(120, 0)
    point = binary_metrics(y, p, 0.5)
    ci = bootstrap_ci(y, p, 0.5, n_boot=500, seed=1)
    assert set(ci) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        lo, hi = ci[k]
        assert lo <= point[k] <= hi, k
        assert lo < hi, k
    assert bootstrap_ci(y, p, 0.5, n_boot=500, seed=1) == ci
    assert bootstrap_ci(y, p, 0.5, n_boot=500, seed=2) != ci


def test_bootstrap_ci_is_the_percentile_interval() -> None:
    y, p = _scores(80, 2)
    values, _ = metrics._bootstrap_samples(y, p, 0.5, n_boot=300, seed=5)
    for alpha in (0.05, 0.5):
        ci = bootstrap_ci(y, p, 0.5, n_boot=300, alpha=alpha, seed=5)
        for k in METRIC_KEYS:
            expected = np.percentile(values[k], [50 * alpha, 100 - 50 * alpha])
            assert ci[k] == pytest.approx(expected.tolist()), (k, alpha)


def test_bootstrap_narrows_with_more_data() -> None:
    width = {
        n: {k: hi - lo for k, (lo, hi) in bootstrap_ci(*_scores(n, 0), 0.5, n_boot=400).items()}
        for n in (40, 640)
    }
    for k in METRIC_KEYS:
        assert width[640][k] < width[40][k] / 2, k


def test_bootstrap_resamples_agree_with_sklearn_and_keep_class_counts() -> None:
    y, p = _scores(50, 4)
    p = np.round(p, 1)
    values, idx = metrics._bootstrap_samples(y, p, 0.4, n_boot=30, seed=0)
    assert (y[idx].sum(axis=1) == y.sum()).all()  # stratified: same number of RDR every time
    for b in range(30):
        ref = binary_metrics(y[idx[b]], p[idx[b]], 0.4)
        for k in METRIC_KEYS:
            assert values[k][b] == pytest.approx(ref[k]), (k, b)
    assert values["auc"][0] == pytest.approx(roc_auc_score(y[idx[0]], p[idx[0]]))


def test_bootstrap_single_class_gives_none() -> None:
    ci = bootstrap_ci([0, 0, 0, 0], [0.1, 0.6, 0.2, 0.3], 0.5, n_boot=50)
    assert ci["auc"] is None and ci["sensitivity"] is None
    assert ci["specificity"] is not None and ci["specificity"][0] <= ci["specificity"][1]


def test_bootstrap_of_1000_resamples() -> None:
    # Well under a second on 2 CPU cores (not asserted: a busy machine would fail a wall-clock bound).
    y, p = _scores(100, 0)
    ci = bootstrap_ci(y, p, 0.5, n_boot=1000)
    assert ci["auc"] is not None and ci["auc"][0] <= ci["auc"][1]


def test_report_is_metrics_plus_ci() -> None:
    r = report(Y, P, 0.5, n_boot=100)
    ci, methods = r.pop("ci95"), r.pop("ci_method")
    assert r == binary_metrics(Y, P, 0.5)
    assert set(ci) == set(methods) == set(METRIC_KEYS)  # readers of ci95 find the same keys
    boot = bootstrap_ci(Y, P, 0.5, n_boot=100)
    for k in ("auc", "balanced_accuracy"):
        assert ci[k] == boot[k] and methods[k] == "stratified bootstrap"
    # Proportions: Wilson on the counts of the confusion matrix (TN 4 FP 2 / FN 1 TP 3).
    assert ci["sensitivity"] == pytest.approx(metrics.proportion_ci(3, 4))
    assert ci["specificity"] == pytest.approx(metrics.proportion_ci(4, 6))
    assert ci["accuracy"] == pytest.approx(metrics.proportion_ci(7, 10))
    json.dumps(ci)


def test_all_found_does_not_collapse_the_interval() -> None:
    """16 of 16 RDR found: the bootstrap says 1.0-1.0; the report must not."""
    y, p = [1] * 16 + [0] * 16, [0.9] * 16 + [0.2] * 15 + [0.7]
    r = report(y, p, 0.5, n_boot=200)
    assert r["sensitivity"] == 1.0
    assert bootstrap_ci(y, p, 0.5, n_boot=200)["sensitivity"] == [1.0, 1.0]
    lo, hi = r["ci95"]["sensitivity"]
    assert hi == 1.0 and lo == pytest.approx(0.806, abs=1e-3)  # Wilson 16/16, as published tables
    lo, hi = r["ci95"]["specificity"]
    assert lo < 15 / 16 < hi < 1.0


@pytest.mark.parametrize(("k", "n", "expected"), [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)),
                                                  (8, 8, (0.6756, 1.0))])
def test_proportion_ci_wilson_reference_values(k: int, n: int, expected: tuple[float, float]) -> None:
    assert metrics.proportion_ci(k, n) == pytest.approx(list(expected), abs=1e-4)
    assert metrics.proportion_ci(0, 0) is None


# --- operating points, per grade, calibration -------------------------------------------------


def test_threshold_for_sensitivity_reaches_target_with_most_specificity() -> None:
    y, p = _scores(200, 3)
    for target in (0.5, 0.85, 0.95, 1.0):
        t = metrics.threshold_for_sensitivity(y, p, target)
        m = binary_metrics(y, p, t)
        assert m["sensitivity"] >= target, target
        # Any higher threshold that gives a different call loses the target.
        higher = sorted(s for s in p[y == 1] if s > t)
        if higher:
            assert binary_metrics(y, p, higher[0] + 1e-9)["sensitivity"] < target, target
    # P: RDR scores 0.9, 0.8, 0.5, 0.3; 0.75 needs three of them: between 0.5 and the next score
    # below (0.4, an NRDR case), i.e. 0.45.
    assert metrics.threshold_for_sensitivity(Y, P, 0.75) == pytest.approx(0.45)
    assert metrics.threshold_for_sensitivity([0, 0], [0.1, 0.2]) is None
    with pytest.raises(ValueError, match="target"):
        metrics.threshold_for_sensitivity(Y, P, 0.0)


def test_operating_point_counts_and_intervals() -> None:
    op = metrics.operating_point("frozen", Y, P, 0.5)
    assert (op["tp"], op["fn"], op["tn"], op["fp"]) == (3, 1, 4, 2)
    assert op["sensitivity"] == pytest.approx(0.75) and op["specificity"] == pytest.approx(4 / 6)
    assert op["sensitivity_ci95"] == pytest.approx(metrics.proportion_ci(3, 4))
    json.dumps(op)


def test_per_grade_adds_up_to_the_confusion_matrix() -> None:
    grades = [0, 0, 1, 0, 1, 1, 2, 4, 3, 2]  # Y: grades >= 2 are the RDR cases
    rows = metrics.per_grade(grades, P, 0.5)
    assert [r["grade"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r["n"] for r in rows) == len(Y)
    (tn, fp), (fn, tp) = binary_metrics(Y, P, 0.5)["confusion_matrix"]
    assert sum(r["called_rdr"] for r in rows if r["referable"]) == tp
    assert sum(r["called_rdr"] for r in rows if not r["referable"]) == fp
    assert {r["grade"]: r["called_rdr"] for r in rows} == {0: 0, 1: 2, 2: 1, 3: 1, 4: 1}
    assert metrics.per_grade([-1, 2], [0.9, 0.9], 0.5)[0]["grade"] == 2  # ungraded left out


def test_calibration_hand_computed_and_sklearn() -> None:
    # Bins of width 0.1: [0.1, 0.1, 0.9, 0.9] -> rates 0.5 (mean p 0.1) and 1.0 (mean p 0.9).
    y, p = [0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9]
    cal = metrics.calibration(y, p)
    assert cal["ece"] == pytest.approx((2 * 0.4 + 2 * 0.1) / 4)
    assert cal["brier"] == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    assert cal["brier_reference"] == pytest.approx(0.75 * 0.25)
    assert [b["n"] for b in cal["bins"]] == [2, 2]
    # Calibrated by construction: outcomes drawn with probability p, many cases -> ECE small.
    rng = np.random.default_rng(0)
    q = rng.random(20000)
    assert metrics.calibration((rng.random(20000) < q).astype(int), q)["ece"] < 0.02
    # Outcomes certain on each side of 0.5 while P(RDR) hedges: badly calibrated, ECE ~ 0.25.
    assert metrics.calibration((q > 0.5).astype(int), q)["ece"] > 0.2


def test_plot_reliability(tmp_path: Path) -> None:
    y, p = _scores(120, 1)
    metrics.plot_reliability(y, p, tmp_path / "rel.png")
    _check_png(tmp_path / "rel.png")


# --- plots ----------------------------------------------------------------------------------


def _check_png(path: Path, min_side: int = 300) -> np.ndarray:
    assert path.stat().st_size > 5_000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert min(img.shape[:2]) >= min_side
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


def test_plot_confusion_matrix(tmp_path: Path) -> None:
    cm = binary_metrics(Y, P)["confusion_matrix"]
    fig = plot_confusion_matrix(cm, tmp_path / "sub" / "cm.png", title="test split")
    _check_png(tmp_path / "sub" / "cm.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NRDR", "RDR"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["NRDR", "RDR"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    cells = [t.get_text() for t in ax.texts]
    assert cells == ["0.67\n(4)", "0.33\n(2)", "0.25\n(1)", "0.75\n(3)"]
    assert len(fig.axes) == 2  # the colour bar


def test_plot_confusion_matrix_empty_row_and_bad_shape() -> None:
    fig = plot_confusion_matrix([[3, 1], [0, 0]])
    assert [t.get_text() for t in fig.axes[0].texts][2:] == ["-", "-"]
    with pytest.raises(ValueError, match="2x2"):
        plot_confusion_matrix([[1, 2, 3]])


def test_confusion_matrix_image() -> None:
    img = confusion_matrix_image([[4, 2], [1, 3]], title="epoch 1")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 300 and img.std() > 10


def test_plot_roc(tmp_path: Path) -> None:
    y, p = _scores(80, 0)
    fig = plot_roc(y, p, tmp_path / "roc.png", threshold=0.5)
    _check_png(tmp_path / "roc.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"ROC (AUC = {roc_auc_score(y, p):.3f})" in labels and "threshold 0.50" in labels
    m = binary_metrics(y, p, 0.5)
    (point,) = [ln for ln in ax.get_lines() if ln.get_label() == "threshold 0.50"]
    assert point.get_xdata()[0] == pytest.approx(1 - m["specificity"])
    assert point.get_ydata()[0] == pytest.approx(m["sensitivity"])
    assert any(f"sens {m['sensitivity']:.2f}" in t.get_text() for t in ax.texts)


def test_plot_roc_single_class_does_not_fail(tmp_path: Path) -> None:
    fig = plot_roc([0, 0, 0], [0.1, 0.5, 0.9], tmp_path / "roc.png", threshold=0.5)
    assert (tmp_path / "roc.png").is_file()
    assert any("only one class" in t.get_text() for t in fig.axes[0].texts)


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_plot_history(tmp_path: Path) -> None:
    csv = _write_csv(
        tmp_path / "history.csv",
        "epoch,accuracy,loss,val_auc,val_balanced_accuracy,val_loss",
        [f"{e},{0.5 + e / 20},{1 - e / 10},{0.6 + e / 30},{0.55 + e / 25},{1.1 - e / 12}" for e in range(6)],
    )
    fig = plot_history(csv, tmp_path / "history.png")
    _check_png(tmp_path / "history.png", min_side=200)
    loss_ax, score_ax = fig.axes
    assert [ln.get_label() for ln in loss_ax.get_lines()] == ["loss", "val_loss"]
    assert [ln.get_label() for ln in score_ax.get_lines()] == ["val_balanced_accuracy", "val_auc"]
    assert list(loss_ax.get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]


def test_plot_history_missing_columns_and_blank_values(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "h.csv", "epoch,loss", ["0,1.0", "1,", "2,0.5"])
    fig = plot_history(csv)
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["loss"]
    assert fig.axes[1].get_lines() == [] and fig.axes[1].texts[0].get_text() == "not logged"


@pytest.mark.parametrize("content", [None, "", "epoch,loss\n", "epoch,foo\n0,1\n"])
def test_plot_history_unusable_file_names_it(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "history.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="history.csv"):
        plot_history(path)
