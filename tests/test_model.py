"""The ResNetV2 builder: pinned default architecture and its parameters."""

from __future__ import annotations

import numpy as np
import pytest

from drtune.config import ModelConfig
from drtune.model import FEATURE_LAYER, build_model


def test_default_architecture_is_pinned() -> None:
    model = build_model(ModelConfig(), input_size=256)
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in model.layers}
    assert shapes["stem_conv"] == (128, 128, 16)  # 7x7 stride 2
    assert shapes["stem_pool"] == (64, 64, 16)  # 3x3 stride 2
    assert shapes["stage1_block1_add"] == (32, 32, 16)
    assert shapes["stage2_block1_add"] == (16, 16, 32)
    assert shapes["stage3_block1_add"] == (8, 8, 64)
    assert shapes[FEATURE_LAYER] == (8, 8, 64)
    assert shapes["pool"] == (64,)
    assert shapes["probs"] == (2,)
    assert model.get_layer("stem_conv").kernel.shape == (7, 7, 3, 16)
    assert model.get_layer("stage2_block1_conv1").kernel.shape == (3, 3, 16, 32)
    assert model.get_layer("stage2_block1_shortcut").kernel.shape == (1, 1, 16, 32)
    assert model.count_params() == 79_794
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 79_410


def test_parametrised_variants() -> None:
    wide = build_model(ModelConfig(width=8, blocks_per_stage=2, dropout=0.3, l2=1e-4), input_size=64)
    names = [layer.name for layer in wide.layers]
    assert "stage3_block2_add" in names and "dropout" in names
    assert wide.get_layer(FEATURE_LAYER).output.shape[1:] == (2, 2, 32)
    assert len(wide.losses) > 0  # L2 penalties are registered
    probs = wide.predict(np.full((3, 64, 64, 3), 128.0, np.float32), verbose=0)
    assert probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_pooling_is_the_mean_max_or_both_of_the_feature_map(pooling: str) -> None:
    import keras

    model = build_model(ModelConfig(width=4, pooling=pooling), input_size=32)
    probe = keras.Model(model.inputs, [model.get_layer(FEATURE_LAYER).output, model.get_layer("pool").output])
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    features, pooled = probe.predict(x, verbose=0)
    expected = {"avg": [features.mean(axis=(1, 2))], "max": [features.max(axis=(1, 2))],
                "avgmax": [features.mean(axis=(1, 2)), features.max(axis=(1, 2))]}[pooling]
    np.testing.assert_allclose(pooled, np.concatenate(expected, axis=1), rtol=1e-5, atol=1e-6)
    assert model.get_layer("probs").kernel.shape == (16 * len(expected), 2)


def test_zero_init_residual_starts_every_block_as_its_shortcut_and_trains_the_branch() -> None:
    import keras

    from drtune.model import compile_model

    # Seeded: with a few unlucky initialisations (drawn from whatever state earlier tests left)
    # every feature of a tiny 1x1 last stage is negative, no gradient reaches that branch, and
    # the check below would fail for a reason that has nothing to do with zero-initialisation.
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(width=4, blocks_per_stage=2, zero_init_residual=True)
    model = build_model(cfg, input_size=32)
    conv2 = [layer for layer in model.layers if layer.name.endswith("_conv2")]
    assert len(conv2) == 6 and all(not np.any(layer.kernel.numpy()) for layer in conv2)
    assert np.any(model.get_layer("stage1_block1_conv1").kernel.numpy())  # only the branch ends
    # An identity block (second of its stage) passes its input through unchanged at the start.
    probe = keras.Model(model.inputs, [model.get_layer("stage1_block1_add").output,
                                       model.get_layer("stage1_block2_add").output])
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    before, after = probe.predict(x, verbose=0)
    np.testing.assert_array_equal(before, after)
    compile_model(model, 1e-2).fit(x, np.array([0, 1, 0, 1]), epochs=2, verbose=0)
    assert all(np.any(layer.kernel.numpy()) for layer in conv2)  # the branches do learn
    assert np.any(build_model(ModelConfig(width=4), 32).get_layer("stage1_block1_conv2").kernel.numpy())


@pytest.mark.slow
def test_narrow_model_trains_at_full_size_without_crashing() -> None:
    """Regression: TF 2.21's oneDNN strided 1x1 conv corrupted the heap below 16 channels."""
    import subprocess
    import sys

    code = ("import numpy as np; from drtune.config import ModelConfig; "
            "from drtune.model import build_model, compile_model; "
            "m = compile_model(build_model(ModelConfig(width=8), 256), 1e-3); "
            "x = np.random.rand(32, 256, 256, 3).astype('float32') * 255; "
            "m.fit(x, np.random.randint(0, 2, 32), batch_size=4, epochs=2, verbose=0); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def _separable(n: int = 96, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a red cast: learnable in a few epochs by any working model."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 200, (n, size, size, 3)).astype("float32")
    y = (np.arange(n) % 2).astype("int32")
    x[y == 1, :, :, 0] += 55.0
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_learns_reloads_and_evaluates_in_float32(tmp_path, precision: str) -> None:
    import keras

    from drtune.config import TrainConfig
    from drtune.model import as_float32, compile_model

    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(width=8), 32, precision)
    assert model.get_layer("stem_conv").dtype_policy.name == precision
    assert model.get_layer("probs").dtype_policy.name == "float32"  # softmax in full precision
    assert keras.config.dtype_policy().name == "float32"  # the process-wide policy is untouched
    compile_model(model, 3e-3, TrainConfig(lr=3e-3), steps_per_epoch=6, precision=precision)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    x, y = _separable()
    history = model.fit(x, y, epochs=20, batch_size=16, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0] and history["accuracy"][-1] >= 0.9
    p = model.predict(x, verbose=0)
    assert p.dtype == np.float32

    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert reloaded.get_layer("stem_conv").dtype_policy.name == precision
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), p)

    full = as_float32(reloaded)
    assert {layer.dtype_policy.name for layer in full.layers} == {"float32"}
    # The same weights computed in float32: the same decisions, probabilities within 16-bit noise.
    np.testing.assert_allclose(full.predict(x, verbose=0), p, atol=0.05)
    assert as_float32(full) is full


@pytest.mark.parametrize("rdr_grade", [2, 3])
def test_grade_head_sums_the_referable_grades_and_reloads(tmp_path, rdr_grade: int) -> None:
    # Columns 0-1 are P(NRDR), P(RDR) (what every reader takes), then the five grade
    # probabilities; P(RDR) is the sum of those at or above the referral grade.
    import keras

    from drtune.model import GradeHead, grade_head

    model = build_model(ModelConfig(width=4, head="grade"), input_size=32, rdr_grade=rdr_grade)
    assert isinstance(grade_head(model), GradeHead) and grade_head(build_model(ModelConfig(width=4), 32)) is None
    x = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    probs = model.predict(x, verbose=0)
    assert probs.shape == (6, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[:, 2:].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[:, 0], probs[:, 2:2 + rdr_grade].sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(probs[:, 1], probs[:, 2 + rdr_grade:].sum(axis=1), rtol=1e-5)
    logits = keras.Model(model.inputs, model.get_layer("grade_logits").output).predict(x, verbose=0)
    np.testing.assert_allclose(probs[:, 2:], np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), rtol=1e-4)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert grade_head(again).rdr_grade == rdr_grade
    np.testing.assert_allclose(again.predict(x, verbose=0), probs, rtol=1e-5)


@pytest.mark.parametrize("rdr_grade", [2, 3])
def test_ordinal_head_cuts_one_severity_score_into_ordered_grades(tmp_path, rdr_grade: int) -> None:
    # P(grade > k) = sigmoid(score - cut_k) with increasing cuts: the grade probabilities are
    # the differences of those steps, P(RDR) is one step at the referral grade, and the head is
    # a grade head for everything downstream (GradeHead, its loss, head_kind).
    import keras

    from drtune.model import GradeHead, OrdinalLogits, grade_head, head_kind

    model = build_model(ModelConfig(width=4, head="ordinal"), input_size=32, rdr_grade=rdr_grade)
    assert isinstance(grade_head(model), GradeHead) and isinstance(model.get_layer("grade_logits"), OrdinalLogits)
    assert [head_kind(build_model(ModelConfig(width=4, head=h), 32)) for h in ("referral", "grade", "ordinal")] \
        == ["referral", "grade", "ordinal"]
    layer = model.get_layer("grade_logits")
    layer.gaps.assign([0.3, -2.0, 1.0])  # uneven gaps: the cuts must still increase
    cuts = keras.ops.convert_to_numpy(layer.cuts())
    assert np.all(np.diff(cuts) > 0)
    x = np.random.default_rng(2).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    probs = model.predict(x, verbose=0)
    score = keras.Model(model.inputs, model.get_layer("severity").output).predict(x, verbose=0)
    above = 1 / (1 + np.exp(-(score - cuts)))  # [6, 4]: P(grade > k)
    grades = np.concatenate([1 - above[:, :1], above[:, :-1] - above[:, 1:], above[:, -1:]], axis=1)
    np.testing.assert_allclose(probs[:, 2:], grades, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs[:, 1], above[:, rdr_grade - 1], rtol=1e-4)
    # One score orders every eye: P(RDR) ranks the photographs as the score does.
    assert list(np.argsort(probs[:, 1])) == list(np.argsort(score[:, 0]))
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert head_kind(again) == "ordinal" and grade_head(again).rdr_grade == rdr_grade
    np.testing.assert_allclose(again.predict(x, verbose=0), probs, rtol=1e-5)


def test_grade_loss_and_accuracy_read_the_grade_and_referral_columns() -> None:
    from drtune.config import TrainConfig
    from drtune.model import GradeCrossentropy, ReferralAccuracy, compile_model

    # Rows: (P(NRDR), P(RDR), P(grade 0..4)) as a grade head with referral grade 2 makes them.
    grade_p = np.array([[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2, 0.5, 0.1, 0.1, 0.1]])
    y_pred = np.concatenate([grade_p[:, :2].sum(1, keepdims=True), grade_p[:, 2:].sum(1, keepdims=True), grade_p],
                            axis=1).astype("float32")
    grades = np.array([0, 3, 2])
    expected = -np.log(grade_p[np.arange(3), grades]).mean()
    assert float(GradeCrossentropy()(grades, y_pred)) == pytest.approx(expected, rel=1e-5)
    # Smoothing 0.1 over five grades: the target puts 0.92 on the grade and 0.02 on each other.
    smooth = np.full((3, 5), 0.02) + 0.9 * np.eye(5)[grades]
    assert float(GradeCrossentropy(0.1)(grades, y_pred)) == pytest.approx(
        -(smooth * np.log(grade_p)).sum(1).mean(), rel=1e-5)
    # Referral accuracy, P(RDR) > 0.5 against grade >= 2: P(RDR) 0.2, 0.8, 0.3 for grades 0, 3,
    # 2 -> hit, hit, miss.
    acc = ReferralAccuracy(2)
    acc.update_state(grades, y_pred)
    assert float(acc.result()) == pytest.approx(2 / 3)
    # compile_model picks both for a grade-head model, whatever the training config says.
    model = compile_model(build_model(ModelConfig(width=4, head="grade"), 32), 1e-3, TrainConfig(label_smoothing=0.1))
    assert isinstance(model.loss, GradeCrossentropy) and model.loss.label_smoothing == 0.1
