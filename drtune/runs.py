"""The on-disk layouts of a data folder and a run folder, and how folders are written atomically.

A data folder (``drtune prepare``) holds TFRecord shards ``<split>-NNNNN-of-NNNNN.tfrecord`` and
``meta.json`` (splits with counts, grades, shard files and image names; size, rdr_grade,
normalize, source, bytes). A run folder (``drtune train``, one per trial) holds ``config.json``
(the resolved config), ``data.json`` (what the run knows of its data folder), ``model.keras``
(the best epoch), ``metrics.json``, ``history.csv``, ``checkpoints/`` and ``tensorboard/``;
``drtune evaluate`` adds ``eval-<split>/`` with ``metrics.json``, ``predictions.csv`` and plots.
Other tools and people read these names: keep them stable.

No TensorFlow here: status, report and the command line read these files cheaply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from absl import logging

from drtune.errors import InputError

# The splits of a data folder, in the order prepare writes them.
TRAIN, VAL, TEST = "train", "val", "test"
SPLITS: tuple[str, ...] = (TRAIN, VAL, TEST)
# Label 0 and 1 of the TFRecords, meta.json counts and predictions.csv decisions.
CLASS_NAMES: tuple[str, str] = ("NRDR", "RDR")

# data folder
META_JSON = "meta.json"

# run folder
CONFIG_JSON = "config.json"
DATA_JSON = "data.json"
MODEL_KERAS = "model.keras"
METRICS_JSON = "metrics.json"  # also inside eval-<split>/
HISTORY_CSV = "history.csv"
CHECKPOINTS_DIR = "checkpoints"
PREDICTIONS_CSV = "predictions.csv"  # inside eval-<split>/


def eval_dir(run: Path | str, split: str) -> Path:
    """``RUN/eval-<split>``: what ``drtune evaluate`` writes for one split."""
    return Path(run) / f"eval-{split}"


def load_meta(data_dir: Path | str) -> dict[str, Any]:
    """Read ``DATA/meta.json`` with clear errors for a missing or foreign directory."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data directory not found (run 'drtune prepare' first)")
    path = data_dir / META_JSON
    if not path.is_file():
        raise InputError(f"{path}: missing; {data_dir} is not a 'drtune prepare' output")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if "splits" not in meta or "size" not in meta:
        raise InputError(f"{path}: missing 'splits' or 'size'")
    return meta


# The `prepare` options a model is tied to: (meta.json and data.json key, `drtune prepare` flag,
# the value an older file without the key implies). Pixels alone do not show these differences:
# a model evaluated on a Graham-normalised copy, or on labels cut at another grade, gives wrong
# metrics without an error.
PREPARED_WITH: tuple[tuple[str, str, Any], ...] = (
    ("size", "--size", None), ("normalize", "--normalize", "none"), ("rdr_grade", "--rdr-grade", 2))


class PreparedDifference(NamedTuple):
    """One ``PREPARED_WITH`` option on which a data folder differs from what was expected."""

    key: str  # as meta.json and data.json name it
    flag: str  # the `drtune prepare` flag that sets it
    found: Any  # in the data folder's meta.json
    expected: Any  # what the run was trained on, or the study asks for

    @property
    def fix(self) -> str:
        """The ``prepare`` flag and value that remove the difference, e.g. ``--size 64``."""
        return f"{self.flag} {self.expected}"


def _option(default: Any, value: Any) -> Any:
    # JSON written by hand may hold 256 or "256"; strings such as "graham" are compared as they are.
    return int(value) if value is not None and (default is None or isinstance(default, int)) else value


def prepared_options(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``PREPARED_WITH`` options of a meta.json or data.json; keys an older file lacks read
    as the value that file was written with."""
    return {key: _option(default, record.get(key, default)) for key, _, default in PREPARED_WITH}


def prepared_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[PreparedDifference]:
    """Each ``PREPARED_WITH`` option on which ``found`` (a data folder's meta.json) differs from
    ``expected``, in ``PREPARED_WITH`` order; an option ``expected`` lacks or holds as None is not
    checked ("any"). The one comparison behind training's check against a study
    (``config.check_prepared``), evaluation's against a run (``evaluate.check_data_matches_run``)
    and an ensemble's against its members (``ensemble.check_same_data``, ``ensemble.write_run``)."""
    have = prepared_options(found)
    differences = []
    for key, flag, default in PREPARED_WITH:
        if expected.get(key) is None:
            continue
        want = _option(default, expected[key])
        if have[key] != want:
            differences.append(PreparedDifference(key, flag, have[key], want))
    return differences


def prepared_refusal(data_dir: Path | str, diffs: Sequence[PreparedDifference], expected_by: str,
                     detail: str = "", alternative: str = "") -> str:
    """The one wording of every refusal of a data folder prepared otherwise than expected (by a
    study, a run or an ensemble's members), so that they all read alike:
    ``DATA: prepared with --size 64 but EXPECTED_BY --size 128 (DETAIL); prepare it again with
    --size 128 (or ALTERNATIVE)``. ``expected_by`` says who expects it, e.g. ``"RUN was trained
    on"``; ``detail`` and ``alternative`` are left out when empty."""
    wanted = " ".join(d.fix for d in diffs)
    return (f"{data_dir}: prepared with {' '.join(f'{d.flag} {d.found}' for d in diffs)} "
            f"but {expected_by} {wanted}{f' ({detail})' if detail else ''}; "
            f"prepare it again with {wanted}{f' (or {alternative})' if alternative else ''}")


# --------------------------------------------------------------------------- atomic files


def temp_sibling(path: Path) -> Path:
    """A temporary sibling of ``path`` unique to this process, with the same suffix (Keras
    requires ``.keras``): two processes saving the same file never write the same temp file."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename) so readers never see half a file."""
    tmp = temp_sibling(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- atomic folders


# Temporary output folders are named .OUT.tmp-HOST-PID-XXXX so that a later run can tell a
# folder left by a killed run (same host, process gone) from one that a live run is writing.
_TMP_RE = r"\.{name}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temporary folders of ``out`` left by killed runs on this host."""
    pattern = re.compile(_TMP_RE.format(name=re.escape(out.name)))
    host = socket.gethostname()
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        m = pattern.fullmatch(tmp.name)
        if m is None or m["host"] != host or not tmp.is_dir() or _pid_alive(int(m["pid"])):
            continue  # another host's run may be alive: only its own host can tell
        shutil.rmtree(tmp, ignore_errors=True)
        logging.info("removed %s, a stale temporary folder of process %s (killed while writing)",
                     tmp, m["pid"])
        removed.append(tmp)
    return removed


@contextmanager
def atomic_dir(out: Path, install: Callable[[Path, Path], None] = os.replace,
               mode: int | None = None) -> Iterator[Path]:
    """Build a folder in a temporary sibling of ``out`` and move it to ``out`` when the block ends.

    A crash never leaves a half-written ``out``: on any exception (Ctrl-C included) the temporary
    folder is removed; temporary folders of killed runs on this host are removed first.
    ``install(tmp, out)`` does the move (default ``os.replace``, which replaces only an empty
    ``out``); ``mode`` sets the folder's permissions (``mkdtemp`` makes it private, 0700).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-",
                                dir=out.parent))
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
