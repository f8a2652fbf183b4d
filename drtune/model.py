"""The simplified ResNetV2 of the original project, parametrised for search.

7x7/2 conv, BN, ReLU, 3x3/2 max-pool, three stages of pre-activation residual blocks
(BN-ReLU-conv3x3(stride 2)-BN-ReLU-conv3x3 with a 1x1 projection shortcut) at width x (1, 2, 4)
channels, ReLU, global average pooling, dense 2 softmax. The model takes RGB pixel values in
0..255 and rescales them itself, so every caller (training, evaluation, predict, Grad-CAM) feeds
the same thing and none can forget the scaling.
"""

from __future__ import annotations

import keras
from keras import layers

from drtune.config import ModelConfig

FEATURE_LAYER = "features"  # last feature map, the layer Grad-CAM differentiates against
OUTPUT_LAYER = "probs"
# Keras' default 0.99 makes the inference statistics lag hundreds of steps behind the weights;
# with a few hundred images per epoch that leaves validation (at threshold 0.5) far behind
# training for most of a short run. 0.9 tracks within tens of steps.
BN_MOMENTUM = 0.9


def _conv(filters: int, kernel: int, strides: int, l2: float, name: str) -> layers.Conv2D:
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    # No bias: every conv is followed by batch norm (or a residual add into one).
    return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                         kernel_initializer="he_normal", kernel_regularizer=reg, name=name)


def _block(x: keras.KerasTensor, filters: int, strides: int, l2: float, name: str) -> keras.KerasTensor:
    """Pre-activation residual block; the shortcut is projected when shape changes."""
    pre = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_preact_bn")(x)
    pre = layers.ReLU(name=f"{name}_preact_relu")(pre)
    if strides != 1 or x.shape[-1] != filters:
        # A strided 1x1 conv, written as subsampling then a 1x1 conv: the same function and
        # weights, but TF 2.21's oneDNN kernel for the strided form corrupts the heap (crash)
        # when trained with fewer than 16 channels on large inputs.
        sub = layers.MaxPooling2D(1, strides=strides, padding="same", name=f"{name}_subsample")(pre)
        shortcut = _conv(filters, 1, 1, l2, f"{name}_shortcut")(sub)
    else:
        shortcut = x
    y = _conv(filters, 3, strides, l2, f"{name}_conv1")(pre)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = _conv(filters, 3, 1, l2, f"{name}_conv2")(y)
    return layers.Add(name=f"{name}_add")([shortcut, y])


def build_model(cfg: ModelConfig = ModelConfig(), input_size: int = 256) -> keras.Model:
    """Build (uncompiled) the network for square RGB inputs of ``input_size`` pixels."""
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv(cfg.width, 7, 2, cfg.l2, "stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, mult in enumerate((1, 2, 4), start=1):
        for block in range(cfg.blocks_per_stage):
            x = _block(x, cfg.width * mult, 2 if block == 0 else 1, cfg.l2, f"stage{stage}_block{block + 1}")
    x = layers.ReLU(name=FEATURE_LAYER)(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(2, activation="softmax", kernel_regularizer=reg, name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name="resnetv2_small")


def compile_model(model: keras.Model, lr: float) -> keras.Model:
    """Adam + sparse categorical cross-entropy, as in the original project."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model
