"""Configuration: TOML loading, dotted overrides and load-time validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from drtune.config import (
    Config,
    check_prepared,
    from_dict,
    load_config,
    parse_override,
    replace,
    to_dict,
)
from drtune.errors import InputError
from drtune.runs import prepared_differences, prepared_options

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_defaults_and_file_and_overrides(tmp_path: Path) -> None:
    assert load_config() == Config()
    path = write(tmp_path, '[train]\nlr = 1e-2\nbatch_size = 2\n[model]\ndropout = 0.25\n')
    cfg = load_config(path, ["train.lr=1e-4", "data.augment=strong", "train.epochs=3"],
                      extra={"data.dir": "DATA"})
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 2 and cfg.train.epochs == 3
    assert cfg.model.dropout == 0.25 and cfg.data.augment == "strong" and cfg.data.dir == "DATA"
    assert from_dict(to_dict(cfg)) == cfg  # config.json round trip
    assert replace(cfg, **{"train.lr": 1e-5}).train.lr == 1e-5


def test_int_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[train]\nlr = 1\n"))
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("text,needle", [
    ("[train]\nlrr = 0.1\n", "unknown key 'train.lrr'"),
    ("[trian]\nlr = 0.1\n", "unknown key 'trian'"),
    ("[train]\nlr = 'fast'\n", "train.lr: expected float, got str"),
    ("[train]\nbatch_size = 2.5\n", "train.batch_size: expected int"),
    ("[train]\nlr = -1\n", "train.lr = -1.0: must be > 0"),
    ("[train]\nlr = 0\n", "train.lr = 0.0: must be > 0"),
    ("[train]\nbatch_size = 0\n", "train.batch_size = 0: must be >= 1"),
    ("[train]\nepochs = 0\n", "train.epochs = 0: must be >= 1"),
    ("[data]\naugment = 'extreme'\n", "data.augment = 'extreme': must be one of none, base, rotate, strong"),
    ("[model]\ndropout = 1.0\n", "model.dropout"),
    ("[finetune]\ntop_k = 0\n", "finetune.top_k = 0: must be >= 1"),
    ("[data]\nval_fraction = 1.0\n", "data.val_fraction = 1.0: must be 0 (prepare's default) or between 0 and 1"),
    ("[model]\nhead = 'regression'\n", "model.head = 'regression': must be one of referral, grade, ordinal"),
    ("train = 3\n", "expected a [train] section"),
    ("[train\nlr = 1\n", "invalid TOML"),
])
def test_bad_config_names_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_bad_overrides() -> None:
    with pytest.raises(InputError, match="train.lr = -0.1: must be > 0"):
        load_config(None, ["train.lr=-0.1"])
    with pytest.raises(InputError, match="expected section.key=value"):
        parse_override("train.lr")
    with pytest.raises(InputError, match="unknown key 'train.nope'"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(InputError, match="config file not found"):
        load_config(Path("no/such/file.toml"))


def test_shipped_studies_load() -> None:
    studies = sorted((REPO / "drtune" / "studies").glob("*.toml"))  # package data
    assert studies, "drtune/studies/ holds at least the demo study"
    for path in studies:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "drtune" in first, f"{path}: header names its command"
        load_config(path)


@pytest.mark.parametrize("text,needle", [
    ('[search.grid]\n"train.lr" = [1e-3, -1.0]\n', "search.grid.train.lr: train.lr = -1.0: must be > 0"),
    ('[search.grid]\n"train.lrate" = [1e-3]\n', "unknown key 'train.lrate'"),
    ('[search.grid]\n"search.pruner" = ["none"]\n', "not a searchable key"),
    ('[search.grid]\n"train.lr" = []\n', "non-empty list"),
    ('[search.grid]\n"train.batch_size" = [2, 2]\n', "values repeat"),
    ('[search.grid]\n"train.batch_size" = [2, 2.5]\n', "train.batch_size: expected int"),
    ('[search.space]\n"train.lr" = { low = 1e-2, high = 1e-5 }\n', "must be below high"),
    ('[search.space]\n"train.lr" = { low = 0.0, high = 1e-2, log = true }\n', "must be > 0"),
    ('[search.space]\n"data.augment" = { low = 1, high = 2 }\n', "not numeric"),
    ('[search.space]\n"data.augment" = { choices = ["base", "wild"] }\n', "must be one of none, base, rotate, strong"),
    ('[search.space]\n"model.width" = { low = 8, hi = 32 }\n', "unexpected 'hi'"),
    ('[search]\npruner = "random"\n', "search.pruner = 'random': must be one of"),
    ('[search]\nheartbeat_interval = 60\ngrace_period = 30\n', "must be longer than search.heartbeat_interval"),
    ('[finetune]\nlr = 0\n', "finetune.lr = 0.0: must be > 0"),
])
def test_bad_search_sections(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_config(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_search_sections_load(tmp_path: Path) -> None:
    path = write(tmp_path, '[search.grid]\n"train.lr" = [1e-2, 1e-3]\n"train.batch_size" = [2, 4]\n'
                           '[search.space]\n"model.dropout" = { low = 0.0, high = 0.5 }\n'
                           '"data.augment" = { choices = ["base", "strong"] }\n[finetune]\nepochs = 7\n')
    cfg = load_config(path, ["search.pruner=hyperband"])
    assert cfg.search.grid == {"train.lr": [1e-2, 1e-3], "train.batch_size": [2, 4]}
    assert cfg.search.space["data.augment"] == {"choices": ["base", "strong"]}
    assert cfg.search.pruner == "hyperband" and cfg.finetune.epochs == 7
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,needle", [
    ("train.seed=-1", "train.seed = -1: must be in 0..4294967295"),
    ("train.seed=4294967296", "train.seed = 4294967296: must be in 0..4294967295"),
    ("model.l2=inf", "model.l2 = inf: must be a finite number"),
    ("train.lr=inf", "train.lr = inf: must be a finite number"),
    ("train.lr=nan", "train.lr = nan: must be a finite number"),
    ("model.dropout=nan", "model.dropout = nan: must be a finite number"),
    ("finetune.lr=inf", "finetune.lr = inf: must be a finite number"),
])
def test_seeds_in_range_and_floats_finite(override: str, needle: str) -> None:
    with pytest.raises(InputError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_seed_limits_are_accepted() -> None:
    assert load_config(None, ["train.seed=0"]).train.seed == 0
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1


def test_prepared_differences_name_every_differing_option() -> None:
    """The one comparison behind training's check against a study and evaluation's against a run:
    keys an older meta.json lacks read as their defaults, "256" is 256, None expects anything."""
    meta = {"size": "256", "normalize": "graham", "splits": {}}
    assert prepared_differences({"size": 256, "normalize": "graham", "rdr_grade": 2}, meta) == []
    assert prepared_differences({"size": None, "normalize": None}, {"size": 64}) == []
    diffs = prepared_differences({"size": 64, "normalize": "none", "rdr_grade": 3}, meta)
    assert [(d.key, d.found, d.expected, d.fix) for d in diffs] == [
        ("size", 256, 64, "--size 64"), ("normalize", "graham", "none", "--normalize none"),
        ("rdr_grade", 2, 3, "--rdr-grade 3")]
    assert prepared_options({"size": 96}) == {"size": 96, "normalize": "none", "rdr_grade": 2}


def test_check_prepared_names_all_differences_and_accepts_any(tmp_path: Path) -> None:
    cfg = replace(load_config(None), **{"data.prepare_size": 128, "data.normalize": "graham"})
    check_prepared(cfg, {"size": 128, "normalize": "graham", "rdr_grade": 3}, tmp_path)  # rdr_grade: any
    with pytest.raises(InputError) as info:
        check_prepared(cfg, {"size": 64}, tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: prepared with --size 64 --normalize none but the config wants --size 128 --normalize "
        "graham (set by data.prepare_size = 128, data.normalize = 'graham'); prepare it again with --size 128 "
        "--normalize graham (or 'drtune prepare ... --config <study>')")


def test_precision_and_jit_compile_keys() -> None:
    cfg = load_config(None, [])
    assert cfg.train.precision == "float32" and cfg.train.jit_compile == "auto"
    cfg = load_config(None, ["train.precision=mixed_float16", "train.jit_compile=false"])
    assert cfg.train.precision == "mixed_float16" and cfg.train.jit_compile is False
    with pytest.raises(InputError, match=r"train.precision = 'fp16': must be one of float32, mixed_float16"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(InputError, match=r'train.jit_compile = .yes.: must be "auto", true or false'):
        load_config(None, ["train.jit_compile=yes"])
    with pytest.raises(InputError, match=r"train.jit_compile: expected bool or str, got int 1"):
        load_config(None, ["train.jit_compile=1"])
