"""One trial of a study: the epoch numbering it shares with its run folder, and why it was pruned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from conftest import study_file
from drtune.config import load_config
from drtune.metrics import read_history
from drtune.objective import PruneBeforeLastEpoch, prune_reason
from drtune.search import search
from drtune.status import status_text
from drtune.study import create_study


def _study_with_three_finished(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for last in (0.6, 0.7, 0.8):
        study.add_trial(create_trial(value=last, intermediate_values={1: 0.5, 2: last}))
    return study


def test_prune_reason_names_the_median_it_was_held_against() -> None:
    study = _study_with_three_finished(optuna.pruners.MedianPruner(n_startup_trials=1))
    trial = study.ask()
    trial.report(0.65, step=1)
    trial.report(0.55, step=2)
    assert trial.should_prune()  # best so far 0.65 < median 0.7 of the finished trials at epoch 2
    assert prune_reason(study, trial.number, 2, "val_auc") == (
        "val_auc 0.55 at epoch 2 (best so far 0.65) below the median of 3 completed trial(s) "
        "at epoch 2 (0.7); MedianPruner")
    nan = study.ask()
    nan.report(math.nan, step=1)
    assert nan.should_prune()
    assert prune_reason(study, nan.number, 1, "val_auc").startswith("val_auc is NaN at epoch 1")


def test_epochs_run_again_after_a_restart_are_not_reported_twice(recwarn: pytest.WarningsRecorder) -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    report = PruneBeforeLastEpoch(trial, epochs=10, monitor="val_auc")
    # A start abandoned at chance level after epoch 2, then the restarted run's epochs 1-3.
    for epoch, auc in [(0, 0.50), (1, 0.51), (0, 0.62), (1, 0.70), (2, 0.74)]:
        report.on_epoch_end(epoch, {"val_auc": auc})
    frozen = study.trials[0]
    assert frozen.intermediate_values == {1: 0.50, 2: 0.51, 3: 0.74}
    assert frozen.user_attrs["restarts"] == 1
    assert not [w for w in recwarn if "already reported" in str(w.message)]


def test_prune_reason_of_other_pruners_names_pruner_and_value() -> None:
    study = _study_with_three_finished(optuna.pruners.HyperbandPruner(min_resource=1, max_resource=3))
    trial = study.ask()
    trial.report(0.25, step=1)
    assert prune_reason(study, trial.number, 1, "val_balanced_accuracy") == (
        "val_balanced_accuracy 0.25 at epoch 1; pruned by HyperbandPruner")


@pytest.fixture(scope="module")
def pruned_study(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, optuna.Study]:
    """A real tiny grid: a good learning rate first (it completes: nothing to compare with yet),
    then a diverging one, which the median pruner stops at its first epoch."""
    tmp = tmp_path_factory.mktemp("objective")
    path = study_file(tmp, prepared, epochs=3, lrs="[3e-3, 1e30]")
    cfg = load_config(path)
    first = create_study(cfg, grid=True)
    for lr in (3e-3, 1e30):  # the order is fixed, not the grid sampler's draw
        first.enqueue_trial({"train.lr": lr})
    return path, search(cfg, grid=True)


@pytest.mark.slow
def test_history_best_epoch_and_study_steps_count_epochs_alike(pruned_study) -> None:
    _, study = pruned_study
    good = next(t for t in study.trials if t.params["train.lr"] == 3e-3)
    assert good.state == TrialState.COMPLETE
    run = Path(good.user_attrs["run_dir"])
    rows = read_history(run / "history.csv")
    with (run / "history.csv").open() as f:  # the file itself, not only what the reader makes of it
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2", "3"]
    assert sorted(good.intermediate_values) == [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r in rows:  # the value the study recorded at step N is history.csv's row of epoch N
        assert good.intermediate_values[int(r["epoch"])] == pytest.approx(float(r["val_balanced_accuracy"]), abs=1e-12)
    m = json.loads((run / "metrics.json").read_text())
    assert m["best_epoch"] == good.user_attrs["best_epoch"] and m["epochs_run"] == good.user_attrs["epochs_run"] == 3
    assert good.intermediate_values[m["best_epoch"]] == pytest.approx(good.value, abs=1e-12) == m["objective"]
    # seconds_per_epoch: the trial carries the run's own figure (train.seconds_per_epoch).
    assert m["seconds_per_epoch"] > 0 and good.user_attrs["seconds_per_epoch"] == round(m["seconds_per_epoch"], 3)
    # The device beside the worker: "cpu" here, the GPU's model name on a GPU worker.
    from drtune.devices import device_name

    assert good.user_attrs["gpu"] == device_name() and good.user_attrs["worker"]


@pytest.mark.slow
def test_pruned_trial_records_when_and_why(pruned_study) -> None:
    path, study = pruned_study
    bad = next(t for t in study.trials if t.params["train.lr"] == 1e30)
    assert bad.state == TrialState.PRUNED
    attrs = bad.user_attrs
    assert "diverged" not in attrs, "pruned by the pruner, not by the divergence check after training"
    at = attrs["pruned_at_epoch"]
    assert at == max(bad.intermediate_values) == attrs["epochs_run"] == 1
    assert attrs["pruned_reason"].startswith("val_balanced_accuracy is NaN at epoch 1")
    assert attrs["pruned_reason"].endswith("MedianPruner prunes such a trial")
    rows = read_history(Path(attrs["run_dir"]) / "history.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    text = status_text(load_config(path))
    assert f"trial {bad.number}, epoch 1: {attrs['pruned_reason']}" in text
