"""Test-time augmentation: average the model's probabilities over flipped/rotated views.

A fundus photograph has no preferred orientation, so the network's answer should not depend
on a flip or a quarter turn; averaging over such views cancels part of the variance of a
model trained on a few hundred photographs. ``tta_model`` wraps a trained model in a Keras
model that does it, so every consumer — the threshold frozen on validation, ``evaluate``,
``predict`` and the probabilities ``gradcam`` shows — calls the same ``predict`` on the same
thing and none can apply it differently.
"""

from __future__ import annotations

from typing import Callable

import keras
from keras import layers, ops

# none: the image itself; flips: + left-right, up-down and both (= half turn);
# dihedral: all 8 symmetries of the square (the flips and their transposes).
from drtune.config import TTA_MODES

View = Callable[[object], object]


def _lr(x: object) -> object:
    return ops.flip(x, axis=2)


def _ud(x: object) -> object:
    return ops.flip(x, axis=1)


def _t(x: object) -> object:
    return ops.transpose(x, (0, 2, 1, 3))  # square inputs: a transpose is a flip + quarter turn


def views(mode: str) -> list[View]:
    """The view functions of ``mode`` ([B,H,W,C] -> [B,H,W,C]); the identity comes first."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta {mode!r}: must be one of {', '.join(TTA_MODES)}")
    flips: list[View] = [lambda x: x, _lr, _ud, lambda x: _ud(_lr(x))]
    if mode == "none":
        return flips[:1]
    if mode == "flips":
        return flips
    return flips + [lambda x, f=f: f(_t(x)) for f in flips]


def tta_model(model: keras.Model, mode: str) -> keras.Model:
    """``model`` itself for ``none``; else a model averaging its output over the views.

    The wrapper shares the weights (nothing is copied) and takes the same input.
    """
    fns = views(mode)
    if len(fns) == 1:
        return model
    inputs = keras.Input(model.input_shape[1:], name="image")
    outs = [model(layers.Lambda(fn, name=f"tta_view{i}")(inputs)) for i, fn in enumerate(fns)]
    return keras.Model(inputs, layers.Average(name="tta_mean")(outs), name=f"{model.name}_tta_{mode}")
