"""Typed, frozen configuration loaded from TOML with dotted ``--set section.key=value`` overrides.

Every value is checked at load time — unknown keys, wrong types, out-of-range values — and the
message names the key and the file, so a typo in a study file fails in a second instead of after
an hour of training. Pure Python: importing this module must not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from drtune.errors import InputError
from drtune.runs import prepared_differences, prepared_refusal

AUGMENT_LEVELS: tuple[str, ...] = ("none", "base", "rotate", "strong")
NORMALIZATIONS: tuple[str, ...] = ("none", "graham")  # what `prepare --normalize` accepts
THRESHOLD_CRITERIA: tuple[str, ...] = ("balanced_accuracy", "youden", "fixed")


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared data is and how the input pipeline treats it."""

    dir: str = ""  # DATA directory of `drtune prepare`; `--data` overrides it
    augment: str = "base"  # none | base | rotate | strong (drtune.data.augment_params)
    balance: bool = True  # oversample the minority class at read time
    cache: bool = True  # keep decoded images in memory when they fit
    image_size: int = 0  # 0: as prepared; else resized in the pipeline (tiny test models)
    # What the study expects of `drtune prepare` (`prepare --config` applies them; training on
    # data prepared otherwise is refused rather than silently wrong). 0 / "": any.
    prepare_size: int = 0
    normalize: str = ""  # "" | none | graham
    # Share of the training patients `prepare --config` holds out for validation; 0: prepare's
    # own default (0.2). Not checked at training time: the split is the researcher's choice.
    val_fraction: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """The simplified ResNetV2; the defaults are the original project's network."""

    width: int = 16  # channels of the first stage; stages use width x (1, 2, 4)
    blocks_per_stage: int = 1
    dropout: float = 0.0  # before the classifier
    l2: float = 0.0  # weight decay on conv/dense kernels
    # Start each residual branch's last conv at zero, so every block starts as its shortcut
    # (Goyal et al. 2017's "zero gamma", for pre-activation blocks): see drtune/model.py.
    zero_init_residual: bool = False
    # How the last feature map becomes one vector: avg (the original network), max, or avgmax
    # (both, concatenated). A few small lesions are a small share of an average over the whole
    # field, but they set its maximum.
    pooling: str = "avg"
    # What the classifier predicts: "referral" (2 classes, NRDR/RDR: the original network),
    # "grade" (the 5 ICDR grades, P(RDR) = the sum over the referable ones) or "ordinal" (the
    # grades as steps of one severity score, P(RDR) = P(score past the referral step)): see
    # drtune/model.py.
    head: str = "referral"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run."""

    lr: float = 1e-3
    batch_size: int = 4
    epochs: int = 50
    steps_per_epoch: int = 0  # 0: one pass over the balanced training set
    checkpoint_every: int = 5  # epochs between checkpoints in RUN/checkpoints
    seed: int = 0
    patience: int = 0  # early stopping on validation balanced accuracy; 0: off
    threshold: str = "balanced_accuracy"  # how the decision threshold is chosen on val
    eval_batch_size: int = 32
    optimizer: str = "adam"  # adam (the original project) | adamw (decoupled weight decay)
    weight_decay: float = 0.0  # AdamW's decoupled decay (only with optimizer = "adamw")
    schedule: str = "constant"  # constant | cosine (decay to 0 over train.epochs)
    warmup_epochs: int = 0  # linear warm-up from 0 to train.lr before the schedule
    label_smoothing: float = 0.0  # targets 1 - e/2 and e/2 instead of 1 and 0
    # Polyak averaging: validate, keep and checkpoint an exponential moving average of the
    # weights with this momentum per step (0: off; 0.99 averages over ~100 steps).
    ema: float = 0.0
    # Soft targets at the referral boundary: the grade below it (ICDR 1) is trained towards
    # P(RDR) = borderline and the referral grade (2) towards 1 - borderline (0: hard labels).
    borderline: float = 0.0
    # Balance the classes by weighting each class's loss by n / (2 n_class) of the training
    # split (Keras' class_weight) instead of oversampling; needs data.balance = false.
    class_weights: bool = False
    # A run still at chance level (training loss > ln 2 - 0.01, validation AUC < 0.6) at epoch
    # chance_check_epoch (0: never checked) is restarted from new random weights up to this
    # many times (0: a warning only); see drtune.callbacks.ChanceLevel. Not in fine-tuning.
    chance_restarts: int = 0
    chance_check_epoch: int = 0
    # Test-time augmentation (drtune/tta.py) of the final model: the validation threshold,
    # evaluate, predict and gradcam all average over these views. none | flips | dihedral
    tta: str = "none"
    # The per-epoch validation value that picks model.keras, drives early stopping and is the
    # search's objective and pruning signal: balanced accuracy at threshold 0.5 (the original
    # project), or AUC, which does not jump between 0.5 and 1.0 on a small validation split
    # while the model's calibration settles.
    monitor: str = "val_balanced_accuracy"
    # Arithmetic of the train step: float32, or Keras mixed precision (half-precision compute,
    # float32 weights and softmax): mixed_float16 roughly doubles throughput on tensor-core GPUs,
    # mixed_bfloat16 suits TPUs and recent CPUs. Evaluation and Grad-CAM always run in float32.
    precision: str = "float32"
    # XLA compilation of the train step: "auto" (on with a GPU, off on a CPU-only machine, where
    # it measured slower), true or false.
    jit_compile: bool | str = "auto"


POOLINGS: tuple[str, ...] = ("avg", "max", "avgmax")
HEADS: tuple[str, ...] = ("referral", "grade", "ordinal")
GRADE_HEADS: tuple[str, ...] = ("grade", "ordinal")  # heads trained on the ICDR grades
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
TTA_MODES: tuple[str, ...] = ("none", "flips", "dihedral")  # see drtune/tta.py
MONITORS: tuple[str, ...] = ("val_balanced_accuracy", "val_auc")
PRECISIONS: tuple[str, ...] = ("float32", "mixed_float16", "mixed_bfloat16")
PRUNERS: tuple[str, ...] = ("median", "hyperband", "successive_halving", "none")
# Sections a search may vary; `search` and `finetune` themselves are not searchable.
SEARCHABLE_SECTIONS: tuple[str, ...] = ("data", "model", "train")


@dataclass(frozen=True)
class SearchConfig:
    """The Optuna study: where it is stored, how it samples and prunes, what it searches.

    ``grid`` maps dotted keys to lists of values (``drtune search --grid``); ``space`` maps
    dotted keys to ``{low, high, log?, step?}`` ranges or ``{choices = [...]}`` (TPE).
    ``n_trials`` is the budget of the whole study, counted across all workers and runs (a
    worker stops once that many trials have finished or are running), not of one process.
    """

    workdir: str = "runs"  # trial run directories, artifacts and the default SQLite file
    storage: str = ""  # SQLAlchemy URL; "": $DRTUNE_STORAGE, else sqlite:///<workdir>/optuna.db
    study: str = ""  # "": the config's name
    sampler_seed: int = 0  # the same on every worker (grid); TPE mixes in $DRTUNE_WORKER
    pruner: str = "median"
    pruner_startup_trials: int = 2  # trials that finish before anything is pruned (every pruner)
    pruner_warmup_epochs: int = 2  # epochs of a trial before it can be pruned
    n_trials: int = 20  # TPE budget of the study, across workers (a grid stops when complete)
    timeout: float = 0.0  # seconds; 0: none
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    grace_period: int = 90  # seconds without heartbeat before a trial counts as dead
    max_retry: int = 2  # times a dead trial is retried with the same parameters
    grid: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneConfig:
    """``drtune finetune --best``: retrain the best trial's model gently, then test it."""

    lr: float = 1e-5
    epochs: int = 50
    augment: str = "strong"
    gradcam: int = 16  # test images in the Grad-CAM galleries uploaded to the study; 0: none
    # `finetune --best` also fine-tunes the next K-1 completed trials and tests their ensemble
    # (an explicit --top-k wins): a study whose result is an ensemble says so here.
    top_k: int = 1


@dataclass(frozen=True)
class Config:
    """A whole experiment: one TOML file of sections."""

    name: str = "drtune"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# (section.key, check, message) — range checks applied after types are right.
_RULES: tuple[tuple[str, typing.Callable[[Any], bool], str], ...] = (
    ("data.augment", lambda v: v in AUGMENT_LEVELS, f"must be one of {', '.join(AUGMENT_LEVELS)}"),
    ("data.image_size", lambda v: v == 0 or 16 <= v <= 4096, "must be 0 (as prepared) or 16-4096"),
    ("data.prepare_size", lambda v: v == 0 or 32 <= v <= 4096, "must be 0 (any) or 32-4096"),
    ("data.val_fraction", lambda v: 0.0 <= v < 1.0, "must be 0 (prepare's default) or between 0 and 1"),
    ("data.normalize", lambda v: v in ("",) + NORMALIZATIONS,
     f"must be one of {', '.join(NORMALIZATIONS)} or \"\" (any)"),
    ("finetune.top_k", lambda v: v >= 1, "must be >= 1"),
    ("model.width", lambda v: v >= 1, "must be >= 1"),
    ("model.blocks_per_stage", lambda v: v >= 1, "must be >= 1"),
    ("model.dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("model.l2", lambda v: v >= 0.0, "must be >= 0"),
    ("model.pooling", lambda v: v in POOLINGS, f"must be one of {', '.join(POOLINGS)}"),
    ("model.head", lambda v: v in HEADS, f"must be one of {', '.join(HEADS)}"),
    ("train.lr", lambda v: v > 0.0, "must be > 0"),
    ("train.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("train.epochs", lambda v: v >= 1, "must be >= 1"),
    ("train.steps_per_epoch", lambda v: v >= 0, "must be >= 0 (0: one pass)"),
    ("train.checkpoint_every", lambda v: v >= 1, "must be >= 1"),
    ("train.patience", lambda v: v >= 0, "must be >= 0 (0: off)"),
    # NumPy's and Keras' seeding take 32-bit seeds; checked here, before a run writes anything.
    ("train.seed", lambda v: 0 <= v < 2**32, "must be in 0..4294967295 (2**32 - 1)"),
    ("train.threshold", lambda v: v in THRESHOLD_CRITERIA,
     f"must be one of {', '.join(THRESHOLD_CRITERIA)}"),
    ("train.eval_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("train.optimizer", lambda v: v in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
    ("train.weight_decay", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("train.schedule", lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
    ("train.warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("train.label_smoothing", lambda v: 0.0 <= v < 0.5, "must be in [0, 0.5)"),
    ("train.ema", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("train.borderline", lambda v: 0.0 <= v < 0.5, "must be in [0, 0.5)"),
    ("train.chance_restarts", lambda v: v >= 0, "must be >= 0"),
    ("train.chance_check_epoch", lambda v: v >= 0, "must be >= 0 (0: off)"),
    ("train.tta", lambda v: v in TTA_MODES, f"must be one of {', '.join(TTA_MODES)}"),
    ("train.monitor", lambda v: v in MONITORS, f"must be one of {', '.join(MONITORS)}"),
    ("train.precision", lambda v: v in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
    ("train.jit_compile", lambda v: v in (True, False, "auto"), 'must be "auto", true or false'),
    ("name", lambda v: bool(v.strip()), "must not be empty"),
    ("search.workdir", lambda v: bool(v.strip()), "must not be empty"),
    ("search.pruner", lambda v: v in PRUNERS, f"must be one of {', '.join(PRUNERS)}"),
    ("search.pruner_startup_trials", lambda v: v >= 0, "must be >= 0"),
    ("search.pruner_warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("search.n_trials", lambda v: v >= 1, "must be >= 1"),
    ("search.timeout", lambda v: v >= 0, "must be >= 0 (0: none)"),
    ("search.heartbeat_interval", lambda v: v >= 1, "must be >= 1 second"),
    ("search.max_retry", lambda v: v >= 0, "must be >= 0"),
    ("finetune.lr", lambda v: v > 0.0, "must be > 0"),
    ("finetune.epochs", lambda v: v >= 1, "must be >= 1"),
    ("finetune.gradcam", lambda v: v >= 0, "must be >= 0 (0: no galleries)"),
    ("finetune.augment", lambda v: v in AUGMENT_LEVELS, f"must be one of {', '.join(AUGMENT_LEVELS)}"),
)


def _fits(value: Any, hint: type) -> bool:
    """``isinstance`` where bool is not an int (``True`` is no batch size)."""
    return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field type; ints are accepted where floats are expected."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):
        # e.g. ``bool | str``: any member type will do (the range rules narrow the values).
        members = typing.get_args(hint)
        ok = any(_fits(value, t) for t in members)
        hint = types.SimpleNamespace(__name__=" or ".join(t.__name__ for t in members))
    elif typing.get_origin(hint) is dict:
        ok = isinstance(value, Mapping)
        value = dict(value) if ok else value
        hint = dict
    else:  # pragma: no cover - only the types above are used in the dataclasses
        raise TypeError(f"unsupported config type {hint!r}")
    if not ok:
        raise InputError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str, source: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise InputError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(prefix + k for k in known))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        where = f"{source}: {prefix}{name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise InputError(f"{where}: expected a [{prefix}{name}] section, got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, hint, where)
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# Sections whose every float must be finite (inf and nan pass ">= 0"-style rules and fail later).
_FINITE_SECTIONS: tuple[str, ...] = ("data", "model", "train", "finetune")


def _check_finite(cfg: Config, source: str) -> None:
    for section in _FINITE_SECTIONS:
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{source}: {section}.{f.name} = {value!r}: must be a finite number")


def validate(cfg: Config, source: str = "config") -> Config:
    """Apply the range rules; raise :class:`InputError` naming the first bad key."""
    _check_finite(cfg, source)
    for key, check, message in _RULES:
        value = _get(cfg, key)
        if not check(value):
            raise InputError(f"{source}: {key} = {value!r}: {message}")
    if cfg.search.grace_period <= cfg.search.heartbeat_interval:
        raise InputError(f"{source}: search.grace_period = {cfg.search.grace_period!r}: must be "
                         f"longer than search.heartbeat_interval ({cfg.search.heartbeat_interval})")
    if cfg.train.class_weights and cfg.data.balance:
        raise InputError(f"{source}: train.class_weights = true: needs data.balance = false "
                         "(oversampling already balances the classes; pick one of the two)")
    if cfg.train.borderline and cfg.model.head in GRADE_HEADS:
        raise InputError(f"{source}: train.borderline = {cfg.train.borderline!r}: needs model.head = "
                         f"\"referral\" (soft NRDR/RDR targets; the {cfg.model.head} head learns the grades "
                         "themselves)")
    _validate_grid(cfg, source)
    _validate_space(cfg, source)
    return cfg


def _searchable(cfg: Config, key: str, where: str) -> Any:
    """Check that ``key`` names a data/model/train setting; return its current value."""
    section = key.split(".")[0]
    if section not in SEARCHABLE_SECTIONS or key.count(".") != 1:
        raise InputError(f"{where}: {key!r} is not a searchable key "
                         f"(use section.key with section one of {', '.join(SEARCHABLE_SECTIONS)})")
    try:
        return _get(cfg, key)
    except AttributeError:
        raise InputError(f"{where}: unknown key {key!r}") from None


def _check_value(cfg: Config, key: str, value: Any, where: str) -> None:
    """A searched value must make a valid config, with the same checks a file would get."""
    values = merge(to_dict(cfg), {key: value})
    values["search"] = {}  # only this value is being checked, not the rest of the grid
    from_dict(values, where)


def _validate_grid(cfg: Config, source: str) -> None:
    for key, values in cfg.search.grid.items():
        where = f"{source}: search.grid.{key}"
        _searchable(cfg, key, where)
        if not isinstance(values, list) or not values:
            raise InputError(f"{where}: expected a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise InputError(f"{where}: values repeat in {values!r}")
        for v in values:
            _check_value(cfg, key, v, where)


def _validate_space(cfg: Config, source: str) -> None:
    for key, spec in cfg.search.space.items():
        where = f"{source}: search.space.{key}"
        current = _searchable(cfg, key, where)
        if not isinstance(spec, Mapping):
            raise InputError(f"{where}: expected {{low, high[, log, step]}} or {{choices = [...]}}")
        allowed = {"choices"} if "choices" in spec else {"low", "high", "log", "step"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise InputError(f"{where}: unexpected {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                raise InputError(f"{where}: choices must be a non-empty list")
            for v in choices:
                _check_value(cfg, key, v, where)
            continue
        if "low" not in spec or "high" not in spec:
            raise InputError(f"{where}: needs low and high (or choices)")
        if isinstance(current, (bool, str)):
            raise InputError(f"{where}: {key} is not numeric; use choices = [...]")
        low, high = spec["low"], spec["high"]
        for v in (low, high):
            _check_value(cfg, key, v, where)
        if not low < high:
            raise InputError(f"{where}: low ({low}) must be below high ({high})")
        if spec.get("log") and low <= 0:
            raise InputError(f"{where}: a log range needs low > 0")


def from_dict(values: Mapping[str, Any], source: str = "config") -> Config:
    """Build and validate a :class:`Config` from nested dicts (TOML or config.json content)."""
    return validate(_build(Config, values, "", source), source)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict of a config (what RUN/config.json holds)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; values parse as TOML, else as plain strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words such as `data.augment=strong`
    return key, value


def merge(values: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of nested ``values`` with dotted-key ``overrides`` applied."""
    merged = json.loads(json.dumps(values))  # deep copy of plain data
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"--set {dotted}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return merged


# Studies installed with the package (package data), so `--config demo` works from any directory.
BUILTIN_STUDIES = Path(__file__).resolve().with_name("studies")


def builtin_studies() -> list[str]:
    """Names of the built-in studies (``demo``, ``idrid_grid``, ...), for ``--config NAME``."""
    return sorted(p.stem for p in BUILTIN_STUDIES.glob("*.toml"))


def resolve_study_path(path: Path | str) -> Path:
    """The study file ``path`` names: an existing file wins; else a bare name (``demo``,
    ``demo.toml``) or the repository spelling ``studies/demo.toml`` is the built-in study of that
    name. ``InputError`` naming ``path`` and listing the built-in studies if neither exists."""
    given = Path(path)
    if given.is_file():
        return given
    parts = given.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "studies"):
        stem = given.stem if given.suffix == ".toml" else given.name
        packaged = BUILTIN_STUDIES / f"{stem}.toml"
        if packaged.is_file():
            return packaged
    raise InputError(f"{path}: config file not found (built-in studies: {', '.join(builtin_studies())})")


def read_toml(path: Path | str) -> dict[str, Any]:
    """Read a TOML file with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML ({exc})") from exc


def load_config(path: Path | str | None = None, overrides: Sequence[str] = (),
                extra: Mapping[str, Any] | None = None) -> Config:
    """Load a study/config TOML file (or the defaults), then apply ``--set`` overrides.

    ``path`` goes through ``resolve_study_path``: a file, or a built-in study's name.

    ``extra`` holds dotted keys set by other command-line flags (``--data``), applied last.
    """
    path = resolve_study_path(path) if path is not None else None
    values = read_toml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    pairs = dict(parse_override(o) for o in overrides)
    if pairs:
        source += " with --set " + " ".join(overrides)
    pairs.update(extra or {})
    return from_dict(merge(values, pairs), source)


def replace(cfg: Config, **dotted: Any) -> Config:
    """A copy of ``cfg`` with dotted keys changed, e.g. ``replace(cfg, **{"train.lr": 1e-5})``."""
    return from_dict(merge(to_dict(cfg), dotted), "override")


def finetune_config(cfg: Config) -> Config:
    """The config of the ``[finetune]`` stage: ``cfg`` trained on at the finetune lr, epochs and
    augmentation (``finetune --best`` and the real-data benchmark both start from a trained model)."""
    ft = cfg.finetune
    return replace(cfg, **{"train.lr": ft.lr, "train.epochs": ft.epochs, "data.augment": ft.augment})


# The study keys that ask for a `prepare` option (meta.json key -> data.KEY); 0 / "" ask for none.
_PREPARE_KEYS: dict[str, str] = {"size": "prepare_size", "normalize": "normalize"}


def check_prepared(cfg: Config, meta: Mapping[str, Any], data_dir: Path | str) -> None:
    """Refuse data prepared otherwise than the study expects (``data.prepare_size``,
    ``data.normalize``): the model would train and report on inputs it was not designed for."""
    expected = {key: getattr(cfg.data, name) or None for key, name in _PREPARE_KEYS.items()}
    diffs = prepared_differences(expected, meta)
    if diffs:
        keys = ", ".join(f"data.{_PREPARE_KEYS[d.key]} = {d.expected!r}" for d in diffs)
        raise InputError(prepared_refusal(data_dir, diffs, "the config wants", detail=f"set by {keys}",
                                          alternative="'drtune prepare ... --config <study>'"))
