"""``drtune report``: a model card of a run (or of a study's fine-tuned model).

Writes ``DIR/report.json`` and a self-contained ``DIR/report.html`` (images embedded as base64
PNG, no external resources) with the minimal items of TRIPOD+AI, CLAIM and Model Cards: intended
use and limits, data, training and search, the selection rule, test metrics with 95% CIs,
operating points beside the IDx-DR endpoints, per-grade sensitivity, calibration, caveats and
versions. Every number comes from ``RUN/eval-test`` and ``RUN/eval-val`` (written by
``evaluate_run`` when missing or stale); the test split chooses nothing.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from drtune import __version__, metrics
from drtune.metrics import fmt_or_na
from drtune.runs import (CLASS_NAMES, CONFIG_JSON, DATA_JSON, METRICS_JSON, MODEL_KERAS, PREDICTIONS_CSV,
                         eval_dir, load_meta)
from drtune.errors import InputError

# The pivotal trial of the first autonomous DR system (IDx-DR, Abramoff et al., npj Digit Med
# 2018) had pre-specified superiority endpoints of sensitivity > 85% and specificity > 82.5%.
IDX_DR = {"sensitivity": 0.85, "specificity": 0.825}
TARGET_SENSITIVITY = IDX_DR["sensitivity"]
_GRADE_NAMES = {0: "no DR", 1: "mild NPDR", 2: "moderate NPDR", 3: "severe NPDR", 4: "PDR"}


# --------------------------------------------------------------------------- inputs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def check_run(run: Path) -> None:
    """``InputError`` unless ``run`` is a finished run directory (cheap: no TensorFlow)."""
    if not run.is_dir():
        raise InputError(f"{run}: run directory not found")
    for name in (MODEL_KERAS, CONFIG_JSON, DATA_JSON, METRICS_JSON):
        if not (run / name).is_file():
            raise InputError(f"{run}: no {name}; the run is not finished (run 'drtune train' to the end first)")


def _stale(run: Path, split: str, data_dir: Path, threshold: float) -> str | None:
    """Why ``RUN/eval-<split>`` cannot be used as it is, or None when it can."""
    out = eval_dir(run, split)
    if not (out / METRICS_JSON).is_file() or not (out / PREDICTIONS_CSV).is_file():
        return "not evaluated yet"
    m = json.loads((out / METRICS_JSON).read_text())
    with (out / PREDICTIONS_CSV).open(newline="") as f:
        header = next(csv.reader(f), [])
    if "grade" not in header or "ci_method" not in m:
        return "evaluated by an older drtune (no grades / bootstrap CIs of proportions)"
    if float(m.get("threshold", -1)) != threshold:
        return "evaluated at another threshold"
    if Path(m.get("data_dir", "")).resolve() != data_dir.resolve():
        return f"evaluated on {m.get('data_dir')}"
    if (run / MODEL_KERAS).stat().st_mtime > (out / METRICS_JSON).stat().st_mtime:
        return "model.keras is newer than the evaluation"
    return None


def _evaluation(run: Path, split: str, data_dir: Path, threshold: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metrics.json, predictions as arrays) of ``split``, evaluating the run first if needed."""
    why = _stale(run, split, data_dir, threshold)
    if why is not None:
        from drtune.evaluate import evaluate_run

        logging.info("%s: evaluating on %s (%s)", run, split, why)
        evaluate_run(run, data_dir, split)
    out = eval_dir(run, split)
    with (out / PREDICTIONS_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    preds = {
        "label": np.array([int(r["label"]) for r in rows], dtype=int),
        "p_rdr": np.array([float(r["p_rdr"]) for r in rows]),
        # The decision column was computed from unrounded scores: exact at the frozen threshold.
        "called": np.array([r["decision"] == CLASS_NAMES[1] for r in rows], dtype=float),
        "grade": np.array([int(r["grade"]) for r in rows], dtype=int),
    }
    return _read_json(out / METRICS_JSON), preds


def _git_commit() -> str | None:
    """The commit of the drtune source at report time (``+dirty`` with uncommitted changes)."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a checkout (an installed wheel) or no git
    return head + ("+dirty" if dirty else "")


def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    # Package metadata, not imports: the report needs no TensorFlow when evaluations exist.
    return {"drtune": __version__, "python": sys.version.split()[0], "tensorflow": version("tensorflow"),
            "keras": version("keras"), "optuna": version("optuna"), "scikit-learn": version("scikit-learn"),
            "git_commit": _git_commit()}


def _gradcam_links(run: Path, extra: dict[str, str] | None) -> list[str]:
    found = sorted(str(p) for p in run.glob("gradcam*/index.html"))
    for path in (extra or {}).values():
        if Path(path).is_file() and str(path) not in found:
            found.append(str(path))
    return found


# --------------------------------------------------------------------------- the card


def build_card(run_dir: Path | str, data_dir: Path | str | None = None,
               study: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``report.json`` for a finished run (evaluating it on val/test if needed).

    ``study`` holds the search facts of ``study_facts`` when the run is a study's fine-tuned model.
    """
    run = Path(run_dir)
    check_run(run)
    cfg = _read_json(run / CONFIG_JSON)
    info = _read_json(run / DATA_JSON)
    run_metrics = _read_json(run / METRICS_JSON)
    data = Path(data_dir or info["data_dir"])
    meta = load_meta(data)
    threshold = float(run_metrics["threshold"])
    rdr_grade = int(info.get("rdr_grade", meta.get("rdr_grade", 2)))
    test, tp = _evaluation(run, "test", data, threshold)
    _, vp = _evaluation(run, "val", data, threshold)

    criterion = cfg.get("train", {}).get("threshold", "balanced_accuracy")
    frozen = metrics.operating_point(f"validation-frozen threshold ({criterion})", tp["label"], tp["called"], 0.5)
    frozen["threshold"] = threshold
    val_frozen = metrics.binary_metrics(vp["label"], vp["p_rdr"], threshold)
    frozen.update(val_sensitivity=val_frozen["sensitivity"], val_specificity=val_frozen["specificity"])
    frozen.update(sensitivity=test["sensitivity"], specificity=test["specificity"])  # exact, as metrics.json
    points = [frozen]
    t85 = metrics.threshold_for_sensitivity(vp["label"], vp["p_rdr"], TARGET_SENSITIVITY)
    if t85 is not None:
        op = metrics.operating_point(f"sensitivity >= {TARGET_SENSITIVITY:.0%} on validation",
                                     tp["label"], tp["p_rdr"], t85)
        v = metrics.binary_metrics(vp["label"], vp["p_rdr"], t85)
        op.update(val_sensitivity=v["sensitivity"], val_specificity=v["specificity"])
        points.append(op)
    for op in points:
        op["meets_idx_dr_endpoints"] = bool(
            op["sensitivity"] is not None and op["specificity"] is not None
            and op["sensitivity"] > IDX_DR["sensitivity"] and op["specificity"] > IDX_DR["specificity"])

    splits = {s: {k: v for k, v in e.items() if k not in ("files", "names")} for s, e in meta["splits"].items()}
    card: dict[str, Any] = {
        "model_card_version": 1,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(run.resolve()),
        "intended_use": {
            "use": "research tool to compare referable-DR classifiers and their hyperparameters",
            "not": "not a medical device; not for diagnosis, screening or treatment decisions",
            "target": f"Referable DR = ICDR grade >= {rdr_grade} on one colour fundus photograph",
            "out_of_scope": "diabetic macular edema (DME), OCT, other eye disease, image quality grading",
        },
        "test": test,
        "operating_points": points,
        "reference_endpoints": {"name": "IDx-DR pivotal trial (Abramoff 2018)", **IDX_DR},
        "calibration": {**metrics.calibration(tp["label"], tp["p_rdr"]), "split": "test"},
        "per_grade": metrics.per_grade(tp["grade"], tp["called"], 0.5, rdr_grade),
        "data": {
            "dir": str(data), "source": meta.get("source"), "splits": splits, "rdr_grade": rdr_grade,
            "group_pattern": meta.get("group_pattern"), "val_fraction": meta.get("val_fraction"),
            "split_seed": meta.get("seed"), "skipped": len(meta.get("skipped", [])),
            "preprocessing": {"size": info.get("size"), "input_size": info.get("input_size"),
                              "normalize": info.get("normalize", "none"),
                              "jpeg_quality": info.get("jpeg_quality")},
        },
        "training": {"config": cfg, "best_epoch": run_metrics.get("best_epoch"),
                     "epochs_run": run_metrics.get("epochs_run"), "params": run_metrics.get("params"),
                     "seconds": run_metrics.get("seconds"),
                     "val_balanced_accuracy": run_metrics.get("val_balanced_accuracy"),
                     "val_auc": run_metrics.get("val_auc"), "threshold_criterion": criterion},
        "selection_rule": (
            "Chosen on the validation split only: the weights of the epoch with the best validation "
            "balanced accuracy (threshold 0.5), the decision threshold (" + criterion + " on "
            "validation, then frozen), the sensitivity-target operating point"
            + (", and the hyperparameters (the best trial of the study by validation balanced "
               "accuracy)" if study else "")
            + ". The test split was used for nothing but the numbers in this report."),
        "caveats": [
            f"Small test set (n={test['n']}: {test['confusion_matrix'][1][0] + test['confusion_matrix'][1][1]}"
            f" RDR, {test['confusion_matrix'][0][0] + test['confusion_matrix'][0][1]} NRDR): read the "
            "95% CIs, not the point estimates; an endpoint is shown to be met only when the CI's "
            "lower bound clears it.",
            "Camera, site and population shift: performance on photographs from other cameras, "
            "clinics or populations than the data above is unknown until tested there.",
            "Grad-CAM heatmaps are qualitative: they show where the model's evidence lies, not "
            "that it is clinically right, and they are not a validated lesion detector.",
            "Calibration was measured on the test split and not corrected: P(RDR) is a score, not "
            "a risk, unless the reliability diagram says otherwise.",
        ],
        "gradcam": _gradcam_links(run, (study or {}).get("gradcam")),
        "versions": _versions(),
    }
    if study:
        card["study"] = {k: v for k, v in study.items() if k != "gradcam"}
    return card


def study_facts(cfg: Any, storage: str | None = None, name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(fine-tuned run directory, search facts) of a study, read from its storage (read-only)."""
    from optuna.trial import TrialState

    from drtune import config as config_lib
    from drtune.study import load_study

    study = load_study(cfg, storage, name)
    ft = study.user_attrs.get("finetune")
    if not ft or not ft.get("run_dir"):
        raise InputError(f"study {study.study_name!r} has no fine-tuned model; run 'drtune finetune --best' first")
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    search = study.user_attrs.get("config", {}).get("search") or config_lib.to_dict(cfg)["search"]
    grid = any("grid_id" in t.system_attrs for t in trials)
    try:
        best = study.best_trial
        best_facts = {"number": best.number, "value": best.value, "params": best.params}
    except ValueError:
        best_facts = None
    facts = {
        "name": study.study_name,
        "objective": f"validation balanced accuracy ({study.direction.name.lower()})",
        "trials": {"total": len(trials), **counts,
                   "retried": sum("retry_of" in t.user_attrs or "failed_trial" in t.system_attrs for t in trials)},
        "sampler": "grid" if grid else f"TPE (seed {search.get('sampler_seed')})",
        "space": search.get("grid") if grid else search.get("space"),
        "pruner": f"{search.get('pruner')} (startup trials {search.get('pruner_startup_trials')}, "
                  f"warm-up epochs {search.get('pruner_warmup_epochs')})",
        "best_trial": best_facts,
        "finetuned_trial": ft.get("trial"),
        "gradcam": ft.get("gradcam") or {},
    }
    return Path(ft["run_dir"]), facts


# --------------------------------------------------------------------------- rendering


def _png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def _fig_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(ci: list[float] | None, pct: bool = True) -> str:
    if not ci:
        return "n/a"
    return f"{_pct(ci[0])} – {_pct(ci[1])}" if pct else f"{ci[0]:.3f} – {ci[1]:.3f}"


def _e(v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:.4g}"  # 0.33333333333333337 reads as 0.3333
    return html.escape("n/a" if v is None else str(v))


def _table(header: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>" for r in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""  # key/value tables: no header
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _flat(d: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", json.dumps(v) if isinstance(v, (dict, list)) else v])
    return rows


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:24px auto;
padding:0 16px;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.1em}h2{border-bottom:2px solid #dde3ea;padding-bottom:4px;margin-top:1.8em}
.sub{color:#5a6675;margin-top:0}.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:8px 12px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px;margin:16px 0}
.tile{border:1px solid #dde3ea;border-radius:8px;padding:10px 14px;background:#f8fafc}
.tile .v{font-size:1.9em;font-weight:600}.tile .l{color:#5a6675;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.93em}
th,td{border:1px solid #dde3ea;padding:4px 9px;text-align:left;vertical-align:top}th{background:#f1f4f8}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.figs img{width:calc(50% - 8px);min-width:320px;height:auto;box-sizing:border-box;border:1px solid #eee}.figs img.wide{width:100%}
.ok{color:#11703a;font-weight:600}.no{color:#a3261b;font-weight:600}code{background:#f1f4f8;padding:0 3px}
"""


def render_html(card: dict[str, Any], images: dict[str, str | None]) -> str:
    """The model card as one self-contained HTML page (``images``: name -> base64 PNG)."""
    t, iu, d = card["test"], card["intended_use"], card["data"]
    (tn, fp), (fn, tp) = t["confusion_matrix"]
    ci = t["ci95"]
    method = t.get("ci_method", {})
    title = f"Model card: referable DR, {Path(card['run']).name}"
    if "study" in card:
        title += f" (study {card['study']['name']}, trial {card['study']['finetuned_trial']} fine-tuned)"

    def tile(label: str, value: str, sub: str) -> str:
        return f'<div class="tile"><div class="l">{_e(label)}</div><div class="v">{_e(value)}</div><div class="l">{_e(sub)}</div></div>'

    tiles = "".join([
        tile("Sensitivity (RDR found)", _pct(t["sensitivity"]), f"{tp}/{tp + fn} · 95% CI {_ci(ci.get('sensitivity'))}"),
        tile("Specificity (NRDR cleared)", _pct(t["specificity"]), f"{tn}/{tn + fp} · 95% CI {_ci(ci.get('specificity'))}"),
        tile("AUC", fmt_or_na(t["auc"]), f"95% CI {_ci(ci.get('auc'), False)}"),
        tile("Balanced accuracy", f"{t['balanced_accuracy']:.3f}", f"95% CI {_ci(ci.get('balanced_accuracy'), False)}"),
    ])
    metric_rows = [[k.replace("_", " "), fmt_or_na(t[k]),
                    _ci(ci.get(k), False), method.get(k, "bootstrap")]
                   for k in ("sensitivity", "specificity", "balanced_accuracy", "auc", "accuracy")]

    def meets(v: float | None, bar: float, lo: list[float] | None) -> str:
        if v is None:
            return "n/a"
        if lo and lo[0] > bar:
            return f'<span class="ok">&gt; {bar:.1%} (CI above)</span>'
        if v > bar:
            return f'<span class="ok">&gt; {bar:.1%}</span> (CI lower bound {_pct(lo[0]) if lo else "n/a"})'
        return f'<span class="no">below {bar:.1%}</span>'

    op_rows = [[_e(op["name"]), f"{op['threshold']:.3f}",
                f"{_pct(op.get('val_sensitivity'))} / {_pct(op.get('val_specificity'))}",
                f"<b>{_pct(op['sensitivity'])}</b> ({_ci(op.get('sensitivity_ci95'))})<br>"
                + meets(op["sensitivity"], IDX_DR["sensitivity"], op.get("sensitivity_ci95")),
                f"<b>{_pct(op['specificity'])}</b> ({_ci(op.get('specificity_ci95'))})<br>"
                + meets(op["specificity"], IDX_DR["specificity"], op.get("specificity_ci95"))]
               for op in card["operating_points"]]
    grade_rows = [[f"{g['grade']} ({_GRADE_NAMES.get(g['grade'], '?')})", "RDR" if g["referable"] else "NRDR",
                   g["n"], g["called_rdr"], _pct(g["share"]), _ci(g["ci95"]),
                   "sensitivity" if g["referable"] else "false-positive rate"] for g in card["per_grade"]]
    split_rows = [[s, e.get("n"), e.get("nrdr"), e.get("rdr"),
                   " · ".join(f"{k}: {v}" for k, v in (e.get("grades") or {}).items())]
                  for s, e in d["splits"].items()]
    cal = card["calibration"]

    def img(key: str, alt: str, cls: str = "") -> str:
        # Two plots side by side at half the page width each (their PNGs are ~560 px wide).
        return (f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{images[key]}">'
                if images.get(key) else "")

    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='sub'>Generated {_e(card['generated'])} by drtune {_e(card['versions']['drtune'])} from <code>{_e(card['run'])}</code></p>",
        f"<p class='warn'><b>Research tool, not a medical device.</b> {_e(iu['target'])}. "
        f"Out of scope: {_e(iu['out_of_scope'])}.</p>",
        f"<h2>Test result (n={t['n']}, threshold {t['threshold']:.3f} frozen on validation)</h2>",
        f"<div class='tiles'>{tiles}</div>",
        _table(["metric", "value", "95% CI", "CI method"], metric_rows),
        f"<div class='figs'>{img('confusion_matrix', 'confusion matrix')}{img('roc', 'ROC curve')}</div>",
        "<h2>Operating points</h2>",
        f"<p>Thresholds chosen on validation, measured on test, beside the endpoints of the "
        f"{_e(card['reference_endpoints']['name'])}: sensitivity &gt; {IDX_DR['sensitivity']:.1%}, "
        f"specificity &gt; {IDX_DR['specificity']:.1%}.</p>",
        _table(["operating point", "threshold", "validation sens / spec", "test sensitivity (95% CI)",
                "test specificity (95% CI)"], op_rows, raw=True),
        "<h2>Sensitivity per ICDR grade (test, frozen threshold)</h2>",
        _table(["grade", "class", "photographs", "called RDR", "share", "95% CI", "meaning"], grade_rows),
        "<h2>Calibration (test)</h2>",
        f"<p>Expected calibration error <b>{cal['ece']:.3f}</b> ({cal['n_bins']} bins); Brier score "
        f"<b>{cal['brier']:.3f}</b> (always predicting the prevalence scores {cal['brier_reference']:.3f}; "
        f"lower is better). Not recalibrated.</p>",
        f"<div class='figs'>{img('reliability', 'reliability diagram')}</div>",
        "<h2>Intended use</h2>",
        _table(["", ""], [["use", iu["use"]], ["not for", iu["not"]], ["target", iu["target"]],
                          ["out of scope", iu["out_of_scope"]]]),
        "<h2>Data</h2>",
        _table(["", ""], [["source", d["source"]], ["folder", d["dir"]],
                          ["validation split", f"{d['val_fraction']} of the training photographs, stratified by "
                                               f"RDR, seed {d['split_seed']}"],
                          ["patient grouping", f"pattern {d['group_pattern']!r}: a group never straddles train and val"
                           if d["group_pattern"] else "none: each photograph is its own group (both eyes of a "
                                                      "patient may fall in train and val)"],
                          ["preprocessing", "retina field cropped and padded square, "
                           + ", ".join(f"{k} {v}" for k, v in d["preprocessing"].items())],
                          ["skipped photographs", d["skipped"]]]),
        _table(["split", "photographs", "NRDR", "RDR", "ICDR grades"], split_rows),
        "<h2>Selection rule</h2>", f"<p>{_e(card['selection_rule'])}</p>",
    ]
    if "study" in card:
        s = card["study"]
        parts += ["<h2>Search</h2>", _table(["", ""], [
            ["study", s["name"]], ["objective", s["objective"]],
            ["trials", ", ".join(f"{k} {v}" for k, v in s["trials"].items() if v or k in ("complete", "pruned", "fail"))],
            ["sampler", s["sampler"]], ["space", json.dumps(s["space"])], ["pruner", s["pruner"]],
            ["best trial", json.dumps(s["best_trial"])], ["fine-tuned", f"trial {s['finetuned_trial']}"]])]
    tr = card["training"]
    parts += [
        "<h2>Model and training</h2>",
        _table(["", ""], [["best epoch", f"{tr['best_epoch']} of {tr['epochs_run']}"], ["parameters", tr["params"]],
                          ["validation balanced accuracy (threshold 0.5)", tr["val_balanced_accuracy"]],
                          ["validation AUC", tr["val_auc"]]]),
        f"<div class='figs'>{img('history', 'learning curves', 'wide')}</div>",
        "<details><summary>Full training configuration (config.json)</summary>",
        _table(["key", "value"], _flat(tr["config"])), "</details>",
        "<h2>Caveats</h2><ul>" + "".join(f"<li>{_e(c)}</li>" for c in card["caveats"]) + "</ul>",
        "<h2>Grad-CAM</h2>",
        ("<ul>" + "".join(f"<li><a href='{_e(h)}'>{_e(h)}</a></li>" for h in card.get("gradcam_links", []))
         + "</ul><p>Heatmaps are qualitative.</p>") if card.get("gradcam_links")
        else "<p>No Grad-CAM gallery next to this run (make one with <code>drtune gradcam RUN --out RUN/gradcam-test</code>).</p>",
        "<h2>Versions</h2>",
        _table(["", ""], [[k, v] for k, v in card["versions"].items()]),
        "</body></html>",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dir: Path | str, out_dir: Path | str, data_dir: Path | str | None = None,
                 study: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``OUT/report.json`` and ``OUT/report.html`` for a finished run; return the card."""
    run, out = Path(run_dir), Path(out_dir)
    card = build_card(run, data_dir, study)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None
    # Links are relative to the report, so the report and the run can move together.
    card["gradcam_links"] = [os.path.relpath(p, out.resolve()) for p in card["gradcam"]]
    test_dir = eval_dir(run, "test")
    tp_path = test_dir / PREDICTIONS_CSV
    with tp_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    y = [int(r["label"]) for r in rows]
    p = [float(r["p_rdr"]) for r in rows]
    images = {
        "confusion_matrix": _png(test_dir / "confusion_matrix.png"),
        "roc": _png(test_dir / "roc.png"),
        "reliability": _fig_png(metrics.plot_reliability(y, p, title=f"Reliability on test (n={len(y)})")),
        "history": _png(run / "history.png"),
    }
    _write_atomic(out / "report.json", json.dumps(card, indent=2) + "\n")
    _write_atomic(out / "report.html", render_html(card, images))
    logging.info("wrote %s and %s", out / "report.html", out / "report.json")
    return card


def report_study(cfg: Any, out_dir: Path | str, storage: str | None = None, name: str | None = None,
                 data_dir: Path | str | None = None) -> dict[str, Any]:
    """The model card of a study's fine-tuned model (``finetune --best``), with the search facts."""
    run, facts = study_facts(cfg, storage, name)
    return write_report(run, out_dir, data_dir, facts)
