"""Grad-CAM maps of a run's model, the lesion-pointing score, and ``run_gradcam`` (the command).

``heatmaps`` is a pure function of a model and a batch. ``pointing_score`` checks, on ``drtune
synth`` data whose lesion masks are known, whether the maps point at lesions at all.
``run_gradcam`` loads a run, picks its images, computes their maps and P(RDR), and hands them to
:mod:`drtune.gallery`, which writes one PNG per photograph and an ``index.html``; the gallery's
names (``GROUPS``, ``PREFIX``, ``SELECTION``, ``NAMED``, ``gallery_artifacts``) are importable
from here too, as callers have always found them.

The class score is the log-odds of the class, ``z_c - logsumexp(z_other)`` on the pre-softmax
logits (``z_1 - z_0`` for RDR): it does not saturate as P -> 1 the way the probability does, and
for the GAP -> dense head its map is exactly where the decision's evidence sits (a CAM of the
logit difference). Maps are ReLU'd and divided by their own maximum, so compare *where* maps
point, not their intensity across images; an all-zero map means no positive evidence anywhere.

An ensemble run (:mod:`drtune.ensemble`) has no single feature map: its map is the mean of its
members' maps and its P(RDR) the ensemble's. ``run_gradcam(names=...)`` renders a gallery on the
images of another one, in its order, so that two models compare photograph by photograph.

TensorFlow, OpenCV and the other drtune modules are imported at the top: only commands that
already load TensorFlow (``drtune gradcam``, ``finetune``) import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from drtune import data, gallery
from drtune.ensemble import member_models
from drtune.errors import InputError
from drtune.evaluate import check_data_matches_run, load_run, model_inputs, predictor
from drtune.fundus import Field, crop_square, find_field
from drtune.gallery import GROUPS, NAMED, PREFIX, SELECTION, gallery_artifacts  # noqa: F401  (re-exported)
from drtune.labels import list_images, read_labels
from drtune.model import FEATURE_LAYER, GradeHead
from drtune.prepare import decode_photo
from drtune.runs import MODEL_KERAS, SPLITS, TEST, TRAIN, load_meta, write_json
from drtune.synth import SYNTH_LAYOUT, mask_path

RDR = 1

# --------------------------------------------------------------------------- heatmaps (pure)


def _grad_model(model: Any, layer: str, where: str = "") -> tuple[Any, Callable[[tf.Tensor], tf.Tensor], int]:
    """(model of [feature map, input of the head], head input -> class logits, number of classes).

    The logits are the dense layer's pre-softmax outputs; for a grade head (``model.head =
    "grade"``) the two referral logits log sum exp over the grades either side of the referral
    grade, whose softmax is exactly the head's (P(NRDR), P(RDR)); for any other head, the log of
    the probabilities.
    """
    try:
        feature = model.get_layer(layer)
    except ValueError:
        raise InputError(f"{where or 'model ' + repr(model.name)}: no layer {layer!r} to explain (Grad-CAM "
                         f"needs the named feature map; drtune models call it {FEATURE_LAYER!r})") from None
    head = model.layers[-1]
    if isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax:
        return (keras.Model(model.inputs, [feature.output, head.input]),
                lambda pre: tf.matmul(pre, head.kernel) + head.bias, int(head.units))
    if isinstance(head, GradeHead):
        r = head.rdr_grade
        return (keras.Model(model.inputs, [feature.output, head.input]),
                lambda g: tf.stack([tf.reduce_logsumexp(g[:, :r], 1), tf.reduce_logsumexp(g[:, r:], 1)], 1), 2)
    return (keras.Model(model.inputs, [feature.output, model.output]),
            lambda p: tf.math.log(tf.maximum(p, 1e-12)), int(model.output.shape[-1]))


def _cams(model: Any, images: np.ndarray, class_index: int | None, layer: str,
          batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps [B,H,W] in [0, 1], P(RDR) [B]) for float32 0..255 ``images`` [B,H,W,3]."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images: expected a batch [B,H,W,3], got shape {images.shape}")
    c = RDR if class_index is None else int(class_index)
    grad_model, to_logits, n_classes = _grad_model(model, layer)
    if not 0 <= c < n_classes:
        raise InputError(f"class_index {class_index}: the model has {n_classes} classes")

    # A graph, not eager: eager backprop through a conv also computes the unused kernel
    # gradient, which is wasted work and crashes oneDNN in TF 2.21 for narrow convs; graph
    # pruning drops it.
    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            feats, pre = grad_model([x], training=False)
            logits = to_logits(pre)
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


# --------------------------------------------------------------------------- the gallery of a run


def _split_batch(model: Any, info: dict[str, Any], run_dir: Path, data_dir: Path, split: str, n: int,
                 threshold: float, wanted: Sequence[str] | None = None,
                 ) -> tuple[np.ndarray, list[str], list[int], dict[str, int]]:
    """(images, names, labels) of the ``n`` gallery images of a prepared split (or of the images
    named ``wanted``, in that order), and its group sizes."""
    if split not in SPLITS:
        raise InputError(f"--split {split!r}: must be {', '.join(SPLITS[:-1])} or {SPLITS[-1]}")
    meta = load_meta(data_dir)
    check_data_matches_run(meta, info, data_dir, run_dir)
    size = info["input_size"] if info["input_size"] != info["size"] else None
    ds = data.eval_dataset(data_dir, split, 32, cache=False, image_size=size, meta=meta)
    y = data.split_labels(data_dir, split, meta)
    names = data.split_names(data_dir, split, meta)
    pick, counts = gallery.choose(y, predictor(model, run_dir).predict(ds, verbose=0)[:, RDR], threshold, n)
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
    if images:
        paths = [Path(p) for p in images]
        batch, errors = model_inputs(paths, info)
        summary.update(source=f"{len(paths)} photograph(s)", n_split=len(paths))
        return batch, [p.stem for p in paths], [str(p) for p in paths], [None] * len(paths), errors
    data_dir = Path(data_dir or info["data_dir"])
    batch, shown, labels, counts = _split_batch(model, info, run_dir, data_dir, split, n, threshold, names)
    summary.update(source=f"{split} split of {data_dir}", split=split, data_dir=str(data_dir),
                   n_split=sum(counts.values()), split_groups=counts, selection=gallery.SELECTION)
    if names is not None:
        summary.update(selection=gallery.NAMED, named=True)
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
    _check_request(images, data_dir, n, names)
    model, info, summary = _open_run(run_dir, layer, masks)
    threshold = summary["threshold"]
    batch, shown, files, labels, errors = _inputs(model, info, Path(run_dir), data_dir, split, images, n,
                                                  threshold, names, summary)
    synth_split = _synth_split(masks, split, bool(images))
    ok = [i for i, e in enumerate(errors) if e is None]
    maps, p_ok = _maps_and_probabilities(model, run_dir, batch[ok], layer)
    rows = gallery.summary_rows(shown, files, labels, errors, dict(zip(ok, p_ok)), threshold,
                                keep_order=names is not None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if masks is not None:  # first, so that each image's own result can go into its figure
        summary.update(_pointing(model, masks, synth_split, info, threshold, layer, tolerance))
    outline = None if masks is None else _lesion_outline(Path(masks), synth_split, info)
    gallery.render_rows(out, rows, batch, dict(zip(ok, maps)), threshold, outline, summary.get("pointing"),
                        numbered=names is not None)
    summary.update(n=len(rows), images=rows, groups=gallery.group_counts(rows))
    gallery.write_index(out, summary)
    write_json(out / "summary.json", summary)
    logging.info("wrote %d Grad-CAM image(s) and %s", len(ok), out / "index.html")
    return summary


def _check_request(images: Sequence[Path | str], data_dir: Path | str | None, n: int,
                   names: Sequence[str] | None) -> None:
    """``InputError`` for arguments of ``run_gradcam`` that contradict each other, before any work."""
    if images and data_dir is not None:
        raise InputError("give either --data/--split or IMAGE..., not both")
    if images and names is not None:
        raise InputError("names pick images of a prepared split: give them without IMAGE...")
    if n < 1:
        raise InputError(f"--n {n}: must be >= 1")
    if names is not None and (not names or len(set(names)) != len(names)):
        raise InputError(f"names: give each image of the split once, at least one ({len(names)} given)")


def _open_run(run_dir: Path | str, layer: str,
              masks: Path | str | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model, data info, the summary's first keys) of a run whose model (or each of whose ensemble
    members) has the feature map ``layer``: ``InputError`` naming the model file otherwise."""
    model, info, run_metrics = load_run(run_dir)
    members = member_models(model)
    for explained in members or [model]:  # fail before any work
        _grad_model(explained, layer, str(Path(run_dir) / MODEL_KERAS))
    summary: dict[str, Any] = {"run": str(run_dir), "threshold": float(run_metrics["threshold"]),
                               "layer": layer, "masks": None if masks is None else str(masks)}
    if members:
        summary["ensemble"] = [m.name for m in members]
    return model, info, summary


def _synth_split(masks: Path | str | None, split: str, raw_photos: bool) -> str:
    """The part of a ``drtune synth`` folder the gallery's images came from, and ``InputError`` if
    ``masks`` is given but is no such folder. A synth folder has a train and a test part; val was
    drawn from its train part, and raw photographs are taken to be test ones."""
    synth_split = TEST if raw_photos or split == TEST else TRAIN
    if masks is not None and not (Path(masks) / SYNTH_LAYOUT[synth_split][1]).is_file():
        raise InputError(f"--masks {masks}: not a 'drtune synth' folder (no {SYNTH_LAYOUT[synth_split][1]})")
    return synth_split


def _maps_and_probabilities(model: Any, run_dir: Path | str, batch: np.ndarray,
                            layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(RDR maps, P(RDR)) of the readable images ``batch``."""
    maps, p = _explain(model, batch, RDR, layer, 16)
    averaged = predictor(model, run_dir)
    if len(batch) and averaged is not model:
        # The heatmap explains the plain view; P(RDR) and the decision are the run's own, with
        # its test-time augmentation, so they match evaluate and predict.
        p = averaged.predict(batch, verbose=0)[:, RDR]
    return maps, p


def _lesion_outline(masks: Path, synth_split: str, info: dict[str, Any]) -> Callable[[str], np.ndarray | None]:
    """``outline(name)``: the lesions of the synth photograph ``name`` at the model input size,
    undilated, to draw on its figure (None when ``masks`` has no such photograph)."""
    photos = masks / SYNTH_LAYOUT[synth_split][0]

    def outline(name: str) -> np.ndarray | None:
        photo = photos / f"{name}.jpg"
        return lesion_masks(photo, mask_path(masks, synth_split, name), info, 0)[0] if photo.is_file() else None

    return outline
