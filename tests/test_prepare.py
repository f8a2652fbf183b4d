"""`drtune prepare`: sources, labels, splits, TFRecord output and every kind of bad input."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

import drtune.prepare as prep
from conftest import shared_dir
from drtune.cli import main
from drtune.errors import InputError
from drtune.labels import LabelRow, read_labels
from drtune.prepare import (
    ImageError,
    PrepareOptions,
    Source,
    decode_photo,
    find_idrid,
    prepare,
    split_train_val,
)
from drtune.synth import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS

IDRID_LABELS = shared_dir("idrid-labels")
SAMPLES = shared_dir("fundus-samples")
OPTS = PrepareOptions(size=64, workers=1)


def read_records(data: Path, split: str) -> list[dict]:
    """Parse a split's shards with TensorFlow, as the input pipeline will."""
    meta = json.loads((data / "meta.json").read_text())
    files = [str(data / f) for f in meta["splits"][split]["files"]]
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "grade": tf.io.FixedLenFeature([], tf.int64),
        "name": tf.io.FixedLenFeature([], tf.string),
    }
    out = []
    for raw in tf.data.TFRecordDataset(files):
        ex = tf.io.parse_single_example(raw, spec)
        out.append({
            "image": tf.io.decode_jpeg(ex["image"]).numpy(),
            "label": int(ex["label"]),
            "grade": int(ex["grade"]),
            "name": ex["name"].numpy().decode(),
        })
    return out


def small_set(synth_root: Path, dest: Path, n: int = 10) -> tuple[Path, Path]:
    """Copy the first ``n`` synthetic photos and their CSV rows into a plain images+CSV folder."""
    images = dest / "images"
    images.mkdir(parents=True)
    lines = (synth_root / TRAIN_LABELS).read_text().splitlines()
    kept = [lines[0]]
    for line in lines[1:n + 1]:
        name = line.split(",")[0]
        shutil.copy(synth_root / TRAIN_IMAGES / f"{name}.jpg", images / f"{name}.jpg")
        kept.append(line)
    labels = dest / "labels.csv"
    labels.write_text("\n".join(kept) + "\n")
    return images, labels


# --------------------------------------------------------------------------- happy path


def test_real_idrid_csvs_parse_as_shipped() -> None:
    if not IDRID_LABELS.is_dir():
        pytest.skip(f"{IDRID_LABELS} absent")
    train, problems = read_labels(IDRID_LABELS / "a. IDRiD_Disease Grading_Training Labels.csv")
    assert problems == []
    assert len(train) == 413
    assert [sum(r.grade == g for r in train) for g in range(5)] == [134, 20, 136, 74, 49]
    test, problems = read_labels(IDRID_LABELS / "b. IDRiD_Disease Grading_Testing Labels.csv")
    assert problems == [] and len(test) == 103
    assert [sum(r.grade == g for r in test) for g in range(5)] == [34, 5, 32, 19, 13]
    assert all(r.name == r.name.strip() and r.name.startswith("IDRiD_") for r in train + test)
    # The macular-edema column comes along, past the training CSV's trailing empty columns.
    for rows, name in ((train, "a. IDRiD_Disease Grading_Training Labels.csv"),
                       (test, "b. IDRiD_Disease Grading_Testing Labels.csv")):
        raw = [line.split(",") for line in (IDRID_LABELS / name).read_text().splitlines()[1:] if line.strip(",")]
        assert [r.edema for r in rows] == [int(fields[2]) for fields in raw]
        assert {r.edema for r in rows} == {0, 1, 2}


def test_macular_edema_column_is_optional(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("Image name,Retinopathy grade\nIDRiD_001,2\n")
    assert [r.edema for r in read_labels(labels)[0]] == [None]
    # Informational only: a blank or odd value is no problem (the grade is what drtune trains on).
    labels.write_text("Image name,Retinopathy grade,Risk of macular edema\na,2,1\nb,0,\nc,1,x\n")
    rows, problems = read_labels(labels)
    assert problems == [] and [(r.name, r.edema) for r in rows] == [("a", 1), ("b", None), ("c", None)]


def test_prepare_idrid_layout_writes_shards_and_meta(prepared: Path, synth_root: Path) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    splits = meta["splits"]
    assert splits["train"]["n"] + splits["val"]["n"] == 32
    assert splits["test"]["n"] == 8
    assert meta["size"] == 64 and meta["rdr_grade"] == 2 and meta["normalize"] == "none"
    on_disk = sum(p.stat().st_size for p in prepared.iterdir() if p.name != "meta.json")
    assert meta["bytes"] == on_disk > 0
    labels = {r.name: r.grade for r in read_labels(synth_root / TRAIN_LABELS)[0]}
    for split in ("train", "val", "test"):
        records = read_records(prepared, split)
        s = splits[split]
        assert len(records) == s["n"]
        assert sum(r["label"] for r in records) == s["rdr"]
        assert s["nrdr"] + s["rdr"] == s["n"]
        assert sorted(r["name"] for r in records) == sorted(s["names"])
        for r in records:
            assert r["image"].shape == (64, 64, 3)
            assert r["label"] == int(r["grade"] >= 2)
            if split != "test":
                assert r["grade"] == labels[r["name"]]
    assert not set(splits["train"]["names"]) & set(splits["val"]["names"])
    # Stratified: both classes in validation, in roughly the training proportion.
    assert splits["val"]["rdr"] >= 1 and splits["val"]["nrdr"] >= 1
    # No temporary directory left beside the output.
    assert [p.name for p in prepared.parent.iterdir()] == [prepared.name]


def test_crops_show_the_whole_field(prepared: Path) -> None:
    for r in read_records(prepared, "val"):
        img = r["image"].astype(float).mean(axis=2)
        corners = [img[:4, :4], img[:4, -4:], img[-4:, :4], img[-4:, -4:]]
        assert max(c.mean() for c in corners) < 25, "corners should be black (circle inside square)"
        mid = img.shape[0] // 2
        # The field reaches the left and right edges of the crop: not shrunk, not cut.
        assert img[mid - 2:mid + 3, :3].mean() > 15 and img[mid - 2:mid + 3, -3:].mean() > 15


def test_split_is_seeded_and_keeps_groups_together() -> None:
    rows = [LabelRow(f"Patient{p:03d}_{eye}", (p % 5), i)
            for i, (p, eye) in enumerate((p, e) for p in range(30) for e in "LR")]
    a = split_train_val(rows, 0.2, 2, r"(Patient\d+)_[LR]", seed=3)
    b = split_train_val(rows, 0.2, 2, r"(Patient\d+)_[LR]", seed=3)
    c = split_train_val(rows, 0.2, 2, r"(Patient\d+)_[LR]", seed=4)
    assert a == b and a != c
    train, val = a
    patients = lambda rs: {r.name.split("_")[0] for r in rs}  # noqa: E731
    assert not patients(train) & patients(val)
    assert len(val) == 12  # 6 of 30 patients, both eyes
    assert {r.grade >= 2 for r in val} == {True, False}


def test_cli_prepare_images_and_labels(synth_root: Path, tmp_path: Path, capsys) -> None:
    images, labels = small_set(synth_root, tmp_path / "src", n=10)
    out = tmp_path / "data"
    rc = main(["prepare", "--images", str(images), "--labels", str(labels), "--out", str(out),
               "--size", "48", "--workers", "2", "--normalize", "graham", "--jpeg-quality", "80"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["normalize"] == "graham" and meta["jpeg_quality"] == 80
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 10
    assert meta["splits"]["test"]["n"] == 0 and meta["splits"]["test"]["files"] == []
    assert read_records(out, "train")[0]["image"].shape == (48, 48, 3)


def test_greyscale_and_png_photos_are_accepted(synth_root: Path, tmp_path: Path) -> None:
    images, labels = small_set(synth_root, tmp_path / "src", n=8)
    first, second = sorted(images.iterdir())[:2]
    grey = cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)
    first.unlink()
    cv2.imwrite(str(first.with_suffix(".png")), grey)
    colour = cv2.imread(str(second))
    cv2.imwrite(str(second), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))
    meta = prepare(Source(images, labels), tmp_path / "data", OPTS)
    assert meta["skipped"] == []
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 8


def test_real_fundus_samples_are_cropped_whole(tmp_path: Path) -> None:
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} absent")
    out = tmp_path / "data"
    rc = main(["prepare", "--images", str(SAMPLES / "images"), "--labels",
               str(SAMPLES / "labels.csv"), "--out", str(out), "--workers", "2",
               "--group-pattern", r"(Patient\d+)_[LR]"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 10
    train_p = {n.split("_")[0] for n in meta["splits"]["train"]["names"]}
    val_p = {n.split("_")[0] for n in meta["splits"]["val"]["names"]}
    assert not train_p & val_p
    for r in read_records(out, "train") + read_records(out, "val"):
        img = r["image"].astype(float).mean(axis=2)
        assert img.shape == (256, 256)
        assert max(img[:8, :8].mean(), img[-8:, -8:].mean(), img[:8, -8:].mean()) < 30
        mid = img[100:156]
        # the field spans the crop: bright at both sides of the middle band
        assert mid[:, :12].mean() > 10 and mid[:, -12:].mean() > 10


# --------------------------------------------------------------------------- bad input


def _bad(synth_root: Path, tmp_path: Path, n: int = 10) -> tuple[Path, Path]:
    return small_set(synth_root, tmp_path / "src", n=n)


def _prepare_fails(images: Path, labels: Path, out: Path, *needles: str) -> str:
    with pytest.raises(InputError) as err:
        prepare(Source(images, labels), out, OPTS)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}.tmp-*")) == []
    return msg


def test_missing_image_for_csv_row(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    victim = sorted(images.iterdir())[3]
    victim.unlink()
    _prepare_fails(images, labels, tmp_path / "out", f"no image file for {victim.stem!r}", "row 5")


def test_image_without_csv_row(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    shutil.copy(sorted(images.iterdir())[0], images / "stray.jpg")
    _prepare_fails(images, labels, tmp_path / "out", "stray.jpg", "has no row")


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "not-an-image", "empty"])
def test_unreadable_images(synth_root: Path, tmp_path: Path, kind: str) -> None:
    images, labels = _bad(synth_root, tmp_path)
    victim = sorted(images.iterdir())[2]
    data = victim.read_bytes()
    if kind == "corrupt":
        victim.write_bytes(data[:200] + bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    elif kind == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif kind == "not-an-image":
        victim.write_text("this is a text file, not a photograph\n")
    else:
        victim.write_bytes(b"")
    msg = _prepare_fails(images, labels, tmp_path / "out", victim.name)
    expected = {"corrupt": "corrupt", "truncated": "truncated", "not-an-image": "not an image",
                "empty": "empty"}[kind]
    assert expected in msg


def test_other_files_in_image_folder_are_ignored(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    (images / "README.txt").write_text("notes")
    (images / ".DS_Store").write_bytes(b"\0\1")
    meta = prepare(Source(images, labels), tmp_path / "out", OPTS)
    assert meta["skipped"] == []


def test_all_black_image(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    victim = sorted(images.iterdir())[1]
    cv2.imwrite(str(victim), np.zeros((266, 400, 3), np.uint8))
    _prepare_fails(images, labels, tmp_path / "out", victim.name, "no retina field")


@pytest.mark.parametrize("grade,needle", [("7", "outside 0-4"), ("-1", "outside 0-4"),
                                          ("two", "not an integer"), ("2.5", "not an integer")])
def test_bad_grades(synth_root: Path, tmp_path: Path, grade: str, needle: str) -> None:
    images, labels = _bad(synth_root, tmp_path)
    lines = labels.read_text().splitlines()
    name = lines[4].split(",")[0]
    lines[4] = f"{name},{grade},0"
    labels.write_text("\n".join(lines) + "\n")
    msg = _prepare_fails(images, labels, tmp_path / "out", f"{labels} row 5", needle)
    assert msg.startswith("1 problem(s)"), "the image of a bad row is not also reported as row-less"


def test_duplicate_names(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines + [lines[2]]) + "\n")
    _prepare_fails(images, labels, tmp_path / "out", "duplicate image name", "first on row 3")


def test_csv_missing_column(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    lines = [",".join(line.split(",")[::2]) for line in labels.read_text().splitlines()]
    labels.write_text("\n".join(lines) + "\n")
    _prepare_fails(images, labels, tmp_path / "out", str(labels), "missing column 'Retinopathy grade'")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("Image name,Retinopathy grade\nIDRiD_001,2\n")
    _prepare_fails(tmp_path / "images", labels, tmp_path / "out", "no images found")


def test_existing_output_is_refused_unless_overwrite(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="already exists"):
        prepare(Source(images, labels), out, OPTS)
    assert (out / "precious.txt").read_text() == "keep me"


def test_fail_reports_every_problem_and_skip_lists_them(synth_root: Path, tmp_path: Path, capsys,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    images, labels = _bad(synth_root, tmp_path, n=12)
    files = sorted(images.iterdir())
    files[0].write_text("not a photo")
    cv2.imwrite(str(files[1]), np.zeros((100, 150, 3), np.uint8))
    files[2].unlink()
    out = tmp_path / "out"
    rc = main(["prepare", "--images", str(images), "--labels", str(labels), "--out", str(out),
               "--size", "64", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "drtune: error: 3 problem(s)" in err
    # Every problem is logged, not just the first.
    bad_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad input")]
    assert len(bad_lines) == 3
    for f in files[:3]:
        assert any(f.name in line or repr(f.stem) in line for line in bad_lines)
    rc = main(["prepare", "--images", str(images), "--labels", str(labels), "--out", str(out),
               "--size", "64", "--workers", "1", "--on-error", "skip"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(s["name"] for s in meta["skipped"]) == sorted(f.stem for f in files[:3])
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 9


def test_cli_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: source folder not found" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not an IDRiD" in capsys.readouterr().err
    assert main(["prepare", "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--images and --labels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--help"])
    assert exit_.value.code == 0
    assert "--group-pattern" in capsys.readouterr().out


def test_bad_group_pattern(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    for pattern, needle in (("(unclosed", "invalid regular expression"), (r"IDRiD_\d+", "capture group")):
        with pytest.raises(InputError, match=needle):
            prepare(Source(images, labels), tmp_path / "out",
                    PrepareOptions(size=64, workers=1, group_pattern=pattern))


def test_find_idrid_accepts_root_or_grading_folder(synth_root: Path, tmp_path: Path) -> None:
    direct = find_idrid(synth_root)
    wrapper = tmp_path / "IDRiD"
    wrapper.mkdir()
    (wrapper / "B. Disease Grading").symlink_to(synth_root, target_is_directory=True)
    nested = find_idrid(wrapper)
    assert direct.train_labels.name == nested.train_labels.name
    assert nested.test_images is not None and nested.test_images.name == "b. Testing Set"


# --------------------------------------------------------------------------- output safety


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["equal", "above", "images", "labels-parent"])
def test_overwrite_never_deletes_the_input(synth_root: Path, tmp_path: Path, capsys, where: str) -> None:
    src = tmp_path / "X"
    images, labels = small_set(synth_root, src, n=8)
    (src / "notes.txt").write_text("unrelated work")
    before = _tree(tmp_path)
    out = {"equal": src, "above": tmp_path, "images": images, "labels-parent": labels.parent}[where]
    rc = main(["prepare", "--images", str(images), "--labels", str(labels), "--out", str(out),
               "--size", "48", "--workers", "1", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("drtune: error: ") and err.count("\n") == 1, err
    assert f"--out {out}" in err and "contains the input" in err
    assert _tree(tmp_path) == before


def test_out_given_through_a_symlink_or_dotdot_is_still_refused(synth_root: Path, tmp_path: Path) -> None:
    images, labels = small_set(synth_root, tmp_path / "X", n=8)
    (tmp_path / "link").symlink_to(tmp_path / "X", target_is_directory=True)
    for out in (tmp_path / "link", images / ".."):
        with pytest.raises(InputError, match="contains the input"):
            prepare(Source(images, labels), out, PrepareOptions(size=48, workers=1, overwrite=True))
    assert sorted(p.name for p in (tmp_path / "X").iterdir()) == ["images", "labels.csv"]


def test_idrid_root_inside_out_is_refused(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "parent" / "idrid"
    shutil.copytree(synth_root, root)
    with pytest.raises(InputError, match="contains the input"):
        prepare(find_idrid(root), tmp_path / "parent", PrepareOptions(size=48, workers=1, overwrite=True))
    assert find_idrid(root).train_images.is_dir()


def test_overwrite_replaces_only_a_drtune_output(synth_root: Path, tmp_path: Path) -> None:
    images, labels = _bad(synth_root, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    opts = PrepareOptions(size=64, workers=1, overwrite=True)
    with pytest.raises(InputError, match=f"{out}: not a 'drtune prepare' output"):
        prepare(Source(images, labels), out, opts)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    prepare(Source(images, labels), out, opts)  # an empty folder holds nothing to lose
    first = json.loads((out / "meta.json").read_text())["created"]
    prepare(Source(images, labels), out, opts)  # a drtune output is replaced
    assert json.loads((out / "meta.json").read_text())["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --------------------------------------------------------------------------- hostile images


def jpeg_claiming(path: Path, width: int, height: int) -> None:
    """A small valid JPEG whose frame header is rewritten to claim ``width`` x ``height``."""
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_a_per_image_problem(synth_root: Path, tmp_path: Path, capsys) -> None:
    images, labels = _bad(synth_root, tmp_path)
    victim = sorted(images.iterdir())[4]
    jpeg_claiming(victim, 30000, 30000)
    _prepare_fails(images, labels, tmp_path / "out", victim.name, "too large")
    out = tmp_path / "skipped"
    rc = main(["prepare", "--images", str(images), "--labels", str(labels), "--out", str(out),
               "--size", "64", "--workers", "2", "--on-error", "skip"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert [s["name"] for s in meta["skipped"]] == [victim.stem]
    assert meta["splits"]["train"]["n"] + meta["splits"]["val"]["n"] == 9


def test_jpeg_with_trailing_data_is_accepted_but_truncation_is_not(synth_root: Path, tmp_path: Path) -> None:
    photo = sorted((synth_root / TRAIN_IMAGES).glob("*.jpg"))[0]
    data = photo.read_bytes()
    reference = decode_photo(data, 64)
    # A motion photo: the still image, then a video after its end marker.
    trailer = b"ftypmp42" + bytes(np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8))
    assert np.array_equal(decode_photo(data + trailer, 64), reference)
    assert np.array_equal(decode_photo(data + b"\0" * 10_000, 64), reference)
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(ImageError, match="truncated"):
            decode_photo(data[:cut], 64)
    # Trailing data does not hide truncation either.
    with pytest.raises(ImageError, match="truncated"):
        decode_photo(data[: len(data) // 2] + b"\0" * 10_000, 64)


# --------------------------------------------------------------------------- external validation


def test_test_only_folder_for_external_validation(synth_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "external"
    rc = main(["prepare", "--test-images", str(synth_root / TEST_IMAGES),
               "--test-labels", str(synth_root / TEST_LABELS), "--out", str(out), "--size", "64",
               "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["n"] == meta["splits"]["val"]["n"] == 0
    assert meta["splits"]["train"]["files"] == meta["splits"]["val"]["files"] == []
    assert meta["splits"]["test"]["n"] == 8
    assert len(read_records(out, "test")) == 8
    # Without images of either kind there is nothing to prepare.
    assert main(["prepare", "--out", str(tmp_path / "none")]) == 2
    assert "--test-images" in capsys.readouterr().err


# --------------------------------------------------------------------------- failures while writing


def test_disk_full_is_one_line_and_leaves_nothing(synth_root: Path, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    images, labels = _bad(synth_root, tmp_path)
    real = prep.write_shards

    def fills_the_disk(folder: Path, split: str, examples: list, shard_size: int) -> list[str]:
        names = real(folder, split, examples, shard_size)  # some real bytes on disk first
        if split == "val":
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        return names

    monkeypatch.setattr(prep, "write_shards", fills_the_disk)
    out = tmp_path / "out"
    rc = main(["prepare", "--images", str(images), "--labels", str(labels), "--out", str(out),
               "--size", "64", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("drtune: error: ") and err.count("\n") == 1, err
    assert "no space left" in err.lower() and "--out" in err and str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    def no_permission(folder: Path, split: str, examples: list, shard_size: int) -> list[str]:
        raise PermissionError(13, "Permission denied", str(folder / "train-00000-of-00001.tfrecord"))

    monkeypatch.setattr(prep, "write_shards", no_permission)
    assert main(["prepare", "--images", str(images), "--labels", str(labels), "--out", str(out),
                 "--size", "64", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_stale_temp_folders_of_dead_runs_are_removed(synth_root: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    images, labels = _bad(synth_root, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no process holds any more
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-abc123"
    alive = tmp_path / f".out.tmp-{host}-1-def456"  # pid 1 is always running
    elsewhere = tmp_path / f".out.tmp-another-host-{dead.pid}-ghi789"
    other_out = tmp_path / f".other.tmp-{host}-{dead.pid}-jkl012"
    for folder in (stale, alive, elsewhere, other_out):
        folder.mkdir()
        (folder / "train-00000-of-00001.tfrecord").write_bytes(b"half")
    prepare(Source(images, labels), tmp_path / "out", OPTS)
    assert not stale.exists()
    assert alive.is_dir() and elsewhere.is_dir() and other_out.is_dir()
    assert any(str(stale) in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)
