"""The words settings are checked with: a :class:`Rule` says in one line what a value may be.

``xray_core.settings`` keeps one table, setting name -> Rule, and checks every ``XRAY_*`` value
against it at start-up. The checks live here so that table stays one line per setting and
``settings.py`` stays short enough to read as the list of knobs.

May import: ``data`` (label names), lazily. Nothing runs at import time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # what model.backbone can load
SEED_RANGE = (0, 2**32 - 1)  # every RNG we seed (numpy, torch, hashing) accepts this range
PROMOTION_METRICS = ("macro_auroc", "balanced_accuracy", "sensitivity_at_specificity")
PROMOTION_MODES = ("non-inferiority", "superiority")
LABEL_TEXT = "1-64 of a-z, 0-9, '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Rule:
    """What one setting allows.

    ``allowed`` is the text every error repeats after ``XRAY_NAME=value:``; ``check`` is True for an
    allowed *parsed* value. ``good`` and ``bad`` are raw environment strings, one allowed and some
    not: the table-driven test loads each, so the words, the predicate and the parser cannot drift
    apart, and they double as examples for a reader.
    """

    allowed: str
    check: Callable[[Any], bool]
    good: str
    bad: tuple[str, ...]

    def passes(self, value: Any) -> bool:
        """``check`` that treats a value of the wrong type (say via ``with_overrides``) as not allowed."""
        try:
            return bool(self.check(value))
        except (TypeError, ValueError, AttributeError):
            return False


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def is_number(value: Any, integer: bool = False) -> bool:
    """A finite int (or float, unless ``integer``). Bools are not numbers here; nan and inf never pass:
    ``nan`` compares False with everything, so a plain ``lo <= v <= hi`` test would wave it through."""
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def number_in(lo: float, hi: float, why: str, *, integer: bool = False, open_lo: bool = False,
              open_hi: bool = False) -> Rule:
    """A finite number in an interval, worded ``must be in [0, 1) (fraction of units dropped)``.

    Its bad examples are the first values outside each end, plus malformed text (and nan/inf)."""
    def check(v: Any) -> bool:
        return is_number(v, integer) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

    span = f"{'(' if open_lo else '['}{_num(lo)}, {_num(hi)}{')' if open_hi else ']'}"
    outside = (_num(lo if open_lo else lo - 1), _num(hi if open_hi else hi + 1))
    if integer:
        return Rule(f"must be an integer in {span} ({why})", check, _num(lo + open_lo), (*outside, "1.5", "abc"))
    return Rule(f"must be in {span} ({why})", check, _num((lo + hi) / 2), (*outside, "nan", "inf", "abc"))


def integer_in(lo: int, hi: int, why: str) -> Rule:
    return number_in(lo, hi, why, integer=True)


def one_of(options: tuple[str, ...], bad: str) -> Rule:
    return Rule(f"must be one of {', '.join(options)}", lambda v: v in options, options[-1], (bad,))


def matching(pattern: str, allowed: str, good: str, bad: tuple[str, ...], optional: bool = False) -> Rule:
    """Text that fully matches ``pattern`` (or None, the setting unset, when ``optional``)."""
    regex = re.compile(pattern)
    return Rule(allowed, lambda v: (optional and v is None) or bool(regex.fullmatch(v)), good, bad)


def is_folder(value: Any) -> bool:
    """Unset, a folder, or a path that does not exist yet (created when needed); never a file.

    A path we may not even look at (permission denied) passes: the step that writes there reports
    that more precisely than "not a folder" would."""
    try:
        return value is None or isinstance(value, Path) and (value.is_dir() or not value.exists())
    except OSError:
        return True


def is_database_url(value: str) -> bool:
    """A URL SQLAlchemy parses, of a dialect it knows: :func:`db.urls.check_database_url`, the same
    check ``xray`` runs at start-up."""
    from db.urls import DatabaseUrlError, check_database_url

    try:
        check_database_url(value)
    except DatabaseUrlError:
        return False
    return True


def is_storage_url(value: str | None) -> bool:
    """Unset, a path, or an fsspec URL (chains like ``simplecache::s3://...`` too) of known protocols."""
    if value is None:
        return True
    import fsspec

    known = set(fsspec.available_protocols())
    return all(part.split("://")[0] in known for part in value.split("::") if "://" in part)


def is_label(value: str) -> bool:
    from xray_core.data.labels import is_safe_label

    return is_safe_label(value)


def is_label_list(value: tuple[str, ...]) -> bool:
    """Empty (any label) or two or more safe labels: one label alone can never train a classifier."""
    return len(value) != 1 and all(map(is_label, value))


def is_regex(value: str) -> bool:
    try:
        return re.compile(value) is not None
    except re.error:
        return False


def is_split_ratios(value: tuple[float, ...]) -> bool:
    """train,val,test fractions summing to 1 with some training data."""
    return (len(value) == 3 and all(is_number(r) and 0 <= r <= 1 for r in value) and value[0] > 0
            and math.isclose(sum(value), 1.0, abs_tol=1e-6))


def is_crop_scale(value: tuple[float, ...]) -> bool:
    return len(value) == 2 and all(map(is_number, value)) and 0 < value[0] <= value[1] <= 1


def is_widths(value: tuple[int, ...]) -> bool:
    """Up to 8 hidden layers of 1..16384 units (a 16384-wide layer over 2208 features is 36 M weights)."""
    return len(value) <= 8 and all(is_number(w, integer=True) and 1 <= w <= 16384 for w in value)


def is_weights(value: str) -> bool:
    return value.lower() in ("imagenet", "random") or Path(value).suffix.lower() in WEIGHT_SUFFIXES


__all__ = ["Rule", "is_number", "number_in", "integer_in", "one_of", "matching", "is_folder", "is_database_url",
           "is_storage_url", "is_label", "is_label_list", "is_regex", "is_split_ratios", "is_crop_scale",
           "is_widths", "is_weights", "WEIGHT_SUFFIXES", "SEED_RANGE", "LABEL_TEXT"]


# One line per setting (field name -> Rule: allowed values in words and as a predicate), checked by
# validate() at start-up; every error names the variable and repeats the words. The unit test fails
# when a field of settings._FIELDS or settings._PATH_FIELDS has no line here.
_DASK = r"(tcp|tls|ucx|inproc|ws|wss)://[\w.\-\[\]:/]+|[\w.\-\[\]]+:\d{1,5}"
_SALT = r"(?!\s)[^\x00-\x1f\x7f]*(?<!\s)"  # a stray newline from a secrets file would change every hash
RULES: dict[str, Rule] = {
    "home": Rule("must be a folder path (created if missing), not a file", is_folder, "var", ("var\0x",)),
    "database_url": Rule("must be a SQLAlchemy URL such as sqlite:///path/catalogue.db or postgresql+psycopg://"
                         "user@host/db", is_database_url, "sqlite:///catalogue.db", ("catalogue.db", "nosuch://h/db")),
    "incoming_dir": Rule("must be a folder path (it need not exist yet), not a file", is_folder, "in", ("in\0",)),
    "storage_url": Rule("must be a folder path or an fsspec URL of a protocol fsspec knows (memory://, file://, "
                        "s3://, ...), or unset", is_storage_url, "memory://xray", ("nosuchproto://bucket/xray",)),
    "allowed_roots": Rule("must be comma-separated absolute folder paths (flow parameters may name paths "
                          "only inside them, XRAY_INCOMING, or what the xray command was given), or none",
                          lambda v: all(isinstance(p, Path) and p.is_absolute() and is_folder(p) for p in v),
                          "/data,/srv/films", ("data/incoming", "/data,films", "/data\0x")),
    "labels": Rule(f"must be empty (any label) or two or more comma-separated labels of {LABEL_TEXT}",
                   is_label_list, "normal,pneumonia", ("normal", "normal,x/y")),
    "negative_label": Rule(f"must be one label of {LABEL_TEXT}", is_label, "healthy", ("no/such",)),
    "patient_regex": Rule("must be a regular expression (group 1, else the whole match, is the patient id), or "
                          "empty for none", is_regex, r"^(p\d+)", ("(person",)),
    "patient_salt": matching(_SALT, "must be text without leading or trailing spaces or control characters; "
                             "unset = a per-home salt file", "hospital-salt", (" salt\n",), optional=True),
    "min_image_side": integer_in(1, 65535, "pixels; smaller images are rejected as too_small"),
    "max_pixels": integer_in(1, 10**9, "width x height above which an image is refused as a decompression bomb"),
    "max_file_bytes": integer_in(1, 2**36, "bytes, at most 64 GiB; larger files are refused unread"),
    "quarantine_max_bytes": integer_in(0, 2**50, "bytes quarantine/ may hold; copies of rejected files that "
                                   "would take it past this are skipped, their rows kept; 0 = copy none"),
    "split_ratios": Rule("must be three comma-separated fractions train,val,test in [0, 1] that sum to 1 with "
                         "train above 0, e.g. 0.7,0.15,0.15", is_split_ratios, "0.8,0.1,0.1",
                         ("nan,nan,nan", "0.5,0.5", "0.7,0.2,0.2", "0,0.5,0.5", "1.2,-0.1,-0.1", "a,b,c")),
    "split_seed": integer_in(*SEED_RANGE, "seed of the patient-to-split hash"),
    "backbone_weights": Rule(f"must be imagenet, random or the path of a state dict ending "
                             f"{', '.join(WEIGHT_SUFFIXES)}",
                             is_weights, "random", ("imagenet22k", "weights.pkl")),
    "backbone_seed": integer_in(*SEED_RANGE, "init seed of a random backbone"),
    "device": matching(r"auto|cpu|cuda(:\d+)?", "must be auto, cpu, cuda or cuda:N", "cpu", ("gpu", "cuda:x")),
    "input_size": integer_in(32, 1024, "square side in pixels fed to densenet161"),
    "views": integer_in(0, 64, "augmented views per image, each a full backbone pass"),
    "aug_rotation": number_in(0, 180, "degrees, +-; 0 disables"),
    "aug_crop_scale": Rule("must be two fractions lo,hi with 0 < lo <= hi <= 1, e.g. 0.8,1.0", is_crop_scale,
                           "0.5,1", ("0,1", "0.9,0.8", "0.8", "nan,1")),
    "aug_hflip": Rule("must be one of 1/0, true/false, yes/no, on/off", lambda v: isinstance(v, bool), "off",
                      ("maybe",)),
    "embed_batch_size": integer_in(1, 4096, "images per backbone call"),
    "embed_precision": one_of(("auto", "fp32", "bf16"), "fp8"),
    "embed_workers": integer_in(0, 256, "decode processes; 0 decodes in the main process"),
    "embed_memory_mb": integer_in(1, 2**20, "MiB of decoded batches held while embedding, at most 1 TiB"),
    "embed_dask_workers": integer_in(0, 1024, "Dask embedding shards; 0 = off"),
    "dask_address": matching(_DASK, "must be a Dask scheduler address such as tcp://host:8786 or host:8786, or "
                             "unset", "tcp://127.0.0.1:8786", ("http://host:8786", "tcp://two hosts"), optional=True),
    "head_hidden": Rule("must be none (a linear head) or up to 8 comma-separated widths, each an integer in "
                        "[1, 16384]", is_widths, "256,128", ("-3", "0", "512,abc", "100000")),
    "head_dropout": number_in(0, 1, "fraction of units dropped", open_hi=True),
    "epochs": integer_in(1, 100_000, "passes over the training features"),
    "batch_size": integer_in(1, 65536, "training rows per step"),
    "learning_rate": number_in(0, 1, "Adam step size", open_lo=True),
    "weight_decay": number_in(0, 1, "Adam L2 penalty; 0 = none"),
    "patience": integer_in(1, 100_000, "epochs without a val-loss improvement before stopping"),
    "train_seed": integer_in(*SEED_RANGE, "seed of head init and batch order"),
    "bootstrap_samples": integer_in(1, 1_000_000, "resamples per confidence interval"),
    "bootstrap_seed": integer_in(*SEED_RANGE, "seed of the bootstrap"),
    "min_test_per_class": integer_in(1, 1_000_000, "test images per class before a promotion is decided"),
    "floor_macro_auroc": number_in(0, 1, "macro AUROC a first model must reach; 0 = no floor"),
    "floor_sensitivity": number_in(0, 1, "per-class sensitivity a first model must reach; 0 = no floor"),
    "promotion_metric": one_of(PROMOTION_METRICS, "accuracy"),
    "promotion_mode": one_of(PROMOTION_MODES, "better"),
    "promotion_margin": number_in(0, 1, "metric difference: shortfall allowed if non-inferiority, gain needed if "
                                  "superiority"),
    "target_specificity": number_in(0, 1, "a fraction: 0.9 means 90%", open_lo=True, open_hi=True),
    "guardrail_sensitivity_drop": number_in(0, 1, "largest per-class sensitivity drop a promotion may cause"),
    "file_mode": Rule("must be an octal file mode from 000 to 777 without write access for others, e.g. 0640 "
                      "or 0644", lambda v: isinstance(v, int) and 0 <= v <= 0o777 and not v & 0o002, "0644",
                      ("0666", "999", "rw-r-----")),
    "guardrail_site_drop": number_in(0, 1, "largest AUROC or per-class sensitivity drop allowed on any site with "
                                     "enough test images"),
    "shortcut_auroc": number_in(0.5, 1, "AUROC of a shortcut probe above which the audit warns"),
    "shortcut_policy": one_of(("warn", "block"), "ignore"),
    "head_recipe": one_of(("auto", "linear", "mlp"), "svm"),
    "head_l2_grid": Rule("must be one or more comma-separated positive numbers (inverse L2 strengths C of the "
                         "linear candidates), e.g. 0.001,0.01,0.1,1",
                         lambda v: bool(v) and all(is_number(c) and 0 < c <= 1e6 for c in v), "0.01,1",
                         ("0", "-1,1", "nan", "a")),
    "lr_schedule": one_of(("cosine", "none"), "step"),
    "recipe_folds": integer_in(2, 20, "patient-grouped folds inside train+val for choosing the head recipe"),
    "recipe_min_val_per_class": integer_in(0, 1_000_000, "validation images per class below which the recipe is "
                                           "chosen by k-fold"),
    "target_sensitivity": Rule("must be a fraction in (0, 1], e.g. 0.95, or unset (Youden's J)",
                               lambda v: v is None or (is_number(v) and 0 < v <= 1), "0.95", ("0", "1.5", "nan")),
    "near_copy_distance": integer_in(-1, 16, "pHash bits within which a film of another patient is a near copy; "
                                     "-1 = off"),
    "allowed_modalities": Rule("must be any, or comma-separated DICOM Modality codes (1-16 of A-Z, 0-9, _) such "
                               "as CR,DX", lambda v: all(re.fullmatch(r"[A-Z0-9_]{1,16}", x) for x in v), "CR,DX,DR",
                               ("CR;DX", "C R")),
    "require_chest": Rule("must be one of 1/0, true/false, yes/no, on/off", lambda v: isinstance(v, bool), "on",
                          ("chest",)),
    "site_from_dicom": one_of(("hash", "name", "off"), "plain"),
    "dicom_store": one_of(("deidentified", "original"), "raw"),
    "allowed_views": Rule("must be empty (any view) or comma-separated view names such as PA,AP",
                          lambda v: all(x.replace(" ", "").isalnum() for x in v), "PA,AP", ("PA,<script>",)),
    "ood_quantile": number_in(0.5, 1, "fraction of in-distribution films scored in-distribution; the OOD "
                              "threshold is a conformal quantile of the validation films' and cross-fitted "
                              "training films' scores", open_hi=True),
    "drift_alpha": number_in(0, 0.5, "p-value below which a batch drift test warns", open_lo=True),
    "drift_permutations": integer_in(19, 100_000, "permutations of the batch drift test"),
    "ingest_workers": integer_in(0, 256, "processes that prepare files during ingest; 0 = one per core, "
                                 "1 = in the ingesting process"),
}
