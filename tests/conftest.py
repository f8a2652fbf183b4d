"""Shared fixtures: a small synthetic IDRiD-layout set and its prepared TFRecords, made once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def shared_dir(name: str) -> Path:
    """A folder of ../shared beside the checkout (CI lays a copy there too)."""
    return REPO.parent / "shared" / name


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from drtune.synth import make_synthetic

    root = tmp_path_factory.mktemp("synth") / "idrid"
    make_synthetic(root, n_train=32, n_test=8, width=400, height=266, seed=1)
    return root


@pytest.fixture(scope="session")
def prepared(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from drtune.prepare import PrepareOptions, find_idrid, prepare

    out = tmp_path_factory.mktemp("data") / "data"
    prepare(find_idrid(synth_root), out, PrepareOptions(size=64, workers=1, seed=0))
    return out


@pytest.fixture(scope="session")
def run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (2 epochs, 48 px) for evaluate/predict/gradcam tests."""
    from drtune.config import load_config
    from drtune.train import train_and_evaluate

    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = load_config(None, ["model.width=4", "data.image_size=48", "train.batch_size=4",
                             "train.steps_per_epoch=4", "train.epochs=2"])
    train_and_evaluate(cfg, prepared, out)
    return out
