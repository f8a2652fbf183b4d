"""Evaluation metrics, threshold choice, bootstrap intervals and plots for RDR detection.

Labels are binary (0 NRDR, 1 RDR) and ``p_rdr`` is the model's probability of RDR; a case is
called RDR when ``p_rdr >= threshold``. Every metric comes from scikit-learn; the only maths
here is arithmetic on confusion counts. Pure numpy/scikit-learn/matplotlib (no TensorFlow), so
the search process and tests can import it cheaply. Plots use ``matplotlib.figure.Figure``
directly: no pyplot state and no GUI backend, so they are safe in worker processes and threads.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike
from scipy.stats import binomtest, mannwhitneyu  # scikit-learn's own dependency
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from drtune.runs import CLASS_NAMES

METRIC_KEYS: tuple[str, ...] = ("balanced_accuracy", "accuracy", "auc", "sensitivity", "specificity")
CRITERIA: tuple[str, ...] = ("balanced_accuracy", "youden", "fixed")
_DPI = 120


def fmt_or_na(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted, or ``n/a`` when it is undefined (AUC of a split with one class)."""
    return "n/a" if value is None else format(value, spec)


def _check(y_true: ArrayLike, p_rdr: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D int labels and float scores; Keras' (n, 1) predictions are flattened."""
    y = np.ravel(np.asarray(y_true))
    p = np.ravel(np.asarray(p_rdr, dtype=float))
    if y.size == 0 or y.size != p.size:
        raise ValueError(
            f"need as many scores as labels (>0), got {y.size} labels and {p.size} scores"
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (NRDR) or 1 (RDR), got {np.unique(y).tolist()}")
    if not np.isfinite(p).all():
        # A diverged model predicts NaN; scikit-learn would fail later with a vaguer message.
        raise ValueError(f"p_rdr has {int((~np.isfinite(p)).sum())} non-finite values")
    return y.astype(int), p


def binary_metrics(y_true: ArrayLike, p_rdr: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics at one operating point, as plain Python values (``json.dumps`` works).

    Keys: ``balanced_accuracy, accuracy, auc, sensitivity`` (recall of RDR), ``specificity``
    (recall of NRDR), ``threshold``, ``confusion_matrix`` (2x2 nested ints, rows true
    [NRDR, RDR], columns predicted) and ``n``. A case is RDR when ``p_rdr >= threshold``.
    ``auc`` is None when only one class is present; ``sensitivity``/``specificity`` are None
    when their class is absent, and ``balanced_accuracy`` is then the recall of the class
    present (scikit-learn's definition).
    """
    y, p = _check(y_true, p_rdr)
    pred = (p >= threshold).astype(int)
    present = set(np.unique(y).tolist())
    with warnings.catch_warnings():
        # Single-class data: sklearn warns that y_pred has classes not in y_true, then averages
        # the recalls of the classes present, which is the value we want.
        warnings.simplefilter("ignore", UserWarning)
        bacc = balanced_accuracy_score(y, pred)
    return {
        "balanced_accuracy": float(bacc),
        "accuracy": float(accuracy_score(y, pred)),
        "auc": float(roc_auc_score(y, p)) if len(present) == 2 else None,
        "sensitivity": float(recall_score(y, pred, pos_label=1)) if 1 in present else None,
        "specificity": float(recall_score(y, pred, pos_label=0)) if 0 in present else None,
        "threshold": float(threshold),
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "n": int(y.size),
    }


def choose_threshold(y_true: ArrayLike, p_rdr: ArrayLike, criterion: str = "balanced_accuracy") -> float:
    """The threshold in [0, 1] that maximises ``criterion`` on (validation) data.

    ``balanced_accuracy`` and ``youden`` share one optimum (balanced accuracy = (J + 1) / 2);
    ``fixed`` returns 0.5. Candidates are roc_curve's thresholds; each operating point holds
    for a whole interval of thresholds, and we return the middle of that interval (widest
    margin to the validation scores on both sides) rather than a score itself, which would sit
    on the edge. Among tied optima the one closest to 0.5 wins, for stability across runs.
    Single-class data has no ROC curve: 0.5 is returned.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown threshold criterion {criterion!r}; allowed: {', '.join(CRITERIA)}")
    y, p = _check(y_true, p_rdr)
    if criterion == "fixed" or np.unique(y).size < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # thr: inf, then distinct scores desc
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0.0, atol=1e-12))
    # The point at thr[k] holds for any t in (thr[k+1], thr[k]]; below the lowest score, down to 0.
    hi = np.clip(thr[best], 0.0, 1.0)
    lo = np.clip(np.append(thr, min(0.0, thr[-1]))[best + 1], 0.0, 1.0)
    mid = (lo + hi) / 2
    mid = np.where(mid > lo, mid, hi)  # adjacent floats: the midpoint may round down onto lo
    return float(mid[np.argmin(np.abs(mid - 0.5))])


def _bootstrap_samples(
    y_true: ArrayLike, p_rdr: ArrayLike, threshold: float, n_boot: int, seed: int
) -> tuple[dict[str, np.ndarray | None], np.ndarray]:
    """Per-resample metric values (arrays of n_boot) and the resampled case indices.

    Resampling is stratified by class: each resample draws as many RDR and NRDR cases as the
    data has. Plain resampling of a small or unbalanced test set sometimes draws no RDR case,
    leaving sensitivity and AUC undefined for that resample, and it would add prevalence
    variation that a fixed test set does not have. The threshold stays fixed, so the interval
    does not include the uncertainty of choosing it.
    """
    y, p = _check(y_true, p_rdr)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate(
        [rng.choice(c, size=(n_boot, c.size)) for c in (pos, neg) if c.size], axis=1
    )
    # Columns are [RDR cases..., NRDR cases...] in every resample, so the confusion counts of
    # all resamples are two row sums (tests check them against binary_metrics, i.e. sklearn).
    called = p[idx] >= threshold
    tp, tn = called[:, : pos.size].sum(axis=1), (~called[:, pos.size :]).sum(axis=1)
    sens = tp / pos.size if pos.size else None
    spec = tn / neg.size if neg.size else None
    recalls = [r for r in (sens, spec) if r is not None]
    auc = None
    if pos.size and neg.size:
        # AUC is the Mann-Whitney U of positives over negatives / (n_pos * n_neg), ties
        # counting one half, as in roc_auc_score; scipy computes all resamples in one call
        # (~100x faster than calling roc_auc_score per resample). Tests check the equality.
        u = mannwhitneyu(p[idx[:, : pos.size]], p[idx[:, pos.size :]], axis=1, method="asymptotic")
        auc = u.statistic / (pos.size * neg.size)
    values = {
        "balanced_accuracy": np.mean(recalls, axis=0),
        "accuracy": (tp + tn) / y.size,
        "auc": auc,
        "sensitivity": sens,
        "specificity": spec,
    }
    return values, idx


def bootstrap_ci(
    y_true: ArrayLike,
    p_rdr: ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap ``[lower, upper]`` (1 - alpha) interval for each of METRIC_KEYS.

    Cases are resampled with replacement, stratified by class (see ``_bootstrap_samples``);
    deterministic for a given seed. A metric undefined on the data (e.g. AUC with one class)
    gets None. 1000 resamples of 100 cases take a few tens of milliseconds.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    values, _ = _bootstrap_samples(y_true, p_rdr, threshold, n_boot, seed)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    return {
        k: None if v is None else [float(x) for x in np.percentile(v, q)] for k, v in values.items()
    }


def proportion_ci(k: int, n: int, alpha: float = 0.05) -> list[float] | None:
    """Wilson score ``[lower, upper]`` (1 - alpha) interval of the proportion k/n; None if n == 0.

    Unlike the bootstrap, it does not collapse at 0/n or n/n: 16 of 16 RDR found gives
    0.806-1.000, which says what 16 cases can and cannot show. Wilson rather than
    Clopper-Pearson because its coverage is close to nominal instead of conservative.
    """
    if n == 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return [float(ci.low), float(ci.high)]


# How each ``ci95`` entry of ``report`` is computed (also written to metrics.json).
CI_METHODS: dict[str, str] = {
    "balanced_accuracy": "stratified bootstrap", "auc": "stratified bootstrap",
    "accuracy": "Wilson", "sensitivity": "Wilson", "specificity": "Wilson",
}


def report(
    y_true: ArrayLike, p_rdr: ArrayLike, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``binary_metrics`` plus ``ci95`` and ``ci_method``: the content of
    ``RUN/eval-<split>/metrics.json``.

    Sensitivity, specificity and accuracy are proportions of counted cases and get Wilson
    intervals (a bootstrap of 16/16 found is always 16/16, "1.000-1.000"); AUC and balanced
    accuracy, which have no binomial count, keep the stratified bootstrap.
    """
    out = binary_metrics(y_true, p_rdr, threshold)
    ci = bootstrap_ci(y_true, p_rdr, threshold, n_boot=n_boot, seed=seed)
    (tn, fp), (fn, tp) = out["confusion_matrix"]
    ci["sensitivity"] = proportion_ci(tp, tp + fn)
    ci["specificity"] = proportion_ci(tn, tn + fp)
    ci["accuracy"] = proportion_ci(tp + tn, out["n"])
    out["ci95"] = ci
    out["ci_method"] = dict(CI_METHODS)
    return out


def threshold_for_sensitivity(y_true: ArrayLike, p_rdr: ArrayLike, target: float = 0.85) -> float | None:
    """The highest threshold whose sensitivity on (validation) data is >= ``target``.

    The highest such threshold keeps the most specificity. As in ``choose_threshold``, the
    returned value is the middle of the interval of thresholds that give that operating point,
    not a score on its edge. None when the data has no RDR case.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, p = _check(y_true, p_rdr)
    if not (y == 1).any():
        return None
    if not (y == 0).any():
        return float(min(p[y == 1].min(), 1.0))  # no NRDR: nothing to trade, call every case RDR
    _, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # thr descending, tpr ascending
    k = int(np.argmax(tpr >= target - 1e-12))
    hi = float(np.clip(thr[k], 0.0, 1.0))
    lo = float(np.clip(thr[k + 1], 0.0, 1.0)) if k + 1 < thr.size else 0.0
    mid = (lo + hi) / 2
    return mid if mid > lo else hi


def operating_point(name: str, y_true: ArrayLike, p_rdr: ArrayLike, threshold: float) -> dict[str, Any]:
    """``{name, threshold, sensitivity, specificity}`` of ``threshold`` on the data, with Wilson
    95% intervals (``sensitivity_ci95``, ``specificity_ci95``) and the counts behind them."""
    m = binary_metrics(y_true, p_rdr, threshold)
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    return {
        "name": name, "threshold": float(threshold),
        "sensitivity": m["sensitivity"], "specificity": m["specificity"],
        "sensitivity_ci95": proportion_ci(tp, tp + fn), "specificity_ci95": proportion_ci(tn, tn + fp),
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


def per_grade(grades: ArrayLike, p_rdr: ArrayLike, threshold: float, rdr_grade: int = 2) -> list[dict[str, Any]]:
    """For each ICDR grade present: ``{grade, referable, n, called_rdr, share, ci95}``.

    ``share`` (called RDR / n, Wilson interval) is the sensitivity within a referable grade
    (>= ``rdr_grade``) and the false-positive rate within a non-referable one: a model that
    finds grade 4 but misses grade 2 shows it here, not in the pooled sensitivity. Records
    without a grade (-1) are left out.
    """
    g = np.ravel(np.asarray(grades)).astype(int)
    p = np.ravel(np.asarray(p_rdr, dtype=float))
    if g.size != p.size:
        raise ValueError(f"need one grade per score, got {g.size} grades and {p.size} scores")
    rows = []
    for grade in sorted(set(g.tolist()) - {-1}):
        sel = g == grade
        n, k = int(sel.sum()), int((p[sel] >= threshold).sum())
        rows.append({"grade": grade, "referable": grade >= rdr_grade, "n": n, "called_rdr": k,
                     "share": k / n, "ci95": proportion_ci(k, n)})
    return rows


def calibration(y_true: ArrayLike, p_rdr: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """Calibration of P(RDR): ``brier`` (scikit-learn), ``ece``, ``n_bins`` and the reliability
    curve ``bins`` (one ``{p_mean, rdr_rate, n}`` per non-empty bin).

    Bins are scikit-learn's ``calibration_curve`` uniform bins; ``ece`` is the expected
    calibration error of P(RDR): the mean |observed RDR rate - mean P(RDR)| over bins, weighted
    by the share of cases in each bin (scikit-learn has no ECE; the bin counts are computed
    with its binning so that they pair with its curve). ``brier_reference`` is the Brier score of
    always predicting the prevalence, the bar a useful model must beat.
    """
    y, p = _check(y_true, p_rdr)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    rate, mean_p = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    counts = counts[counts > 0]
    prevalence = float(y.mean())
    return {
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "brier_reference": prevalence * (1 - prevalence),
        "ece": float(np.sum(counts * np.abs(rate - mean_p)) / y.size),
        "n_bins": int(n_bins),
        "bins": [{"p_mean": float(a), "rdr_rate": float(b), "n": int(c)}
                 for a, b, c in zip(mean_p, rate, counts)],
        "n": int(y.size),
    }


def _save(fig: Figure, path: Path | str | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI)
    return fig


def plot_confusion_matrix(cm: ArrayLike, path: Path | str | None = None, title: str = "") -> Figure:
    """Row-normalised confusion matrix (rows true, columns predicted; NRDR, RDR) with counts.

    Each cell shows the share of its true class and the count, e.g. ``0.83\\n(25)``; a class
    absent from the data shows ``-``. Saved as PNG when ``path`` is given.
    """
    counts = np.asarray(cm, dtype=int)
    if counts.shape != (2, 2):
        raise ValueError(f"confusion matrix must be 2x2, got shape {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.full((2, 2), np.nan), where=rows > 0)
    fig = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, k), s in np.ndenumerate(share):
        text = "-" if np.isnan(s) else f"{s:.2f}\n({counts[i, k]})"
        # White on dark cells, black on light ones, so every cell stays readable.
        color = "white" if s > 0.5 else "black"
        ax.text(k, i, text, ha="center", va="center", fontsize=12, color=color)
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix (n={int(counts.sum())})")
    fig.colorbar(im, ax=ax, label="share of true class")
    return _save(fig, path)


def confusion_matrix_image(cm: ArrayLike, title: str = "") -> np.ndarray:
    """The confusion-matrix plot as an RGB uint8 array [H, W, 3], e.g. for TensorBoard."""
    canvas = FigureCanvasAgg(plot_confusion_matrix(cm, title=title))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_roc(
    y_true: ArrayLike,
    p_rdr: ArrayLike,
    path: Path | str | None = None,
    threshold: float | None = None,
    title: str = "",
) -> Figure:
    """ROC curve with AUC in the legend, the chance diagonal and, when ``threshold`` is given,
    its operating point annotated with sensitivity and specificity.

    Single-class data has no ROC curve: the plot says so instead of failing, so an evaluation
    still writes its files.
    """
    y, p = _check(y_true, p_rdr)
    fig = Figure(figsize=(4.8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    if np.unique(y).size == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color="C0", lw=2, label=f"ROC (AUC = {roc_auc_score(y, p):.3f})")
        if threshold is not None:
            m = binary_metrics(y, p, threshold)
            x, s = 1 - m["specificity"], m["sensitivity"]
            ax.plot(x, s, "o", ms=9, color="C3", label=f"threshold {threshold:.2f}")
            # Put the label on the side with room: right of the point unless it is near the edge.
            ax.annotate(
                f"sens {s:.2f}\nspec {m['specificity']:.2f}",
                (x, s),
                xytext=(10, -28) if x < 0.6 else (-70, -28),
                textcoords="offset points",
                fontsize=9,
                color="C3",
            )
    else:
        ax.text(0.5, 0.6, "ROC undefined:\nonly one class present", ha="center", va="center")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title or f"ROC, RDR vs NRDR (n={y.size})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_reliability(y_true: ArrayLike, p_rdr: ArrayLike, path: Path | str | None = None,
                     n_bins: int = 10, title: str = "") -> Figure:
    """Reliability diagram of P(RDR): observed RDR rate against mean P(RDR) per bin (marker
    area ~ cases in the bin), the diagonal of perfect calibration, ECE and Brier score in the
    legend, and below it the histogram of P(RDR) by true class (where the model puts its cases).
    """
    y, p = _check(y_true, p_rdr)
    cal = calibration(y, p, n_bins)
    fig = Figure(figsize=(4.8, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    top.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfectly calibrated")
    xs = [b["p_mean"] for b in cal["bins"]]
    ys = [b["rdr_rate"] for b in cal["bins"]]
    sizes = [20 + 200 * b["n"] / cal["n"] for b in cal["bins"]]
    top.plot(xs, ys, "-", color="C0", lw=1.5)
    top.scatter(xs, ys, s=sizes, color="C0", zorder=3,
                label=f"model (ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f})")
    top.set(xlim=(-0.01, 1.01), ylim=(-0.02, 1.02), ylabel="observed share RDR")
    top.set_title(title or f"Reliability, P(RDR) in {n_bins} bins (n={y.size})")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for label, color in ((0, "C2"), (1, "C3")):
        if (y == label).any():
            bottom.hist(p[y == label], bins=edges, color=color, alpha=0.6,
                        label=f"true {CLASS_NAMES[label]} ({int((y == label).sum())})")
    bottom.set(xlabel="predicted P(RDR)", ylabel="cases")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(fontsize=8)
    return _save(fig, path)


# Learning-curve panels: (title, [(column, line style)]); training dashed, validation solid.
_HISTORY_PANELS = (
    ("loss", [("loss", "--"), ("val_loss", "-")]),
    ("balanced accuracy / AUC", [
        ("balanced_accuracy", "--"), ("val_balanced_accuracy", "-"), ("auc", "--"), ("val_auc", "-"),
    ]),
)


def _float(s: str | None) -> float:
    try:
        return float(s) if s not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_history(path: Path | str) -> list[dict[str, str]]:
    """Rows of a run's ``history.csv`` with epochs numbered from 1; [] when it does not exist.

    Epochs are counted as people count them everywhere in drtune (the first is epoch 1). Runs
    written before that hold Keras' 0-based numbers, recognised by a first row of epoch 0 (a
    1-based file never has one): they are shifted here, so that every reader (resume, plots,
    the search) sees one numbering whatever the age of the run.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    numbered = [r for r in rows if (r.get("epoch") or "").isdigit()]
    if numbered and int(numbered[0]["epoch"]) == 0:
        for r in numbered:
            r["epoch"] = str(int(r["epoch"]) + 1)
    return rows


def plot_history(history_csv: Path | str, path: Path | str | None = None) -> Figure:
    """Learning curves from a run's ``history.csv``: loss (train, val) and balanced accuracy /
    AUC per epoch, epochs numbered from 1 (see :func:`read_history`). Columns that are absent
    are skipped; a missing or empty file, or one with none of the known columns, raises
    ValueError naming the file."""
    history_csv = Path(history_csv)
    if not history_csv.is_file():
        raise ValueError(f"{history_csv}: training history not found")
    rows = read_history(history_csv)
    if not rows:
        raise ValueError(f"{history_csv}: training history is empty (no epochs logged)")
    cols = {c: np.array([_float(r.get(c)) for r in rows]) for c in rows[0] if c is not None}
    epochs = cols["epoch"] if "epoch" in cols else np.arange(1, len(rows) + 1)
    panels = [(t, [(c, ls) for c, ls in series if c in cols]) for t, series in _HISTORY_PANELS]
    if not any(series for _, series in panels):
        known = [c for _, series in _HISTORY_PANELS for c, _ in series]
        raise ValueError(f"{history_csv}: none of the columns {known} (has {list(cols)})")
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, (t, series) in zip(fig.subplots(1, 2), panels):
        for c, ls in series:
            ax.plot(epochs, cols[c], ls, marker="o", ms=3, label=c)
        if not series:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=t, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 on short runs
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(f"{history_csv.parent.name}/{history_csv.name}")  # the run it belongs to
    return _save(fig, path)
