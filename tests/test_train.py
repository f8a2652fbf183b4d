"""Training: run directory contents, resume after kill -9, repeatability, divergence, learning."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from drtune import callbacks, train
from drtune.callbacks import RunOwner, RunOwnershipLost
from drtune.cli import main
from drtune.config import load_config
from drtune.errors import InputError
from drtune.train import TrainingDiverged, train_and_evaluate

from conftest import make_data

TINY = ["model.width=4", "data.image_size=32", "train.batch_size=4", "train.steps_per_epoch=3",
        "train.eval_batch_size=16"]


def tiny(*extra: str):
    return load_config(None, TINY + list(extra))


def history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as f:
        return list(csv.DictReader(f))


def curves(run: Path) -> np.ndarray:
    """Per-epoch training and validation losses of a run."""
    return np.array([[float(r["loss"]), float(r["val_loss"])] for r in history(run)])


def epochs_done(run: Path) -> int:
    return json.loads((run / "checkpoints" / "state.json").read_text())["epochs_done"]


class Interrupted(Exception):
    pass


class Reporter(keras.callbacks.Callback):
    """Stands in for the search's pruning callback: records the epochs reported to it, and
    dies at epoch ``die_at`` before reporting it (a kill between the epoch and its report)."""

    def __init__(self, die_at: int = -1) -> None:
        super().__init__()
        self.die_at, self.seen = die_at, []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == self.die_at:
            raise Interrupted
        self.seen.append(epoch)


@pytest.mark.slow
def test_run_directory_contents(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train_and_evaluate(tiny("train.epochs=2", "train.checkpoint_every=2"), prepared, run)
    for name in ("config.json", "data.json", "model.keras", "metrics.json", "history.csv", "history.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "epoch-0002.keras").is_file()
    assert not (run / "checkpoints" / "epoch-0001.keras").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["data"]["dir"] == str(prepared.resolve())
    rows = history(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]  # counted from 1, as best_epoch is
    assert {"loss", "val_loss", "val_balanced_accuracy", "val_auc"} <= set(rows[0])
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert result["epochs_run"] == 2 and 0.0 <= result["threshold"] <= 1.0
    assert result["val_balanced_accuracy"] == max(float(r["val_balanced_accuracy"]) for r in rows)
    best_row = next(r for r in rows if int(r["epoch"]) == result["best_epoch"])
    assert float(best_row["val_balanced_accuracy"]) == result["objective"]
    assert result["seconds_per_epoch"] > 0
    assert result["val"]["n"] == json.loads((prepared / "meta.json").read_text())["splits"]["val"]["n"]
    # TensorBoard: scalars and a confusion-matrix image per epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard" / "validation"), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Tags()["tensors"]) + len(acc.Tags()["images"]) > 0
    tags = acc.Tags()["tensors"]
    assert "confusion_matrix" in tags
    assert [e.step for e in acc.Tensors("confusion_matrix")] == [1, 2]
    # A finished run is not trained again.
    mtime = (run / "model.keras").stat().st_mtime
    assert train_and_evaluate(tiny("train.epochs=2", "train.checkpoint_every=2"), prepared, run) == result
    assert (run / "model.keras").stat().st_mtime == mtime


@pytest.mark.slow
def test_same_seed_same_run(prepared: Path, tmp_path: Path) -> None:
    a = train_and_evaluate(tiny("train.epochs=2"), prepared, tmp_path / "a")
    b = train_and_evaluate(tiny("train.epochs=2"), prepared, tmp_path / "b")
    la = [float(r["loss"]) for r in history(tmp_path / "a")]
    lb = [float(r["loss"]) for r in history(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-5)
    assert a["val"]["confusion_matrix"] == b["val"]["confusion_matrix"]
    c = train_and_evaluate(tiny("train.epochs=2", "train.seed=1"), prepared, tmp_path / "c")
    lc = [float(r["loss"]) for r in history(tmp_path / "c")]
    assert lc != pytest.approx(la, rel=1e-5)
    del c


@pytest.mark.slow
def test_other_config_in_same_run_dir_is_refused(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_and_evaluate(tiny("train.epochs=1"), prepared, run)
    with pytest.raises(InputError, match="different config.*train.lr"):
        train_and_evaluate(tiny("train.epochs=1", "train.lr=0.1"), prepared, run)


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "drtune", "train", "--data", str(prepared), "--out", str(run)]
    for s in TINY + ["train.epochs=30", "train.checkpoint_every=1"]:
        cmd += ["--set", s]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run / "checkpoints" / "state.json"
    deadline = time.monotonic() + 900  # a safety net on a busy machine, not a speed check
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epochs_done"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["epochs_done"]
    assert 2 <= killed_at < 30 and not (run / "metrics.json").exists()
    # Same command again: continues after the last finished epoch instead of starting over.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming after epoch {killed_at}" in proc.stderr
    epochs = [int(r["epoch"]) for r in history(run)]
    assert epochs == list(range(1, 31))
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 30
    # Exact resume: the same batches, augmentation and optimizer state as a run never killed.
    train_and_evaluate(tiny("train.epochs=30", "train.checkpoint_every=1"), prepared, tmp_path / "whole")
    np.testing.assert_allclose(curves(run), curves(tmp_path / "whole"), rtol=1e-4)


@pytest.mark.slow
def test_interrupted_epoch_is_reported_again_and_early_stopping_keeps_its_patience(
        prepared: Path, tmp_path: Path) -> None:
    cfg = tiny("train.epochs=10", "train.patience=1")
    whole = train_and_evaluate(cfg, prepared, tmp_path / "whole")
    stop = whole["epochs_run"] - 1  # the epoch at which early stopping ended the run
    assert 1 <= stop < 9, "this check needs a run that early stopping ends"
    run = tmp_path / "run"
    first = Reporter(die_at=stop)
    with pytest.raises(Interrupted):
        train_and_evaluate(cfg, prepared, run, callbacks=[first])
    assert epochs_done(run) == stop  # the epoch its reporter never saw is not committed
    second = Reporter()
    result = train_and_evaluate(cfg, prepared, run, callbacks=[second])
    assert first.seen + second.seen == list(range(whole["epochs_run"]))
    assert result["epochs_run"] == whole["epochs_run"]  # patience carried over the resume
    assert [int(r["epoch"]) for r in history(run)] == list(range(1, whole["epochs_run"] + 1))
    np.testing.assert_allclose(curves(run), curves(tmp_path / "whole"), rtol=1e-4)


@pytest.mark.slow
def test_run_with_0_based_history_resumes_counting_from_1(prepared: Path, tmp_path: Path) -> None:
    """Runs written before epochs were counted from 1 have a 0-based history.csv: resuming one
    rewrites it 1-based and carries on, and reading one (metrics.read_history) shifts it."""
    from drtune.metrics import read_history

    cfg = tiny("train.epochs=3")
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_and_evaluate(cfg, prepared, run, callbacks=[Reporter(die_at=2)])
    assert epochs_done(run) == 2
    rows = history(run)[:2]
    old = run / "history.csv"  # as the older version wrote it: epochs 0 and 1
    with old.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "epoch": str(int(r["epoch"]) - 1)} for r in rows)
    assert [r["epoch"] for r in read_history(old)] == ["1", "2"]
    result = train_and_evaluate(cfg, prepared, run)
    after = history(run)
    assert [r["epoch"] for r in after] == ["1", "2", "3"] and after[:2] == rows
    assert result["epochs_run"] == 3 and 1 <= result["best_epoch"] <= 3
    best_row = after[result["best_epoch"] - 1]
    assert float(best_row["val_balanced_accuracy"]) == result["objective"]


@pytest.mark.slow
def test_a_run_taken_over_stops_without_writing(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny("train.epochs=4", "train.checkpoint_every=1")
    seen: dict[str, float] = {}

    class TakeOver(keras.callbacks.Callback):
        # Another worker claims the run while this one is mid-epoch (as after SIGSTOP).
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if not seen and (run / "checkpoints" / "state.json").is_file() and epochs_done(run) == 1:
                RunOwner(run).claim()
                seen.update({p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()})

    with pytest.raises(RunOwnershipLost, match=f"{run}: another process .* took over"):
        train_and_evaluate(cfg, prepared, run, callbacks=[TakeOver()])
    assert seen and epochs_done(run) == 1 and len(history(run)) == 1
    after = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    changed = {k for k in after if after[k] != seen.get(k) and not k.startswith("events.out")}
    assert not changed, changed
    # The new owner resumes it; every epoch is recorded once.
    assert train_and_evaluate(cfg, prepared, run)["epochs_run"] == 4
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3, 4]


def test_callback_names_imported_from_train_are_the_callbacks_own() -> None:
    """The callbacks live in drtune.callbacks; the names other modules, scripts and tests import
    from drtune.train (the search catches train.RunOwnershipLost) must be the very same objects."""
    for name in ("RunOwner", "RunOwnershipLost", "MONITOR", "LAST", "seconds_per_epoch", "write_json"):
        assert getattr(train, name) is getattr(callbacks, name), name


def test_disk_full_is_one_line_and_keeps_good_models(prepared: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(prepared), "--out", str(run)]
    for s in TINY + ["train.epochs=3"]:
        argv += ["--set", s]
    save, calls = keras.Model.save, []

    def full_disk(model: keras.Model, path: object, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) <= 2:  # epoch 1: model.keras and last.keras
            return save(model, path, *args, **kwargs)
        Path(str(path)).write_bytes(b"PK\x03\x04 cut short")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(keras.Model, "save", full_disk)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"drtune: error: {run}: no space left on the device" in err and "Traceback" not in err
    assert "run the same command again" in err
    for path in run.rglob("*.keras"):
        keras.models.load_model(path)  # never a truncated model in place of a good one
    assert not list(run.rglob(".*tmp*"))
    monkeypatch.setattr(keras.Model, "save", save)
    assert main(argv) == 0
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3]


def test_truncated_shard_names_the_data_and_prepare(prepared: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shard = data / json.loads((data / "meta.json").read_text())["splits"]["train"]["files"][0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run")]
    for s in TINY + ["train.epochs=1"]:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"drtune: error: {data}: a TFRecord shard is damaged or truncated")
    assert "drtune prepare" in err[-1]


def test_bad_seed_writes_nothing(prepared: Path, tmp_path: Path, capsys) -> None:
    for seed in ("-1", str(2**32)):
        rc = main(["train", "--data", str(prepared), "--out", str(tmp_path / "run"), "--set", f"train.seed={seed}"])
        assert rc == 2 and "train.seed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    del rc


@pytest.mark.slow
def test_divergence_is_a_clear_error(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match="diverged.*train.lr=1e\\+30.*smaller learning rate"):
        train_and_evaluate(tiny("train.epochs=3", "train.lr=1e30"), prepared, tmp_path / "run")


def test_missing_and_empty_data_dir(tmp_path: Path, capsys) -> None:
    rc = main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "nope: data directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    rc = main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "meta.json: missing" in capsys.readouterr().err
    rc = main(["train", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "no data directory" in capsys.readouterr().err


def test_bad_config_on_command_line(prepared: Path, tmp_path: Path, capsys) -> None:
    rc = main(["train", "--data", str(prepared), "--out", str(tmp_path / "run"), "--set", "train.lr=-1"])
    assert rc == 2
    assert "drtune: error: defaults with --set train.lr=-1: train.lr = -1.0: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_learns_synthetic_lesions(tmp_path: Path) -> None:
    """The learning check: lesions make RDR visible, so a short CPU run must find them."""
    from drtune.prepare import PrepareOptions, find_idrid, prepare
    from drtune.synth import make_synthetic

    make_synthetic(tmp_path / "synth", n_train=80, n_test=4, width=400, height=266, seed=7)
    prepare(find_idrid(tmp_path / "synth"), tmp_path / "data", PrepareOptions(size=96, workers=2))
    cfg = load_config(None, ["model.width=8", "train.batch_size=8", "train.epochs=20",
                             "train.lr=3e-3", "train.patience=0"])
    result = train_and_evaluate(cfg, tmp_path / "data", tmp_path / "run")
    # Per-epoch value at the fixed 0.5 threshold: not tuned on the split it is measured on.
    assert result["val_balanced_accuracy"] >= 0.9, result


@pytest.mark.slow
def test_mixed_precision_run_trains_resumes_and_evaluates_in_float32(prepared: Path, tmp_path: Path) -> None:
    from drtune.evaluate import evaluate_run

    run = tmp_path / "run"
    cfg = tiny("train.epochs=2", "train.checkpoint_every=1", "train.precision=mixed_float16")
    result = train_and_evaluate(cfg, prepared, run)
    saved = keras.models.load_model(run / "model.keras")
    assert saved.get_layer("stem_conv").dtype_policy.name == "mixed_float16"
    assert saved.get_layer("probs").dtype_policy.name == "float32"
    losses = [float(r["loss"]) for r in history(run)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # A resume starts from the checkpoint as saved: mixed layers and the loss-scaling optimizer.
    last = keras.models.load_model(run / "checkpoints" / "last.keras")
    assert isinstance(last.optimizer, keras.optimizers.LossScaleOptimizer)
    assert last.get_layer("stem_conv").dtype_policy.name == "mixed_float16"
    # The threshold was frozen on the float32 computation evaluate uses: same calls on val.
    val = evaluate_run(run, prepared, "val")
    assert val["confusion_matrix"] == result["val"]["confusion_matrix"]
    assert val["threshold"] == result["threshold"]


class HoldAtChance(keras.callbacks.Callback):
    """Makes a network stuck at chance level for real: its classifier's weights are zeroed
    after every batch, so it answers exactly 0.5 for every image (training loss ln 2, validation
    AUC 0.5). ``first_only``: only the first network it is given (so a restart gets away)."""

    def __init__(self, first_only: bool) -> None:
        super().__init__()
        self.first_only, self.held = first_only, None

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        if self.held is None or not self.first_only:
            self.held = model

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.model is self.held:
            layer = self.model.get_layer("probs")
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])


def test_chance_level_criterion_takes_out_the_l2_penalty() -> None:
    check = callbacks.ChanceLevel(check_epoch=5, restarts_left=0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
        2, kernel_regularizer=keras.regularizers.L2(0.5), kernel_initializer="ones")])
    check.set_model(model)  # penalty 0.5 * 4 = 2.0 in Keras' "loss"
    assert check.stuck({"loss": 2.0 + 0.6935, "val_auc": 0.52})
    assert check.stuck({"loss": 2.0 + 0.708, "val_auc": 0.55})  # above ln 2 is not learning either
    assert not check.stuck({"loss": 2.0 + 0.60, "val_auc": 0.52})  # learning
    assert not check.stuck({"loss": 2.0 + 0.6935, "val_auc": 0.75})  # validation says it learns
    assert not check.stuck({"loss": 2.0 + 0.6935, "val_auc": float("nan")})  # one-class split: no verdict


def test_grade_chance_loss_is_the_entropy_of_the_streams_grades(prepared: Path) -> None:
    # A grade-head network at chance answers the stream's grade distribution for every image;
    # its loss is that distribution's entropy, measured here on the balanced stream itself.
    from drtune import data

    grades = json.loads((prepared / "meta.json").read_text())["splits"]["train"]["grades"]
    counts = [int(grades[str(g)]) for g in range(5)]
    ds, _ = data.train_dataset(prepared, 16, augment_level="none", seed=0, image_size=16, grades=True)
    drawn = np.concatenate([y.numpy() for _, y in ds.take(150)])
    p = np.bincount(drawn, minlength=5) / len(drawn)
    assert callbacks.grade_chance_loss(counts, 2, True, 0.0) == pytest.approx(-np.sum(p[p > 0] * np.log(p[p > 0])),
                                                                              abs=0.03)
    share = np.asarray(counts) / sum(counts)
    assert callbacks.grade_chance_loss(counts, 2, False, 0.0) == pytest.approx(-np.sum(share * np.log(share)))
    # Smoothing spreads the targets: a higher floor; ln 2 is the 2-class floor, far below.
    assert callbacks.grade_chance_loss(counts, 2, True, 0.1) > callbacks.grade_chance_loss(counts, 2, True, 0.0) > 1.2
    check = callbacks.ChanceLevel(check_epoch=5, restarts_left=0, chance_loss=1.4)
    check.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
    assert check.stuck({"loss": 1.40, "val_auc": 0.52}) and not check.stuck({"loss": 1.1, "val_auc": 0.52})


@pytest.mark.slow
def test_run_stuck_at_chance_restarts_from_new_weights(prepared: Path, tmp_path: Path) -> None:
    # One restart allowed: a tiny model has not learned much by epoch 2 either, so a second
    # check of the restarted start would be a coin toss (the criterion has its own test above).
    cfg = tiny("train.epochs=4", "train.chance_check_epoch=2", "train.chance_restarts=1",
               "train.checkpoint_every=1")
    run = tmp_path / "run"
    hold = HoldAtChance(first_only=True)
    reporter = Reporter()
    result = train_and_evaluate(cfg, prepared, run, callbacks=[hold, reporter])
    assert result["restarts"] == 1 and result["epochs_run"] == 4
    # The stuck start's epoch 2 was never committed or reported; the restart ran all 4 epochs.
    assert reporter.seen == [0, 0, 1, 2, 3]
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3, 4]
    assert not any(abs(float(r["loss"]) - np.log(2)) < 1e-3 for r in history(run))
    assert json.loads((run / "checkpoints" / "state.json").read_text()) == {"epochs_done": 4, "restarts": 1}
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch-*.keras")) == [
        f"epoch-{e:04d}.keras" for e in range(1, 5)]
    # The restart drew other initial weights than the stuck start (same train.seed).
    plain = train_and_evaluate(tiny("train.epochs=1"), prepared, tmp_path / "plain")
    del plain
    assert float(history(run)[0]["loss"]) != pytest.approx(float(history(tmp_path / "plain")[0]["loss"]), rel=1e-4)


@pytest.mark.slow
def test_run_still_stuck_after_its_restarts_finishes_with_a_warning(prepared: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny("train.epochs=3", "train.chance_check_epoch=2", "train.chance_restarts=1")
    result = train_and_evaluate(cfg, prepared, tmp_path / "run", callbacks=[HoldAtChance(first_only=False)])
    assert result["restarts"] == 1 and result["epochs_run"] == 3
    assert result["val_auc"] == pytest.approx(0.5)
    assert [float(r["loss"]) for r in history(tmp_path / "run")][1:] == pytest.approx([np.log(2)] * 2, abs=1e-4)
    messages = [r.getMessage() for r in caplog.records]
    assert any("restart 1 of 1" in m for m in messages)
    assert any("has not left chance level after 2 epochs" in m and "unlikely to learn" in m for m in messages)


def test_weight_averaging_validates_the_average_and_trains_the_raw_weights(prepared: Path,
                                                                           tmp_path: Path) -> None:
    # train.ema swaps the moving average in at each epoch's end and back at the next epoch's
    # beginning: training itself must be untouched (the same training losses as without it, also
    # across a resume from a checkpoint written swapped), while validation sees other weights.
    plain = tmp_path / "plain"
    train_and_evaluate(tiny("train.epochs=6"), prepared, plain)
    cfg = tiny("train.epochs=6", "train.ema=0.9")
    run = tmp_path / "ema"
    with pytest.raises(Interrupted):
        train_and_evaluate(cfg, prepared, run, callbacks=[Reporter(die_at=3)])
    assert epochs_done(run) == 3
    result = train_and_evaluate(cfg, prepared, run)
    assert result["epochs_run"] == 6
    np.testing.assert_allclose(curves(run)[:, 0], curves(plain)[:, 0], rtol=1e-4)
    assert np.abs(curves(run)[:, 1] - curves(plain)[:, 1]).max() > 1e-3
    # What the run keeps is the averaged model it validated: its validation loss at the best epoch.
    best = next(r for r in history(run) if int(r["epoch"]) == result["best_epoch"])
    model = keras.models.load_model(run / "model.keras")
    x, y = zip(*((xb, yb) for xb, yb in train.data.eval_dataset(prepared, "val", 16, image_size=32)))
    probs = model.predict(np.concatenate(x), verbose=0)
    picked = probs[np.arange(len(probs)), np.concatenate(y)]
    assert float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0)))) == pytest.approx(float(best["val_loss"]), rel=1e-4)


def test_borderline_targets_train_and_resume(prepared: Path, tmp_path: Path) -> None:
    # Soft targets change the loss to categorical cross-entropy on class probabilities: a run
    # resumes from its checkpoint with it, and its training loss is not the hard-label run's.
    cfg = tiny("train.epochs=3", "train.borderline=0.25")
    run = tmp_path / "soft"
    with pytest.raises(Interrupted):
        train_and_evaluate(cfg, prepared, run, callbacks=[Reporter(die_at=1)])
    result = train_and_evaluate(cfg, prepared, run)
    assert result["epochs_run"] == 3 and epochs_done(run) == 3
    train_and_evaluate(tiny("train.epochs=3"), prepared, tmp_path / "hard")
    soft, hard = curves(run)[:, 0], curves(tmp_path / "hard")[:, 0]
    assert np.all(np.isfinite(soft)) and np.abs(soft - hard).max() > 1e-4
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in history(run))


def test_grade_head_trains_on_grades_resumes_and_evaluates(prepared: Path, tmp_path: Path) -> None:
    # model.head = "grade": the loss is the grade cross-entropy (not the 2-class one), the logged
    # accuracy is still the referral one, a run resumes from its checkpoint, and evaluate reads
    # P(RDR) from the same column as for any model (same calls on val as the frozen threshold's).
    from drtune.evaluate import evaluate_run
    from drtune.model import GradeCrossentropy, grade_head

    cfg = tiny("train.epochs=3", "model.head=grade", "train.chance_check_epoch=2")
    run = tmp_path / "grade"
    with pytest.raises(Interrupted):
        train_and_evaluate(cfg, prepared, run, callbacks=[Reporter(die_at=1)])
    result = train_and_evaluate(cfg, prepared, run)
    assert result["epochs_run"] == 3 and epochs_done(run) == 3
    last = keras.models.load_model(run / "checkpoints" / "last.keras")
    assert isinstance(last.loss, GradeCrossentropy) and grade_head(last).rdr_grade == 2
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and np.isfinite(float(r["loss"])) for r in history(run))
    assert keras.models.load_model(run / "model.keras").output.shape[-1] == 7
    val = evaluate_run(run, prepared, "val")
    assert val["confusion_matrix"] == result["val"]["confusion_matrix"]
    # A warm start must keep the head the config names (targets follow the config, the loss
    # the model); data whose records are not counted as graded is refused by name.
    with pytest.raises(InputError, match=r"\(grade\) does not match model.head = 'referral'"):
        train_and_evaluate(tiny("train.epochs=1"), prepared, tmp_path / "warm", init_model=run / "model.keras")
    ungraded = make_data(tmp_path / "ungraded", {"train": (6, 6), "val": (3, 3)})
    with pytest.raises(InputError, match=r"ungraded: split 'train' has 0 graded of 12 records"):
        train_and_evaluate(tiny("train.epochs=1", "model.head=grade"), ungraded, tmp_path / "u")
    with pytest.raises(InputError, match='train.borderline = 0.2: needs model.head = "referral"'):
        tiny("model.head=grade", "train.borderline=0.2")


def test_ordinal_head_trains_on_grades_and_keeps_its_kind(prepared: Path, tmp_path: Path) -> None:
    # The ordinal head is a grade head to training (grade targets, the grade loss, the grade
    # chance loss) but a head of its own kind: a warm start must name the same one.
    from drtune.model import GradeCrossentropy, OrdinalLogits, head_kind

    cfg = tiny("train.epochs=2", "model.head=ordinal", "train.chance_check_epoch=1")
    result = train_and_evaluate(cfg, prepared, tmp_path / "ordinal")
    model = keras.models.load_model(tmp_path / "ordinal" / "checkpoints" / "last.keras")
    assert head_kind(model) == "ordinal" and isinstance(model.loss, GradeCrossentropy)
    assert isinstance(model.get_layer("grade_logits"), OrdinalLogits)
    assert result["epochs_run"] == 2 and all(np.isfinite(float(r["loss"])) for r in history(tmp_path / "ordinal"))
    with pytest.raises(InputError, match=r"\(ordinal\) does not match model.head = 'grade'"):
        train_and_evaluate(tiny("train.epochs=1", "model.head=grade"), prepared, tmp_path / "warm",
                           init_model=tmp_path / "ordinal" / "model.keras")
    with pytest.raises(InputError, match='needs model.head = "referral" .soft NRDR/RDR targets; the ordinal'):
        tiny("model.head=ordinal", "train.borderline=0.2")


def test_class_weights_instead_of_oversampling(tmp_path: Path) -> None:
    # Keras' class_weight multiplies each image's loss: on an imbalanced split the weighted run's
    # losses differ from the unweighted one's on the same stream; both balancings are refused.
    with pytest.raises(InputError, match="data.balance = false"):
        tiny("train.class_weights=true")
    prepared = make_data(tmp_path / "data", {"train": (12, 4), "val": (3, 3), "test": (2, 2)})
    meta = json.loads((prepared / "meta.json").read_text())
    cfg = tiny("data.balance=false", "train.class_weights=true")
    weights = train._class_weights(cfg, prepared, meta)
    assert weights == pytest.approx({0: 16 / 24, 1: 16 / 8})  # n / (2 n_class): 12 x 2/3 = 4 x 2
    weighted = train_and_evaluate(tiny("train.epochs=2", "data.balance=false", "train.class_weights=true"),
                                  prepared, tmp_path / "weighted")
    train_and_evaluate(tiny("train.epochs=2", "data.balance=false"), prepared, tmp_path / "plain")
    assert weighted["epochs_run"] == 2
    assert np.abs(curves(tmp_path / "weighted")[:, 0] - curves(tmp_path / "plain")[:, 0]).max() > 1e-3
    # A training split without RDR images cannot be weighted: named, and no epoch is committed.
    no_rdr = make_data(tmp_path / "no_rdr", {"train": (12, 0), "val": (3, 3), "test": (2, 2)})
    with pytest.raises(InputError, match=r"no_rdr: split 'train' has no RDR images; cannot weight classes"):
        train_and_evaluate(tiny("train.epochs=2", "data.balance=false", "train.class_weights=true"),
                           no_rdr, tmp_path / "no_rdr_run")
    assert not (tmp_path / "no_rdr_run" / "checkpoints" / "state.json").exists()
    assert not (tmp_path / "no_rdr_run" / "metrics.json").exists()
