"""Ensembles of runs (drtune.ensemble) and ``finetune --best --top-k``: the ensemble run predicts
the mean of its members' TTA probabilities, freezes its threshold on validation, and evaluate,
predict and gradcam all see the same P(RDR); finetune records it and shows both Grad-CAM
galleries on the same photographs."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta

from conftest import study_file
from drtune import data, ensemble, gradcam, metrics
from drtune.cli import main
from drtune.config import load_config
from drtune.errors import InputError
from drtune.evaluate import evaluate_run, load_run, predict_files, predictor
from drtune.search import search
from drtune.study import storage_url

TINY = ["model.width=4", "data.image_size=48", "train.batch_size=4", "train.steps_per_epoch=4", "train.epochs=2"]


@pytest.fixture(scope="module")
def flips_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny run, with flip TTA and another seed, so that members differ in both."""
    from drtune.train import train_and_evaluate

    out = tmp_path_factory.mktemp("runs") / "flips-run"
    train_and_evaluate(load_config(None, [*TINY, "train.tta=flips", "train.seed=7"]), prepared, out)
    return out


@pytest.fixture(scope="module")
def ens(run: Path, flips_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensembles") / "top2"
    ensemble.write_run(out, {"plain": run, "flips": flips_run})
    return out


def _split_images(prepared: Path, split: str) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in data.eval_dataset(prepared, split, 8, image_size=48)])


@pytest.mark.slow
def test_ensemble_is_the_mean_of_its_members_with_their_tta(run, flips_run, ens, prepared) -> None:
    images = _split_images(prepared, "test")
    members = [predictor(load_run(r)[0], r).predict(images, verbose=0) for r in (run, flips_run)]
    model, info, _ = load_run(ens)
    got = predictor(model, ens).predict(images, verbose=0)
    np.testing.assert_allclose(got, np.mean(members, axis=0), atol=1e-5)
    assert not np.allclose(members[0], members[1], atol=1e-3)  # two different members, both count
    # The views are inside the model: the run's config must not ask evaluate for them again.
    assert json.loads((ens / "config.json").read_text())["train"]["tta"] == "none"
    described = json.loads((ens / ensemble.ENSEMBLE_JSON).read_text())["members"]
    assert [(m["label"], m["tta"]) for m in described] == [("plain", "none"), ("flips", "flips")]
    assert [m.name for m in ensemble.member_models(model)] == ["member_flips", "member_plain"]
    assert info == json.loads((run / "data.json").read_text())


@pytest.mark.slow
def test_threshold_is_frozen_on_the_ensembles_validation_predictions(ens, prepared) -> None:
    model, _, frozen = load_run(ens)
    y_val = data.split_labels(prepared, "val")
    p_val = model.predict(_split_images(prepared, "val"), verbose=0)[:, 1]
    assert frozen["threshold"] == pytest.approx(metrics.choose_threshold(y_val, p_val, "balanced_accuracy"))
    assert frozen["val"]["n"] == len(y_val) and frozen["val"]["threshold"] == frozen["threshold"]
    assert frozen["val"]["confusion_matrix"] == metrics.binary_metrics(y_val, p_val, frozen["threshold"])[
        "confusion_matrix"]
    assert not list(ens.parent.glob(".top2.tmp-*"))  # written through a temporary folder


@pytest.mark.slow
def test_evaluate_predict_and_gradcam_agree_on_an_ensemble(ens, run, flips_run, prepared, synth_root,
                                                          tmp_path) -> None:
    evaluate_run(ens, split="test", n_boot=10)
    with (ens / "eval-test" / "predictions.csv").open() as f:
        evaluated = {r["name"]: float(r["p_rdr"]) for r in csv.DictReader(f)}
    photos = sorted((synth_root / "1. Original Images" / "b. Testing Set").glob("*.jpg"))[:3]
    for row in predict_files(ens, photos):
        assert row["p_rdr"] == pytest.approx(evaluated[row["name"]], abs=1e-4)
    summary = gradcam.run_gradcam(ens, tmp_path / "gallery", split="test", n=4)
    assert summary["ensemble"] == ["member_flips", "member_plain"]
    assert "mean of the members' Grad-CAM maps" in (tmp_path / "gallery" / "index.html").read_text()
    assert len(summary["images"]) == 4
    for r in summary["images"]:
        assert r["p_rdr"] == pytest.approx(evaluated[r["name"]], abs=1e-5)
    # The map of an ensemble is the mean of its members' maps, rescaled to its own maximum.
    images = _split_images(prepared, "test")[:3]
    maps = np.mean([gradcam.heatmaps(load_run(r)[0], images) for r in (run, flips_run)], axis=0)
    peak = maps.max(axis=(1, 2), keepdims=True)
    want = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)
    np.testing.assert_allclose(gradcam.heatmaps(load_run(ens)[0], images), want, atol=1e-5)


@pytest.mark.slow
def test_members_prepared_differently_are_refused(run, flips_run, tmp_path) -> None:
    other = tmp_path / "graham-run"
    shutil.copytree(run, other)
    info = json.loads((other / "data.json").read_text())
    (other / "data.json").write_text(json.dumps({**info, "normalize": "graham"}))
    with pytest.raises(InputError, match="trial_0001 and trial_0004 were trained on data prepared "
                                         "differently: normalize=none vs graham"):
        ensemble.write_run(tmp_path / "ens", {"trial_0001": flips_run, "trial_0004": other})
    assert not (tmp_path / "ens").exists()


# --------------------------------------------------------------------------- finetune --top-k


@pytest.fixture(scope="module")
def two_trial_study(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grid of two learning rates, both COMPLETE: no pruner to stop the second, and heartbeats
    slow enough that a busy machine's pauses do not count as dead workers."""
    path = study_file(tmp_path_factory.mktemp("topk"), prepared, lrs="[3e-3, 2e-3]")
    text = path.read_text().replace('pruner = "median"', 'pruner = "none"')
    path.write_text(text.replace("heartbeat_interval = 1\ngrace_period = 2", "heartbeat_interval = 60\ngrace_period = 600"))
    study = search(load_config(path), grid=True)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    return path


def test_grade_head_members_average_all_columns_and_mixed_heads_are_refused() -> None:
    import keras

    from drtune.config import ModelConfig
    from drtune.model import build_model

    keras.utils.set_random_seed(3)
    a, b = (build_model(ModelConfig(width=4, head="grade"), 32) for _ in range(2))
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    both = ensemble.build_model({"a": (a, "none"), "b": (b, "none")})
    np.testing.assert_allclose(both.predict(x, verbose=0),
                               (a.predict(x, verbose=0) + b.predict(x, verbose=0)) / 2, rtol=1e-5)
    with pytest.raises(InputError, match="different classifiers .*: a grade, c referral"):
        ensemble.build_model({"a": (a, "none"), "c": (build_model(ModelConfig(width=4), 32), "none")})


@pytest.mark.slow
def test_finetune_top_k_records_the_ensemble(two_trial_study: Path, capsys, caplog) -> None:
    path = two_trial_study
    with caplog.at_level(logging.WARNING):
        assert main(["finetune", "--best", "--top-k", "3", "--config", str(path)]) == 0
    assert "has only 2 completed trial(s)" in caplog.text
    study = optuna.load_study(study_name="tiny", storage=storage_url(load_config(path)))
    ft = study.user_attrs["finetune"]
    ens = ft["ensemble"]
    assert ft["trial"] == study.best_trial.number == ens["trials"][0]
    assert sorted(ens["trials"]) == [t.number for t in study.trials]
    run = Path(ens["run_dir"])
    assert run.name == "finetune-top2" and (run / "model.keras").is_file()
    assert [Path(m).name for m in ens["members"]] == [f"finetune-trial-{n:04d}" for n in ens["trials"]]
    tested = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert tested["n"] == ens["test"]["n"] > 0 and tested["balanced_accuracy"] == ens["test"]["balanced_accuracy"]
    assert ens["threshold"] == json.loads((run / "metrics.json").read_text())["threshold"]
    out = capsys.readouterr().out
    assert f"ensemble of trials {ens['trials'][0]}, {ens['trials'][1]}: test balanced accuracy" in out
    names = [m.filename for m in get_all_artifact_meta(study)]
    assert "ensemble_roc.png" in names and "ensemble_confusion_matrix.png" in names
    from optuna_dashboard import get_note

    note = get_note(study)
    assert "**Ensemble of the top 2 trials**" in note and "best single model (trial" in note
    assert note.count("](/artifacts/") >= 6  # the fine-tuned model's plots and the ensemble's
    assert main(["status", "--config", str(path)]) == 0
    capsys.readouterr()
    # A second run finds everything recorded and uploads nothing twice; the study's
    # finetune.top_k asks for the ensemble as --top-k does.
    assert main(["finetune", "--best", "--config", str(path), "--set", "finetune.top_k=2"]) == 0
    assert len(get_all_artifact_meta(study)) == len(names)
    again = capsys.readouterr().out
    assert f"ensemble of trials {ens['trials'][0]}, {ens['trials'][1]}: test balanced accuracy" in again


@pytest.mark.slow
def test_both_galleries_show_the_same_photographs(two_trial_study: Path) -> None:
    """Chosen once with the fine-tuned model; each gallery captions its own model's P(RDR)."""
    study = optuna.load_study(study_name="tiny", storage=storage_url(load_config(two_trial_study)))
    if "finetune" not in study.user_attrs:
        assert main(["finetune", "--best", "--config", str(two_trial_study)]) == 0
        study = optuna.load_study(study_name="tiny", storage=storage_url(load_config(two_trial_study)))
    ft = study.user_attrs["finetune"]
    galleries = {k: json.loads((Path(v).parent / "summary.json").read_text()) for k, v in ft["gradcam"].items()}
    tuned, trial = galleries["finetune"], galleries["trial"]
    assert [r["name"] for r in trial["images"]] == [r["name"] for r in tuned["images"]]
    assert len(tuned["images"]) == 4 and trial["selection"] == gradcam.NAMED
    for summary in (tuned, trial):
        for r in summary["images"]:
            assert r["decision"] == ("RDR" if r["p_rdr"] >= summary["threshold"] else "NRDR")
    # Each P(RDR) is its own model's: the best trial's as its own evaluation gives it.
    trial_run = Path(study.best_trial.user_attrs["run_dir"])
    evaluate_run(trial_run, split="test", n_boot=10)
    with (trial_run / "eval-test" / "predictions.csv").open() as f:
        evaluated = {r["name"]: float(r["p_rdr"]) for r in csv.DictReader(f)}
    for r in trial["images"]:
        assert r["p_rdr"] == pytest.approx(evaluated[r["name"]], abs=1e-5)
    # Its files and its page keep the given order.
    assert [int(r["png"].split("_")[0]) for r in trial["images"]] == list(range(len(trial["images"])))
    page = (Path(ft["gradcam"]["trial"])).read_text()
    assert re.findall(r'alt="([^"]+)"', page) == [r["name"] for r in tuned["images"]]


def test_top_k_below_one_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    from drtune.cli import main

    db = tmp_path / "runs" / "optuna.db"
    code = main(["finetune", "--best", "--top-k", "0", "--storage", f"sqlite:///{db}", "--study", "s"])
    assert code == 2
    assert "--top-k 0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no database, no run folder
