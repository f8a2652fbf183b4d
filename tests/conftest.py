"""Shared fixtures and helpers: a small synthetic IDRiD-layout set and its prepared TFRecords
(made once), a tiny trained run, the tiny study file of the search tests, ``../shared``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def default_sigint() -> None:
    """``preexec_fn`` of a child process that a test interrupts with SIGINT. A background job of a
    non-interactive shell (as some CI runners start the suite) inherits SIGINT *ignored*, and a
    Python started so never raises KeyboardInterrupt: the child gets the default disposition back,
    so that Ctrl-C reaches it as it would in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


# --------------------------------------------------------------------------- search helpers

TINY_STUDY = """\
# drtune search --grid --config {path}   (test study, seconds)
name = "tiny"

[data]
dir = "{data}"
image_size = 32

[model]
width = 4

[train]
batch_size = 4
epochs = {epochs}
steps_per_epoch = 3
eval_batch_size = 16
checkpoint_every = 2

[search]
workdir = "{workdir}"
pruner = "median"
pruner_startup_trials = 1
pruner_warmup_epochs = 0
heartbeat_interval = 1
grace_period = 2
n_trials = 3

[search.grid]
"train.lr" = {lrs}

[search.space]
"train.lr" = {{ low = 1e-4, high = 1e-2, log = true }}
"model.dropout" = {{ low = 0.0, high = 0.5 }}
"data.augment" = {{ choices = ["none", "base"] }}

[finetune]
lr = 1e-5
epochs = 2
gradcam = 4
"""


def study_file(tmp_path: Path, data: Path, epochs: int = 3, lrs: str = "[3e-3, 1e30]") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_STUDY.format(path=path, data=data, workdir=tmp_path / "runs", epochs=epochs, lrs=lrs))
    return path


SIX_POINTS = "[3e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4]"  # a grid of train.lr for several workers


def check_grid_once(study: optuna.Study, points: list[float]) -> None:
    """Every grid point exactly once among COMPLETE/PRUNED trials; nothing left running."""
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    finished = [t.params["train.lr"] for t in study.trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(finished) == sorted(points)


def make_data(root: Path, counts: dict[str, tuple[int, int]], size: int = 32) -> Path:
    """A tiny prepared-data dir: per split (n NRDR, n RDR) flat grey images.

    Grey level 10 + 2i for NRDR image i and 130 + 2j for RDR image j: it encodes both the label
    (> 120) and which image it is, and flat JPEGs decode to within +-1.
    """
    import json

    import numpy as np

    from drtune.prepare import encode_jpeg, write_shards

    root.mkdir(parents=True)
    splits = {}
    for split, (n0, n1) in counts.items():
        examples = []
        for i in range(n0 + n1):
            label = int(i >= n0)
            img = np.full((size, size, 3), 130 + 2 * (i - n0) if label else 10 + 2 * i, np.uint8)
            examples.append((encode_jpeg(img, 95), label, 3 * label, f"{split}_{i:03d}"))
        # interleave classes on disk as prepare does (it shuffles the training split)
        examples = [examples[i] for i in np.random.default_rng(0).permutation(len(examples))]
        files = write_shards(root, split, examples, shard_size=16)
        splits[split] = {"n": n0 + n1, "nrdr": n0, "rdr": n1, "files": files,
                         "names": [e[3] for e in examples]}
    (root / "meta.json").write_text(json.dumps({"splits": splits, "size": size}))
    return root
