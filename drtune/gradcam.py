"""Grad-CAM heatmaps (pure), a browsable gallery (IO) and a lesion-pointing score.

``heatmaps`` is a pure function of a model and a batch. ``run_gradcam`` renders one PNG per
photograph (photo | heatmap overlay, titled with name, P(RDR), decision and ground truth) and an
``index.html`` that opens from disk (file://). ``pointing_score`` checks, on ``drtune synth``
data whose lesion masks are known, whether the maps point at lesions at all.

The class score is the log-odds of the class, ``z_c - logsumexp(z_other)`` on the pre-softmax
logits (``z_1 - z_0`` for RDR): it does not saturate as P -> 1 the way the probability does, and
for the GAP -> dense head its map is exactly where the decision's evidence sits (a CAM of the
logit difference). Maps are ReLU'd and divided by their own maximum, so compare *where* maps
point, not their intensity across images; an all-zero map means no positive evidence anywhere.

An ensemble run (:mod:`drtune.ensemble`) has no single feature map: its map is the mean of its
members' maps and its P(RDR) the ensemble's. ``run_gradcam(names=...)`` renders a gallery on the
images of another one, in its order, so that two models compare photograph by photograph.
"""

from __future__ import annotations

import html
import json
import re
from itertools import zip_longest
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np
from absl import logging

from drtune.errors import InputError
from drtune.model import FEATURE_LAYER
from drtune.runs import CLASS_NAMES, MODEL_KERAS, SPLITS, TEST, TRAIN, load_meta

RDR = 1
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


# --------------------------------------------------------------------------- heatmaps (pure)


def _grad_model(model: Any, layer: str, where: str = "") -> Any:
    """[feature map, pre-softmax input of the head (or the probabilities)] of ``model``."""
    import keras

    try:
        feature = model.get_layer(layer)
    except ValueError:
        raise InputError(f"{where or 'model ' + repr(model.name)}: no layer {layer!r} to explain (Grad-CAM "
                         f"needs the named feature map; drtune models call it {FEATURE_LAYER!r})") from None
    head = model.layers[-1]
    dense = isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax
    return keras.Model(model.inputs, [feature.output, head.input if dense else model.output]), (
        head if dense else None)


def _cams(model: Any, images: np.ndarray, class_index: int | None, layer: str,
          batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps [B,H,W] in [0, 1], P(RDR) [B]) for float32 0..255 ``images`` [B,H,W,3]."""
    import tensorflow as tf

    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images: expected a batch [B,H,W,3], got shape {images.shape}")
    c = RDR if class_index is None else int(class_index)
    grad_model, head = _grad_model(model, layer)
    n_classes = int(model.output.shape[-1])
    if not 0 <= c < n_classes:
        raise InputError(f"class_index {class_index}: the model has {n_classes} classes")

    # A graph, not eager: eager backprop through a conv also computes the unused kernel
    # gradient, which is wasted work and crashes oneDNN in TF 2.21 for narrow convs; graph
    # pruning drops it.
    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            feats, pre = grad_model([x], training=False)
            logits = (tf.matmul(pre, head.kernel) + head.bias if head is not None
                      else tf.math.log(tf.maximum(pre, 1e-12)))
            others = tf.concat([logits[:, :c], logits[:, c + 1:]], axis=1)
            score = logits[:, c] - tf.reduce_logsumexp(others, axis=1)
        grads = tape.gradient(score, feats)  # images are independent: d(sum)/dA_b = d(score_b)/dA_b
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(feats * weights, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, tf.shape(x)[1:3], method="bilinear")[..., 0]
        return cam, tf.nn.softmax(logits)[:, RDR]

    maps, probs = [], []
    for i in range(0, len(images), batch_size):
        cam, p = (t.numpy() for t in step(tf.constant(images[i:i + batch_size])))
        peak = cam.max(axis=(1, 2), keepdims=True)
        maps.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
        probs.append(p)
    empty = [np.zeros((0,) + images.shape[1:3], np.float32)], [np.zeros(0, np.float32)]
    return np.clip(np.concatenate(maps or empty[0]), 0.0, 1.0), np.concatenate(probs or empty[1])


def _explain(model: Any, images: np.ndarray, class_index: int | None, layer: str,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``_cams`` of a single model, or of an ensemble (:mod:`drtune.ensemble`), which has no single
    feature map: there the map is the mean of the members' maps (each scaled to its own maximum
    first, so that every member counts alike), rescaled to its own maximum like any map, and
    P(RDR) is the ensemble's own (the mean of its members', each with its TTA views)."""
    from drtune.ensemble import member_models

    members = member_models(model)
    if not members:
        return _cams(model, images, class_index, layer, batch_size)
    maps = np.mean([_cams(m, images, class_index, layer, batch_size)[0] for m in members], axis=0)
    peak = maps.max(axis=(1, 2), keepdims=True) if len(maps) else maps
    maps = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)
    p = model.predict(np.asarray(images, np.float32), verbose=0)[:, RDR] if len(images) else np.zeros(0)
    return maps, p


def heatmaps(model: Any, images: np.ndarray, class_index: int | None = None,
             layer: str = FEATURE_LAYER, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps [B,H,W] float32 in [0, 1] at the input size, computed ``batch_size`` at a time.

    ``images``: float32 RGB 0..255 [B,H,W,3], as the model takes them. ``class_index``: the class
    explained; None means RDR (index 1), the class a screener wants located. ``layer``: the
    feature map differentiated against (default the last, ``FEATURE_LAYER``; an earlier stage
    gives finer, less class-specific maps). ``InputError`` if the model has no such layer. An
    ensemble's map is the mean of its members' maps (``_explain``).
    """
    return _explain(model, images, class_index, layer, batch_size)[0]


# --------------------------------------------------------------------------- lesion masks


def lesion_masks(photo: Path | str, mask_file: Path | str, info: dict[str, Any],
                 tolerance: int) -> tuple[np.ndarray, np.ndarray]:
    """(lesion mask dilated by ``tolerance`` px, retina field), bool [S,S] at the model input size.

    The mask gets exactly the photo's ``prepare`` crop: the field is found on the photo decoded
    as ``prepare`` decodes it (possibly at 1/2-1/8 resolution), scaled to the mask's resolution,
    and the square crop is area-resized; any lesion pixel marks its target pixel (like a
    max-pool), so microaneurysms survive the shrink.
    """
    import cv2

    from drtune.fundus import Field, crop_square, find_field
    from drtune.prepare import decode_photo

    size, n = int(info["size"]), int(info["input_size"])
    rgb = decode_photo(Path(photo).read_bytes(), size)
    mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InputError(f"{mask_file}: lesion mask missing or unreadable")
    f, s = find_field(rgb), mask.shape[1] / rgb.shape[1]  # pixel centres scale about -0.5
    field = Field((f.cx + 0.5) * s - 0.5, (f.cy + 0.5) * s - 0.5, f.radius * s, 0, 0, 0, 0)

    def to_input(a: np.ndarray) -> np.ndarray:
        return cv2.resize(crop_square(a, field).astype(np.float32), (n, n), interpolation=cv2.INTER_AREA)

    lesions = (to_input(mask) > 0).astype(np.uint8)
    if tolerance > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1,) * 2)
        lesions = cv2.dilate(lesions, kernel)
    yy, xx = np.ogrid[:n, :n]
    circle = (xx - (n - 1) / 2) ** 2 + (yy - (n - 1) / 2) ** 2 <= (n / 2) ** 2
    field_px = (to_input(np.full(mask.shape, 255, np.uint8)) > 127) & circle
    return lesions.astype(bool) & field_px, field_px


def pointing_score(model: Any, synth_root: Path | str, split: str, info: dict[str, Any],
                   threshold: float, layer: str = FEATURE_LAYER,
                   tolerance: int | None = None) -> dict[str, Any]:
    """Pointing game and energy share of the RDR maps on a ``drtune synth`` split.

    Over the correctly classified RDR photographs (grade >= the run's ``rdr_grade``, P(RDR) >=
    ``threshold``): ``hit_rate`` is the share whose map peak lies in the lesion mask dilated by
    ``tolerance`` px at the model input size (default 1/32 of the side, >= 2: 8 px at 256, a
    quarter cell of the stride-32 feature map); ``energy_share`` the mean share of map mass in
    that mask; ``baseline`` the mean share of the retina field it covers: what a uniformly random
    peak (or a flat map) would score on either. Photos are preprocessed as ``prepare`` does.
    """
    from drtune.evaluate import model_inputs
    from drtune.labels import list_images, read_labels
    from drtune.synth import SYNTH_LAYOUT, mask_path

    root = Path(synth_root)
    if split not in SYNTH_LAYOUT:
        raise InputError(f"split {split!r}: a synth set has {' and '.join(SYNTH_LAYOUT)}")
    images_dir, labels_csv, _ = (root / p for p in SYNTH_LAYOUT[split])
    if not labels_csv.is_file():
        raise InputError(f"{root}: not a 'drtune synth' folder (no {SYNTH_LAYOUT[split][1]})")
    rows, _ = read_labels(labels_csv)
    files, _ = list_images(images_dir)
    rows = [r for r in rows if r.grade >= int(info.get("rdr_grade", 2)) and r.name in files]
    tol = max(2, round(int(info["input_size"]) / 32)) if tolerance is None else int(tolerance)
    batch, errors = model_inputs([files[r.name] for r in rows], info)
    ok = [i for i, e in enumerate(errors) if e is None]
    maps, p = _explain(model, batch[ok], RDR, layer, 16)
    per_image = []
    for k, i in enumerate(ok):
        if p[k] < threshold:
            continue
        name = rows[i].name
        lesions, field = lesion_masks(files[name], mask_path(root, split, name), info, tol)
        peak = np.unravel_index(np.argmax(maps[k]), maps[k].shape)
        per_image.append({"name": name, "p_rdr": float(p[k]), "hit": bool(lesions[peak]),
                          "energy": float((maps[k] * lesions).sum() / max(maps[k].sum(), 1e-12)),
                          "coverage": float(lesions.sum() / max(field.sum(), 1))})

    def mean(key: str) -> float | None:
        return float(np.mean([r[key] for r in per_image])) if per_image else None

    return {"split": split, "layer": layer, "tolerance_px": tol, "n_rdr": len(rows),
            "n_unreadable": len(rows) - len(ok), "n": len(per_image), "hit_rate": mean("hit"),
            "energy_share": mean("energy"), "baseline": mean("coverage"), "images": per_image}


# --------------------------------------------------------------------------- gallery (IO)


def _group(label: int | None, decision: int) -> str:
    if label is None:
        return f"{CLASS_NAMES[decision]}?"
    return ("TN", "FP", "FN", "TP")[2 * label + decision]


def _choose(labels: np.ndarray, p: np.ndarray, threshold: float,
            n: int) -> tuple[list[int], dict[str, int]]:
    """Indices of the ``n`` gallery images of a split (rule in ``SELECTION``), and the size of
    each group in the whole split."""
    groups = {g: [] for g in ("FN", "FP", "TP", "TN")}
    for i in np.argsort(-p, kind="stable"):  # most confident RDR first
        groups[_group(int(labels[i]), int(p[i] >= threshold))].append(int(i))
    groups["FN"].reverse(), groups["TN"].reverse()  # confident NRDR calls have the lowest P
    rest = [i for pair in zip_longest(groups["TP"], groups["TN"]) for i in pair if i is not None]
    return (groups["FN"] + groups["FP"] + rest)[:n], {g: len(v) for g, v in groups.items()}


def _render(path: Path, image: np.ndarray, heat: np.ndarray, title: str,
            lesions: np.ndarray | None) -> None:
    """Photo | Grad-CAM overlay (jet, 40%) side by side with a colour bar, lesion outlines when known."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

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


def _write_index(out: Path, summary: dict[str, Any]) -> None:
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


def _split_batch(model: Any, info: dict[str, Any], run_dir: Path, data_dir: Path, split: str, n: int,
                 threshold: float, wanted: Sequence[str] | None = None,
                 ) -> tuple[np.ndarray, list[str], list[int], dict[str, int]]:
    """(images, names, labels) of the ``n`` gallery images of a prepared split (or of the images
    named ``wanted``, in that order), and its group sizes."""
    from drtune import data
    from drtune.evaluate import check_data_matches_run, predictor

    if split not in SPLITS:
        raise InputError(f"--split {split!r}: must be {', '.join(SPLITS[:-1])} or {SPLITS[-1]}")
    meta = load_meta(data_dir)
    check_data_matches_run(meta, info, data_dir, run_dir)
    size = info["input_size"] if info["input_size"] != info["size"] else None
    ds = data.eval_dataset(data_dir, split, 32, cache=False, image_size=size, meta=meta)
    y = data.split_labels(data_dir, split, meta)
    names = data.split_names(data_dir, split, meta)
    pick, counts = _choose(y, predictor(model, run_dir).predict(ds, verbose=0)[:, RDR], threshold, n)
    if wanted is not None:
        index = {name: i for i, name in enumerate(names)}
        missing = [name for name in wanted if name not in index]
        if missing:
            raise InputError(f"{data_dir}: the {split} split has no image named {', '.join(map(repr, missing[:5]))}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        pick = [index[name] for name in wanted]
    slot, seen = {j: k for k, j in enumerate(pick)}, 0
    batch = np.zeros((len(pick),) + tuple(model.input_shape[1:]), np.float32)
    for b, _ in ds:  # a second pass keeps only the chosen images in memory
        for j, image in enumerate(b.numpy(), start=seen):
            if j in slot:
                batch[slot[j]] = image
        seen += len(b)
    return batch, [names[i] for i in pick], [int(y[i]) for i in pick], counts


def _inputs(model: Any, info: dict[str, Any], run_dir: Path, data_dir: Path | str | None, split: str,
            images: Sequence[Path | str], n: int, threshold: float, names: Sequence[str] | None,
            summary: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str], list[int | None], list[str | None]]:
    """(batch, names, files, labels, errors) of the gallery's images; fills in ``summary``'s
    description of where they come from and how they were chosen."""
    from drtune.evaluate import model_inputs

    if images:
        paths = [Path(p) for p in images]
        batch, errors = model_inputs(paths, info)
        summary.update(source=f"{len(paths)} photograph(s)", n_split=len(paths))
        return batch, [p.stem for p in paths], [str(p) for p in paths], [None] * len(paths), errors
    data_dir = Path(data_dir or info["data_dir"])
    batch, shown, labels, counts = _split_batch(model, info, run_dir, data_dir, split, n, threshold, names)
    summary.update(source=f"{split} split of {data_dir}", split=split, data_dir=str(data_dir),
                   n_split=sum(counts.values()), split_groups=counts, selection=SELECTION)
    if names is not None:
        summary.update(selection=NAMED, named=True)
    return batch, shown, [f"{data_dir}:{split}"] * len(shown), list(labels), [None] * len(shown)


def run_gradcam(run_dir: Path | str, out_dir: Path | str, data_dir: Path | str | None = None,
                split: str = TEST, images: Sequence[Path | str] = (), n: int = 16,
                masks: Path | str | None = None, layer: str = FEATURE_LAYER,
                tolerance: int | None = None, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Write a Grad-CAM gallery of a run to ``out_dir``: PNGs, ``index.html``, ``summary.json``.

    Either raw photographs ``images`` (all shown, preprocessed as ``prepare`` does; unreadable
    ones become error entries) or ``n`` images of a prepared ``split`` of ``data_dir`` (default:
    the run's data) chosen as ``SELECTION`` says. ``names``: instead of choosing, show exactly
    these images of the split, in this order (another gallery's ``images``, to compare two models
    image by image); each keeps this run's own P(RDR) and group. ``masks``: a ``drtune synth``
    root; adds lesion outlines and the ``pointing_score`` (on the synth split ``split`` came
    from: test for test and raw photos, train for train/val) to the gallery and the summary,
    which is returned. An ensemble run (``drtune.ensemble``) shows the mean of its members' maps.
    """
    from drtune.ensemble import member_models
    from drtune.evaluate import load_run, predictor
    from drtune.synth import SYNTH_LAYOUT
    from drtune.train import write_json

    if images and data_dir is not None:
        raise InputError("give either --data/--split or IMAGE..., not both")
    if images and names is not None:
        raise InputError("names pick images of a prepared split: give them without IMAGE...")
    if n < 1:
        raise InputError(f"--n {n}: must be >= 1")
    if names is not None and (not names or len(set(names)) != len(names)):
        raise InputError(f"names: give each image of the split once, at least one ({len(names)} given)")
    model, info, run_metrics = load_run(run_dir)
    members = member_models(model)
    for explained in members or [model]:  # fail before any work
        _grad_model(explained, layer, str(Path(run_dir) / MODEL_KERAS))
    threshold = float(run_metrics["threshold"])
    summary: dict[str, Any] = {"run": str(run_dir), "threshold": threshold, "layer": layer,
                               "masks": None if masks is None else str(masks)}
    if members:
        summary["ensemble"] = [m.name for m in members]
    batch, shown, files, labels, errors = _inputs(model, info, Path(run_dir), data_dir, split, images, n,
                                                  threshold, names, summary)
    # A synth folder has a train and a test part; val was drawn from its train part.
    synth_split = TEST if images or split == TEST else TRAIN
    if masks is not None and not (Path(masks) / SYNTH_LAYOUT[synth_split][1]).is_file():
        raise InputError(f"--masks {masks}: not a 'drtune synth' folder (no {SYNTH_LAYOUT[synth_split][1]})")
    ok = [i for i, e in enumerate(errors) if e is None]
    maps, p_ok = _explain(model, batch[ok], RDR, layer, 16)
    averaged = predictor(model, run_dir)
    if ok and averaged is not model:
        # The heatmap explains the plain view; P(RDR) and the decision are the run's own, with
        # its test-time augmentation, so they match evaluate and predict.
        p_ok = averaged.predict(batch[ok], verbose=0)[:, RDR]
    rows = _rows(shown, files, labels, errors, dict(zip(ok, p_ok)), threshold, keep_order=names is not None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if masks is not None:  # first, so that each image's own result can go into its figure
        summary.update(_pointing(model, masks, synth_split, info, threshold, layer, tolerance))
    _render_rows(out, rows, batch, dict(zip(ok, maps)), threshold, info, masks, synth_split,
                 summary.get("pointing"), numbered=names is not None)
    summary.update(n=len(rows), images=rows,
                   groups={g[0]: sum(r["group"] == g[0] for r in rows) for g in GROUPS})
    _write_index(out, summary)
    write_json(out / "summary.json", summary)
    logging.info("wrote %d Grad-CAM image(s) and %s", len(ok), out / "index.html")
    return summary


def _rows(names: Sequence[str], files: Sequence[str], labels: Sequence[int | None],
          errors: Sequence[str | None], p: dict[int, float], threshold: float,
          keep_order: bool) -> list[dict[str, Any]]:
    """One summary row per image (``i``: its index in the batch), in the gallery's order: by
    group as ``GROUPS`` lists them, most confident first, unless ``keep_order``."""
    rows: list[dict[str, Any]] = []
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
        rows.append(row)
    if not keep_order:
        order = {g[0]: k for k, g in enumerate(GROUPS)}
        rows.sort(key=lambda r: (order[r["group"]], -(r["p_rdr"] or 0.0)))
    return rows


def _pointing(model: Any, masks: Path | str, synth_split: str, info: dict[str, Any], threshold: float,
              layer: str, tolerance: int | None) -> dict[str, Any]:
    """The summary's ``pointing`` (``pointing_score``) and ``pointing_text``."""
    score = pointing_score(model, masks, synth_split, info, threshold, layer, tolerance)
    text = ("n/a (no correctly classified RDR image)" if not score["n"] else
            f"hit rate {score['hit_rate']:.2f} vs {score['baseline']:.2f} for a random peak, energy "
            f"share {score['energy_share']:.2f} (baseline {score['baseline']:.2f}), over {score['n']} "
            f"correctly classified RDR photos of the synth {synth_split} split (lesions dilated by "
            f"{score['tolerance_px']} px)")
    logging.info("pointing game: %s", text)
    return {"pointing": score, "pointing_text": text}


def _render_rows(out: Path, rows: list[dict[str, Any]], batch: np.ndarray, heat: dict[int, np.ndarray],
                 threshold: float, info: dict[str, Any], masks: Path | str | None, synth_split: str,
                 pointing: dict[str, Any] | None, numbered: bool) -> None:
    """Render each readable row's PNG and name it in the row (``png``); pops the rows' ``i``."""
    from drtune.synth import SYNTH_LAYOUT, mask_path

    scored = {s["name"]: s for s in pointing["images"]} if pointing else {}
    photos = Path(masks) / SYNTH_LAYOUT[synth_split][0] if masks is not None else None
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
        if photos is not None and r["name"] in scored:
            r.update(peak_on_lesion=scored[r["name"]]["hit"], lesion_energy=scored[r["name"]]["energy"])
            title += f"\npointing game: peak {'on' if r['peak_on_lesion'] else 'off'} a lesion, " \
                     f"{r['lesion_energy']:.0%} of the map on lesions"
        photo = photos / f"{r['name']}.jpg" if photos is not None else None
        lesions = (lesion_masks(photo, mask_path(Path(masks), synth_split, r["name"]), info, 0)[0]
                   if photo is not None and photo.is_file() else None)
        _render(out / r["png"], batch[i], heat[i], title, lesions)


def gallery_artifacts(out_dir: Path | str) -> list[Path]:
    """The files of a gallery worth uploading: ``index.html``, then its PNGs in the gallery's order
    (errors first; each name starts with its group, ``fn_``, ``fp_``, ``tp_``, ``tn_``...)."""
    out = Path(out_dir)
    if not (out / "index.html").is_file() or not (out / "summary.json").is_file():
        raise InputError(f"{out}: no Grad-CAM gallery (run 'drtune gradcam' first)")
    rows = json.loads((out / "summary.json").read_text())["images"]
    return [out / "index.html"] + [out / r["png"] for r in rows if r["png"] and (out / r["png"]).is_file()]
