"""The built-in studies ship with the package: `--config demo` works from any directory."""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import pytest

from drtune.config import BUILTIN_STUDIES, builtin_studies, load_config, resolve_study_path
from drtune.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_builtin_studies_resolve_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository root: nothing here but what the test writes
    assert {"demo", "idrid", "idrid_grid"} <= set(builtin_studies())
    for spelling in ("demo", "demo.toml", "studies/demo.toml", Path("studies") / "demo.toml"):
        assert resolve_study_path(spelling) == BUILTIN_STUDIES / "demo.toml"
        assert load_config(spelling).name == "demo"
    assert load_config("idrid_grid", ["train.epochs=3"]).name == "idrid_grid"
    # A file that exists wins over a built-in of the same name, in studies/ or anywhere else.
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "demo.toml").write_text('name = "mine"\n')
    (tmp_path / "idrid_grid").write_text('name = "bare"\n')
    assert load_config("studies/demo.toml").name == "mine"
    assert load_config(tmp_path / "studies" / "demo.toml").name == "mine"
    assert load_config("idrid_grid").name == "bare"
    assert load_config("demo").name == "demo"  # no file ./demo: the built-in one
    # Only bare names and studies/NAME fall back; other missing paths stay errors naming them.
    for missing in ("nope", "other/demo.toml", "studies/nope.toml"):
        with pytest.raises(InputError, match=rf"^{missing}: config file not found \(built-in studies: "
                                             r"demo, idrid, idrid_grid"):
            load_config(missing)


def test_commands_default_to_the_builtin_demo_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from drtune import cli, config, demo

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config=None, set=["search.n_trials=2"], data=None)
    assert cli._study_config(args).name == "demo"
    assert cli._study_config(argparse.Namespace(config=Path("idrid"), set=[])).name == "idrid_tpe"

    # `drtune demo` finds its study before any work (stopped right there: the demo itself is slow).
    seen: list[Path] = []

    def stop(path, *a, **k):
        seen.append(Path(path))
        raise InputError("stop")

    monkeypatch.setattr(config, "load_config", stop)
    with pytest.raises(InputError, match="^stop$"):
        demo.run_demo(tmp_path / "work")
    assert seen == [BUILTIN_STUDIES / "demo.toml"] and not (tmp_path / "work").exists()


def test_builtin_studies_are_package_data() -> None:
    """Every built-in study is matched by pyproject's package-data, so a wheel carries it."""
    assert BUILTIN_STUDIES == REPO / "drtune" / "studies"
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = tool.get("package-data", {}).get("drtune", [])
    studies = sorted(BUILTIN_STUDIES.glob("*.toml"))
    assert studies
    for path in studies:
        rel = path.relative_to(REPO / "drtune").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"
    # The repository's studies/ holds no second copy to drift from the packaged one.
    assert not list((REPO / "studies").glob("*.toml"))
