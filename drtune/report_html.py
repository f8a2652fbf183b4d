"""The HTML page of a model card (``report.html``): :func:`render_html` turns the card that
:mod:`drtune.report` gathers (``report.json``) into one self-contained page, images embedded as
base64 PNG and no external resources. Presentation only: every number is already in the card.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from drtune.metrics import fmt_or_na

_GRADE_NAMES = {0: "no DR", 1: "mild NPDR", 2: "moderate NPDR", 3: "severe NPDR", 4: "PDR"}


def png(path: Path) -> str | None:
    """The PNG file at ``path`` as base64, None when it does not exist."""
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def fig_png(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG."""
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
    ref = card["reference_endpoints"]  # the endpoints the operating points are held against
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
                + meets(op["sensitivity"], ref["sensitivity"], op.get("sensitivity_ci95")),
                f"<b>{_pct(op['specificity'])}</b> ({_ci(op.get('specificity_ci95'))})<br>"
                + meets(op["specificity"], ref["specificity"], op.get("specificity_ci95"))]
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
        f"{_e(ref['name'])}: sensitivity &gt; {ref['sensitivity']:.1%}, "
        f"specificity &gt; {ref['specificity']:.1%}.</p>",
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
