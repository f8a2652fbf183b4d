"""Reading grade CSVs and matching them to image files.

Kept apart from ``prepare`` so that the CSV quirks of real data sets (IDRiD's nine trailing empty
columns and a stray trailing space) are handled, and tested, in one small place.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from drtune.errors import InputError

# Image formats that ``prepare`` decodes; other files in an image folder (README, .DS_Store) are
# ignored rather than treated as errors, because real data folders often carry them.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

# Header spellings seen in public DR data sets (IDRiD, Kaggle EyePACS, APTOS), compared after
# stripping and lower-casing, so a CSV from any of them works without renaming columns.
NAME_COLUMNS: tuple[str, ...] = ("image name", "image", "id_code", "filename", "name")
GRADE_COLUMNS: tuple[str, ...] = ("retinopathy grade", "level", "diagnosis", "grade")
# IDRiD's third column. drtune does not train on it; bench_real breaks its results down by it,
# because exudates near the macula are what a referable eye often shows first.
EDEMA_COLUMNS: tuple[str, ...] = ("risk of macular edema",)


@dataclass(frozen=True)
class LabelRow:
    """One graded image as the CSV names it; ``row`` is the 1-based line number for messages."""

    name: str
    grade: int
    row: int
    edema: int | None = None  # "Risk of macular edema" 0-2 when the CSV has it (None: absent or blank)


@dataclass(frozen=True)
class Problem:
    """A bad input item: where it is (file and row) and what is wrong with it."""

    where: str
    message: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _find_column(header: list[str], candidates: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for cand in candidates:
        if cand in lowered:
            return lowered.index(cand)
    return None


def _edema(fields: list[str], col: int | None) -> int | None:
    """The row's macular-edema risk, or None: informational only, so a blank or odd value is no problem."""
    raw = fields[col].strip() if col is not None and col < len(fields) else ""
    return int(raw) if raw.isdigit() else None


def read_labels(csv_path: Path, allow_empty: bool = False) -> tuple[list[LabelRow], list[Problem]]:
    """Parse a grade CSV into rows and per-row problems.

    Structural faults (unreadable file, missing column, no rows) raise :class:`InputError`
    because nothing can be salvaged; per-row faults (bad grade, duplicate name) are returned as
    problems so the caller can report all of them at once or skip those rows.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: label CSV not found")
    try:
        # utf-8-sig: CSVs saved by Excel start with a byte-order mark that would corrupt the
        # first header name.
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{csv_path}: cannot read label CSV ({exc})") from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise InputError(f"{csv_path}: label CSV is empty")
    name_col = _find_column(header, NAME_COLUMNS)
    grade_col = _find_column(header, GRADE_COLUMNS)
    edema_col = _find_column(header, EDEMA_COLUMNS)
    missing = [
        label
        for label, col in (("Image name", name_col), ("Retinopathy grade", grade_col))
        if col is None
    ]
    if missing:
        found = ", ".join(repr(h) for h in header if h.strip()) or "none"
        raise InputError(
            f"{csv_path}: missing column {' and '.join(repr(m) for m in missing)} "
            f"(found columns: {found})"
        )
    assert name_col is not None and grade_col is not None

    rows: list[LabelRow] = []
    problems: list[Problem] = []
    first_row: dict[str, int] = {}
    for line_no, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue  # blank lines and rows of empty trailing columns
        where = f"{csv_path} row {line_no}"
        name = fields[name_col].strip() if name_col < len(fields) else ""
        raw = fields[grade_col].strip() if grade_col < len(fields) else ""
        if not name:
            problems.append(Problem(where, "empty image name"))
            continue
        try:
            grade = int(raw)
        except ValueError:
            # Accept "2.0" as written by pandas, but nothing that is not a whole number.
            try:
                as_float = float(raw)
            except ValueError:
                as_float = float("nan")
            if not as_float.is_integer():
                problems.append(Problem(where, f"grade {raw!r} of {name!r} is not an integer 0-4", name))
                continue
            grade = int(as_float)
        if not 0 <= grade <= 4:
            problems.append(Problem(where, f"grade {grade} of {name!r} is outside 0-4", name))
            continue
        key = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
        if key in first_row:
            problems.append(
                Problem(where, f"duplicate image name {name!r} (first on row {first_row[key]})", name)
            )
            continue
        first_row[key] = line_no
        rows.append(LabelRow(name=key, grade=grade, row=line_no, edema=_edema(fields, edema_col)))
    if not rows and not problems and not allow_empty:
        raise InputError(f"{csv_path}: label CSV has a header but no rows")
    return rows, problems


def list_images(folder: Path) -> tuple[dict[str, Path], list[Problem]]:
    """Map image stem -> path for the image files directly in ``folder``.

    Two files with the same stem (``a.jpg`` and ``a.png``) are a problem, since a CSV row could
    not say which one it means.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder not found")
    found: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            problems.append(
                Problem(str(path), f"same name as {found[path.stem].name}; keep only one", path.stem)
            )
            continue
        found[path.stem] = path
    if not found:
        raise InputError(
            f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return found, problems


def match(
    rows: list[LabelRow], images: dict[str, Path], csv_path: Path, folder: Path,
    reported: Iterable[str] = (),
) -> tuple[list[tuple[LabelRow, Path]], list[Problem]]:
    """Pair CSV rows with image files; rows without an image and images without a row are problems.

    ``reported`` names images whose row was already reported as bad (e.g. grade 7): their image
    has a row, so it is not reported again as having none.
    """
    pairs: list[tuple[LabelRow, Path]] = []
    problems: list[Problem] = []
    for row in rows:
        path = images.get(row.name)
        if path is None:
            problems.append(
                Problem(f"{csv_path} row {row.row}", f"no image file for {row.name!r} in {folder}", row.name)
            )
        else:
            pairs.append((row, path))
    named = {row.name for row in rows} | set(reported)
    for stem, path in images.items():
        if stem not in named:
            problems.append(Problem(str(path), f"image has no row in {csv_path}", stem))
    return pairs, problems


def group_key(name: str, pattern: re.Pattern[str] | None) -> str:
    """The split group of an image: the first capture group of ``pattern``, else the name itself."""
    if pattern is None:
        return name
    m = pattern.search(name)
    return m.group(1) if m and m.group(1) is not None else name


def compile_group_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """Compile ``--group-pattern``; it must be a valid regex with at least one capture group."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--group-pattern {pattern!r}: invalid regular expression ({exc})") from exc
    if compiled.groups < 1:
        raise InputError(
            f"--group-pattern {pattern!r}: needs a capture group, e.g. '(Patient\\d+)_[LR]'"
        )
    return compiled
