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


def test_unknown_tta_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="tta 'spin'"):
        tta.views("spin")
