#!/usr/bin/env python3
"""The real-data yardstick: patient-grouped, label-stratified K-fold cross-validation.

Every fold runs the code a user runs: ``prepare`` (the fold's training patients as the
training images, with a patient-grouped validation split carved from them, and the fold's
held-out patients as the test split), then ``train_and_evaluate`` with the study's defaults
(+ the study's ``[finetune]`` stage, warm-started from the best model, unless ``--no-finetune``),
then ``evaluate`` on the held-out fold at the threshold frozen on validation. Nothing is tuned
on a held-out fold: it is only ever predicted once, by the model of the fold that left it out.

Prints one line per fold, the pooled out-of-fold result with 95% bootstrap CIs and the share
called RDR per ICDR grade (split by macular-edema risk where the CSV has it); the last line is
``cv_auc=... cv_balanced_accuracy=... minutes=...``.

    python scripts/bench_real.py --config studies/real.toml [--set train.epochs=40 ...]
    python scripts/bench_real.py --folds 2 --quick            # smoke run (a few minutes)

Defaults read ``../shared/fundus-train`` (``labels.csv`` + ``images/``), grouped by
``(Patient\\d+)_[LR]``. Fold data folders are cached under ``--workdir`` by their preparation
settings, so experiments that only change training settings reuse them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drtune import config as config_lib  # noqa: E402
from drtune import labels as labels_lib  # noqa: E402
from drtune import metrics  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "fundus-train"
DEFAULT_GROUPS = r"(Patient\d+)_[LR]"


def read_source(images: Path, labels_csv: Path, limit: int = 0, seed: int = 0) -> list[tuple[str, int, Path]]:
    """(name, grade, path) of every labelled photograph; ``limit`` keeps whole patients' worth."""
    rows, problems = labels_lib.read_labels(labels_csv)
    found, img_problems = labels_lib.list_images(images)
    pairs, match_problems = labels_lib.match(rows, found, labels_csv, images)
    problems = problems + img_problems + match_problems
    if problems:
        raise SystemExit(f"bench_real: {len(problems)} problem(s) in {labels_csv}: {problems[0]}")
    items = [(row.name, row.grade, path) for row, path in pairs]
    if limit and limit < len(items):
        # A stratified subset for smoke runs: the same share of each grade, fixed by the seed.
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(items))
        by_label: dict[int, list[int]] = {}
        for i in order:
            by_label.setdefault(int(items[i][1] >= 2), []).append(int(i))
        keep: list[int] = []
        for idx in by_label.values():
            keep += idx[: max(2, round(limit * len(idx) / len(items)))]
        items = [items[i] for i in sorted(keep)]
    return items


def make_folds(names: Sequence[str], y: Sequence[int], group_pattern: str | None, k: int,
               seed: int) -> list[np.ndarray]:
    """Held-out indices of each of ``k`` folds: patients never straddle folds, labels stratified.

    scikit-learn's StratifiedGroupKFold does the work; every index is held out exactly once.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    pattern = labels_lib.compile_group_pattern(group_pattern)
    groups = [labels_lib.group_key(n, pattern) for n in names]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(y)), np.asarray(y), groups)]


def _write_labels(path: Path, items: Sequence[tuple[str, int, Path]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image name", "Retinopathy grade"])
        w.writerows([(n, g) for n, g, _ in items])


def _link_images(folder: Path, items: Sequence[tuple[str, int, Path]]) -> None:
    # Symlinks: a fold's image folder is a view of the source, not a copy of it.
    folder.mkdir(parents=True, exist_ok=True)
    for _, _, path in items:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path.resolve())


def prepare_fold(out: Path, train_items: Sequence[tuple[str, int, Path]],
                 test_items: Sequence[tuple[str, int, Path]], size: int, normalize: str,
                 group_pattern: str | None, seed: int, val_fraction: float) -> Path:
    """``drtune prepare`` of one fold (cached: an existing folder is reused)."""
    from drtune.prepare import PrepareOptions, Source, prepare

    data = out / "data"
    if (data / "meta.json").is_file():
        return data
    src = out / "src"
    _link_images(src / "train", train_items)
    _link_images(src / "test", test_items)
    _write_labels(src / "train.csv", train_items)
    _write_labels(src / "test.csv", test_items)
    prepare(Source(src / "train", src / "train.csv", src / "test", src / "test.csv",
                   f"bench_real fold of {len(train_items) + len(test_items)} photographs"),
            data, PrepareOptions(size=size, normalize=normalize, group_pattern=group_pattern, seed=seed,
                                 val_fraction=val_fraction))
    return data


def run_fold(cfg: config_lib.Config, data: Path, run_dir: Path, finetune: bool) -> tuple[Path, dict[str, Any]]:
    """Train (and fine-tune) one fold; evaluate the final model on the held-out test split."""
    import keras

    from drtune.evaluate import evaluate_run
    from drtune.train import train_and_evaluate

    final = run_dir / "finetune" if finetune else run_dir
    if (final / "eval-test" / "metrics.json").is_file():
        # A finished fold (e.g. run by another bench_real process with --only-folds) is reused,
        # so folds run in parallel can be pooled by one last invocation over all of them.
        return final, json.loads((final / "metrics.json").read_text())
    keras.backend.clear_session()
    result = train_and_evaluate(cfg, data, run_dir)
    final = run_dir
    if finetune:
        keras.backend.clear_session()
        final = run_dir / "finetune"
        result = train_and_evaluate(config_lib.finetune_config(cfg), data, final,
                                    init_model=run_dir / "model.keras")
    evaluate_run(final, data, "test", n_boot=200)
    return final, result


def run_fold_search(cfg: config_lib.Config, data: Path, run_dir: Path, top_k: int) -> tuple[Path, dict[str, Any]]:
    """The study as a user runs it on one fold: ``drtune search --grid`` (its own SQLite file in
    the fold's folder), then ``drtune finetune --best --top-k K``; the final model is the
    fine-tuned best trial, or the ensemble of the K best. Its test split is the held-out fold."""
    from drtune.finetune import finetune_best
    from drtune.search import search

    marker = run_dir / "final.txt"  # written last: a fold with it is finished and reused
    if marker.is_file():
        final = Path(marker.read_text().strip())
        return final, json.loads((final / "metrics.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    # Galleries are for people; the yardstick needs only the predictions.
    cfg = config_lib.replace(cfg, **{"search.workdir": str(run_dir), "finetune.gradcam": 0,
                                     "search.storage": f"sqlite:///{run_dir / 'optuna.db'}"})
    search(cfg, data, grid=True)
    summary = finetune_best(cfg, data_dir=data, top_k=top_k)
    final = Path(summary.get("ensemble", summary)["run_dir"])
    marker.write_text(str(final))
    return final, json.loads((final / "metrics.json").read_text())


def search_facts(fold_dir: Path, final: Path) -> str:
    """What a fold's search did: its trials by state and the models in the final one."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{fold_dir / 'optuna.db'}")
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
    ensemble = final / "ensemble.json"
    models = len(json.loads(ensemble.read_text())["members"]) if ensemble.is_file() else 1
    return f"trials: {counts}; final: {models} fine-tuned model{'s' if models > 1 else ''}"


def _read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return ([r["name"] for r in rows], np.array([int(r["label"]) for r in rows]),
            np.array([float(r["p_rdr"]) for r in rows]))


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _f(v: float | None) -> str:
    """A metric that may be undefined (None: e.g. sensitivity of a fold without RDR)."""
    return "n/a" if v is None else f"{v:.3f}"


def summarise(y: np.ndarray, p: np.ndarray, called: np.ndarray, n_boot: int = 2000) -> dict[str, Any]:
    """Pooled out-of-fold metrics: AUC from the scores, the rest from each fold's decisions.

    The decisions were made at each fold's own validation-frozen threshold, so they are pooled
    as 0/1 "scores" at threshold 0.5; AUC pools the raw probabilities (the usual pooled
    out-of-fold ROC, which mixes the folds' calibrations and so slightly understates a fold).
    """
    at_threshold = metrics.report(y, called.astype(float), 0.5, n_boot=n_boot)
    ranked = metrics.report(y, p, 0.5, n_boot=n_boot)
    out = {k: at_threshold[k] for k in ("balanced_accuracy", "sensitivity", "specificity", "accuracy",
                                        "confusion_matrix", "n")}
    out["auc"] = ranked["auc"]
    out["ci95"] = {k: at_threshold["ci95"][k] for k in ("balanced_accuracy", "sensitivity", "specificity")}
    out["ci95"]["auc"] = ranked["ci95"]["auc"]
    return out


def edema_risk(labels_csv: Path) -> dict[str, int]:
    """Image name -> the CSV's "Risk of macular edema" (rows without one are left out)."""
    rows, _ = labels_lib.read_labels(labels_csv)
    return {row.name: row.edema for row in rows if row.edema is not None}


def by_grade(grades: np.ndarray, called: np.ndarray, edema: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Where the misses are: ``metrics.per_grade`` of the pooled decisions (each made at its
    fold's threshold), each row tagged ``edema_risk`` "any"; with ``edema`` (-1: unknown), a
    grade that has eyes of both macular-edema risk 0 and 1-2 gets a row for each side too.

    Pooled AUC says how well the study ranks; this says which eyes it misses: moderate DR
    without maculopathy (microaneurysms and haemorrhages only) is harder than exudates.
    """
    def rows(g: np.ndarray, risk: str) -> list[dict[str, Any]]:
        return [{**r, "edema_risk": risk} for r in metrics.per_grade(g, called.astype(float), 0.5)]

    out = rows(grades, "any")
    if edema is not None:
        sides = [rows(np.where(mask, grades, -1), risk) for risk, mask in (("0", edema == 0), ("1-2", edema > 0))]
        both = {r["grade"] for r in sides[0]} & {r["grade"] for r in sides[1]}  # one side says nothing new
        out += [r for side in sides for r in side if r["grade"] in both]
    return sorted(out, key=lambda r: r["grade"])  # stable: "any" first, then risk 0, then 1-2


def _grade_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        text = f"{r['called_rdr']}/{r['n']} = {r['share']:.2f} ({_ci(r['ci95'])})"
        if r["edema_risk"] == "any":
            lines.append(f"  grade {r['grade']}: called RDR {text}")
        else:
            lines[-1] += f"; macular edema risk {r['edema_risk']}: {text}"
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_SOURCE / "images")
    ap.add_argument("--labels", type=Path, default=DEFAULT_SOURCE / "labels.csv")
    ap.add_argument("--config", default=None, help="study file or built-in study name (default: the config defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--only-folds", default="", help="run only these folds, e.g. 0,1 (screening); "
                    "the pooled figures then cover those folds only")
    ap.add_argument("--group-pattern", default=DEFAULT_GROUPS)
    ap.add_argument("--size", type=int, default=0, help="prepare size (default: the study's data.prepare_size or 256)")
    ap.add_argument("--normalize", default="", help="prepare normalisation (default: the study's)")
    ap.add_argument("--seed", type=int, default=0, help="fold assignment and validation split seed")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="share of each fold's training "
                    "patients held out for validation (default: the study's data.val_fraction, else 0.2)")
    ap.add_argument("--limit", type=int, default=0, help="use a stratified subset of this many photographs")
    ap.add_argument("--quick", action="store_true", help="smoke variant: few epochs, small images")
    ap.add_argument("--no-finetune", action="store_true", help="skip the study's [finetune] stage")
    ap.add_argument("--search", action="store_true", help="per fold, run the study's grid search and "
                    "finetune --best (as a user would) instead of training the study's defaults once")
    ap.add_argument("--top-k", type=int, default=0, help="with --search: finetune --best --top-k K "
                    "(the ensemble of the K best trials; default: the study's finetune.top_k)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/drtune-bench-real"))
    ap.add_argument("--tag", default="", help="name of this experiment's run folder (default: from the settings)")
    args = ap.parse_args(argv)
    if args.folds < 2:
        ap.error("--folds must be >= 2")
    if args.top_k < 0 or (args.top_k > 1 and not args.search):
        ap.error("--top-k must be >= 1, and above 1 only with --search")

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    overrides = list(args.overrides)
    if args.quick:
        overrides = ["train.epochs=3", "finetune.epochs=1", "data.image_size=96", "model.width=8"] + overrides
    cfg = config_lib.load_config(args.config, overrides)
    top_k = args.top_k or cfg.finetune.top_k  # as `finetune --best` takes it: --top-k, else the study's
    size = args.size or cfg.data.prepare_size or 256
    normalize = args.normalize or cfg.data.normalize or "none"
    from drtune.prepare import PrepareOptions

    default_val = PrepareOptions.val_fraction  # prepare's own default, as `drtune prepare` takes it
    val_fraction = args.val_fraction or cfg.data.val_fraction or default_val
    finetune = not args.no_finetune and cfg.finetune.epochs > 0

    items = read_source(args.images, args.labels, args.limit, args.seed)
    names = [n for n, _, _ in items]
    grades = np.array([g for _, g, _ in items])
    y = (grades >= 2).astype(int)
    folds = make_folds(names, y.tolist(), args.group_pattern, args.folds, args.seed)
    data_key = f"data-n{len(items)}-k{args.folds}-s{args.seed}-{size}px-{normalize}" \
        + (f"-val{val_fraction:g}" if val_fraction != default_val else "")  # as cached before the option
    # One run folder per experiment: the overrides name it (slashes would make sub-folders).
    tag = args.tag or "run-" + ("-".join(o.replace("=", "").replace("/", "_") for o in overrides) or "defaults") \
        + (f"-search-top{top_k}" if args.search else "")
    print(f"bench_real: {len(items)} photographs ({int(y.sum())} RDR), {args.folds} folds by "
          f"{args.group_pattern!r}; config {args.config or 'defaults'} {' '.join(overrides)}; "
          f"prepared at {size}px, normalize={normalize}, validation {val_fraction:g} of each fold's training "
          "patients; "
          + (f"grid search + finetune --best --top-k {top_k}" if args.search
             else f"finetune={'yes' if finetune else 'no'}"), flush=True)

    t_start = time.monotonic()
    oof_p = np.full(len(items), np.nan)
    oof_called = np.zeros(len(items), bool)
    index = {n: i for i, n in enumerate(names)}
    fold_ids = [int(k) for k in args.only_folds.split(",")] if args.only_folds else range(args.folds)
    for k in fold_ids:
        test_idx = set(folds[k].tolist())
        train_items = [it for i, it in enumerate(items) if i not in test_idx]
        test_items = [items[i] for i in sorted(test_idx)]
        t0 = time.monotonic()
        data = prepare_fold(args.workdir / data_key / f"fold-{k}", train_items, test_items, size, normalize,
                            args.group_pattern, args.seed, val_fraction)
        t_prep = time.monotonic() - t0
        if args.search:
            final, result = run_fold_search(cfg, data, args.workdir / tag / f"fold-{k}", top_k)
        else:
            final, result = run_fold(cfg, data, args.workdir / tag / f"fold-{k}", finetune)
        fold_names, fold_y, fold_p = _read_predictions(final / "eval-test" / "predictions.csv")
        threshold = float(json.loads((final / "metrics.json").read_text())["threshold"])
        m = json.loads((final / "eval-test" / "metrics.json").read_text())
        for n, p in zip(fold_names, fold_p):
            oof_p[index[n]] = p
            oof_called[index[n]] = p >= threshold
        if args.search:
            how = search_facts(args.workdir / tag / f"fold-{k}", final)
        else:
            epochs = json.loads((args.workdir / tag / f"fold-{k}" / "metrics.json").read_text())["epochs_run"]
            with (final / "history.csv").open(newline="") as f:
                train_acc = float(list(csv.DictReader(f))[-1]["accuracy"])  # under- or over-fitting?
            how = (f"train acc {train_acc:.3f}  epochs {epochs}"
                   f"{'+' + str(result.get('epochs_run', '')) if finetune else ''}")
        ci = m.get("ci95", {})
        print(f"fold {k}: n={m['n']} AUC {_f(m['auc'])} ({_ci(ci.get('auc'))})  "
              f"bal.acc {_f(m['balanced_accuracy'])} ({_ci(ci.get('balanced_accuracy'))})  "
              f"sens {_f(m['sensitivity'])}  spec {_f(m['specificity'])}  "
              f"thr {threshold:.3f}  val bal.acc {_f(result['val']['balanced_accuracy'])}  "
              f"val AUC {_f(result['val']['auc'])}  {how}  "
              f"{(time.monotonic() - t0) / 60:.1f} min (prepare {t_prep:.0f}s)", flush=True)

    done = ~np.isnan(oof_p)
    minutes = (time.monotonic() - t_start) / 60
    s = summarise(y[done], oof_p[done], oof_called[done])
    risk = edema_risk(args.labels)
    edema = np.array([risk.get(n, -1) for n in names]) if risk else None
    s["by_grade"] = by_grade(grades[done], oof_called[done], edema[done] if edema is not None else None)
    ci = s["ci95"]
    print(f"pooled out-of-fold (n={s['n']}): AUC {s['auc']:.3f} ({_ci(ci['auc'])})  "
          f"bal.acc {s['balanced_accuracy']:.3f} ({_ci(ci['balanced_accuracy'])})  "
          f"sens {s['sensitivity']:.3f} ({_ci(ci['sensitivity'])})  "
          f"spec {s['specificity']:.3f} ({_ci(ci['specificity'])})  cm {s['confusion_matrix']}")
    print("per grade, pooled out-of-fold:", *_grade_lines(s["by_grade"]), sep="\n")
    (args.workdir / tag).mkdir(parents=True, exist_ok=True)
    (args.workdir / tag / "cv.json").write_text(json.dumps({"overrides": overrides, "config": args.config,
                                                            "search": args.search, "top_k": top_k,
                                                            "size": size, "normalize": normalize,
                                                            "minutes": minutes, **s}, indent=2, default=float))
    print(f"cv_auc={s['auc']:.4f} cv_balanced_accuracy={s['balanced_accuracy']:.4f} minutes={minutes:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
