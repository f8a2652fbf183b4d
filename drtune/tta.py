"""Test-time augmentation: average the model's probabilities over flipped/rotated views.

A fundus photograph has no preferred orientation, so the network's answer should not depend
on a flip or a quarter turn; averaging over such views cancels part of the variance of a
model trained on a few hundred photographs. ``tta_model`` wraps a trained model in a Keras
model that does it, so every consumer — the threshold frozen on validation, ``evaluate``,
``predict`` and the probabilities ``gradcam`` shows — calls the same ``predict`` on the same
thing and none can apply it differently.

Each view is a :class:`View` layer, which Keras can save and load (a ``Lambda`` would need
unsafe deserialisation): an ensemble run (:mod:`drtune.ensemble`) saves its members' views
inside its ``model.keras``, built by the same :func:`mean_over_views` as ``tta_model``.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import layers, ops

# none: the image itself; flips: + left-right, up-down and both (= half turn);
# dihedral: all 8 symmetries of the square (the flips and their transposes).
from drtune.config import TTA_MODES

ViewFn = Callable[[Any], Any]


def _lr(x: object) -> object:
    return ops.flip(x, axis=2)


def _ud(x: object) -> object:
    return ops.flip(x, axis=1)


def _t(x: object) -> object:
    return ops.transpose(x, (0, 2, 1, 3))  # square inputs: a transpose is a flip + quarter turn


def views(mode: str) -> list[ViewFn]:
    """The view functions of ``mode`` ([B,H,W,C] -> [B,H,W,C]); the identity comes first."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta {mode!r}: must be one of {', '.join(TTA_MODES)}")
    flips: list[ViewFn] = [lambda x: x, _lr, _ud, lambda x: _ud(_lr(x))]
    if mode == "none":
        return flips[:1]
    if mode == "flips":
        return flips
    return flips + [lambda x, f=f: f(_t(x)) for f in flips]


@keras.saving.register_keras_serializable(package="drtune", name="View")
class View(layers.Layer):
    """View ``index`` of the test-time augmentation ``mode`` (``views``) as a saveable layer.

    Saved models name it ``drtune>View``: keep the package and name, or older ensemble runs no
    longer load."""

    def __init__(self, mode: str, index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode, self.index = mode, int(index)
        self._view = views(mode)[self.index]

    def call(self, x: Any) -> Any:
        return self._view(x)

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return input_shape  # flips, and transposes of square images, keep the shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode, "index": self.index}


def mean_over_views(model: keras.Model, inputs: Any, mode: str, name: str) -> Any:
    """The symbolic output of ``model`` averaged over the views of ``mode`` of ``inputs``: one
    ``View`` layer per view (``{name}_view{i}``), then ``{name}_tta``, their mean (with a single
    view, ``none``, its output itself). ``model`` is called, not copied: the weights are shared."""
    outs = [model(View(mode, i, name=f"{name}_view{i}")(inputs)) for i in range(len(views(mode)))]
    return outs[0] if len(outs) == 1 else layers.Average(name=f"{name}_tta")(outs)


def tta_model(model: keras.Model, mode: str) -> keras.Model:
    """``model`` itself for ``none``; else a model averaging its output over the views.

    The wrapper shares the weights (nothing is copied) and takes the same input.
    """
    if len(views(mode)) == 1:
        return model
    inputs = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(inputs, mean_over_views(model, inputs, mode, model.name), name=f"{model.name}_tta_{mode}")
