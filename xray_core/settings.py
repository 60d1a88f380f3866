"""One typed settings object, read from ``XRAY_*`` environment variables.

Nothing here runs at import time: Prefect imports flow modules to deploy them, so settings are read
only when :func:`get_settings` is first called (and again after :func:`reset_settings`).

Every setting is checked at start-up against one table, :data:`RULES` (name -> allowed values in
words and as a predicate): a bad value fails at once with a :class:`SettingsError` (exit code 2)
naming the variable and what it allows, not hours later inside torch or the promotion policy, and
never silently (``XRAY_TARGET_SPECIFICITY=90`` used to give a sensitivity of 1.0).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from xray_core.errors import SettingsError
from xray_core.rules import PROMOTION_METRICS, PROMOTION_MODES, RULES, Rule

DEFAULT_PATIENT_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d{4})"


@dataclass(frozen=True)
class Settings:
    """Every knob of the system. Paths are absolute once loaded."""

    home: Path  # XRAY_HOME: catalogue, store, features, models, reports, quarantine live here
    database_url: str  # any SQLAlchemy URL; default SQLite file under home
    store_dir: Path
    features_dir: Path
    models_dir: Path
    reports_dir: Path
    quarantine_dir: Path
    incoming_dir: Path | None  # folder the nightly retrain scans; None = only explicit sources
    # XRAY_STORAGE_URL: where store/, quarantine/, features/ and models/ live, as an fsspec URL
    # (memory://xray, s3://bucket/xray) or a path; None = the folders under home above (xray_core.io.storage)
    storage_url: str | None = None
    # XRAY_ALLOWED_ROOTS: folders (resolved) that paths named by flow parameters must lie in, besides
    # incoming_dir and the paths typed on the command line (xray_core.io.allowed_roots). Unset: the
    # parent of incoming_dir (incoming_dir itself when that parent is "/"), else none.
    allowed_roots: tuple[Path, ...] = ()

    # ingest
    labels: tuple[str, ...] = ()  # allowed labels after normalisation; empty = any well-formed name
    negative_label: str = "normal"  # the non-disease class (binary threshold, guardrails)
    patient_regex: str = DEFAULT_PATIENT_REGEX  # group 1 of a match on the file name = patient id; "" = off
    patient_salt: str | None = None  # salt for hashing DICOM PatientID; None = per-home salt file
    min_image_side: int = 64  # pixels; smaller images are rejected as too_small
    max_pixels: int = 50_000_000  # width*height above this is a decompression bomb (a 7000x7000 film fits)
    max_file_bytes: int = 512 * 1024 * 1024  # files larger than this are rejected unread
    # XRAY_QUARANTINE_MAX_BYTES: copies of rejected files stop once quarantine/ would hold more than
    # this (rejection rows are still written); 0 = copy nothing. 10 GiB is about 10,000 typical films.
    quarantine_max_bytes: int = 10 * 1024**3

    # split
    split_ratios: tuple[float, float, float] = (0.70, 0.15, 0.15)  # train / val / test
    split_seed: int = 0

    # backbone and features
    backbone_weights: str = "imagenet"  # imagenet | random | /path/to/state_dict.safetensors|.pth
    backbone_seed: int = 0  # init seed when backbone_weights == "random"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    input_size: int = 224  # square side in pixels fed to densenet161
    views: int = 4  # K augmented views per image (view 0, the eval view, is extra)
    aug_rotation: float = 10.0  # degrees, +-; 0 disables
    aug_crop_scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop area scale
    aug_hflip: bool = True
    embed_batch_size: int = 16
    embed_precision: str = "auto"  # auto | fp32 | bf16: the backbone forward's arithmetic (see model.backbone)
    embed_workers: int = 0  # DataLoader decode workers; 0 decodes in the main process
    embed_memory_mb: int = 2048  # cap on memory held by decoded batches while embedding
    embed_dask_workers: int = 0  # >0: the retrain flow fans embedding out over this many Dask shards
    dask_address: str | None = None  # an existing Dask scheduler (tcp://host:8786); None = a local cluster

    # head training
    head_hidden: tuple[int, ...] = (512,)  # hidden layer widths; XRAY_HEAD_HIDDEN=none gives a linear head
    head_dropout: float = 0.2
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # early stopping: epochs without val-loss improvement
    train_seed: int = 0

    # metrics
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0

    # promotion policy
    min_test_per_class: int = 20
    floor_macro_auroc: float = 0.80
    floor_sensitivity: float = 0.70
    promotion_metric: str = "macro_auroc"
    promotion_mode: str = "non-inferiority"
    promotion_margin: float = 0.01
    target_specificity: float = 0.90  # for promotion_metric == sensitivity_at_specificity
    guardrail_sensitivity_drop: float = 0.02

    # sites, views and shortcuts
    guardrail_site_drop: float = 0.10  # largest AUROC or per-class sensitivity drop allowed on any judged site
    shortcut_auroc: float = 0.80  # a shortcut probe above this AUROC is a warning
    shortcut_policy: str = "warn"  # warn | block: a flagged audit blocks automatic promotion
    allowed_views: tuple[str, ...] = ()  # e.g. PA,AP: films of other known views are quarantined; () = any
    near_copy_distance: int = 3  # pHash bits: a film this close to another patient's is a near copy; -1 = off

    # files
    # XRAY_FILE_MODE (octal, e.g. 0640): permission bits of the files people open (reports, result.json,
    # report heatmaps, prediction CSVs and overlays). The store, features and models stay 0600/0700.
    file_mode: int = 0o640

    # DICOM (issue 17): which acquisitions ingest accepts, where the site comes from, what is stored
    allowed_modalities: tuple[str, ...] = ("CR", "DX")  # DICOM Modality values accepted; () = any
    require_chest: bool = False  # True: films whose BodyPartExamined is not CHEST are quarantined
    site_from_dicom: str = "hash"  # InstitutionName -> site: hash (salted) | name | off
    dicom_store: str = "deidentified"  # deidentified (PS3.15 Basic Profile copy) | original bytes

    # head recipe and calibration (xray_core.model.recipes, xray_core.model.calibrate)
    head_recipe: str = "auto"  # auto (compare on held-out patients) | linear | mlp
    head_l2_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # linear candidates' inverse L2 strengths (C)
    lr_schedule: str = "cosine"  # the MLP's learning rate: cosine (anneal to 0, run every epoch) | none
    recipe_folds: int = 5  # patient-grouped folds inside train+val when validation is too small
    recipe_min_val_per_class: int = 20  # fewer val images of a class -> choose the recipe by k-fold
    target_sensitivity: float | None = None  # threshold for this sensitivity on val; None = Youden's J
    # processes that read, hash, decode and pHash files during ingest; 0 = the cores this process may
    # use; 1 = in this process (one writer either way: see xray_core.data.ingest_pool)
    ingest_workers: int = 0

    # monitoring between retrains (xray_core.monitor)
    ood_quantile: float = 0.99  # target fraction of in-distribution films scored in-distribution (conformal)
    drift_alpha: float = 0.01  # p-value below which a batch test (MMD on features, KS on probabilities) warns
    drift_permutations: int = 999  # patient-level MMD permutations; p >= 1/(n+1) must be able to go below alpha/3

    def public_dict(self) -> dict[str, Any]:
        """Settings as JSON-able values, without secrets (the patient salt)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "patient_salt":
                value = "(set)" if value else "(per-home file)"
            elif f.name == "storage_url" and value and "@" in value:
                value = re.sub(r"//[^/@]*@", "//***@", value)  # credentials in the URL
            elif f.name == "file_mode":
                value = f"{value:04o}"  # as people write it (XRAY_FILE_MODE=0640), not 416
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[f.name] = value
        return out

    def with_overrides(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


# name -> (env var, parser). A parser raises ValueError on malformed text; load_settings then reports
# the variable with what RULES allows for it.
def _int(name: str, raw: str) -> int:
    return int(raw)


def _float(name: str, raw: str) -> float:
    return float(raw)


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a yes/no value")


def _floats(name: str, raw: str) -> tuple[float, ...]:
    return tuple(float(p) for p in raw.replace("/", ",").split(",") if p.strip())


def _ints(name: str, raw: str) -> tuple[int, ...]:
    if raw.strip().lower() in ("none", "linear"):
        return ()
    return tuple(int(p) for p in raw.split(",") if p.strip())


def _octal_mode(name: str, raw: str) -> int:
    """File permission bits from an octal string (``0640``, ``640`` or ``0o640``). Others may read
    but never write: a report or prediction file that anyone can rewrite cannot be trusted."""
    text = raw.strip().lower().removeprefix("0o")
    allowed = "use an octal mode from 000 to 777 without write access for others, e.g. 0640 or 0644"
    try:
        mode = int(text, 8)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an octal file mode; {allowed}") from None
    if not 0 <= mode <= 0o777:
        raise SettingsError(f"{name}={raw!r} is outside 000..777; {allowed}")
    if mode & 0o002:
        raise SettingsError(f"{name}={raw!r} lets every user write the file; {allowed}")
    return mode


def _folders(name: str, raw: str) -> tuple[Path, ...]:
    """``/data,/srv/films`` -> absolute folders, resolved (links and ``..``), so that a resolved flow
    path can be compared with them; ``none`` -> (). A relative entry is refused: it would depend on the
    folder each process happens to start in."""
    if raw.strip().lower() == "none":
        return ()
    parts = [Path(p.strip()).expanduser() for p in raw.split(",") if p.strip()]
    if not parts or not all(p.is_absolute() for p in parts):
        raise ValueError(f"{name}={raw!r}: every entry must be an absolute folder path")
    return tuple(dict.fromkeys(p.resolve() for p in parts))  # ValueError for a NUL byte


def default_allowed_roots(incoming_dir: Path | None) -> tuple[Path, ...]:
    """Without XRAY_ALLOWED_ROOTS: the incoming folder's parent (``/data/incoming`` -> ``/data``, where
    the other drop folders usually sit); the folder itself when its parent is the file system's root."""
    if incoming_dir is None:
        return ()
    return (incoming_dir if incoming_dir.parent == incoming_dir.parent.parent else incoming_dir.parent,)


def _labels(name: str, raw: str) -> tuple[str, ...]:
    from xray_core.data.labels import normalise_label

    return tuple(sorted({normalise_label(p) for p in raw.split(",") if p.strip()}))


def _modalities(name: str, raw: str) -> tuple[str, ...]:
    """``CR,DX`` -> ("CR", "DX"); ``any`` -> () (every modality accepted)."""
    parts = tuple(sorted({p.strip().upper() for p in raw.split(",") if p.strip()}))
    if parts == ("ANY",):
        return ()
    if not parts or any(not re.fullmatch(r"[A-Z0-9_]{1,16}", p) for p in parts):
        raise SettingsError(f"{name}={raw!r}: use DICOM Modality codes separated by commas (e.g. CR,DX) or 'any'")
    return parts


_FIELDS: dict[str, tuple[str, Any]] = {
    "storage_url": ("XRAY_STORAGE_URL", lambda n, r: r.strip().rstrip("/") or None),
    "allowed_roots": ("XRAY_ALLOWED_ROOTS", _folders),
    "labels": ("XRAY_LABELS", _labels),
    "negative_label": ("XRAY_NEGATIVE_LABEL", lambda n, r: r.strip().lower()),
    "patient_regex": ("XRAY_PATIENT_REGEX", lambda n, r: r),
    "patient_salt": ("XRAY_PATIENT_SALT", lambda n, r: r or None),
    "min_image_side": ("XRAY_MIN_IMAGE_SIDE", _int),
    "max_pixels": ("XRAY_MAX_PIXELS", _int),
    "max_file_bytes": ("XRAY_MAX_FILE_BYTES", _int),
    "quarantine_max_bytes": ("XRAY_QUARANTINE_MAX_BYTES", _int),
    "split_ratios": ("XRAY_SPLIT_RATIOS", _floats),
    "split_seed": ("XRAY_SPLIT_SEED", _int),
    "backbone_weights": ("XRAY_BACKBONE_WEIGHTS", lambda n, r: r.strip()),
    "backbone_seed": ("XRAY_BACKBONE_SEED", _int),
    "device": ("XRAY_DEVICE", lambda n, r: r.strip().lower()),
    "input_size": ("XRAY_INPUT_SIZE", _int),
    "views": ("XRAY_VIEWS", _int),
    "aug_rotation": ("XRAY_AUG_ROTATION", _float),
    "aug_crop_scale": ("XRAY_AUG_CROP_SCALE", _floats),
    "aug_hflip": ("XRAY_AUG_HFLIP", _bool),
    "embed_batch_size": ("XRAY_EMBED_BATCH_SIZE", _int),
    "embed_precision": ("XRAY_EMBED_PRECISION", lambda n, r: r.strip().lower()),
    "embed_workers": ("XRAY_EMBED_WORKERS", _int),
    "embed_memory_mb": ("XRAY_EMBED_MEMORY_MB", _int),
    "embed_dask_workers": ("XRAY_EMBED_DASK_WORKERS", _int),
    "dask_address": ("XRAY_DASK_ADDRESS", lambda n, r: r.strip() or None),
    "head_hidden": ("XRAY_HEAD_HIDDEN", _ints),
    "head_dropout": ("XRAY_HEAD_DROPOUT", _float),
    "epochs": ("XRAY_EPOCHS", _int),
    "batch_size": ("XRAY_BATCH_SIZE", _int),
    "learning_rate": ("XRAY_LEARNING_RATE", _float),
    "weight_decay": ("XRAY_WEIGHT_DECAY", _float),
    "patience": ("XRAY_PATIENCE", _int),
    "train_seed": ("XRAY_TRAIN_SEED", _int),
    "bootstrap_samples": ("XRAY_BOOTSTRAP_SAMPLES", _int),
    "bootstrap_seed": ("XRAY_BOOTSTRAP_SEED", _int),
    "min_test_per_class": ("XRAY_MIN_TEST_PER_CLASS", _int),
    "floor_macro_auroc": ("XRAY_FLOOR_MACRO_AUROC", _float),
    "floor_sensitivity": ("XRAY_FLOOR_SENSITIVITY", _float),
    "promotion_metric": ("XRAY_PROMOTION_METRIC", lambda n, r: r.strip().lower()),
    "promotion_mode": ("XRAY_PROMOTION_MODE", lambda n, r: r.strip().lower()),
    "promotion_margin": ("XRAY_PROMOTION_MARGIN", _float),
    "target_specificity": ("XRAY_TARGET_SPECIFICITY", _float),
    "guardrail_sensitivity_drop": ("XRAY_GUARDRAIL_SENSITIVITY_DROP", _float),
    "file_mode": ("XRAY_FILE_MODE", _octal_mode),
    "guardrail_site_drop": ("XRAY_GUARDRAIL_SITE_DROP", _float),
    "shortcut_auroc": ("XRAY_SHORTCUT_AUROC", _float),
    "shortcut_policy": ("XRAY_SHORTCUT_POLICY", lambda n, r: r.strip().lower()),
    "near_copy_distance": ("XRAY_NEAR_COPY_DISTANCE", _int),
    "allowed_views": ("XRAY_ALLOWED_VIEWS", lambda n, r: tuple(sorted({" ".join(p.upper().replace("_", " ").split())
                                                                       for p in r.split(",") if p.strip()}))),
    "allowed_modalities": ("XRAY_ALLOWED_MODALITIES", _modalities),
    "require_chest": ("XRAY_REQUIRE_CHEST", _bool),
    "site_from_dicom": ("XRAY_SITE_FROM_DICOM", lambda n, r: r.strip().lower()),
    "dicom_store": ("XRAY_DICOM_STORE", lambda n, r: r.strip().lower()),
    "head_recipe": ("XRAY_HEAD_RECIPE", lambda n, r: r.strip().lower()),
    "head_l2_grid": ("XRAY_HEAD_L2_GRID", _floats),
    "lr_schedule": ("XRAY_LR_SCHEDULE", lambda n, r: r.strip().lower()),
    "recipe_folds": ("XRAY_RECIPE_FOLDS", _int),
    "recipe_min_val_per_class": ("XRAY_RECIPE_MIN_VAL_PER_CLASS", _int),
    "target_sensitivity": ("XRAY_TARGET_SENSITIVITY", _float),
    "ood_quantile": ("XRAY_OOD_QUANTILE", _float),
    "drift_alpha": ("XRAY_DRIFT_ALPHA", _float),
    "drift_permutations": ("XRAY_DRIFT_PERMUTATIONS", _int),
    "ingest_workers": ("XRAY_INGEST_WORKERS", _int),
}

# Settings whose empty value means something rather than "unset": XRAY_PATIENT_REGEX="" turns
# patient ids from file names off (each image without another id is then its own patient).
_EMPTY_IS_A_VALUE = frozenset({"patient_regex"})

# Settings that are not dataclass defaults: paths derived at load time.
_PATH_FIELDS = {"home": "XRAY_HOME", "database_url": "XRAY_DATABASE_URL", "incoming_dir": "XRAY_INCOMING"}

ENV_VARS: tuple[str, ...] = (*_PATH_FIELDS.values(), *(env for env, _ in _FIELDS.values()))


_VARS = {**_PATH_FIELDS, **{name: env for name, (env, _) in _FIELDS.items()}}
ENV_BY_FIELD: dict[str, str] = dict(_VARS)  # field name -> its XRAY_* variable (docs, tooling)
_SECRETS = frozenset({"patient_salt"})  # never echoed in an error


def _as_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _problem(name: str, shown: str) -> str:
    """``XRAY_NAME=value: must be ...``; secrets hidden, URL credentials masked, odd text quoted."""
    if name in _SECRETS:
        shown = "(hidden)"
    shown = re.sub(r"//[^/@\s]*@", "//***@", shown)
    if not shown.isprintable() or shown != shown.strip() or not shown:
        shown = repr(shown)
    return f"{_VARS.get(name, name)}={shown}: {RULES[name].allowed}"


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser().resolve()  # ValueError for a NUL byte


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default: ``os.environ``) and validate them.

    Every problem is reported at once (one line each), so a user fixes them in one go.
    """
    env = os.environ if env is None else env
    problems: list[str] = []

    def parse(name: str, var: str, raw: str, parser: Callable[[str, str], Any], fallback: Any) -> Any:
        try:
            return parser(var, raw)
        except (ValueError, SettingsError) as exc:
            problems.append(_problem(name, raw) if name in RULES else f"{var}={raw!r}: {exc}")
            return fallback

    home = parse("home", "XRAY_HOME", env.get("XRAY_HOME") or "var", _path, Path("var").resolve())
    database_url = env.get("XRAY_DATABASE_URL") or f"sqlite:///{home / 'catalogue.db'}"
    incoming = env.get("XRAY_INCOMING")
    incoming_dir = parse("incoming_dir", "XRAY_INCOMING", incoming, _path, None) if incoming else None
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    raws: dict[str, str] = {}
    for name, (var, parser) in _FIELDS.items():
        raw = env.get(var)
        if raw is not None and (raw != "" or name in _EMPTY_IS_A_VALUE):
            values[name], raws[name] = parse(name, var, raw, parser, defaults[name]), raw
    if "allowed_roots" not in raws:
        values["allowed_roots"] = default_allowed_roots(incoming_dir)
    settings = Settings(
        home=home,
        database_url=database_url,
        store_dir=home / "store",
        features_dir=home / "features",
        models_dir=home / "models",
        reports_dir=home / "reports",
        quarantine_dir=home / "quarantine",
        incoming_dir=incoming_dir,
        **values,
    )
    problems += _problems(settings, raws)
    if problems:
        raise SettingsError("\n".join(dict.fromkeys(problems)))
    return settings


def _problems(s: Settings, raws: Mapping[str, str]) -> list[str]:
    return [_problem(name, raws.get(name, _as_text(getattr(s, name))))
            for name, rule in RULES.items() if not rule.passes(getattr(s, name))]


def validate(s: Settings) -> None:
    """Reject settings that would make later steps fail obscurely (or silently do the wrong thing).

    Raises one :class:`SettingsError` listing every setting outside what :data:`RULES` allows.
    """
    problems = _problems(s, {})
    if problems:
        raise SettingsError("\n".join(problems))


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return load_settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI call this after changing the environment)."""
    get_settings.cache_clear()


__all__ = ["Settings", "Rule", "RULES", "ENV_BY_FIELD", "PROMOTION_METRICS", "PROMOTION_MODES", "load_settings", "validate", "get_settings", "reset_settings", "ENV_VARS"]
