"""What a study tells its reader in optuna-dashboard: its note, objective name and test numbers.

The dashboard is what users watch, so the study says there what ``drtune status`` and the model
card say: what the study is (data, space, sampler, pruner, objective), and, once ``finetune
--best`` has run, which trial won, its test metrics with 95% CIs and n, the frozen threshold, the
operating points and the plots at full size. Notes are optuna-dashboard's (``save_note``: Markdown
kept in the study's system attributes); images are the study's artifacts, embedded by the URL the
dashboard serves them at (``/artifacts/<study id>/<artifact id>``).

The study note is one Markdown text. drtune owns two sections of it (the fine-tune result first,
then the study description), each between invisible markers, and rewrites only its own section:
text a user adds in the dashboard outside them is kept. No TensorFlow here.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState
from optuna_dashboard import get_note, save_note
from optuna_dashboard.artifact import get_artifact_path

from drtune.config import Config

# drtune's sections of the study note, in the order they appear.
SECTIONS = ("finetune", "search")
# The test metrics recorded as separate numeric study attributes, in display order.
TEST_METRICS = ("balanced_accuracy", "auc", "sensitivity", "specificity", "accuracy")
_LABELS = {"balanced_accuracy": "balanced accuracy", "auc": "AUC", "sensitivity": "sensitivity",
           "specificity": "specificity", "accuracy": "accuracy"}
# IDx-DR's pre-specified endpoints (Abramoff et al. 2018), as in the model card.
_ENDPOINTS = "IDx-DR endpoints (sensitivity > 85%, specificity > 82.5%)"


# --------------------------------------------------------------------------- the note itself


def _markers(key: str) -> tuple[str, str]:
    # Link reference definitions: valid Markdown that renders as nothing, unlike HTML comments,
    # which a renderer without raw HTML may show as text. They cannot interrupt a paragraph, so
    # each stands between blank lines (else the dashboard shows it as text).
    return f"[//]: # (drtune:{key})", f"[//]: # (drtune:{key}:end)"


def _split_note(body: str) -> tuple[dict[str, str], str]:
    """(drtune's sections by key, the rest of the note) of a note's Markdown."""
    sections: dict[str, str] = {}
    for key in SECTIONS:
        start, end = _markers(key)
        m = re.search(re.escape(start) + r"\n+(.*?)\n+" + re.escape(end) + r"\n*", body, re.DOTALL)
        if m:
            sections[key] = m.group(1)
            body = body[:m.start()] + body[m.end():]
    return sections, body.strip("\n")


def set_section(study: optuna.Study, key: str, markdown: str) -> str:
    """Replace drtune's ``key`` section of the study note (one of ``SECTIONS``); return the note."""
    if key not in SECTIONS:
        raise ValueError(f"note section {key!r}: must be one of {', '.join(SECTIONS)}")
    sections, rest = _split_note(get_note(study))
    sections[key] = markdown.strip("\n")
    parts = ["\n\n".join((_markers(k)[0], sections[k], _markers(k)[1])) for k in SECTIONS if k in sections]
    body = "\n\n".join(parts + ([rest] if rest else [])) + "\n"
    save_note(study, body)
    return body


# --------------------------------------------------------------------------- objective name


def objective_name(monitor: str) -> str:
    """A readable name of a Keras log key: ``val_balanced_accuracy`` -> ``val balanced accuracy``."""
    words = monitor.replace("_", " ")
    return re.sub(r"\bauc\b", "AUC", words)


def name_objective(study: optuna.Study, monitor: str) -> None:
    """Name the study's objective (the dashboard says "Objective 0" otherwise); a name already set,
    by an earlier run or by hand, stays."""
    if not study.metric_names:
        study.set_metric_names([objective_name(monitor)])


# --------------------------------------------------------------------------- formatting


def _num(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if not ci else f"{ci[0]:.3f}–{ci[1]:.3f}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the search


def _head(cfg: Config, meta: dict[str, Any]) -> str:
    """The classifier in words, for the study note (the grade head sums its grades into P(RDR))."""
    if cfg.model.head == "grade":
        return f"5-grade head (P(RDR) = the sum over grades ≥ {meta.get('rdr_grade', 2)})"
    if cfg.model.head == "ordinal":
        return f"ordinal grade head (one severity score; P(RDR) = P(grade ≥ {meta.get('rdr_grade', 2)}))"
    return "2-class head"


def _space_rows(cfg: Config, grid: bool) -> list[list[str]]:
    if grid:
        return [[f"`{k}`", _value(list(v))] for k, v in cfg.search.grid.items()]
    rows = []
    for k, spec in cfg.search.space.items():
        if "choices" in spec:
            rows.append([f"`{k}`", "one of " + _value(list(spec["choices"]))])
        else:
            extra = [f"step {_value(spec['step'])}"] if spec.get("step") else []
            extra += ["log scale"] if spec.get("log") else []
            rows.append([f"`{k}`", f"{_value(spec['low'])} to {_value(spec['high'])}"
                         + (f" ({', '.join(extra)})" if extra else "")])
    return rows


def _trial_counts(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = [(s.name.lower(), sum(t.state == s for t in trials)) for s in TrialState]
    return f"{len(trials)} trial(s): " + ", ".join(f"{n} {name}" for name, n in counts if n)


def write_search_note(study: optuna.Study, cfg: Config, meta: Mapping[str, Any],
                      data_dir: Path | str | None = None, grid: bool | None = None,
                      monitor: str = "val_balanced_accuracy") -> str:
    """Write the "what this study is" section of the study note; return the whole note.

    ``meta``: the data folder's ``meta.json`` (counts per split and class). ``grid``: whether the
    study runs ``[search.grid]`` (default: it has a grid and no TPE space). ``monitor``: the Keras
    log key the trials return (named as ``name_objective`` names it). Called when a search
    starts and again at its end, when it also lists the trials so far and the best one.
    """
    s = cfg.search
    grid = bool(s.grid) and not s.space if grid is None else grid
    monitor = objective_name(monitor)
    splits = meta.get("splits", {})
    rows = [[name, e.get("n", "?"), e.get("nrdr", "?"), e.get("rdr", "?")]
            for name, e in splits.items()]
    rows.append(["total", *(sum(int(e.get(k, 0)) for e in splits.values()) for k in ("n", "nrdr", "rdr"))])
    sampler = (f"grid (Optuna `GridSampler`, seed {s.sampler_seed}; every point runs once)" if grid else
               f"TPE (seeded per worker from {s.sampler_seed}, constant liar), "
               f"{s.n_trials} trial(s) in the study")
    pruner = ("none" if s.pruner == "none" else
              f"{s.pruner} (no pruning before {s.pruner_startup_trials} trial(s) have finished, "
              f"nor before epoch {s.pruner_warmup_epochs})")
    lines = [
        f"## Study `{study.study_name}`: what it is",
        "",
        f"**Objective (maximised):** {monitor} of each trial's best epoch, on the validation split "
        f"(n={splits.get('val', {}).get('n', '?')}). It chooses the trial; it is not a test result "
        "and, on a small validation split, is optimistic. The test result is in the section above "
        "once `drtune finetune --best` has run.",
        "",
        f"**Data:** `{data_dir or meta.get('source', '?')}` ({meta.get('source', 'unknown source')}); "
        f"RDR = ICDR grade ≥ {meta.get('rdr_grade', 2)}, photographs prepared at {meta.get('size', '?')} px"
        + (f", patients grouped by `{meta['group_pattern']}`" if meta.get("group_pattern") else "") + ".",
        "",
        _table(["split", "photographs", "NRDR", "RDR"], rows),
        "",
        f"**Search space** ({'grid' if grid else 'TPE'}):",
        "",
        _table(["parameter", "values" if grid else "range"], _space_rows(cfg, grid)),
        "",
        f"**Sampler:** {sampler}.  ",
        f"**Pruner:** {pruner}.  ",
        f"**Each trial:** up to {cfg.train.epochs} epochs, ResNetV2 width {cfg.model.width} with "
        f"{cfg.model.blocks_per_stage} block(s) per stage and a "
        f"{_head(cfg, meta)}, input "
        f"{cfg.data.image_size or meta.get('size', '?')} px, {cfg.data.augment} augmentation, "
        f"seed {cfg.train.seed}.",
        "",
        f"**Trials so far:** {_trial_counts(study)}.",
    ]
    try:
        best = study.best_trial
        lines += ["", f"**Best on validation:** trial {best.number}, {monitor} {best.value:.4f}: "
                  + ", ".join(f"`{k}` = {_value(v)}" for k, v in best.params.items()) + "."]
    except ValueError:
        pass
    return set_section(study, "search", "\n".join(lines))


# --------------------------------------------------------------------------- the result


def record_test_metrics(study: optuna.Study, test: Mapping[str, Any]) -> dict[str, Any]:
    """Record the test metrics as separate numeric study attributes (``test_auc``, ...,
    ``test_n``), each CI as ``test_<metric>_ci95`` = [low, high]; return what was set."""
    attrs: dict[str, Any] = {}
    ci = test.get("ci95") or {}
    for key in TEST_METRICS:
        if test.get(key) is not None:
            attrs[f"test_{key}"] = round(float(test[key]), 4)
        if ci.get(key):
            attrs[f"test_{key}_ci95"] = [round(float(v), 3) for v in ci[key]]
    if test.get("n") is not None:
        attrs["test_n"] = int(test["n"])
    if test.get("threshold") is not None:
        attrs["test_threshold"] = round(float(test["threshold"]), 4)
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    return attrs


def upload_as(store: Any, study: optuna.Study, path: Path | str, name: str) -> str | None:
    """Upload ``path`` to the study under the file name ``name`` (so the artifact list sorts and
    explains itself); return its artifact id, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / name
        shutil.copyfile(path, named)
        return upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)


def _metric_rows(test: Mapping[str, Any]) -> list[list[str]]:
    ci, method = test.get("ci95") or {}, test.get("ci_method") or {}
    (tn, fp), (fn, tp) = test["confusion_matrix"]
    counts = {"sensitivity": f" ({tp}/{tp + fn})", "specificity": f" ({tn}/{tn + fp})",
              "accuracy": f" ({tp + tn}/{tn + fp + fn + tp})"}
    return [[_LABELS[k], _num(test.get(k)) + counts.get(k, ""), _ci(ci.get(k)), method.get(k, "")]
            for k in TEST_METRICS if k in test]


def _operating_rows(points: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for op in points:
        meets = op.get("meets_idx_dr_endpoints")
        rows.append([op["name"], _num(op.get("threshold")),
                     f"{_num(op.get('sensitivity'))} ({_ci(op.get('sensitivity_ci95'))})",
                     f"{_num(op.get('specificity'))} ({_ci(op.get('specificity_ci95'))})",
                     "—" if meets is None else ("yes" if meets else "no")])
    return rows


def _ensemble_lines(summary: Mapping[str, Any]) -> list[str]:
    """The ensemble of the top trials beside the best single model, on the same test split."""
    ens, single = summary["ensemble"], summary["test"]
    test, trials = ens["test"], ", ".join(str(t) for t in ens["trials"])

    def errors(cm: Sequence[Sequence[int]]) -> str:  # rows: truth NRDR, RDR; columns: the call
        return f"{cm[1][0]} / {cm[0][1]}"

    rows = [[_LABELS[k], _num(single.get(k)), f"{_num(test.get(k))} ({_ci((test.get('ci95') or {}).get(k))})"]
            for k in TEST_METRICS if k in test]
    rows += [["threshold (frozen on validation)", _num(summary.get("threshold")), _num(ens.get("threshold"))],
             ["missed RDR / false alarms", errors(single["confusion_matrix"]), errors(test["confusion_matrix"])]]
    return [f"**Ensemble of the top {len(ens['trials'])} trials** ({trials}): the mean of their fine-tuned "
            "models' P(RDR), each with its own test-time augmentation, at a threshold chosen on the "
            f"ensemble's validation predictions; run directory `{ens.get('run_dir', '-')}`.", "",
            _table(["test metric", f"best single model (trial {summary['trial']})", "ensemble (95% CI)"], rows)]


def write_finetune_note(study: optuna.Study, summary: Mapping[str, Any],
                        artifacts: Mapping[str, str | None] | None = None,
                        operating_points: Sequence[Mapping[str, Any]] | None = None,
                        calibration: Mapping[str, Any] | None = None,
                        report: str | None = None) -> str:
    """Write the result section of the study note (``finetune --best``); return the whole note.

    ``summary``: what ``finetune_best`` records (``trial``, ``params``, ``threshold``,
    ``val_balanced_accuracy``, ``test`` as in ``eval-test/metrics.json``, optionally
    ``settings``, ``run_dir`` and ``ensemble``: ``trials``, ``threshold``, ``test`` and ``run_dir``
    of the ensemble of the top trials). ``artifacts``: study artifact ids of the plots to embed at
    full size, by key ``confusion_matrix``, ``roc``, ``reliability``, ``history``,
    ``ensemble_confusion_matrix``, ``ensemble_roc`` (missing ones are left out). ``operating_points`` and ``calibration``: as in the model card's ``report.json``.
    ``report``: the artifact id of the uploaded model card (``report.html``), linked when given.
    """
    test, artifacts = summary["test"], dict(artifacts or {})
    (tn, fp), (fn, tp) = test["confusion_matrix"]
    ci = (test.get("ci95") or {}).get("balanced_accuracy")
    settings = summary.get("settings") or {}
    lines = [
        f"## Result: the fine-tuned model of trial {summary['trial']} on the test split",
        "",
        f"**Test balanced accuracy {_num(test['balanced_accuracy'])} (95% CI {_ci(ci)}), "
        f"AUC {_num(test.get('auc'))}, n = {test['n']} photographs ({tp + fn} RDR, {tn + fp} NRDR)**, "
        f"at the decision threshold {_num(summary['threshold'])} chosen on validation and then frozen "
        "(the test split chose nothing).",
        "",
        _table(["test metric", "value", "95% CI", "CI method"], _metric_rows(test)),
        "",
        "Confusion matrix on test (rows: truth; columns: the model's call):",
        "",
        _table(["", "called NRDR", "called RDR"], [["NRDR", tn, fp], ["RDR", fn, tp]]),
    ]
    if operating_points:
        lines += ["", f"**Operating points** (thresholds chosen on validation, measured on test, "
                      f"beside the {_ENDPOINTS}):", "",
                  _table(["operating point", "threshold", "test sensitivity (95% CI)",
                          "test specificity (95% CI)", "meets endpoints"], _operating_rows(operating_points))]
    if calibration and calibration.get("ece") is not None:
        lines += ["", f"**Calibration on test:** expected calibration error {_num(calibration['ece'])}, "
                      f"Brier score {_num(calibration.get('brier'))}."]
    won = (f"**Winning trial:** {summary['trial']} (best validation value of the search; "
           f"validation balanced accuracy after fine-tuning {_num(summary.get('val_balanced_accuracy'))}): "
           + ", ".join(f"`{k}` = {_value(v)}" for k, v in (summary.get("params") or {}).items()) + ".")
    if settings:
        won += (f" Fine-tuned from its best checkpoint: {settings.get('epochs', '?')} epochs at learning "
                f"rate {_value(settings.get('lr', '?'))}, {settings.get('augment', '?')} augmentation.")
    lines += ["", won]
    if summary.get("ensemble"):
        lines += ["", *_ensemble_lines(summary)]
    if summary.get("run_dir"):
        lines += ["", f"Run directory: `{summary['run_dir']}`."]
    if report:
        lines += ["", f"**Model card:** [finetuned_report.html]({get_artifact_path(study, report)}) "
                      "(intended use, data, search, per-grade sensitivity, calibration, caveats)."]
    titles = {"confusion_matrix": "Confusion matrix (test)", "roc": "ROC curve (test)",
              "reliability": "Reliability diagram (test)", "history": "Fine-tuning history",
              "ensemble_confusion_matrix": "Ensemble: confusion matrix (test)", "ensemble_roc": "Ensemble: ROC curve (test)"}
    for key, title in titles.items():
        if artifacts.get(key):
            lines += ["", f"### {title}", "", f"![{title}]({get_artifact_path(study, artifacts[key])})"]
    return set_section(study, "finetune", "\n".join(lines))
