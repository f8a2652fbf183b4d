"""scripts/bench_real.py: patient-grouped folds, and a smoke run on real photographs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_dir, study_file

FUNDUS_TRAIN = shared_dir("fundus-train")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_real", REPO / "scripts" / "bench_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _patients(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Both eyes of ``n`` patients; eyes of one patient usually share their label, not always."""
    rng = np.random.default_rng(seed)
    names, y = [], []
    for p in range(n):
        label = int(rng.random() < 0.35)
        for eye in "LR":
            names.append(f"Patient{p:03d}_{eye}")
            y.append(label if rng.random() < 0.9 else 1 - label)
    return names, y


@pytest.mark.parametrize("k", [2, 5])
def test_folds_keep_patients_together_and_cover_every_image_once(k: int) -> None:
    bench = _bench()
    names, y = _patients(120, seed=k)
    folds = bench.make_folds(names, y, bench.DEFAULT_GROUPS, k, seed=0)
    assert len(folds) == k
    held = np.concatenate(folds)
    assert sorted(held.tolist()) == list(range(len(names)))  # out-of-fold exactly once
    fold_of = {}
    for i, idx in enumerate(folds):
        for j in idx:
            patient = names[j].split("_")[0]
            assert fold_of.setdefault(patient, i) == i, f"{patient} is in two folds"
    # Label strata are kept: every fold's RDR share is close to the whole set's.
    share = np.mean(y)
    for idx in folds:
        assert abs(np.mean(np.asarray(y)[idx]) - share) < 0.1
    # Different seeds give different folds; the same seed the same ones.
    again = bench.make_folds(names, y, bench.DEFAULT_GROUPS, k, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    other = bench.make_folds(names, y, bench.DEFAULT_GROUPS, k, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other))


def test_without_groups_every_image_is_its_own_group() -> None:
    bench = _bench()
    names, y = _patients(30, seed=0)
    folds = bench.make_folds(names, y, None, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(names)))
    folds_of: dict[str, set[int]] = {}
    for i, idx in enumerate(folds):
        for j in idx:
            folds_of.setdefault(names[j].split("_")[0], set()).add(i)
    # Ungrouped, the two eyes of a patient land in different folds for some patients (with 30
    # pairs over 3 folds, all pairs together is vanishingly unlikely): grouping is what stops it.
    assert any(len(f) > 1 for f in folds_of.values())


def test_pooled_summary_uses_each_folds_decisions() -> None:
    bench = _bench()
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.55, 0.9, 0.3])
    called = np.array([False, True, False, True, True, False])  # made at per-fold thresholds
    s = bench.summarise(y, p, called, n_boot=50)
    assert s["confusion_matrix"] == [[2, 1], [1, 2]]
    assert s["balanced_accuracy"] == pytest.approx(2 / 3)
    assert s["auc"] == pytest.approx(7 / 9)  # from the scores, not the decisions


def test_per_grade_breakdown_splits_by_macular_edema_where_both_sides_exist() -> None:
    bench = _bench()
    grades = np.array([0, 0, 1, 2, 2, 2, 2, 3])
    edema = np.array([0, 0, 0, 0, 0, 1, 2, -1])  # -1: the CSV had no value
    called = np.array([False, True, False, False, True, True, True, True])
    rows = {(r["grade"], r["edema_risk"]): r for r in bench.by_grade(grades, called, edema)}
    # Grades 0 and 1 have edema risk 0 only and grade 3 none known: no split for them.
    assert set(rows) == {(0, "any"), (1, "any"), (2, "any"), (2, "0"), (2, "1-2"), (3, "any")}
    assert (rows[0, "any"]["called_rdr"], rows[0, "any"]["n"]) == (1, 2)
    assert (rows[2, "any"]["called_rdr"], rows[2, "any"]["n"]) == (3, 4)
    assert (rows[2, "0"]["called_rdr"], rows[2, "0"]["n"]) == (1, 2)
    assert (rows[2, "1-2"]["called_rdr"], rows[2, "1-2"]["n"]) == (2, 2)
    assert [r["edema_risk"] for r in bench.by_grade(grades, called)] == ["any"] * 4
    lines = bench._grade_lines(bench.by_grade(grades, called, edema))
    assert len(lines) == 4 and lines[2].startswith("  grade 2: called RDR 3/4 = 0.75 (")
    assert "; macular edema risk 0: 1/2 = 0.50 (" in lines[2] and "; macular edema risk 1-2: 2/2 = 1.00 (" in lines[2]


@pytest.mark.slow
@pytest.mark.skipif(not FUNDUS_TRAIN.is_dir(), reason="../shared/fundus-train is not here")
def test_two_fold_quick_run_on_real_photographs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    assert bench.main(["--folds", "2", "--quick", "--limit", "40", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("fold ")] == ["fold 0", "fold 1"]
    last = dict(kv.split("=") for kv in lines[-1].split())
    assert "per grade, pooled out-of-fold:" in lines  # labels.csv has the macular-edema column
    assert set(last) == {"cv_auc", "cv_balanced_accuracy", "minutes"}
    assert 0.0 <= float(last["cv_auc"]) <= 1.0 and 0.0 <= float(last["cv_balanced_accuracy"]) <= 1.0


@pytest.mark.slow
def test_search_mode_runs_the_grid_and_the_top_k_ensemble_per_fold(
        synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--search --top-k 2``: each fold runs the study's grid in its own SQLite file, fine-tunes
    the two best trials and is scored by their ensemble; a second call reuses finished folds."""
    import optuna

    from drtune.synth import SYNTH_LAYOUT

    bench = _bench()
    images, labels, _ = SYNTH_LAYOUT["train"]
    study = study_file(tmp_path, tmp_path / "unused", epochs=2, lrs="[3e-3, 1e-3]")
    work = tmp_path / "bench"
    argv = ["--images", str(synth_root / images), "--labels", str(synth_root / labels),
            "--config", str(study), "--set", "search.pruner=none", "--set", "finetune.epochs=1",
            "--folds", "2", "--group-pattern", "", "--size", "64", "--normalize", "none", "--val-fraction", "0.3",
            "--search", "--top-k", "2", "--workdir", str(work), "--tag", "s"]
    assert bench.main(argv) == 0
    first = capsys.readouterr().out.strip().splitlines()
    # Each fold's validation split is the asked share of its training photographs.
    (data_dir,) = work.glob("data-*-val0.3")
    assert all(json.loads((data_dir / f"fold-{k}" / "data" / "meta.json").read_text())["val_fraction"] == 0.3
               for k in (0, 1))
    for k in (0, 1):
        fold = work / "s" / f"fold-{k}"
        final = Path((fold / "final.txt").read_text())
        assert final == fold / "tiny" / "finetune-top2"  # scored by the ensemble of the two best
        assert (final / "ensemble.json").is_file() and (final / "eval-test" / "predictions.csv").is_file()
        trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{fold / 'optuna.db'}").trials
        assert sorted(t.params["train.lr"] for t in trials) == [1e-3, 3e-3]  # the grid, each point once
    assert first[-1].startswith("cv_auc=")
    fold_lines = [line for line in first if line.startswith("fold ")]
    assert len(fold_lines) == 2 and all("trials: 2 complete; final: 2 fine-tuned models" in line
                                        for line in fold_lines)
    # Finished folds are reused, not searched again: the same pooled figures from the same files.
    assert bench.main(argv) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert [line for line in again if line.startswith("pooled")] == [line for line in first if line.startswith("pooled")]
    with pytest.raises(SystemExit):
        bench.main(argv[:-7] + ["--top-k", "2"])  # --top-k without --search
