"""One typed settings object, read from ``XRAY_*`` environment variables.

Nothing here runs at import time: Prefect imports flow modules to deploy them, so settings are read
only when :func:`get_settings` is first called (and again after :func:`reset_settings`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from xray_core.errors import SettingsError

PROMOTION_METRICS = ("macro_auroc", "balanced_accuracy", "sensitivity_at_specificity")
PROMOTION_MODES = ("non-inferiority", "superiority")
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

    # ingest
    labels: tuple[str, ...] = ()  # allowed labels after normalisation; empty = any well-formed name
    negative_label: str = "normal"  # the non-disease class (binary threshold, guardrails)
    patient_regex: str = DEFAULT_PATIENT_REGEX  # group 1 of a match on the file name = patient id; "" = off
    patient_salt: str | None = None  # salt for hashing DICOM PatientID; None = per-home salt file
    min_image_side: int = 64  # pixels; smaller images are rejected as too_small
    max_pixels: int = 50_000_000  # width*height above this is a decompression bomb (a 7000x7000 film fits)
    max_file_bytes: int = 512 * 1024 * 1024  # files larger than this are rejected unread

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

    # head recipe and calibration (xray_core.model.recipes, xray_core.model.calibrate)
    head_recipe: str = "auto"  # auto (compare on held-out patients) | linear | mlp
    head_l2_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # linear candidates' inverse L2 strengths (C)
    lr_schedule: str = "cosine"  # the MLP's learning rate: cosine (anneal to 0, run every epoch) | none
    recipe_folds: int = 5  # patient-grouped folds inside train+val when validation is too small
    recipe_min_val_per_class: int = 20  # fewer val images of a class -> choose the recipe by k-fold
    target_sensitivity: float | None = None  # threshold for this sensitivity on val; None = Youden's J

    def public_dict(self) -> dict[str, Any]:
        """Settings as JSON-able values, without secrets (the patient salt)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "patient_salt":
                value = "(set)" if value else "(per-home file)"
            elif f.name == "storage_url" and value and "@" in value:
                value = re.sub(r"//[^/@]*@", "//***@", value)  # credentials in the URL
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def with_overrides(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


# name -> (env var, parser). Parsers raise SettingsError with the variable name.
def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: use one of 1/0, true/false, yes/no, on/off")


def _floats(name: str, raw: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in raw.replace("/", ",").split(",") if p.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected comma-separated numbers") from None


def _ints(name: str, raw: str) -> tuple[int, ...]:
    if raw.strip().lower() in ("none", "linear"):
        return ()
    try:
        return tuple(int(p) for p in raw.split(",") if p.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected comma-separated integers") from None


def _labels(name: str, raw: str) -> tuple[str, ...]:
    from xray_core.data.labels import normalise_label

    return tuple(sorted({normalise_label(p) for p in raw.split(",") if p.strip()}))


_FIELDS: dict[str, tuple[str, Any]] = {
    "storage_url": ("XRAY_STORAGE_URL", lambda n, r: r.strip().rstrip("/") or None),
    "labels": ("XRAY_LABELS", _labels),
    "negative_label": ("XRAY_NEGATIVE_LABEL", lambda n, r: r.strip().lower()),
    "patient_regex": ("XRAY_PATIENT_REGEX", lambda n, r: r),
    "patient_salt": ("XRAY_PATIENT_SALT", lambda n, r: r or None),
    "min_image_side": ("XRAY_MIN_IMAGE_SIDE", _int),
    "max_pixels": ("XRAY_MAX_PIXELS", _int),
    "max_file_bytes": ("XRAY_MAX_FILE_BYTES", _int),
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
    "head_recipe": ("XRAY_HEAD_RECIPE", lambda n, r: r.strip().lower()),
    "head_l2_grid": ("XRAY_HEAD_L2_GRID", _floats),
    "lr_schedule": ("XRAY_LR_SCHEDULE", lambda n, r: r.strip().lower()),
    "recipe_folds": ("XRAY_RECIPE_FOLDS", _int),
    "recipe_min_val_per_class": ("XRAY_RECIPE_MIN_VAL_PER_CLASS", _int),
    "target_sensitivity": ("XRAY_TARGET_SENSITIVITY", _float),
}

# Settings whose empty value means something rather than "unset": XRAY_PATIENT_REGEX="" turns
# patient ids from file names off (each image without another id is then its own patient).
_EMPTY_IS_A_VALUE = frozenset({"patient_regex"})

ENV_VARS: tuple[str, ...] = (
    "XRAY_HOME",
    "XRAY_DATABASE_URL",
    "XRAY_INCOMING",
    *(env for env, _ in _FIELDS.values()),
)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default: ``os.environ``) and validate them."""
    env = os.environ if env is None else env
    home = Path(env.get("XRAY_HOME") or "var").expanduser().resolve()
    database_url = env.get("XRAY_DATABASE_URL") or f"sqlite:///{home / 'catalogue.db'}"
    incoming = env.get("XRAY_INCOMING")
    values: dict[str, Any] = {}
    for name, (var, parse) in _FIELDS.items():
        raw = env.get(var)
        if raw is not None and (raw != "" or name in _EMPTY_IS_A_VALUE):
            values[name] = parse(var, raw)
    settings = Settings(
        home=home,
        database_url=database_url,
        store_dir=home / "store",
        features_dir=home / "features",
        models_dir=home / "models",
        reports_dir=home / "reports",
        quarantine_dir=home / "quarantine",
        incoming_dir=Path(incoming).expanduser().resolve() if incoming else None,
        **values,
    )
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Reject settings that would make later steps fail obscurely."""
    if len(s.split_ratios) != 3 or any(r < 0 for r in s.split_ratios) or abs(sum(s.split_ratios) - 1) > 1e-6:
        raise SettingsError(
            f"XRAY_SPLIT_RATIOS={','.join(map(str, s.split_ratios))}: need three non-negative "
            "train,val,test fractions that sum to 1, e.g. 0.7,0.15,0.15"
        )
    if s.split_ratios[0] == 0:
        raise SettingsError("XRAY_SPLIT_RATIOS: the train fraction must be above 0")
    if s.input_size < 32:
        raise SettingsError(f"XRAY_INPUT_SIZE={s.input_size}: densenet161 needs at least 32 pixels")
    if s.views < 0:
        raise SettingsError(f"XRAY_VIEWS={s.views}: must be 0 or more")
    if len(s.aug_crop_scale) != 2 or not 0 < s.aug_crop_scale[0] <= s.aug_crop_scale[1] <= 1:
        raise SettingsError("XRAY_AUG_CROP_SCALE: need two fractions lo,hi with 0 < lo <= hi <= 1")
    if s.device != "auto" and not (s.device == "cpu" or s.device.startswith("cuda")):
        raise SettingsError(f"XRAY_DEVICE={s.device!r}: use auto, cpu, cuda or cuda:N")
    if s.promotion_metric not in PROMOTION_METRICS:
        raise SettingsError(
            f"XRAY_PROMOTION_METRIC={s.promotion_metric!r}: only {', '.join(PROMOTION_METRICS)} are supported"
        )
    if s.promotion_mode not in PROMOTION_MODES:
        raise SettingsError(
            f"XRAY_PROMOTION_MODE={s.promotion_mode!r}: only {', '.join(PROMOTION_MODES)} are supported"
        )
    for name, value in (("XRAY_EPOCHS", s.epochs), ("XRAY_BATCH_SIZE", s.batch_size),
                        ("XRAY_EMBED_BATCH_SIZE", s.embed_batch_size),
                        ("XRAY_BOOTSTRAP_SAMPLES", s.bootstrap_samples)):
        if value < 1:
            raise SettingsError(f"{name}={value}: must be at least 1")
    if s.min_image_side < 1 or s.max_pixels < 1:
        raise SettingsError("XRAY_MIN_IMAGE_SIDE and XRAY_MAX_PIXELS must be positive")
    if s.embed_dask_workers < 0:
        raise SettingsError(f"XRAY_EMBED_DASK_WORKERS={s.embed_dask_workers}: must be 0 (off) or more")
    if s.embed_workers < 0:
        raise SettingsError(f"XRAY_EMBED_WORKERS={s.embed_workers}: must be 0 or more")
    _validate_head_training(s)


def _validate_head_training(s: Settings) -> None:
    if s.head_recipe not in ("auto", "linear", "mlp"):
        raise SettingsError(f"XRAY_HEAD_RECIPE={s.head_recipe!r}: only auto, linear and mlp are supported")
    if not s.head_l2_grid or any(not c > 0 for c in s.head_l2_grid):
        raise SettingsError("XRAY_HEAD_L2_GRID: need one or more positive numbers, e.g. 0.001,0.01,0.1,1")
    if s.lr_schedule not in ("cosine", "none"):
        raise SettingsError(f"XRAY_LR_SCHEDULE={s.lr_schedule!r}: only cosine and none are supported")
    if s.recipe_folds < 2:
        raise SettingsError(f"XRAY_RECIPE_FOLDS={s.recipe_folds}: must be at least 2")
    if s.recipe_min_val_per_class < 0:
        raise SettingsError(f"XRAY_RECIPE_MIN_VAL_PER_CLASS={s.recipe_min_val_per_class}: must be 0 or more")
    if s.target_sensitivity is not None and not 0 < s.target_sensitivity <= 1:
        raise SettingsError(f"XRAY_TARGET_SENSITIVITY={s.target_sensitivity}: must be in (0, 1], e.g. 0.95")


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return load_settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI call this after changing the environment)."""
    get_settings.cache_clear()


__all__ = ["Settings", "load_settings", "get_settings", "reset_settings", "ENV_VARS"]
