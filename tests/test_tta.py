"""Test-time augmentation: the wrapped model's output is the mean of the model on each view."""

from __future__ import annotations

import numpy as np
import pytest

from drtune import tta
from drtune.config import ModelConfig
from drtune.model import build_model


@pytest.fixture(scope="module")
def model_and_images():
    model = build_model(ModelConfig(width=4), input_size=32)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    return model, images


def _by_hand(model, images: np.ndarray, mode: str) -> np.ndarray:
    flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    if mode == "dihedral":
        transposed = images.transpose(0, 2, 1, 3)
        flips += [transposed, transposed[:, :, ::-1], transposed[:, ::-1], transposed[:, ::-1, ::-1]]
    return np.mean([model.predict(np.ascontiguousarray(v), verbose=0) for v in flips], axis=0)


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_tta_is_the_mean_over_views(model_and_images, mode: str) -> None:
    model, images = model_and_images
    wrapped = tta.tta_model(model, mode)
    got = wrapped.predict(images, verbose=0)
    np.testing.assert_allclose(got, _by_hand(model, images, mode), rtol=1e-5, atol=1e-6)
    # The views really differ on a random image: the mean is not just the plain prediction.
    assert not np.allclose(got, model.predict(images, verbose=0), atol=1e-6)
    assert wrapped.count_params() == model.count_params()  # shared weights, nothing copied


def test_tta_none_is_the_model_itself(model_and_images) -> None:
    model, _ = model_and_images
    assert tta.tta_model(model, "none") is model
    assert len(tta.views("dihedral")) == 8


def test_view_layer_keeps_its_saved_name_and_round_trips() -> None:
    """Ensemble runs' model.keras files name the layer drtune>View: renaming it (or its package)
    would make every saved ensemble unloadable."""
    import keras

    assert keras.saving.get_registered_name(tta.View) == "drtune>View"
    layer = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(tta.View("dihedral", 5)))
    assert isinstance(layer, tta.View) and (layer.mode, layer.index) == ("dihedral", 5)


def test_unknown_tta_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="tta 'spin'"):
        tta.views("spin")


@pytest.fixture(scope="module")
def tta_run(prepared, tmp_path_factory: pytest.TempPathFactory):
    """A tiny run whose config asks for flip TTA (same recipe as conftest's ``run``)."""
    from drtune.config import load_config
    from drtune.train import train_and_evaluate

    out = tmp_path_factory.mktemp("runs") / "tta-run"
    cfg = load_config(None, ["model.width=4", "data.image_size=48", "train.batch_size=4",
                             "train.steps_per_epoch=4", "train.epochs=2", "train.tta=flips"])
    train_and_evaluate(cfg, prepared, out)
    return out


@pytest.mark.slow
def test_evaluate_predict_and_gradcam_share_the_tta(tta_run, prepared, synth_root, tmp_path) -> None:
    """The run's TTA is applied by evaluate, predict and gradcam alike: same P(RDR) everywhere,
    and it is the mean of the plain model over the four flip views."""
    import csv

    import keras

    from drtune import data, gradcam
    from drtune.evaluate import evaluate_run, predict_files

    evaluate_run(tta_run, split="test", n_boot=10)
    with (tta_run / "eval-test" / "predictions.csv").open() as f:
        evaluated = {r["name"]: float(r["p_rdr"]) for r in csv.DictReader(f)}
    plain = keras.models.load_model(tta_run / "model.keras")
    images = np.concatenate([x.numpy() for x, _ in data.eval_dataset(prepared, "test", 8, image_size=48)])
    names = data.split_names(prepared, "test")
    by_hand = _by_hand(plain, images, "flips")[:, 1]
    for name, p in zip(names, by_hand):
        assert evaluated[name] == pytest.approx(float(p), abs=1e-5)

    photos = sorted((synth_root / "1. Original Images" / "b. Testing Set").glob("*.jpg"))[:3]
    for row in predict_files(tta_run, photos):
        assert row["p_rdr"] == pytest.approx(evaluated[row["name"]], abs=1e-4)

    summary = gradcam.run_gradcam(tta_run, tmp_path / "gallery", split="test", n=4)
    shown = [r for r in summary["images"] if r["p_rdr"] is not None]
    assert shown
    for r in shown:
        assert r["p_rdr"] == pytest.approx(evaluated[r["name"]], abs=1e-5)
    # The plain model's threshold differs from the TTA one: metrics.json froze it on TTA views.
    plain_p = plain.predict(images, verbose=0)[:, 1]
    assert not np.allclose(plain_p, by_hand, atol=1e-6)
