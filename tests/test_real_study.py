"""The recommended real-data study: prepare --config applies its preprocessing, training on
data prepared otherwise is refused, and its training options build a model that trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drtune import config as config_lib
from drtune.cli import main
from drtune.errors import InputError


def test_check_prepared_names_the_difference(tmp_path: Path) -> None:
    cfg = config_lib.load_config("real")
    assert (cfg.data.prepare_size, cfg.data.normalize) == (384, "graham")
    assert cfg.train.threshold == "fixed"  # 0.5, the balanced point of oversampled training
    assert cfg.model.blocks_per_stage == 2  # the deeper network measured best by 5-fold CV
    # The grade head, and a finetune stage that augments as training does: both measured better.
    assert (cfg.model.head, cfg.data.augment, cfg.finetune.augment) == ("grade", "rotate", "rotate")
    # Its grid is three seeds of that configuration, all completing (the pruner starts after
    # three trials): `finetune --best` averages them (finetune.top_k), the study's measured result.
    assert cfg.search.grid == {"train.seed": [0, 1, 2]} and cfg.search.pruner_startup_trials >= 3
    assert cfg.finetune.top_k == 3
    config_lib.check_prepared(cfg, {"size": 384, "normalize": "graham"}, tmp_path)  # matches
    with pytest.raises(InputError, match=r"prepared with --normalize none .* data.normalize = 'graham'"):
        config_lib.check_prepared(cfg, {"size": 384, "normalize": "none"}, tmp_path)
    with pytest.raises(InputError, match=r"prepared with --size 256 .* data.prepare_size = 384"):
        config_lib.check_prepared(cfg, {"size": 256, "normalize": "graham"}, tmp_path)
    # The defaults expect nothing in particular: any prepared data is accepted.
    config_lib.check_prepared(config_lib.load_config(None), {"size": 64, "normalize": "none"}, tmp_path)


def test_prepare_with_the_study_and_explicit_flags_winning(synth_root: Path, tmp_path: Path) -> None:
    assert main(["prepare", str(synth_root), "--out", str(tmp_path / "a"), "--config", "real"]) == 0
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert (meta["size"], meta["normalize"], meta["val_fraction"]) == (384, "graham", 0.1)
    assert main(["prepare", str(synth_root), "--out", str(tmp_path / "b"), "--config", "real",
                 "--size", "64", "--normalize", "none", "--val-fraction", "0.3"]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert (meta["size"], meta["normalize"], meta["val_fraction"]) == (64, "none", 0.3)
    # Without a study, prepare's own default.
    assert main(["prepare", str(synth_root), "--out", str(tmp_path / "c"), "--size", "64"]) == 0
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["val_fraction"] == 0.2


def test_training_the_study_on_other_data_is_refused(prepared: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(prepared), "--out", str(out), "--config", "real"]) == 2
    err = capsys.readouterr().err
    assert "drtune: error:" in err and "data.prepare_size = 384" in err
    assert not (out / "config.json").exists()  # refused before anything was written


@pytest.mark.slow
def test_the_study_training_options_train_and_reload(prepared: Path, tmp_path: Path) -> None:
    """AdamW, warm-up + cosine, label smoothing and flip TTA together: a run completes, resumes
    as complete, and keeps the study's fixed threshold."""
    from drtune.train import train_and_evaluate

    cfg = config_lib.load_config("real", ["data.prepare_size=0", "data.normalize=''", "model.width=4",
                                          "data.image_size=48", "train.batch_size=4",
                                          "train.steps_per_epoch=4", "train.epochs=3", "train.warmup_epochs=1"])
    result = train_and_evaluate(cfg, prepared, tmp_path / "run")
    assert result["epochs_run"] == 3 and 0.0 <= result["threshold"] <= 1.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (saved["optimizer"], saved["schedule"], saved["tta"]) == ("adamw", "cosine", "flips")
    # The grade head trained on the records' grades: its model has the grade columns too.
    import keras

    import drtune.model  # noqa: F401  (registers the grade head's layer for loading)

    assert keras.models.load_model(tmp_path / "run" / "model.keras").output.shape[-1] == 7
    assert result["threshold"] == 0.5  # train.threshold = "fixed"
    assert train_and_evaluate(cfg, prepared, tmp_path / "run")["threshold"] == result["threshold"]


@pytest.mark.slow
def test_auc_as_the_monitor_picks_the_best_auc_epoch(prepared: Path, tmp_path: Path) -> None:
    """train.monitor=val_auc: model.keras is the best-AUC epoch and it is the run's objective."""
    import csv

    from drtune.train import train_and_evaluate

    cfg = config_lib.load_config(None, ["model.width=4", "data.image_size=48", "train.batch_size=4",
                                        "train.steps_per_epoch=4", "train.epochs=4", "train.monitor=val_auc"])
    result = train_and_evaluate(cfg, prepared, tmp_path / "run")
    with (tmp_path / "run" / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    aucs = [float(r["val_auc"]) for r in rows]
    assert result["monitor"] == "val_auc" and result["objective"] == pytest.approx(max(aucs))
    assert result["best_epoch"] == aucs.index(max(aucs)) + 1  # the first epoch reaching the best
    assert result["val_auc"] == pytest.approx(max(aucs))
    assert result["val_balanced_accuracy"] == pytest.approx(float(rows[result["best_epoch"] - 1]["val_balanced_accuracy"]))
