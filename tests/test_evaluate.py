"""`drtune evaluate` and `drtune predict` on a tiny trained run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_dir
from drtune.cli import main
from drtune.errors import InputError
from drtune.evaluate import evaluate_run, predict_files
from drtune.synth import TEST_IMAGES

SAMPLES = shared_dir("fundus-samples")


@pytest.mark.slow
def test_evaluate_writes_report(run: Path, prepared: Path, capsys) -> None:
    assert main(["evaluate", str(run), "--split", "test", "--n-boot", "200"]) == 0
    assert "test: balanced accuracy" in capsys.readouterr().out
    out = run / "eval-test"
    m = json.loads((out / "metrics.json").read_text())
    for key in ("balanced_accuracy", "accuracy", "auc", "sensitivity", "specificity", "threshold",
                "confusion_matrix", "n", "ci95"):
        assert key in m, key
    meta = json.loads((prepared / "meta.json").read_text())["splits"]["test"]
    assert m["n"] == meta["n"] == int(np.sum(m["confusion_matrix"]))
    assert np.sum(m["confusion_matrix"], axis=1).tolist() == [meta["nrdr"], meta["rdr"]]
    assert m["threshold"] == json.loads((run / "metrics.json").read_text())["threshold"]
    lo, hi = m["ci95"]["balanced_accuracy"]
    assert lo <= m["balanced_accuracy"] <= hi
    for png in ("confusion_matrix.png", "roc.png"):
        assert (out / png).stat().st_size > 5000
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["name"] for r in rows) == sorted(meta["names"])
    decisions = [r["decision"] == "RDR" for r in rows]
    assert decisions == [float(r["p_rdr"]) >= m["threshold"] for r in rows]


@pytest.mark.slow
def test_predict_matches_prepared_records(run: Path, synth_root: Path, tmp_path: Path) -> None:
    """Raw photo -> predict gives the same P(RDR) as the prepared record of that photo."""
    photos = sorted((synth_root / TEST_IMAGES).glob("*.jpg"))[:4]
    rows = predict_files(run, photos, tmp_path / "pred.csv")
    evaluate_run(run, split="test", n_boot=10)
    with (run / "eval-test" / "predictions.csv").open() as f:
        by_name = {r["name"]: float(r["p_rdr"]) for r in csv.DictReader(f)}
    for r in rows:
        assert r["error"] == ""
        assert r["p_rdr"] == pytest.approx(by_name[r["name"]], abs=1e-4)
    with (tmp_path / "pred.csv").open() as f:
        written = list(csv.DictReader(f))
    assert [w["name"] for w in written] == [p.stem for p in photos]
    assert set(written[0]) == {"name", "file", "p_rdr", "decision", "threshold", "error"}


@pytest.mark.slow
def test_predict_real_photos_and_unreadable_file(run: Path, tmp_path: Path) -> None:
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} absent")
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a photograph")
    photos = sorted((SAMPLES / "images").glob("*.jpg"))
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), *map(str, photos), str(bad), "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(photos) + 1
    assert rows[-1]["name"] == "broken" and "not an image" in rows[-1]["error"]
    for r in rows[:-1]:
        assert r["error"] == "" and 0.0 <= float(r["p_rdr"]) <= 1.0 and r["decision"] in ("NRDR", "RDR")


@pytest.mark.slow
def test_predict_creates_output_folder_and_gradcam_takes_images_anywhere(run: Path, synth_root: Path,
                                                                       tmp_path: Path) -> None:
    photo = sorted((synth_root / TEST_IMAGES).glob("*.jpg"))[0]
    out = tmp_path / "new" / "dir" / "p.csv"
    assert main(["predict", str(run), str(photo), "--out", str(out)]) == 0
    assert out.read_bytes().count(b"\r") == 0 and len(out.read_text().splitlines()) == 2
    assert main(["gradcam", str(run), "--out", str(tmp_path / "g"), str(photo)]) == 0
    assert (tmp_path / "g" / "index.html").is_file()


@pytest.mark.slow
def test_bad_runs_and_splits(run: Path, prepared: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", str(run), "--n-boot", "0"]) == 2
    assert "--n-boot 0: must be >= 1" in capsys.readouterr().err
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert main(["evaluate", str(empty)]) == 2
    assert "no model.keras" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope"), "x.jpg"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    # A data set without a test split cannot be evaluated on it.
    no_test = tmp_path / "data"
    shutil.copytree(prepared, no_test)
    meta = json.loads((no_test / "meta.json").read_text())
    meta["splits"]["test"] = {"n": 0, "nrdr": 0, "rdr": 0, "files": [], "names": []}
    (no_test / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="split 'test' is empty"):
        evaluate_run(run, no_test, "test")


@pytest.mark.slow
def test_data_prepared_differently_is_refused(run: Path, prepared: Path, synth_root: Path,
                                              tmp_path: Path, capsys) -> None:
    """evaluate and gradcam refuse a data folder prepared with other options than the run's:
    its pixels decode fine, so nothing else would notice, and the metrics would be wrong."""
    from drtune.gradcam import run_gradcam
    from drtune.prepare import PrepareOptions, find_idrid, prepare

    graham = tmp_path / "graham"
    prepare(find_idrid(synth_root), graham, PrepareOptions(size=64, workers=1, seed=0, normalize="graham"))
    # The same wording as training's refusal (config.check_prepared): runs.prepared_refusal.
    line = (f"{graham}: prepared with --normalize graham but {run} was trained on --normalize none; "
            "prepare it again with --normalize none")
    assert main(["evaluate", str(run), "--data", str(graham), "--n-boot", "10"]) == 2
    assert capsys.readouterr().err.strip() == f"drtune: error: {line}"
    assert main(["gradcam", str(run), "--data", str(graham), "--n", "2", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.strip() == f"drtune: error: {line}"
    assert not (tmp_path / "g").exists()

    def edited(name: str, **changes) -> Path:
        out = tmp_path / name
        shutil.copytree(prepared, out)
        meta = json.loads((out / "meta.json").read_text())
        for key, value in changes.items():
            if value is None:
                del meta[key]
            else:
                meta[key] = value
        (out / "meta.json").write_text(json.dumps(meta))
        return out

    for changes, needle in (
            ({"rdr_grade": 3}, "--rdr-grade 3 but .* --rdr-grade 2; prepare it again with --rdr-grade 2"),
            ({"size": 96}, "--size 96 but .* --size 64; prepare it again with --size 64")):
        other = edited("-".join(changes), **changes)
        with pytest.raises(InputError, match=needle):
            evaluate_run(run, other, "train", n_boot=10)
        with pytest.raises(InputError, match=needle):
            run_gradcam(run, tmp_path / "g", data_dir=other, split="train", n=2)
    # A folder from before meta.json recorded these keys gets their defaults, as the run did.
    old = edited("old", normalize=None, rdr_grade=None)
    assert evaluate_run(run, old, "train", n_boot=10)["n"] > 0
    assert run_gradcam(run, tmp_path / "g-old", data_dir=old, split="train", n=2)["n"] == 2


@pytest.mark.slow
def test_predict_keeps_a_decompression_bomb_to_its_own_row(run: Path, synth_root: Path,
                                                           tmp_path: Path) -> None:
    from test_prepare import jpeg_claiming

    photos = sorted((synth_root / TEST_IMAGES).glob("*.jpg"))[:2]
    bomb = tmp_path / "bomb.jpg"
    jpeg_claiming(bomb, 30000, 30000)
    rows = predict_files(run, [photos[0], bomb, photos[1]])
    assert [r["name"] for r in rows] == [photos[0].stem, "bomb", photos[1].stem]
    assert "too large" in rows[1]["error"] and rows[1]["p_rdr"] == ""
    for r in (rows[0], rows[2]):
        assert r["error"] == "" and 0.0 <= r["p_rdr"] <= 1.0


@pytest.mark.slow
def test_predict_to_stdout_is_proper_csv(run: Path, synth_root: Path, tmp_path: Path, capsys) -> None:
    photo = sorted((synth_root / TEST_IMAGES).glob("*.jpg"))[0]
    odd = tmp_path / 'left, "eye".jpg'
    shutil.copy(photo, odd)
    broken = tmp_path / "broken, too.jpg"
    broken.write_text("not a photograph")
    assert main(["predict", str(run), str(odd), str(broken)]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["name"] for r in rows] == ['left, "eye"', "broken, too"]
    assert set(rows[0]) == {"name", "p_rdr", "decision", "threshold", "error"}
    assert rows[0]["decision"] in ("NRDR", "RDR") and rows[0]["error"] == ""
    assert rows[1]["p_rdr"] == "" and "not an image" in rows[1]["error"]


@pytest.mark.slow
def test_evaluate_on_an_external_test_only_folder(run: Path, prepared: Path, synth_root: Path,
                                                  tmp_path: Path, capsys) -> None:
    """Another site's photographs, prepared without training images, are scored like the test
    split, at the run's frozen threshold."""
    from drtune.synth import TEST_LABELS

    external = tmp_path / "external"
    assert main(["prepare", "--test-images", str(synth_root / TEST_IMAGES), "--test-labels",
                 str(synth_root / TEST_LABELS), "--out", str(external), "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["evaluate", str(run), "--data", str(external), "--split", "test", "--n-boot", "50"]) == 0
    assert "test: balanced accuracy" in capsys.readouterr().out
    m = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert m["data_dir"] == str(external) and m["n"] == 8
    assert m["threshold"] == json.loads((run / "metrics.json").read_text())["threshold"]
    # The same photographs prepared with the training set score the same.
    internal = evaluate_run(run, prepared, "test", n_boot=50)
    assert internal["confusion_matrix"] == m["confusion_matrix"]
    with pytest.raises(InputError, match="split 'val' is empty"):
        evaluate_run(run, external, "val")
