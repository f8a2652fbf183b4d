"""The simplified ResNetV2 of the original project, parametrised for search.

7x7/2 conv, BN, ReLU, 3x3/2 max-pool, three stages of pre-activation residual blocks
(BN-ReLU-conv3x3(stride 2)-BN-ReLU-conv3x3 with a 1x1 projection shortcut) at width x (1, 2, 4)
channels, ReLU, global average pooling (or max, or both: ``model.pooling``), dense 2 softmax
(or, with ``model.head = "grade"``, dense 5 softmax over the ICDR grades: :class:`GradeHead`;
with ``"ordinal"``, one severity score cut into the five grades: :class:`OrdinalLogits`).
The model takes RGB pixel values in 0..255 and rescales them itself, so every caller (training,
evaluation, predict, Grad-CAM) feeds the same thing and none can forget the scaling.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import keras
from keras import layers

from drtune.config import GRADE_HEADS, ModelConfig, TrainConfig

FEATURE_LAYER = "features"  # last feature map, the layer Grad-CAM differentiates against
OUTPUT_LAYER = "probs"
N_GRADES = 5  # ICDR grades 0-4
# Keras' default 0.99 makes the inference statistics lag hundreds of steps behind the weights;
# with a few hundred images per epoch that leaves validation (at threshold 0.5) far behind
# training for most of a short run. 0.9 tracks within tens of steps.
BN_MOMENTUM = 0.9


def _conv(filters: int, kernel: int, strides: int, l2: float, name: str,
          initializer: str = "he_normal") -> layers.Conv2D:
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    # No bias: every conv is followed by batch norm (or a residual add into one).
    return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                         kernel_initializer=initializer, kernel_regularizer=reg, name=name)


def _block(x: keras.KerasTensor, filters: int, strides: int, l2: float, name: str,
           zero_init: bool = False) -> keras.KerasTensor:
    """Pre-activation residual block; the shortcut is projected when shape changes.

    ``zero_init``: the branch's last conv starts at zero, so the block starts as its shortcut
    and the network as a shallow one that deepens as training moves those weights (they get
    gradients from the first step: their input is not zero). On real photographs (5 folds of the
    ``real`` study) runs with it left the chance-level plateau (training loss ln 2) by epochs
    7-13 instead of 7-17, but pooled AUC was the same (0.864): off by default.
    """
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
    y = _conv(filters, 3, 1, l2, f"{name}_conv2", "zeros" if zero_init else "he_normal")(y)
    return layers.Add(name=f"{name}_add")([shortcut, y])


@contextmanager
def _dtype_policy(precision: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``precision`` while the layers are made.

    Layers take the policy in force when they are created and save it with the model, so a
    reloaded model (resume, warm start, evaluate) computes as it was trained; restoring the old
    policy keeps other models of the process (tests, Grad-CAM) in float32.
    """
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def build_model(cfg: ModelConfig = ModelConfig(), input_size: int = 256,
                precision: str = "float32", rdr_grade: int = 2) -> keras.Model:
    """Build (uncompiled) the network for square RGB inputs of ``input_size`` pixels.

    ``rdr_grade`` (the data's referral grade) is where a grade head splits NRDR from RDR.

    ``precision`` ``mixed_float16``/``mixed_bfloat16`` computes in half precision with float32
    weights (Keras mixed precision); the softmax stays in float32 either way, because
    probabilities near 0 and 1 (and the loss of them) lose too much in 16 bits.
    """
    with _dtype_policy(precision):
        return _build(cfg, input_size, rdr_grade)


def as_float32(model: keras.Model) -> keras.Model:
    """``model`` computing in float32: itself if it already does, else a float32 copy.

    Evaluation, the validation threshold and Grad-CAM use this, so a model trained in mixed
    precision is judged and explained with full-precision arithmetic (its weights are float32
    already; only the computation changes). The copy shares nothing with ``model``.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model

    def in_float32(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    clone = keras.models.clone_model(model, clone_function=in_float32)
    clone.set_weights(model.get_weights())
    return clone


def _pool(x: keras.KerasTensor, pooling: str) -> keras.KerasTensor:
    """``model.pooling``: global average (the original), global max, or both side by side."""
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name="pool")(x)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name="pool")(x)
    return layers.Concatenate(name="pool")([layers.GlobalAveragePooling2D(name="pool_avg")(x),
                                            layers.GlobalMaxPooling2D(name="pool_max")(x)])


@keras.saving.register_keras_serializable(package="drtune")
class GradeHead(layers.Layer):
    """Grade logits [B, 5] -> [P(NRDR), P(RDR), P(grade 0), ..., P(grade 4)], float32.

    The first two columns are what every reader of a drtune model takes (``[:, 1]`` is P(RDR)),
    so evaluate, predict, Grad-CAM, test-time augmentation and ensembles work unchanged; the
    grade columns are what the training loss (:class:`GradeCrossentropy`) reads. Learning the
    grades teaches the network what separates a mild eye (grade 1: microaneurysms only) from a
    healthy one, the very lesions that make a moderate eye (grade 2) referable when no exudate
    shows; a 2-class head is never asked to see them below the referral grade.
    """

    def __init__(self, rdr_grade: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rdr_grade = rdr_grade

    def call(self, logits: Any) -> Any:
        from keras import ops

        p = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        nrdr = ops.sum(p[:, :self.rdr_grade], axis=-1, keepdims=True)
        rdr = ops.sum(p[:, self.rdr_grade:], axis=-1, keepdims=True)
        return ops.concatenate([nrdr, rdr, p], axis=-1)

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (input_shape[0], 2 + N_GRADES)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rdr_grade": self.rdr_grade}


@keras.saving.register_keras_serializable(package="drtune")
class OrdinalLogits(layers.Layer):
    """Severity score [B, 1] -> log P(grade 0), ..., log P(grade 4) [B, 5]: a cumulative-link
    (proportional odds) model, P(grade > k) = sigmoid(score - t_k) with learned cut points
    t_0 < t_1 < t_2 < t_3, the grade probabilities the differences of consecutive steps.

    The ICDR grades are steps of one disease, not five unrelated classes: one score ranks every
    eye, so the referral decision (P(RDR) = P(grade >= referral grade) = sigmoid(score - t)) is
    a cut of the same ranking the grades train, where a 5-way softmax spends a separate direction
    on each grade. Its output feeds :class:`GradeHead` as logits (the softmax of log-probabilities
    is those probabilities), so the loss, Grad-CAM and every reader are the grade head's.
    """

    def __init__(self, n_grades: int = N_GRADES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_grades = n_grades

    def build(self, input_shape: tuple[Any, ...]) -> None:
        # Cut points as the first one plus positive gaps (softplus), so they stay ordered and
        # every grade keeps a probability >= 0; they start 1 apart around 0.
        self.first_cut = self.add_weight(shape=(1,), initializer=keras.initializers.Constant(-1.5),
                                         name="first_cut")
        self.gaps = self.add_weight(shape=(self.n_grades - 2,), name="gaps",
                                    initializer=keras.initializers.Constant(0.5413))  # softplus = 1

    def cuts(self) -> Any:
        from keras import ops

        return ops.concatenate([self.first_cut, self.first_cut + ops.cumsum(ops.softplus(self.gaps))])

    def call(self, score: Any) -> Any:
        from keras import ops

        above = ops.sigmoid(ops.cast(score, "float32") - self.cuts())  # [B, n-1]: P(grade > k)
        ones, zeros = ops.ones_like(above[:, :1]), ops.zeros_like(above[:, :1])
        p = ops.concatenate([ones, above], axis=-1) - ops.concatenate([above, zeros], axis=-1)
        return ops.log(ops.maximum(p, 1e-7))

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (input_shape[0], self.n_grades)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "n_grades": self.n_grades}


def head_kind(model: keras.Model) -> str:
    """The model's ``model.head``: "referral", "grade" or "ordinal" (from its layers)."""
    if grade_head(model) is None:
        return "referral"
    return "ordinal" if isinstance(model.get_layer("grade_logits"), OrdinalLogits) else "grade"


def grade_head(model: keras.Model) -> GradeHead | None:
    """The model's :class:`GradeHead`, or None for a 2-class (referral) model."""
    try:
        head = model.get_layer(OUTPUT_LAYER)
    except ValueError:  # an ensemble or TTA wrapper: its members carry the heads
        return None
    return head if isinstance(head, GradeHead) else None


def _build(cfg: ModelConfig, input_size: int, rdr_grade: int = 2) -> keras.Model:
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv(cfg.width, 7, 2, cfg.l2, "stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, mult in enumerate((1, 2, 4), start=1):
        for block in range(cfg.blocks_per_stage):
            x = _block(x, cfg.width * mult, 2 if block == 0 else 1, cfg.l2, f"stage{stage}_block{block + 1}",
                       cfg.zero_init_residual)
    x = layers.ReLU(name=FEATURE_LAYER)(x)
    x = _pool(x, cfg.pooling)
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout, name="dropout")(x)
    if cfg.head == "grade":
        logits = layers.Dense(N_GRADES, kernel_regularizer=reg, name="grade_logits", dtype="float32")(x)
    elif cfg.head == "ordinal":
        score = layers.Dense(1, kernel_regularizer=reg, name="severity", dtype="float32")(x)
        logits = OrdinalLogits(N_GRADES, name="grade_logits", dtype="float32")(score)
    if cfg.head in GRADE_HEADS:
        outputs = GradeHead(rdr_grade, name=OUTPUT_LAYER, dtype="float32")(logits)
    else:
        outputs = layers.Dense(2, activation="softmax", kernel_regularizer=reg, name=OUTPUT_LAYER,
                               dtype="float32")(x)
    return keras.Model(inputs, outputs, name="resnetv2_small")


@keras.saving.register_keras_serializable(package="drtune")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing (Keras' sparse loss has none).

    Registered so that a checkpoint compiled with it reloads (resume, warm start): importing
    this module is enough, and train.py always does.
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy",
                 **kwargs: object) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing
        self._ce = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)

    def call(self, y_true: object, y_pred: object) -> object:
        from keras import ops

        onehot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(y_pred)[-1])
        return keras.losses.categorical_crossentropy(onehot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="drtune")
class GradeCrossentropy(SmoothedSparseCrossentropy):
    """Cross-entropy of the ICDR grade (int targets 0-4) against a :class:`GradeHead`'s grade
    columns, with label smoothing over the five grades: the sparse loss above, on those columns."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "grade_crossentropy", **kwargs: object) -> None:
        super().__init__(label_smoothing=label_smoothing, name=name, **kwargs)

    def call(self, y_true: object, y_pred: object) -> object:
        return super().call(y_true, y_pred[:, 2:])


@keras.saving.register_keras_serializable(package="drtune")
class ReferralAccuracy(keras.metrics.MeanMetricWrapper):
    """Training accuracy of a grade-head model as the logs have always meant it: P(RDR) > 0.5
    against grade >= ``rdr_grade`` (not the 5-grade accuracy)."""

    def __init__(self, rdr_grade: int = 2, name: str = "accuracy", **kwargs: Any) -> None:
        super().__init__(fn=_referral_hits, name=name, rdr_grade=rdr_grade, **kwargs)
        self.rdr_grade = rdr_grade

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "rdr_grade": self.rdr_grade}


def _referral_hits(y_true: Any, y_pred: Any, rdr_grade: int = 2) -> Any:
    from keras import ops

    referable = ops.reshape(ops.cast(y_true, "int32"), (-1,)) >= rdr_grade
    return ops.cast(ops.equal(referable, y_pred[:, 1] > 0.5), "float32")


def learning_rate(train: TrainConfig, lr: float, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """``lr`` constant, or linear warm-up then cosine decay to 0 over ``train.epochs``.

    The schedule counts optimizer steps, which the checkpoint carries, so a resumed run
    continues on the same curve.
    """
    warmup = train.warmup_epochs * steps_per_epoch
    if train.schedule == "constant" and not warmup:
        return lr
    total = max(1, train.epochs * steps_per_epoch)
    if train.schedule == "constant":
        # Warm-up alone: a cosine "decay" to alpha=1 stays flat after the ramp.
        return keras.optimizers.schedules.CosineDecay(0.0, max(1, total - warmup), alpha=1.0,
                                                      warmup_target=lr, warmup_steps=warmup)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(0.0, max(1, total - warmup),
                                                      warmup_target=lr, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(lr, total)


def compile_model(model: keras.Model, lr: float, train: TrainConfig | None = None,
                  steps_per_epoch: int = 1, precision: str = "float32",
                  jit_compile: bool | str = "auto") -> keras.Model:
    """Adam + sparse categorical cross-entropy, as in the original project, by default.

    ``train`` adds what the real-data study uses: AdamW's decoupled weight decay, a warm-up +
    cosine schedule (``steps_per_epoch`` converts its epochs to steps), label smoothing, soft
    targets at the referral boundary (``train.borderline``) and an exponential moving average of
    the weights (``train.ema``). A grade-head model (:class:`GradeHead`) is trained on the ICDR
    grades instead, whatever ``train`` says: the head decides, so a warm start keeps its loss.
    ``precision`` ``mixed_float16`` scales the loss dynamically (Keras' LossScaleOptimizer) so
    that small float16 gradients do not underflow; bfloat16 has float32's range and needs none.
    ``jit_compile`` "auto" is Keras' rule: XLA on a GPU, not on a CPU-only machine (where it
    measured 2.3x slower for this network).
    """
    train = train or TrainConfig(lr=lr)
    rate = learning_rate(train, lr, steps_per_epoch)
    # train.ema: the optimizer keeps the moving average; callbacks.EMAWeights swaps it in.
    ema = dict(use_ema=True, ema_momentum=train.ema) if train.ema else {}
    if train.optimizer == "adamw":
        optimizer: keras.optimizers.Optimizer = keras.optimizers.AdamW(learning_rate=rate,
                                                                       weight_decay=train.weight_decay, **ema)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=rate, **ema)
    if precision == "mixed_float16":
        # Explicit, not compile's auto_scale_loss: that looks at the model's own policy, which a
        # functional model reloaded from a checkpoint does not keep (its layers do).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    head = grade_head(model)
    if head is not None:
        # Targets are ICDR grades then (drtune.data.train_dataset(grades=True)).
        loss: keras.losses.Loss = GradeCrossentropy(train.label_smoothing)
        accuracy: keras.metrics.Metric = ReferralAccuracy(head.rdr_grade)
    elif train.borderline:
        # The pipeline's targets are class probabilities then (drtune.data.borderline_targets),
        # each on its hard label's side of 0.5, so arg-max accuracy still counts the labels.
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = (SmoothedSparseCrossentropy(train.label_smoothing) if train.label_smoothing
                else keras.losses.SparseCategoricalCrossentropy())
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile, auto_scale_loss=False,
                  metrics=[accuracy])
    return model
