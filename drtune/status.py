"""``drtune status`` (a table of a study's trials) and ``drtune dashboard`` (optuna-dashboard).

Neither imports TensorFlow, so both answer in a second while workers train elsewhere.
"""

from __future__ import annotations

from typing import Any

import optuna
from absl import logging
from optuna.artifacts import FileSystemArtifactStore

from drtune.config import Config
from drtune.errors import DrtuneError
from drtune.study import artifact_dir, load_study, open_storage, redact, storage_url


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec) if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"
    return str(value)


def status_text(cfg: Config, storage: str | None = None, name: str | None = None) -> str:
    """The trials of a study as a text table, then the best trial and the finetune result.

    Trials of dead workers are failed (and queued for retry) first, as a worker would on its
    next trial: without that they would show as RUNNING until some worker starts again.
    """
    study = load_study(cfg, storage, name)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    header = ["#", "state", *keys, "value", "epochs", "duration"]
    rows = []
    for t in trials:
        duration = t.duration.total_seconds() if t.duration else None
        rows.append([str(t.number), t.state.name, *(_fmt(t.params.get(k), "g") for k in keys),
                     _fmt(t.value), _fmt(t.user_attrs.get("epochs_run")),
                     "-" if duration is None else f"{duration:.0f}s"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"study {study.study_name!r} in {redact(storage_url(cfg, storage))}: {len(trials)} trial(s)", ""]
    for r in [header, *rows]:
        lines.append("  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines += _pruned_lines(trials)
    try:
        best = study.best_trial
        lines += ["", f"best: trial {best.number}, validation balanced accuracy {best.value:.4f}, "
                      + " ".join(f"{k}={v}" for k, v in best.params.items()),
                  f"      run directory {best.user_attrs.get('run_dir', '-')}"]
    except ValueError:
        lines += ["", "best: no trial has completed yet"]
    ft = study.user_attrs.get("finetune")
    if ft:
        lines += _test_lines(f"finetune of trial {ft['trial']}", ft)
        ens = ft.get("ensemble")
        if ens:  # drtune finetune --best --top-k K
            lines += _test_lines(f"ensemble of trials {', '.join(map(str, ens['trials']))}", ens)
    else:
        lines.append("finetune: not run yet ('drtune finetune --best' with the same --config/--storage)")
    return "\n".join(lines)


def _test_lines(what: str, result: dict[str, Any]) -> list[str]:
    """A test result recorded by finetune (the fine-tuned model's or the ensemble's) and its run."""
    test = result["test"]
    ci = test.get("ci95", {}).get("balanced_accuracy")
    ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    return [f"{what}: test balanced accuracy {test['balanced_accuracy']:.4f}{ci_text}, AUC "
            f"{_fmt(test.get('auc'), '.3f')}, sensitivity {_fmt(test.get('sensitivity'), '.3f')}, "
            f"specificity {_fmt(test.get('specificity'), '.3f')}, n={test['n']}",
            f"      run directory {result['run_dir']}"]


def _pruned_lines(trials: list[Any]) -> list[str]:
    """Why each pruned trial was stopped (its ``pruned_reason``; epochs counted from 1)."""
    reasons = [f"  trial {t.number}, epoch {t.user_attrs.get('pruned_at_epoch', '?')}: {t.user_attrs['pruned_reason']}"
               for t in trials if t.state.name == "PRUNED" and t.user_attrs.get("pruned_reason")]
    return ["", "pruned:", *reasons] if reasons else []


def serve_dashboard(cfg: Config, storage: str | None = None, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard on the study storage with its artifact store; blocks until stopped.

    The dashboard has no authentication, hence 127.0.0.1 by default.
    """
    # optuna-dashboard pulls in scikit-learn and SciPy (~2 s): only the dashboard pays for it.
    from optuna_dashboard import run_server

    store = open_storage(cfg, storage, create=False)
    artifacts = artifact_dir(cfg)
    artifacts.mkdir(parents=True, exist_ok=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"optuna-dashboard for {redact(storage_url(cfg, storage))} at http://{shown}:{port}/ "
          f"(artifacts in {artifacts}); Ctrl-C to stop", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("the dashboard has no authentication and is reachable on %s", host)
    try:
        run_server(store, host=host, port=port, artifact_store=FileSystemArtifactStore(str(artifacts)))
    except OSError as exc:
        raise DrtuneError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); "
                          "pass another --port") from None
