"""Tests for drtune.synth: IDRiD layout, determinism, fundus appearance and lesion masks."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from drtune import synth
from drtune.errors import InputError
from drtune.synth import (
    LABEL_HEADER,
    SYNTH_LAYOUT,
    TEST_IMAGES,
    TEST_LABELS,
    TEST_MASKS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    TRAIN_MASKS,
    make_synthetic,
    mask_path,
    render_fundus,
)

W, H = 640, 426  # the default size
N_TRAIN, N_TEST = 8, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthSummary:
    root = tmp_path_factory.mktemp("synth") / "idrid"
    return make_synthetic(root, n_train=N_TRAIN, n_test=N_TEST, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None, path
    return mask


def test_layout_matches_idrid_names(dataset: synth.SynthSummary) -> None:
    root = dataset.root
    assert TRAIN_IMAGES == Path("1. Original Images/a. Training Set")
    assert TEST_IMAGES == Path("1. Original Images/b. Testing Set")
    assert TRAIN_LABELS == Path("2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv")
    assert TEST_LABELS == Path("2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv")
    assert TRAIN_MASKS == Path("3. Lesion Masks/a. Training Set")
    assert TEST_MASKS == Path("3. Lesion Masks/b. Testing Set")
    expected = set()
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels, masks = SYNTH_LAYOUT[split]
        names = [f"IDRiD_{i:03d}" for i in range(1, n + 1)]
        expected |= {str(images / f"{x}.jpg") for x in names}
        expected |= {str(masks / f"{x}.png") for x in names}
        expected.add(str(labels))
    assert set(_files(root)) == expected
    # Built in a temporary sibling and renamed: nothing else is left next to the output.
    assert [p.name for p in root.parent.iterdir()] == [root.name]
    assert (dataset.n_train, dataset.n_test) == (N_TRAIN, N_TEST)


@pytest.mark.parametrize("split", ["train", "test"])
def test_label_csv(dataset: synth.SynthSummary, split: str) -> None:
    text = (dataset.root / SYNTH_LAYOUT[split][1]).read_text(encoding="utf-8")
    assert text.splitlines()[0] == "Image name,Retinopathy grade,Risk of macular edema"
    rows = list(csv.reader(text.splitlines()))
    assert tuple(rows[0]) == LABEL_HEADER
    body = rows[1:]
    assert [r[0] for r in body] == [f"IDRiD_{i:03d}" for i in range(1, len(body) + 1)]
    assert [int(r[1]) for r in body] == dataset.grades[split]
    for _, grade, edema in body:
        assert int(grade) in range(5)
        assert int(edema) in ((0,) if int(grade) < 2 else (0, 1, 2))


def test_images_and_masks_have_matching_sizes(dataset: synth.SynthSummary) -> None:
    for split in ("train", "test"):
        images, _, _ = SYNTH_LAYOUT[split]
        for jpg in sorted((dataset.root / images).glob("*.jpg")):
            assert jpg.read_bytes()[:2] == b"\xff\xd8"  # a real JPEG, not a renamed PNG
            assert _read_rgb(jpg).shape == (H, W, 3)
            mask = _read_mask(mask_path(dataset.root, split, jpg.name))
            assert mask.shape == (H, W) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}


def test_mask_path(dataset: synth.SynthSummary) -> None:
    got = mask_path(dataset.root, "test", "IDRiD_003.jpg")
    assert got == dataset.root / TEST_MASKS / "IDRiD_003.png" and got.is_file()
    want = dataset.root / TRAIN_MASKS / "IDRiD_001.png"
    assert mask_path(dataset.root, "train", "IDRiD_001") == want
    with pytest.raises(InputError, match="split"):
        mask_path(dataset.root, "val", "IDRiD_001")


def test_same_seed_is_byte_identical_and_independent_of_n(dataset: synth.SynthSummary,
                                                         tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", n_train=N_TRAIN, n_test=N_TEST, seed=3)
    assert _files(again.root) == _files(dataset.root)
    assert again.grades == dataset.grades
    # An image depends on (seed, split, index) only, not on how many images are made.
    fewer = _files(make_synthetic(tmp_path / "fewer", n_train=2, n_test=1, seed=3).root)
    full = _files(dataset.root)
    for rel, data in fewer.items():
        if not rel.endswith(".csv"):
            assert full[rel] == data, rel


def test_different_seed_gives_different_images(dataset: synth.SynthSummary, tmp_path: Path) -> None:
    other = _files(make_synthetic(tmp_path / "other", n_train=N_TRAIN, n_test=N_TEST, seed=4).root)
    full = _files(dataset.root)
    jpgs = [rel for rel in full if rel.endswith(".jpg")]
    assert all(full[rel] != other[rel] for rel in jpgs)


def test_both_classes_in_each_split(dataset: synth.SynthSummary) -> None:
    for split in ("train", "test"):
        grades = dataset.grades[split]
        assert any(g < 2 for g in grades) and any(g >= 2 for g in grades), (split, grades)
    # Balanced in blocks of four, so exactly half of a multiple-of-4 split is referable.
    assert sum(g >= 2 for g in dataset.grades["train"]) == N_TRAIN // 2


def test_masks_follow_grades_and_lie_inside_the_field(dataset: synth.SynthSummary) -> None:
    for split in ("train", "test"):
        images, _, _ = SYNTH_LAYOUT[split]
        for i, grade in enumerate(dataset.grades[split], start=1):
            name = f"IDRiD_{i:03d}"
            mask = _read_mask(mask_path(dataset.root, split, name)) > 0
            photo = _read_rgb(dataset.root / images / f"{name}.jpg")
            if grade == 0:
                assert not mask.any(), name
            elif grade == 1:
                assert 0 < mask.sum() < 0.002 * mask.size, name  # only a few microaneurysms
            else:
                assert mask.sum() > 0.002 * mask.size, name
            # Every lesion pixel is on the retina, never on the black background.
            assert (photo[mask].max(axis=1) > 30).all(), name


@pytest.mark.parametrize("seed", range(4))
def test_lesions_are_visible_against_the_fundus(seed: int) -> None:
    img, mask = render_fundus(np.random.default_rng(seed), 4, W, H)
    img = img.astype(np.float32)
    n, labels = cv2.connectedComponents(mask)
    assert n - 1 >= 10  # grade 4 has many lesions
    near_any = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
    diffs, means = [], []
    for i in range(1, n):
        comp = (labels == i).astype(np.uint8)
        ring = (cv2.dilate(comp, np.ones((9, 9), np.uint8)) > 0) & ~near_any
        if ring.sum() >= 5:
            means.append(img[comp > 0].mean(axis=0))
            diffs.append(means[-1] - img[ring].mean(axis=0))
    diffs_arr, means_arr = np.array(diffs), np.array(means)
    contrast = np.abs(diffs_arr).max(axis=1)
    assert (contrast > 20).mean() >= 0.8 and np.median(contrast) > 30
    # Hard exudates: many bright *yellow* blobs (green well up, blue well below green).
    yellow = (diffs_arr[:, 1] > 60) & (means_arr[:, 1] - means_arr[:, 2] > 50)
    assert yellow.sum() >= 5
    # Haemorrhages and microaneurysms: clearly darker than their surround.
    assert (diffs_arr.mean(axis=1) < -20).sum() >= 8


@pytest.mark.parametrize("seed", range(4))
def test_grade_1_has_only_a_few_microaneurysms(seed: int) -> None:
    img, mask = render_fundus(np.random.default_rng(seed), 1, W, H)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    assert 1 <= n - 1 <= 4
    assert (stats[1:, cv2.CC_STAT_AREA] <= 40).all()  # dots of radius ~1-3 px
    near = cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0
    # Dark red dots: like real microaneurysms they stand out most in the green channel.
    green = img[..., 1].astype(np.float32)
    assert green[mask > 0].mean() < green[near & (mask == 0)].mean() - 12


@pytest.mark.parametrize("seed", range(6))
def test_field_is_circular_and_clipped_like_idrid(seed: int) -> None:
    img, _ = render_fundus(np.random.default_rng(seed), seed % 5, W, H)
    lum = img.max(axis=2)
    for corner in (lum[:8, :8], lum[:8, -8:], lum[-8:, :8], lum[-8:, -8:]):
        assert corner.max() == 0
    assert lum[:, :20].max() == 0 and lum[:, -20:].max() == 0  # black side margins
    # The field is taller than the frame: the top and bottom rows cut through the retina.
    assert (lum[0] > 30).sum() > 0.05 * W and (lum[-1] > 30).sum() > 0.05 * W
    # The field is a disc: the middle row is lit over roughly the image height.
    lit = np.flatnonzero(lum[H // 2] > 30)
    assert 1.0 * H < lit[-1] - lit[0] < 1.15 * H


def test_field_centre_and_disc_side_vary() -> None:
    centres, sides = [], set()
    for seed in range(8):
        img, _ = render_fundus(np.random.default_rng(seed), 0, W, H)
        lum = img.max(axis=2)
        lit = np.flatnonzero(lum[H // 2] > 30)
        centres.append((lit[0] + lit[-1]) / 2)
        # The optic disc is the brightest large spot and sits well off-centre.
        x = int(np.argmax(cv2.GaussianBlur(img[..., 1].astype(np.float32), (0, 0), 8).max(axis=0)))
        assert abs(x - centres[-1]) > 0.1 * W, seed
        sides.add(x > centres[-1])
    assert max(abs(c - W / 2) for c in centres) > 2  # not always exactly centred
    assert sides == {True, False}  # left and right eyes both occur


def test_existing_output_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="already exists") as info:
        make_synthetic(out, n_train=1, n_test=0)
    assert str(out) in str(info.value)
    assert _files(out) == {"keep.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary left
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError):
        make_synthetic(tmp_path / "file", n_train=1, n_test=0)


def test_empty_existing_directory_is_filled(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    summary = make_synthetic(tmp_path / "data", n_train=1, n_test=0, width=64, height=64)
    assert (summary.root / TRAIN_IMAGES / "IDRiD_001.jpg").is_file()
    assert (summary.root / TEST_LABELS).read_text().strip() == ",".join(LABEL_HEADER)


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = synth.render_fundus, []

    def flaky(*args: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(synth, "render_fundus", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        make_synthetic(tmp_path / "data", n_train=4, n_test=0, width=64, height=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"n_train": 0}, "n_train"), ({"n_test": -1}, "n_test"), ({"width": 63}, "width"),
     ({"height": 10}, "height"), ({"jpeg_quality": 0}, "jpeg_quality"),
     ({"jpeg_quality": 101}, "jpeg_quality"), ({"seed": -1}, "seed"), ({"width": 64.5}, "width")],
)
def test_bad_arguments_are_input_errors(tmp_path: Path, kwargs: dict, name: str) -> None:
    flag = "--" + name.replace("_", "-")  # named as the command line spells it
    with pytest.raises(InputError, match=f"^{flag}:"):
        make_synthetic(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_render_rejects_bad_grade() -> None:
    with pytest.raises(InputError, match="grade"):
        render_fundus(np.random.default_rng(0), 5, W, H)


def test_progress_is_reported(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    make_synthetic(tmp_path / "d", n_train=2, n_test=1, width=64, height=64,
                   progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_full_idrid_size_render() -> None:
    img, mask = render_fundus(np.random.default_rng(0), 3, 4288, 2848)
    assert img.shape == (2848, 4288, 3) and img.dtype == np.uint8
    assert mask.shape == (2848, 4288) and mask.any()
    assert img[0, 0].max() == 0 and img[2848 // 2, 4288 // 2].max() > 30
