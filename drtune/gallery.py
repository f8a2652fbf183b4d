"""The Grad-CAM gallery on disk: which images, in what order, under what file names, drawn how.

A gallery folder holds one PNG per readable photograph (photo | heatmap overlay, titled with its
name, P(RDR), decision and ground truth), an ``index.html`` that opens from disk (file://) and
``summary.json``. Images fall into the groups of ``GROUPS`` (errors first: a missed RDR is what a
screener fears most); ``choose`` picks a split's images by the rule ``SELECTION`` says,
``summary_rows`` orders them, ``render_rows`` names and draws their PNGs and ``write_index``
writes the page.

This module only lays out what it is given: the maps, probabilities and lesion outlines come from
:mod:`drtune.gradcam`, whose ``run_gradcam`` drives it. It imports no TensorFlow.
"""

from __future__ import annotations

import html
import json
import re
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

import numpy as np
from absl import logging
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from drtune.errors import InputError
from drtune.runs import CLASS_NAMES

# Gallery sections in display order, errors first (a missed RDR is what a screener fears most):
# key, heading, what it means.
GROUPS = (("FN", "False negatives", "RDR, called NRDR"), ("FP", "False positives", "NRDR, called RDR"),
          ("TP", "True positives", "RDR, called RDR"), ("TN", "True negatives", "NRDR, called NRDR"),
          ("RDR?", "Called RDR", "no ground truth"), ("NRDR?", "Called NRDR", "no ground truth"),
          ("error", "Unreadable", "no prediction"))
LABELLED, UNLABELLED = ("FN", "FP", "TP", "TN"), ("RDR?", "NRDR?")
# PNG name prefixes: the group is readable in a flat artifact list, and names sort errors first.
PREFIX = {"FN": "fn", "FP": "fp", "TP": "tp", "TN": "tn", "RDR?": "called-rdr", "NRDR?": "called-nrdr"}
SELECTION = ("all errors first (false negatives, then false positives, most confident first), "
             "then true positives and true negatives alternately, most confident first")
# The selection of a gallery given its images by name (``run_gradcam(names=...)``).
NAMED = "the images asked for by name (another gallery's), in that gallery's order"


# --------------------------------------------------------------------------- selection and order


def _group(label: int | None, decision: int) -> str:
    if label is None:
        return f"{CLASS_NAMES[decision]}?"
    return ("TN", "FP", "FN", "TP")[2 * label + decision]


def choose(labels: np.ndarray, p: np.ndarray, threshold: float, n: int) -> tuple[list[int], dict[str, int]]:
    """Indices of the ``n`` gallery images of a split (rule in ``SELECTION``), and the size of
    each group in the whole split."""
    groups = {g: [] for g in ("FN", "FP", "TP", "TN")}
    for i in np.argsort(-p, kind="stable"):  # most confident RDR first
        groups[_group(int(labels[i]), int(p[i] >= threshold))].append(int(i))
    groups["FN"].reverse(), groups["TN"].reverse()  # confident NRDR calls have the lowest P
    rest = [i for pair in zip_longest(groups["TP"], groups["TN"]) for i in pair if i is not None]
    return (groups["FN"] + groups["FP"] + rest)[:n], {g: len(v) for g, v in groups.items()}


def summary_rows(names: Sequence[str], files: Sequence[str], labels: Sequence[int | None],
                 errors: Sequence[str | None], p: dict[int, float], threshold: float,
                 keep_order: bool) -> list[dict[str, Any]]:
    """One summary row per image (``i``: its index in the batch), in the gallery's order: by
    group as ``GROUPS`` lists them, most confident first, unless ``keep_order``."""
    out: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        row = {"name": name, "file": files[i], "group": "error", "error": errors[i], "p_rdr": None,
               "decision": None, "truth": None if labels[i] is None else CLASS_NAMES[labels[i]],
               "png": None, "i": i}
        if errors[i] is None:
            decision = int(p[i] >= threshold)
            row.update(group=_group(labels[i], decision), p_rdr=float(p[i]),
                       decision=CLASS_NAMES[decision])
        else:
            logging.warning("%s: %s", files[i], errors[i])
        out.append(row)
    if not keep_order:
        order = {g[0]: k for k, g in enumerate(GROUPS)}
        out.sort(key=lambda r: (order[r["group"]], -(r["p_rdr"] or 0.0)))
    return out


def group_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many of the gallery's rows fall in each group of ``GROUPS`` (the summary's ``groups``)."""
    return {g[0]: sum(r["group"] == g[0] for r in rows) for g in GROUPS}


# --------------------------------------------------------------------------- PNGs


def _render(path: Path, image: np.ndarray, heat: np.ndarray, title: str,
            lesions: np.ndarray | None) -> None:
    """Photo | Grad-CAM overlay (jet, 40%) side by side with a colour bar, lesion outlines when known."""
    photo = np.clip(image, 0, 255) / 255.0
    overlay = np.clip(0.6 * photo + 0.4 * colormaps["jet"](heat)[..., :3], 0.0, 1.0)
    fig = Figure(figsize=(7.8, 3.9), layout="constrained")
    for k, (shown, label) in enumerate(((photo, "photograph"), (overlay, "Grad-CAM: evidence for RDR"))):
        ax = fig.add_subplot(1, 2, k + 1, title=label)
        ax.imshow(shown, interpolation="bilinear")
        ax.set_axis_off()
    if lesions is not None and lesions.any():
        ax.contour(lesions, levels=[0.5], colors="white", linewidths=0.6)
    # The overlay is a blend, so the bar maps the heatmap's own colours; 1 is this image's maximum.
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormaps["jet"]), ax=ax, shrink=0.8,
                       ticks=[0.0, 0.5, 1.0])
    bar.set_label("evidence for RDR (1 = this image's max)", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def render_rows(out: Path, rows: list[dict[str, Any]], batch: np.ndarray, heat: dict[int, np.ndarray],
                threshold: float, outline: Callable[[str], np.ndarray | None] | None,
                pointing: dict[str, Any] | None, numbered: bool) -> None:
    """Render each readable row's PNG and name it in the row (``png``); pops the rows' ``i``.

    ``outline(name)``: the image's lesion mask to draw (None: unknown), when masks were given;
    ``pointing``: the ``pointing_score`` whose per-image results go into the titles.
    """
    scored = {s["name"]: s for s in pointing["images"]} if pointing else {}
    digits = len(str(max(len(rows) - 1, 1)))
    rank_in_group: dict[str, int] = {}
    for pos, r in enumerate(rows):
        i = r.pop("i")
        if r["error"] is not None:
            continue
        # fn_00_<name>.png: the group first, so a flat listing (the dashboard's artifacts) sorts
        # errors first and says what each image is; then the rank in the gallery's order. A
        # gallery of given names keeps their order: its position comes first (00_fn_<name>.png).
        k = rank_in_group[r["group"]] = rank_in_group.get(r["group"], -1) + 1
        r["png"] = (f"{pos:0{digits}d}_{PREFIX[r['group']]}_{_slug(r['name'])}.png" if numbered
                    else f"{PREFIX[r['group']]}_{k:0{digits}d}_{_slug(r['name'])}.png")
        truth = f"; truth {r['truth']} ({r['group']})" if r["truth"] else ""
        title = f"{r['name']}: P(RDR) {r['p_rdr']:.3f} -> {r['decision']} (threshold {threshold:.3f}){truth}"
        if outline is not None and r["name"] in scored:
            r.update(peak_on_lesion=scored[r["name"]]["hit"], lesion_energy=scored[r["name"]]["energy"])
            title += f"\npointing game: peak {'on' if r['peak_on_lesion'] else 'off'} a lesion, " \
                     f"{r['lesion_energy']:.0%} of the map on lesions"
        _render(out / r["png"], batch[i], heat[i], title, outline(r["name"]) if outline is not None else None)


# --------------------------------------------------------------------------- index.html


def _pointing_caption(row: dict[str, Any]) -> str:
    """The image's own pointing-game result, when it took part (correctly called RDR, mask known)."""
    if row.get("peak_on_lesion") is None:
        return ""
    return (f"; peak {'on' if row['peak_on_lesion'] else 'off'} a lesion, "
            f"{row['lesion_energy']:.0%} of the map on lesions")


def _figures(rows: Sequence[dict[str, Any]], with_group: bool = False) -> str:
    return "".join(
        f'<figure data-p="{r["p_rdr"]:.6f}"><a href="{quote(r["png"])}"><img src="{quote(r["png"])}" '
        f'alt="{html.escape(r["name"])}" loading="lazy"></a><figcaption>{html.escape(r["name"])}: '
        f'P(RDR) {r["p_rdr"]:.3f}' + (f' ({html.escape(r["group"])})' if with_group else "")
        + f'{_pointing_caption(r)}</figcaption></figure>' for r in rows)


def _group_sections(summary: dict[str, Any]) -> list[str]:
    """One heading per group of ``GROUPS`` with its images (the gallery's usual layout)."""
    rows, parts = summary["images"], []
    in_split = summary.get("split_groups") or {}
    for key, heading, meaning in GROUPS:
        group = [r for r in rows if r["group"] == key]
        # Every group of the gallery's kind is shown, empty or not: "False negatives (0)" is an
        # answer a clinician looks for, not a section to leave out.
        if not group and key not in (LABELLED if summary.get("split") else UNLABELLED):
            continue
        total = in_split.get(key, len(group))
        more = (f" <small>{len(group)} of {total} in the {html.escape(summary['split'])} split shown</small>"
                if total > len(group) else "")
        parts.append(f'<h2 id="{quote(key)}">{heading} ({total}) <small>{meaning}</small>{more}</h2>')
        if not group:
            where = f" in the {html.escape(summary['split'])} split" if in_split else ""
            parts.append(f'<p class="none">None{where}.</p>')
            continue
        if key == "error":
            items = "".join(f"<li><b>{html.escape(r['name'])}</b> ({html.escape(r['file'])}): "
                            f"{html.escape(r['error'])}</li>" for r in group)
            parts.append(f'<ul class="errors">{items}</ul>')
            continue
        parts.append(f'<div class="group">{_figures(group)}</div>')
    return parts


def _named_section(summary: dict[str, Any]) -> list[str]:
    """The images given by name, in their order (to set beside the gallery they came from), each
    captioned with this run's group; the group sizes of the whole split above them."""
    in_split = summary.get("split_groups") or {}
    sizes = ", ".join(f"{heading.lower()} {in_split[key]}" for key, heading, _ in GROUPS if key in in_split)
    return [f"<h2>In the order given</h2><p>This run on the whole {html.escape(summary['split'])} split: "
            f"{sizes}.</p>", f'<div class="group">{_figures(summary["images"], with_group=True)}</div>']


def write_index(out: Path, summary: dict[str, Any]) -> None:
    """``out/index.html``: the gallery page of ``summary`` (``run_gradcam``'s), its PNGs linked."""
    parts = [f"<h1>Grad-CAM: {html.escape(summary['run'])}</h1><p>{html.escape(summary['source'])}; "
             f"threshold {summary['threshold']:.3f}; maps explain RDR from layer "
             f"<code>{html.escape(summary['layer'])}</code>. Each map is scaled to its own maximum: "
             "red is the strongest evidence for RDR <i>in that image</i>, so in images called NRDR "
             "it marks the least weak evidence, not a finding."
             + (" White outlines: known lesions." if summary.get("masks") else "") + "</p>"]
    if summary.get("ensemble"):
        parts.append(f"<p>An ensemble of {len(summary['ensemble'])} models "
                     f"({html.escape(', '.join(summary['ensemble']))}): each map is the mean of the "
                     "members' Grad-CAM maps (each scaled to its own maximum first); P(RDR) is the "
                     "ensemble's, the mean of its members'.</p>")
    if summary.get("selection"):
        parts.append(f"<p>Shown: {summary['n']} of {summary['n_split']} images: "
                     f"{html.escape(summary['selection'])}.</p>")
    if summary.get("pointing"):
        parts.append(f'<p class="pointing"><b>Pointing game</b> (does the map peak on a known lesion?): '
                     f"{html.escape(summary['pointing_text'])}.</p>")
    parts += _named_section(summary) if summary.get("named") else _group_sections(summary)
    style = ("body{font-family:sans-serif;margin:1em 2em}.group{display:flex;flex-wrap:wrap;gap:8px}"
             "figure{margin:0;width:500px}img{width:100%}figcaption{font-size:90%}small{color:#666}"
             ".none{color:#666;font-style:italic}.pointing{background:#f3f3f3;padding:.5em}")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>Grad-CAM '
            f'{html.escape(summary["run"])}</title><style>{style}</style></head><body>'
            + "\n".join(parts) + "</body></html>\n")
    (out / "index.html").write_text(page, encoding="utf-8")


def gallery_artifacts(out_dir: Path | str) -> list[Path]:
    """The files of a gallery worth uploading: ``index.html``, then its PNGs in the gallery's order
    (errors first; each name starts with its group, ``fn_``, ``fp_``, ``tp_``, ``tn_``...)."""
    out = Path(out_dir)
    if not (out / "index.html").is_file() or not (out / "summary.json").is_file():
        raise InputError(f"{out}: no Grad-CAM gallery (run 'drtune gradcam' first)")
    rows = json.loads((out / "summary.json").read_text())["images"]
    return [out / "index.html"] + [out / r["png"] for r in rows if r["png"] and (out / r["png"]).is_file()]
