"""`drtune.data`: augmentation (eager, tf.function, tf.data), balancing, eval order, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from drtune import data
from drtune.errors import InputError
from drtune.prepare import encode_jpeg, write_shards
from drtune.runs import load_meta

from conftest import make_data

S = 64  # test image side


# --------------------------------------------------------------------------- helpers


def disc_batch(n: int = 16, size: int = S) -> np.ndarray:
    """Grey discs on black with a red marker left and a green marker right of the centre."""
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    img = np.zeros((size, size, 3), np.float32)
    img[(yy - c) ** 2 + (xx - c) ** 2 <= (0.36 * size) ** 2] = 120.0
    r = max(2, size // 20)
    for dx, colour in ((-0.2, (250.0, 0.0, 0.0)), (0.2, (0.0, 250.0, 0.0))):
        mx = c + dx * size
        img[(yy - c) ** 2 + (xx - mx) ** 2 <= r**2] = colour
    return np.repeat(img[None], n, axis=0)


def marker_angles(batch: np.ndarray) -> np.ndarray:
    """Angle (degrees, 0..90) between the red->green marker line and the horizontal axis.

    Flips turn 0 into 180 degrees; folding into 0..90 keeps only the rotation (+ shear) part.
    NaN where a marker left the frame.
    """
    out = []
    for img in batch:
        red = (img[..., 0] - img[..., 1]) > 60
        green = (img[..., 1] - img[..., 0]) > 60
        if red.sum() < 3 or green.sum() < 3:
            out.append(np.nan)
            continue
        (ry, rx), (gy, gx) = [np.argwhere(m).mean(axis=0) for m in (red, green)]
        ang = abs(math.degrees(math.atan2(gy - ry, gx - rx))) % 180
        out.append(min(ang, 180 - ang))
    return np.array(out)


def corner_means(batch: np.ndarray, k: int = 6) -> np.ndarray:
    corners = [batch[:, :k, :k], batch[:, :k, -k:], batch[:, -k:, :k], batch[:, -k:, -k:]]
    return np.stack([c.mean(axis=(1, 2, 3)) for c in corners], axis=1).max(axis=1)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("imb") / "data",
                     {"train": (40, 10), "val": (5, 3), "test": (0, 0)})


def first_labels(ds: tf.data.Dataset, n_batches: int) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in ds.take(n_batches)])


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("level", data.AUGMENT_LEVELS)
def test_augment_eager_function_and_tfdata_agree_on_contract(level: str) -> None:
    x = disc_batch(16)
    seed = tf.constant([3, 4], tf.int64)
    eager = data.augment(tf.constant(x), level, seed).numpy()
    graph = tf.function(lambda t: data.augment(t, level, seed))(tf.constant(x)).numpy()
    piped = next(iter(tf.data.Dataset.from_tensors(x).map(
        lambda t: data.augment(t, level, seed)))).numpy()
    for out in (eager, graph, piped):
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 255.0
        # the black surround stays black in most images (zoom/shift may push the disc into one)
        assert np.mean(corner_means(out) < 10.0) >= 0.75
    # stateless: the same seed is the same augmentation whichever way it runs
    np.testing.assert_allclose(eager, graph, atol=0.01)
    np.testing.assert_allclose(eager, piped, atol=0.01)
    if level == "none":
        np.testing.assert_array_equal(eager, x)
    else:
        changed = np.abs(eager - x).reshape(len(x), -1).max(axis=1) > 1.0
        assert changed.all()
        # images of one batch get different parameters
        assert np.abs(eager[0] - eager[1]).max() > 1.0


def test_augment_without_seed_and_single_image() -> None:
    x = disc_batch(4)
    a, b = data.augment(x, "base").numpy(), data.augment(x, "base").numpy()
    assert not np.array_equal(a, b)
    one = data.augment(x[0], "strong").numpy()
    assert one.shape == x[0].shape


def test_rotation_ranges_of_base_rotate_and_strong() -> None:
    x = disc_batch(64)
    assert np.nanmax(marker_angles(x)) < 1.0  # the probe itself reads 0 on the input
    base, rotate, strong = (marker_angles(data.augment(x, level, tf.constant([1, 1])).numpy())
                            for level in ("base", "rotate", "strong"))
    assert all(np.isfinite(a).sum() >= 48 for a in (base, rotate, strong))
    # base: +-5 degrees of rotation plus +-0.05 rad (2.9 degrees) of shear, plus pixel rounding
    assert np.nanmax(base) < 10.0
    assert np.sum(strong > 30.0) >= 10 and np.sum(rotate > 30.0) >= 10


def test_rotate_keeps_brightness_and_periphery_close_to_the_input() -> None:
    """``rotate`` turns freely but barely rescales: brightness 0.9-1.1, zoom 0.9-1.1 (base's 0.7 crops)."""
    x = disc_batch(64)
    out = data.augment(x, "rotate", tf.constant([5, 6])).numpy()
    # The disc's centre stays grey under any rotation (the markers sit 0.2 S from it).
    centre = out[:, S // 2 - 3:S // 2 + 3, S // 2 - 3:S // 2 + 3, 2]
    factors = centre.mean(axis=(1, 2)) / 120.0
    assert 0.85 < factors.min() and factors.max() < 1.15
    disc_area = ((x[0, ..., 2] > 60).sum(), (out[..., 2] > 60).sum(axis=(1, 2)))
    assert np.all(np.abs(disc_area[1] / disc_area[0] - 1.0) < 0.3)  # zoom 0.9-1.1: area within +-21%


def test_augment_flips_and_brightness_happen() -> None:
    x = disc_batch(64)
    out = data.augment(x, "base", tf.constant([5, 6])).numpy()
    red_x = [np.argwhere((o[..., 0] - o[..., 1]) > 60)[:, 1].mean() for o in out]
    green_x = [np.argwhere((o[..., 1] - o[..., 0]) > 60)[:, 1].mean() for o in out]
    mirrored = np.array(red_x) > np.array(green_x)
    assert 10 <= mirrored.sum() <= 54  # horizontal flip with p=0.5
    centre = out[:, S // 2 - 4:S // 2 + 4, S // 2 - 14:S // 2 - 8, 2]  # grey part of the disc
    factors = centre.mean(axis=(1, 2)) / 120.0
    assert factors.min() < 0.75 and factors.max() > 1.1


def test_augment_params_and_unknown_level() -> None:
    assert data.augment_params("base")["rotation_deg"] == 5.0
    assert data.augment_params("strong")["rotation_deg"] == 180.0
    assert data.augment_params("rotate")["rotation_deg"] == 180.0
    p = data.augment_params("none")
    p["shift"] = 9.0  # a copy: callers cannot corrupt the table
    assert data.augment_params("none")["shift"] == 0.0
    with pytest.raises(InputError, match="none, base, rotate, strong"):
        data.augment_params("heavy")
    with pytest.raises(InputError, match="heavy"):
        data.augment(disc_batch(1), "heavy")


# --------------------------------------------------------------------------- training data


def test_balanced_training_reads_half_rdr(imbalanced: Path) -> None:
    ds, steps = data.train_dataset(imbalanced, 8, augment_level="none", seed=0)
    assert steps == math.ceil(2 * 40 / 8)
    labels = first_labels(ds, 50)
    assert len(labels) == 400
    assert abs(labels.mean() - 0.5) < 0.1
    # every image of both classes is shown (oversampling repeats the minority, all of it)
    seen = np.concatenate([x.numpy()[:, 16, 16, 0] for x, _ in ds.take(50)])
    assert len(set(np.round(seen / 2).astype(int))) == 50


def test_unbalanced_training_keeps_disk_ratio(imbalanced: Path) -> None:
    ds, steps = data.train_dataset(imbalanced, 8, augment_level="none", balance=False)
    assert steps == math.ceil(50 / 8)
    labels = first_labels(ds, 50)
    assert abs(labels.mean() - 0.2) < 0.05  # 50 batches = exactly 8 passes over 50 images


def test_training_batches_shape_dtype_and_labels_match_images(imbalanced: Path) -> None:
    ds, _ = data.train_dataset(imbalanced, 8, augment_level="none", seed=1)
    x, y = next(iter(ds))
    assert x.shape == (8, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    # the flat colour encodes the label, so a label/image mix-up would show here
    np.testing.assert_array_equal((x.numpy()[:, 16, 16, 0] > 120).astype(int), y.numpy())


def test_borderline_targets_are_soft_next_to_the_referral_grade(tmp_path: Path) -> None:
    # Flat images whose grey level encodes the grade (20 + 40 * grade) or, for a record without
    # one (-1, written by hand), its label (230 NRDR, 250 RDR): each target must be its grade's
    # row of the table, and an ungraded record's target its hard label.
    root = tmp_path / "data"
    root.mkdir()
    grades = [0, 0, 1, 1, -1, 2, 2, 3, 4, -1]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    grey = [230 + 20 * lab if g < 0 else 20 + 40 * g for g, lab in zip(grades, labels)]
    examples = [(encode_jpeg(np.full((32, 32, 3), v, np.uint8), 95), lab, g, f"img_{i}")
                for i, (v, g, lab) in enumerate(zip(grey, grades, labels))]
    files = write_shards(root, "train", examples, shard_size=4)
    (root / "meta.json").write_text(json.dumps({"size": 32, "rdr_grade": 2, "splits": {
        "train": {"n": 10, "nrdr": 5, "rdr": 5, "files": files, "names": [e[3] for e in examples]}}}))
    table = data.borderline_targets(0.2).numpy()
    np.testing.assert_allclose(table[:, 1], [0.0, 0.2, 0.8, 1.0, 1.0])
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    expected = {v: (np.eye(2)[lab] if g < 0 else table[g]) for v, g, lab in zip(grey, grades, labels)}
    ds, _ = data.train_dataset(root, 5, augment_level="none", seed=0, borderline=0.2)
    seen = set()
    for x, y in ds.take(20):
        assert y.dtype == tf.float32 and y.shape == (5, 2)
        for value, target in zip(x.numpy()[:, 16, 16, 0], y.numpy()):
            level = min(expected, key=lambda v: abs(v - value))
            np.testing.assert_allclose(target, expected[level], err_msg=f"grey {value}")
            seen.add(level)
    assert seen == set(grey)
    # Another referral grade moves the soft pair with it.
    np.testing.assert_allclose(data.borderline_targets(0.3, rdr_grade=3).numpy()[:, 1], [0, 0, 0.3, 0.7, 1])


def test_training_is_repeatable_per_seed(prepared: Path) -> None:
    def first(seed: int) -> np.ndarray:
        ds, _ = data.train_dataset(prepared, 4, augment_level="base", seed=seed)
        return next(iter(ds))[0].numpy()

    a, b, c = first(7), first(7), first(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_augmentation_seed_differs_per_batch_and_per_run_seed(tmp_path: Path) -> None:
    # One training image: every batch shows it, so any difference is the augmentation's.
    d = make_data(tmp_path / "d", {"train": (1, 0), "val": (1, 0)})

    def batches(seed: int) -> np.ndarray:
        ds, _ = data.train_dataset(d, 1, augment_level="base", seed=seed, balance=False)
        return np.stack([x.numpy()[0] for x, _ in ds.take(3)])

    a, b = batches(3), batches(4)
    np.testing.assert_array_equal(a, batches(3))
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    assert all(not np.array_equal(a[i], b[i]) for i in range(3))


@pytest.mark.parametrize("balance", [True, False])
def test_resumed_training_data_continues_the_uninterrupted_stream(imbalanced: Path, balance: bool) -> None:
    # A resumed run must see the batches an uninterrupted one sees at the same epochs: the same
    # images in the same order (shuffle and class sampling continue) and the same augmentation.
    def stream(initial_epoch: int, n: int) -> list[np.ndarray]:
        ds, steps = data.train_dataset(imbalanced, 4, augment_level="base", seed=5, balance=balance,
                                       steps_per_epoch=3, initial_epoch=initial_epoch)
        assert steps == 3
        return [np.concatenate([x.numpy().ravel(), y.numpy()]) for x, y in ds.take(n)]

    whole = stream(0, 7 * 3)
    resumed = stream(5, 2 * 3)
    assert len(resumed) == 6
    for a, b in zip(whole[15:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0], resumed[0])


def test_training_resizes_and_works_without_cache(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, _ = data.train_dataset(prepared, 4, augment_level="strong", image_size=32)
    x, _ = next(iter(ds))
    assert x.shape == (4, 32, 32, 3)
    monkeypatch.setattr(data, "_cache_budget", lambda: 0)
    ds, _ = data.train_dataset(prepared, 4, augment_level="base")
    x, _ = next(iter(ds))
    assert x.shape == (4, 64, 64, 3) and float(tf.reduce_max(x)) > 50


def test_training_with_one_class_missing(tmp_path: Path) -> None:
    d = make_data(tmp_path / "d", {"train": (6, 0), "val": (2, 1)})
    with pytest.raises(InputError, match=r"d: split 'train' has no RDR"):
        data.train_dataset(d, 2)
    ds, steps = data.train_dataset(d, 2, balance=False)
    assert steps == 3 and next(iter(ds))[0].shape == (2, 32, 32, 3)


# --------------------------------------------------------------------------- evaluation data


def read_raw(data_dir: Path, split: str) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Decode a split independently of drtune.data (protobuf parse + decode_jpeg)."""
    meta = load_meta(data_dir)
    images, labels, names = [], [], []
    for f in meta["splits"][split]["files"]:
        for raw in tf.data.TFRecordDataset(str(data_dir / f)):
            ex = tf.train.Example.FromString(raw.numpy()).features.feature
            images.append(tf.io.decode_jpeg(ex["image"].bytes_list.value[0], channels=3).numpy())
            labels.append(ex["label"].int64_list.value[0])
            names.append(ex["name"].bytes_list.value[0].decode())
    return images, labels, names


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_dataset_is_exact_ordered_and_deterministic(prepared: Path, split: str) -> None:
    meta = load_meta(prepared)
    ds = data.eval_dataset(prepared, split, batch_size=3)
    first = [(x.numpy(), y.numpy()) for x, y in ds]
    second = [(x.numpy(), y.numpy()) for x, y in ds]
    images = np.concatenate([x for x, _ in first])
    labels = np.concatenate([y for _, y in first])
    assert len(images) == meta["splits"][split]["n"]
    assert images.dtype == np.float32
    for (a, la), (b, lb) in zip(first, second):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    raw_images, raw_labels, raw_names = read_raw(prepared, split)
    np.testing.assert_array_equal(images, np.stack(raw_images).astype(np.float32))
    np.testing.assert_array_equal(labels, raw_labels)
    assert raw_names == meta["splits"][split]["names"]
    assert data.split_names(prepared, split) == meta["splits"][split]["names"]
    np.testing.assert_array_equal(data.split_labels(prepared, split), labels)
    assert data.split_labels(prepared, split).dtype == np.int32


def test_eval_dataset_resizes(prepared: Path) -> None:
    x, _ = next(iter(data.eval_dataset(prepared, "val", image_size=32)))
    assert x.shape[1:] == (32, 32, 3)


def test_eval_order_is_meta_order_not_sorted(imbalanced: Path) -> None:
    """Each image, label and name of an eval pass is the record meta.json lists at that place
    (make_data's grey level tells which image it is), though the records are not sorted."""
    x, y = (np.concatenate(parts) for parts in zip(*data.eval_dataset(imbalanced, "val", 3, cache=False)
                                                   .as_numpy_iterator()))
    names = data.split_names(imbalanced, "val")
    assert x.shape == (8, 32, 32, 3) and list(y) == list(data.split_labels(imbalanced, "val"))
    n0 = 5  # NRDR images of the val split
    for image, label, name in zip(x, y, names):
        i = int(name.split("_")[1])
        assert label == int(i >= n0)
        assert abs(image.mean() - (130 + 2 * (i - n0) if label else 10 + 2 * i)) <= 1.5
    names = load_meta(imbalanced)["splits"]["train"]["names"]
    assert names != sorted(names)  # so that the next line checks order, not sorting
    assert data.split_names(imbalanced, "train") == names


# --------------------------------------------------------------------------- errors


def test_empty_split_missing_dir_and_unknown_split(imbalanced: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"{imbalanced}: split 'test' is empty"):
        data.eval_dataset(imbalanced, "test")
    with pytest.raises(InputError, match="split 'test' is empty"):
        data.split_labels(imbalanced, "test")
    with pytest.raises(InputError, match="data directory not found"):
        data.train_dataset(tmp_path / "nowhere", 4)
    with pytest.raises(InputError, match="no split 'dev'"):
        data.eval_dataset(imbalanced, "dev")
    with pytest.raises(InputError, match="augment level 'heavy'"):
        data.train_dataset(imbalanced, 4, augment_level="heavy")
    with pytest.raises(InputError, match="batch size 0"):
        data.eval_dataset(imbalanced, "val", batch_size=0)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    d = make_data(tmp_path / "d", {"train": (3, 3), "val": (2, 1)})
    shard = load_meta(d)["splits"]["val"]["files"][0]
    (d / shard).unlink()
    with pytest.raises(InputError, match=rf"{shard}: shard listed in meta.json is missing"):
        data.eval_dataset(d, "val")


@pytest.mark.parametrize("level", ["base", "strong"])
def test_fused_warp_matches_tensorflow_projective_transform(level: str) -> None:
    """The XLA kernel resamples exactly like ImageProjectiveTransformV3 (bilinear, fill 0)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 40, 48, 3)).astype(np.float32)
    u = tf.random.stateless_uniform([8, 9], seed=[0, 1])
    t = data._transforms(u, data.augment_params(level), 40, 48)
    # plus pure shifts that push the image part-way and (nearly) all the way out of the frame
    shifts = [(30.0, 0.0), (-20.5, 3.3), (0.5, -39.5), (-47.2, 39.9)]
    t = tf.concat([t[:4], tf.constant([[1, 0, dx, 0, 1, dy, 0, 0] for dx, dy in shifts],
                                      tf.float32)], axis=0)
    ref = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=t, output_shape=[40, 48], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT").numpy()
    out = tf.function(data._warp, jit_compile=True)(tf.constant(x), t, tf.ones([8])).numpy()
    np.testing.assert_allclose(out, ref, atol=0.05)
    assert (ref[4:] == 0).mean() > 0.4  # the shifts really left the frame


def test_strong_colour_jitter_keeps_near_black_near_black() -> None:
    x = np.zeros((32, 16, 16, 3), np.float32)
    x[:, :8] = 100.0  # the field
    x[:, 8:, :, 0] = 3.0  # JPEG-like noise in the surround
    out = data._jitter(tf.constant(x), tf.fill([32], 1.1), tf.fill([32], 0.9)).numpy()
    assert out[:, 8:].max() < 5.0
    assert np.allclose(out[:, :8].mean(axis=-1), 100.0, atol=1e-3)  # mean of the field kept
    sat = data._jitter(tf.constant(disc_batch(2)), tf.fill([2], 0.5), tf.fill([2], 1.0)).numpy()
    assert sat[0, 32, int(31.5 - 0.2 * S), 0] < 200  # the red marker lost saturation


def test_grade_targets_are_the_records_grades(tmp_path: Path) -> None:
    # Flat images whose grey level encodes the grade (20 + 40 * grade): each target must be its
    # image's grade; a split whose records are not all graded is refused by name.
    root = tmp_path / "data"
    root.mkdir()
    grades = [0, 0, 1, 1, 1, 2, 2, 3, 4, 4]
    examples = [(encode_jpeg(np.full((32, 32, 3), 20 + 40 * g, np.uint8), 95), int(g >= 2), g, f"img_{i}")
                for i, g in enumerate(grades)]
    files = write_shards(root, "train", examples, shard_size=4)
    entry = {"n": 10, "nrdr": 5, "rdr": 5, "files": files, "names": [e[3] for e in examples],
             "grades": {str(g): grades.count(g) for g in range(5)}}
    (root / "meta.json").write_text(json.dumps({"size": 32, "rdr_grade": 2, "splits": {"train": entry}}))
    ds, _ = data.train_dataset(root, 5, augment_level="none", seed=0, grades=True)
    seen = set()
    for x, y in ds.take(20):
        assert y.dtype == tf.int32 and y.shape == (5,)
        np.testing.assert_array_equal(np.round((x.numpy()[:, 16, 16, 0] - 20) / 40), y.numpy())
        seen.update(y.numpy().tolist())
    assert seen == set(grades)
    del entry["grades"]
    (root / "meta.json").write_text(json.dumps({"size": 32, "rdr_grade": 2, "splits": {"train": entry}}))
    with pytest.raises(InputError, match=r"data: split 'train' has 0 graded of 10 records .*model.head"):
        data.train_dataset(root, 5, augment_level="none", seed=0, grades=True)
