"""Command line: argparse subcommands, each a thin handler that calls one library function.

Errors become one line ``drtune: error: ...`` with exit code 2 for bad usage, configuration or
data and 1 for failures while running (docs/architecture.md). Heavy modules (TensorFlow) are imported
inside the handlers so that ``drtune --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import logging as std_logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from absl import logging

from drtune import __version__
from drtune.config import NORMALIZATIONS
from drtune.errors import DrtuneError, InputError
from drtune.runs import SPLITS, eval_dir

Handler = Callable[[argparse.Namespace], int]
DEFAULT_STUDY = "demo"  # the built-in study (package data): defaults work from any directory


# --------------------------------------------------------------------------- handlers


def cmd_synth(args: argparse.Namespace) -> int:
    from drtune.synth import make_synthetic

    summary = make_synthetic(args.out, n_train=args.n_train, n_test=args.n_test,
                             width=args.width, height=args.height, seed=args.seed)
    logging.info("wrote %d training and %d test photographs to %s",
                 summary.n_train, summary.n_test, summary.root)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from drtune.prepare import PrepareOptions, prepare, resolve_source

    source = resolve_source(args.src, args.images, args.labels, args.test_images, args.test_labels)
    size, normalize, val_fraction = args.size, args.normalize, args.val_fraction
    if args.config:
        from drtune.config import load_config

        # The study says how its data must be prepared; explicit flags still win.
        data = load_config(args.config).data
        size, normalize = size or data.prepare_size, normalize or data.normalize
        if val_fraction is None and data.val_fraction:
            val_fraction = data.val_fraction
    opts = PrepareOptions(size=size or 256,
                          val_fraction=PrepareOptions.val_fraction if val_fraction is None else val_fraction,
                          rdr_grade=args.rdr_grade, group_pattern=args.group_pattern, seed=args.seed,
                          workers=args.workers, on_error=args.on_error, normalize=normalize or "none",
                          jpeg_quality=args.jpeg_quality, overwrite=args.overwrite)
    prepare(source, args.out, opts)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from drtune.config import load_config
    from drtune.train import train_and_evaluate

    cfg = load_config(args.config, args.set or ())
    result = train_and_evaluate(cfg, args.data, args.out)
    # Runs finished before train.monitor existed have no "monitor"/"objective" keys.
    monitor = result.get("monitor", "val_balanced_accuracy")
    value = result.get("objective", result["val_balanced_accuracy"])
    print(f"best {monitor.replace('_', ' ').replace('val ', 'validation ')} {value:.3f} "
          f"(epoch {result['best_epoch']}); run in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from drtune.evaluate import evaluate_run
    from drtune.metrics import fmt_or_na

    result = evaluate_run(args.run, args.data, args.split, n_boot=args.n_boot)
    lo, hi = result["ci95"]["balanced_accuracy"] or (float("nan"), float("nan"))
    print(f"{args.split}: balanced accuracy {result['balanced_accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
          f"AUC {fmt_or_na(result['auc'])}, n={result['n']}; report in {eval_dir(args.run, args.split)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from drtune.evaluate import predict_files

    rows = predict_files(args.run, args.images, args.out)
    if args.out is None:
        import csv

        # The csv module quotes names and error messages that hold commas or quotes.
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["name", "p_rdr", "decision", "threshold", "error"])
        for r in rows:
            writer.writerow([r["name"], r["p_rdr"], r["decision"], f"{r['threshold']:.4f}", r["error"]])
    return 1 if all(r["error"] for r in rows) else 0


def cmd_gradcam(args: argparse.Namespace) -> int:
    from drtune.gradcam import run_gradcam

    if args.images and (args.data is not None or args.split is not None):
        raise InputError("give either --data/--split or IMAGE..., not both")
    summary = run_gradcam(args.run, args.out, data_dir=args.data, split=args.split or "test",
                          images=args.images, n=args.n, masks=args.masks, layer=args.layer,
                          tolerance=args.tolerance)
    shown = sum(r["png"] is not None for r in summary["images"])
    print(f"{shown} Grad-CAM image(s) ({summary['n'] - shown} unreadable); "
          f"gallery in {Path(args.out) / 'index.html'}")
    if "pointing" in summary:
        print(f"pointing game: {summary['pointing_text']}")
    return 1 if shown == 0 else 0


def _study_config(args: argparse.Namespace):  # -> Config (typed lazily: config is cheap anyway)
    """The study config of search/finetune/status/dashboard: --config, else the built-in demo."""
    from drtune.config import load_config

    path = args.config
    if path is None:
        path = DEFAULT_STUDY
        logging.info("using the built-in %s study (pass --config for another study)", path)
    extra = {"data.dir": str(args.data)} if getattr(args, "data", None) else {}
    return load_config(path, getattr(args, "set", None) or (), extra=extra)


def cmd_search(args: argparse.Namespace) -> int:
    from drtune.study import check_budget, create_study
    from drtune.workers import parse_gpus, run_workers

    check_budget(args.n_trials, args.timeout)
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be >= 1")
    gpus = parse_gpus(args.gpus)
    workers = args.workers or len(gpus) or 1
    if workers > 1 or gpus:
        # A bad config or storage fails once here, and the study (and on a new database,
        # Optuna's tables) exists before the workers start.
        create_study(_study_config(args), args.grid, args.storage, args.study)
        return run_workers(args.argv, workers, gpus)
    from drtune.search import search  # TensorFlow: only a process that trains loads it

    cfg = _study_config(args)
    search(cfg, grid=args.grid, storage=args.storage, name=args.study, n_trials=args.n_trials,
           timeout=args.timeout)
    print(f"see the trials with: drtune status{_cfg_flag(args)}   or the dashboard: drtune dashboard{_cfg_flag(args)}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from drtune.finetune import finetune_best
    from drtune.metrics import fmt_or_na

    if not args.best:
        raise InputError("finetune needs --best (fine-tuning the best completed trial is the only mode)")
    cfg = _study_config(args)
    top_k = cfg.finetune.top_k if args.top_k is None else args.top_k
    summary = finetune_best(cfg, storage=args.storage, name=args.study, data_dir=args.data, top_k=top_k)
    test = summary["test"]
    print(f"fine-tuned trial {summary['trial']}: test balanced accuracy {test['balanced_accuracy']:.3f}, "
          f"AUC {fmt_or_na(test['auc'])}, n={test['n']}; run in {summary['run_dir']}")
    ens = summary.get("ensemble") if top_k > 1 else None
    if ens:
        print(f"ensemble of trials {', '.join(map(str, ens['trials']))}: test balanced accuracy "
              f"{ens['test']['balanced_accuracy']:.3f}, AUC {fmt_or_na(ens['test']['auc'])}; run in {ens['run_dir']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from drtune.status import status_text

    print(status_text(_study_config(args), storage=args.storage, name=args.study))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from drtune.status import serve_dashboard

    serve_dashboard(_study_config(args), storage=args.storage, host=args.host, port=args.port)
    return 0


def _cfg_flag(args: argparse.Namespace) -> str:
    """The flags that find this study again, for the hints printed after a command.

    ``--set`` flags are kept (``search.storage``/``search.workdir`` may be among them); passwords
    are masked, so a hint for a password-protected database needs the password put back (or the
    URL in ``$DRTUNE_STORAGE``).
    """
    import shlex

    from drtune.study import redact

    flags = [f"--config {shlex.quote(str(args.config))}"] if args.config else []
    flags += [f"--storage {shlex.quote(redact(args.storage))}"] if args.storage else []
    flags += [f"--study {shlex.quote(args.study)}"] if args.study else []
    flags += [f"--set {shlex.quote(redact(s))}" for s in getattr(args, "set", None) or ()]
    return "".join(" " + f for f in flags)


def cmd_report(args: argparse.Namespace) -> int:
    from drtune.report import report_study, write_report

    if (args.run is None) == (args.config is None):
        raise InputError("give either a run directory RUN or --config STUDY (for its fine-tuned model)")
    if args.run is not None:
        if args.storage or args.study:
            raise InputError("--storage/--study go with --config, not with a run directory")
        card = write_report(args.run, args.out, args.data)
    else:
        card = report_study(_study_config(args), args.out, args.storage, args.study, args.data)
    t = card["test"]
    print(f"model card of {card['run']} (test n={t['n']}, balanced accuracy {t['balanced_accuracy']:.3f}): "
          f"open {Path(args.out) / 'report.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from drtune.demo import run_demo

    run_demo(args.workdir, args.config)
    return 0


# --------------------------------------------------------------------------- parser


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="make synthetic fundus photographs in IDRiD layout",
                       description="Write synthetic colour fundus photographs with ICDR grades and "
                                   "lesion masks in IDRiD 'Disease Grading' layout.")
    p.add_argument("out", type=Path, help="output folder (must not exist)")
    p.add_argument("--n-train", type=int, default=48, help="training photographs (default 48)")
    p.add_argument("--n-test", type=int, default=12, help="test photographs (default 12)")
    p.add_argument("--width", type=int, default=640, help="image width (default 640; IDRiD: 4288)")
    p.add_argument("--height", type=int, default=426, help="image height (default 426; IDRiD: 2848)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(handler=cmd_synth)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="fundus photographs + grades -> TFRecord shards",
        description="Detect the retina field, crop, resize and split fundus photographs, and write "
                    "TFRecord shards plus meta.json. SRC is an IDRiD folder ('B. Disease Grading' "
                    "layout); for other layouts use --images and --labels. --test-images and "
                    "--test-labels alone make a test-only folder (external validation with "
                    "'drtune evaluate RUN --data OUT').")
    p.add_argument("src", type=Path, nargs="?", help="IDRiD root or 'B. Disease Grading' folder")
    p.add_argument("--out", type=Path, required=True,
                   help="output data directory (must not exist, and must not hold the input)")
    p.add_argument("--images", type=Path, help="folder of training photographs")
    p.add_argument("--labels", type=Path, help="CSV with 'Image name,Retinopathy grade' columns")
    p.add_argument("--test-images", type=Path, help="folder of test photographs")
    p.add_argument("--test-labels", type=Path, help="CSV of the test photographs")
    p.add_argument("--config", help="study file or built-in study name: prepare the way it expects "
                                    "(its data.prepare_size, data.normalize and data.val_fraction; "
                                    "explicit flags win)")
    p.add_argument("--size", type=int, default=None,
                   help="output side in pixels (default: the study's data.prepare_size, else 256)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of training images held out for validation (default: the study's "
                        "data.val_fraction, else 0.2)")
    p.add_argument("--rdr-grade", type=int, default=2,
                   help="lowest ICDR grade counted as referable (default 2)")
    p.add_argument("--group-pattern", help="regex whose first group keeps related images in one "
                                           r"split, e.g. '(Patient\d+)_[LR]'")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="worker threads (default: all cores)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="on bad input: report all problems and write nothing (fail, default), "
                        "or leave bad items out and list them in meta.json (skip)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default=None,
                   help="optional colour normalisation (graham: local-average subtraction; "
                        "default: the study's data.normalize, else none)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of crops (default 95)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output of 'drtune prepare' (a folder with meta.json)")
    p.set_defaults(handler=cmd_prepare)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model on prepared data",
                       description="Train the ResNetV2 on a prepared data directory. Resumes when OUT "
                                   "holds an unfinished run with the same config.")
    p.add_argument("--data", type=Path, help="prepared data directory (default: data.dir of the config)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--config", type=Path,
                   help="study/config TOML or a built-in study's name, e.g. demo (default: built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.set_defaults(handler=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run on a split",
                       description="Metrics with 95% CIs, confusion matrix and ROC of RUN on a "
                                   "split, at the threshold frozen on validation; writes RUN/eval-SPLIT/.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--data", type=Path, help="data directory (default: the one the run trained on)")
    p.add_argument("--split", default="test", choices=SPLITS, help="default: test")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.set_defaults(handler=cmd_evaluate)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="P(RDR) for raw photographs",
                       description="Preprocess raw fundus photographs as 'prepare' does and predict "
                                   "P(RDR) and the decision at the run's threshold.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("images", type=Path, nargs="+", help="photographs (JPEG, PNG, TIFF, BMP)")
    p.add_argument("--out", type=Path, help="CSV file (default: print to stdout)")
    p.set_defaults(handler=cmd_predict)


def _add_gradcam(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gradcam", help="Grad-CAM heatmaps of a run as a browsable gallery",
        description="Draw Grad-CAM maps of the evidence for RDR over photographs of a prepared split "
                    "(--data/--split; N images, errors first) or over raw photographs (IMAGE...), "
                    "and write PNGs, an index.html gallery grouped into true/false positives/"
                    "negatives, and summary.json to OUT.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("images", type=Path, nargs="*", metavar="IMAGE",
                   help="raw photographs, preprocessed as 'prepare' does (instead of a split)")
    p.add_argument("--data", type=Path, help="data directory (default: the one the run trained on)")
    p.add_argument("--split", choices=SPLITS, help="split to draw from (default: test)")
    p.add_argument("--n", type=int, default=16, help="images taken from the split (default 16)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--masks", type=Path, metavar="SYNTH_ROOT",
                   help="a 'drtune synth' folder: outline its lesions and score the pointing game")
    p.add_argument("--layer", default="features",
                   help="feature map to explain (default: features, the last; e.g. stage2_block1_add)")
    p.add_argument("--tolerance", type=int, metavar="PX",
                   help="pointing game: lesion dilation in input pixels (default: input size / 32)")
    p.set_defaults(handler=cmd_gradcam)


def _study_args(p: argparse.ArgumentParser, data: bool = True, overrides: bool = True) -> None:
    p.add_argument("--config", type=Path,
                   help="study TOML, or a built-in study: demo, idrid_grid, idrid, real (default: demo)")
    p.add_argument("--storage", help="SQLAlchemy URL (default: $DRTUNE_STORAGE, else the study's "
                                     "search.storage, else sqlite:///<search.workdir>/optuna.db)")
    p.add_argument("--study", help="study name (default: the study's)")
    if data:
        p.add_argument("--data", type=Path, help="prepared data directory (default: the study's data.dir)")
    if overrides:
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set search.pruner=none (repeatable)")


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run or resume an Optuna study",
                       description="Run an Optuna study: each trial trains a model and reports "
                                   "validation balanced accuracy per epoch, so bad trials are pruned. "
                                   "Re-running the same command resumes the study.")
    p.add_argument("--grid", action="store_true", help="grid search over [search.grid]; stops when done")
    _study_args(p)
    p.add_argument("--n-trials", type=int, help="trials to run now (default: the grid, or search.n_trials)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--workers", type=int, help="start N local worker processes on the study "
                                               "(default 1; with --gpus, one per GPU)")
    p.add_argument("--gpus", help="comma-separated GPU indices, dealt to the workers through "
                                  "CUDA_VISIBLE_DEVICES, e.g. 0,1")
    p.set_defaults(handler=cmd_search)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="retrain the best trial gently and test it",
                       description="Warm-start the best COMPLETE trial's model and train on with the "
                                   "study's [finetune] settings (lr 1e-5, strong augmentation, 50 "
                                   "epochs by default), then evaluate on the test split.")
    p.add_argument("--best", action="store_true", help="fine-tune the best completed trial")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="also fine-tune the next K-1 completed trials and test the ensemble that averages "
                        "the K fine-tuned models (a run in STUDY/finetune-topK; default: the study's "
                        "finetune.top_k, else 1: no ensemble)")
    _study_args(p)
    p.set_defaults(handler=cmd_finetune)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="table of a study's trials",
                       description="Trials (number, state, params, value, epochs, duration), the best "
                                   "trial and the finetune result of a study.")
    _study_args(p, data=False)
    p.set_defaults(handler=cmd_status)


def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard for the study storage",
                       description="Serve optuna-dashboard (with the trials' artifacts) on the study "
                                   "storage. It has no authentication: keep the default host.")
    _study_args(p, data=False)
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="default: 8080")
    p.set_defaults(handler=cmd_dashboard)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="model card of a run or of a study's fine-tuned model",
        description="Write OUT/report.html (self-contained model card: test metrics with 95%% CIs, "
                    "operating points beside the IDx-DR endpoints, per-grade sensitivity, calibration, "
                    "data, training, caveats) and OUT/report.json. Evaluates the run on val and test "
                    "first when needed.")
    p.add_argument("run", type=Path, nargs="?", help="run directory (or --config for a study's fine-tuned model)")
    _study_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(handler=cmd_report)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on synthetic data",
                       description="synth -> prepare -> grid search (the built-in demo study) -> finetune "
                                   "--best -> test report, in a few minutes on a CPU. Re-running "
                                   "reuses finished steps.")
    p.add_argument("--workdir", type=Path, default=Path("demo-work"), help="default: demo-work")
    p.add_argument("--config", type=Path, help="study file or built-in study name (default: demo)")
    p.set_defaults(handler=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``drtune`` parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="drtune",
        description="Hyperparameter search for referable diabetic retinopathy detection.")
    parser.add_argument("--version", action="version", version=f"drtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_synth, _add_prepare, _add_train, _add_evaluate, _add_predict, _add_gradcam, _add_search,
                _add_finetune, _add_status, _add_dashboard, _add_report, _add_demo):
        add(sub)
    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """absl logging to stderr with a short, human-readable format."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter
    from absl import flags

    # absl warns "Logging before flag parsing" unless its flags count as parsed; drtune uses
    # argparse, so there are no absl flags to parse.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    logging.set_verbosity(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``drtune`` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `gradcam RUN --out DIR a.jpg b.jpg`: argparse cannot put positionals after an option
        # into an optional (nargs="*") list, so take them here; anything else is an error.
        if args.command == "gradcam" and not any(e.startswith("-") for e in extra):
            args.images = list(args.images) + [Path(e) for e in extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for worker processes
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args))
    except DrtuneError as exc:
        print(f"drtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("drtune: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
