"""Every setting, declared once: :class:`Settings`, read from ``XRAY_*`` environment variables.

Each field says its type, default, range (``ge``/``le``, a ``Literal``, or a check from
:mod:`xray_core.rules`) and, in its description, what it is for. Everything else is derived from
that one declaration: the environment variable (``XRAY_`` + the upper-cased name, through
pydantic-settings), the words every error repeats, the examples the unit test loads, the defaults
of :class:`~xray_core.evaluate.promotion.PolicyConfig` and :class:`~xray_core.model.train.HeadConfig`,
which settings a rerun ignores (``affects``), and ``docs/settings.md``
(``python scripts/settings_table.py --write``).

Nothing here runs at import time: Prefect imports flow modules to deploy them, so settings are read
only when :func:`get_settings` is first called (and again after :func:`reset_settings`). A bad value
fails at once with one :class:`SettingsError` (exit code 2) naming each bad variable and what it
allows, not hours later inside torch or the promotion policy, and never silently
(``XRAY_TARGET_SPECIFICITY=90`` used to give a sensitivity of 1.0).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from db.urls import mask_url, mask_userinfo
from xray_core import rules as r
from xray_core.errors import SettingsError
from xray_core.rules import check, parse, setting

DEFAULT_PATIENT_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d{4})"
PromotionMetric = Literal["macro_auroc", "balanced_accuracy", "sensitivity_at_specificity"]
PromotionMode = Literal["non-inferiority", "superiority"]
LrSchedule = Literal["none", "cosine"]
ReviewMode = Literal["off", "blocked", "always"]
PROMOTION_METRICS: tuple[str, ...] = get_args(PromotionMetric)
PROMOTION_MODES: tuple[str, ...] = get_args(PromotionMode)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
REVIEW_MODES: tuple[str, ...] = get_args(ReviewMode)

Folder = Annotated[Path, BeforeValidator(r.path), check(r.is_folder)]  # a default Path is resolved too
Word = parse(r.words)  # stripped, lower case
_SEED: dict[str, Any] = {"ge": 0, "le": r.SEED_MAX}
_DASK = r"(tcp|tls|ucx|inproc|ws|wss)://[\w.\-\[\]:/]+|[\w.\-\[\]]+:\d{1,5}"
_SALT = r"(?!\s)[^\x00-\x1f\x7f]*(?<!\s)"  # a stray newline from a secrets file would change every hash
_YES_NO = "one of 1/0, true/false, yes/no, on/off"


def _url(text: str) -> str | None:
    return text.strip().rstrip("/") or None


def _text(text: str) -> str | None:
    return text.strip() or None


def _under_home(folder: str) -> Any:
    return setting(default_factory=lambda data: data["home"] / folder, from_env=False,
                   description=f"XRAY_HOME/{folder}", affects="execution")


def default_allowed_roots(incoming_dir: Path | None) -> tuple[Path, ...]:
    """Without XRAY_ALLOWED_ROOTS: the incoming folder's parent (``/data/incoming`` -> ``/data``, where
    the other drop folders usually sit); the folder itself when its parent is the file system's root."""
    if incoming_dir is None:
        return ()
    return (incoming_dir if incoming_dir.parent == incoming_dir.parent.parent else incoming_dir.parent,)


class Settings(BaseSettings):
    """Every knob of the system. Paths are absolute once loaded; frozen (change with :meth:`with_overrides`).

    ``Settings(**values)`` validates ``values`` only; :func:`load_settings` reads the environment.
    """

    model_config = SettingsConfigDict(env_prefix="XRAY_", frozen=True, extra="forbid", allow_inf_nan=False,
                                      validate_default=True, enable_decoding=False)

    home: Folder = setting(Path("var"), default_text="`./var`", affects="execution", allowed=(
        "a folder path (created if missing), not a file"), good="var", bad=("var\0x",), description=(
        "catalogue, store, features, models, reports and quarantine live here"))
    database_url: Annotated[str, check(r.is_database_url)] = setting(
        default_factory=lambda data: f"sqlite:///{data['home'] / 'catalogue.db'}", affects="execution",
        default_text="`sqlite:///$XRAY_HOME/catalogue.db`", description="the catalogue database", allowed=(
            "a SQLAlchemy URL such as sqlite:///path/catalogue.db or postgresql+psycopg://user@host/db"),
        good="sqlite:///catalogue.db", bad=("catalogue.db", "nosuch://h/db"))
    store_dir: Path = _under_home("store")
    features_dir: Path = _under_home("features")
    models_dir: Path = _under_home("models")
    reports_dir: Path = _under_home("reports")
    quarantine_dir: Path = _under_home("quarantine")
    incoming_dir: Folder | None = setting(
        None, env="XRAY_INCOMING", affects="execution",
        description="folder the nightly retrain scans; unset = only explicit sources",
        allowed="a folder path (it need not exist yet), not a file", good="in",
        bad=("in\0",))
    incoming_settle_s: int = setting(
        900, ge=0, le=7 * 24 * 3600, description="seconds a batch folder of XRAY_INCOMING without a READY "
        "file must be unchanged (no file or folder modified) before a retrain takes it; 0 = take it at once")
    storage_url: Annotated[str | None, parse(_url), check(r.is_storage_url)] = setting(
        None, affects="execution", description="where store/, quarantine/, features/ and models/ live, as "
        "an fsspec URL (memory://xray, s3://bucket/xray) or a path; unset = the folders under XRAY_HOME",
        allowed="a folder path or an fsspec URL of a protocol fsspec knows (memory://, file://, s3://, ...), "
        "or unset",
        good="memory://xray", bad=("nosuchproto://bucket/xray",))
    allowed_roots: Annotated[tuple[Path, ...], parse(r.folders), check(r.are_roots)] = setting(
        default_factory=lambda data: default_allowed_roots(data.get("incoming_dir")),
        default_text="`XRAY_INCOMING`'s parent (itself if that is `/`), else none",
        description="folders that paths named by flow parameters must lie in, besides XRAY_INCOMING and the "
        "paths typed on the command line", allowed="comma-separated absolute folder paths (flow parameters "
        "may name paths only inside them, XRAY_INCOMING, or what the xray command was given), or none",
        good="/data,/srv/films", bad=("data/incoming", "/data,films", "/data\0x"))

    # ingest
    labels: Annotated[tuple[str, ...], parse(r.labels), check(r.is_label_list)] = setting(
        (), description="allowed labels after normalisation; empty = any well-formed name", allowed=(
            f"empty (any label) or two or more comma-separated labels of {r.LABEL_TEXT}"),
        good="normal,pneumonia", bad=("normal", "normal,x/y"))
    negative_label: Annotated[str, Word, check(r.is_label)] = setting(
        "normal", affects="training", description="the non-disease class (binary threshold, guardrails)",
        allowed=f"one label of {r.LABEL_TEXT}", good="healthy", bad=("no/such",))
    patient_regex: Annotated[str, check(r.is_regex)] = setting(
        DEFAULT_PATIENT_REGEX, empty_is_a_value=True, description="group 1 of a match on the file name is "
        "the patient id; empty = off (each image without another id is its own patient)", allowed=(
            "a regular expression (group 1, else the whole match, is the patient id), or empty for none"),
        good=r"^(p\d+)", bad=("(person",))
    patient_salt: Annotated[str | None, check(r.matches(_SALT, optional=True))] = setting(
        None, secret=True, description="salt for hashing DICOM PatientID; unset = a per-home salt file",
        allowed="text without leading or trailing spaces or control characters; unset = a per-home salt file",
        good="hospital-salt", bad=(" salt\n",))
    min_image_side: int = setting(64, ge=1, le=65535, description="pixels; smaller images are rejected as "
                                  "too_small")
    max_pixels: int = setting(50_000_000, ge=1, le=10**9, description="width x height above which an image "
                              "is refused as a decompression bomb")
    max_file_bytes: int = setting(512 * 1024 * 1024, ge=1, le=2**36, description="bytes, at most 64 GiB; "
                                  "larger files are refused unread")
    quarantine_max_bytes: int = setting(
        10 * 1024**3, ge=0, le=2**50, affects="execution", description="bytes quarantine/ may hold; copies "
        "of rejected files that would take it past this are skipped, their rows kept; 0 = copy none")

    # split
    split_ratios: Annotated[tuple[float, ...], parse(r.floats), check(r.is_split_ratios)] = setting(
        (0.70, 0.15, 0.15), description="train / val / test shares of the patients", allowed=(
            "three comma-separated fractions train,val,test in [0, 1] that sum to 1 with train above 0, "
            "e.g. 0.7,0.15,0.15"), good="0.8,0.1,0.1",
        bad=("nan,nan,nan", "0.5,0.5", "0.7,0.2,0.2", "0,0.5,0.5", "1.2,-0.1,-0.1", "a,b,c"))
    split_seed: int = setting(0, **_SEED, description="seed of the patient-to-split hash")
    sequester_fraction: float = setting(0.05, ge=0, le=0.5, description="share of NEW patients, per site "
        "and label, set aside as the sequestered test set that only the audit reads (xray audit); 0 = off; "
        "patients already assigned keep their split")

    # backbone and features
    backbone_weights: Annotated[str, parse(str.strip), check(r.is_weights)] = setting(
        "imagenet", description="densenet161's weights", allowed=(
            f"imagenet, random or the path of a state dict ending {', '.join(r.WEIGHT_SUFFIXES)}"),
        good="random", bad=("imagenet22k", "weights.pkl"))
    backbone_seed: int = setting(0, **_SEED, description="init seed of a random backbone")
    device: Annotated[str, Word, check(r.matches(r"auto|cpu|cuda(:\d+)?"))] = setting(
        "auto", description="where the backbone runs", allowed="auto, cpu, cuda or cuda:N", good="cpu",
        bad=("gpu", "cuda:x"))
    input_size: int = setting(224, ge=32, le=1024, description="square side in pixels fed to densenet161")
    views: int = setting(4, ge=0, le=64, affects="training",
                         description="augmented views per image, each a full backbone pass")
    aug_rotation: float = setting(10.0, ge=0, le=180, description="degrees, +-; 0 disables")
    aug_crop_scale: Annotated[tuple[float, ...], parse(r.floats), check(r.is_crop_scale)] = setting(
        (0.8, 1.0), description="RandomResizedCrop area scale", allowed=(
            "two fractions lo,hi with 0 < lo <= hi <= 1, e.g. 0.8,1.0"), good="0.5,1",
        bad=("0,1", "0.9,0.8", "0.8", "nan,1"))
    aug_hflip: Annotated[bool, Word] = setting(True, description="random horizontal flips in the views",
                                               allowed=_YES_NO, good="off", bad=("maybe",))
    embed_batch_size: int = setting(16, ge=1, le=4096, description="images per backbone call")
    embed_precision: Annotated[Literal["auto", "fp32", "bf16"], Word] = setting(
        "auto", affects="execution", bad=("fp8",), description="the backbone forward's arithmetic")
    embed_workers: int = setting(0, ge=0, le=256, affects="execution",
                                 description="decode processes; 0 decodes in the main process")
    embed_memory_mb: int = setting(2048, ge=1, le=2**20, description="MiB of decoded batches held while "
                                   "embedding, at most 1 TiB")
    memory_mb: int = setting(2048, ge=64, le=2**20, description=(
        "MiB a step's chunked working arrays may hold (the bootstrap's resample blocks); results do not "
        "depend on it"))
    # affects training: above it the recipes are compared on a subsample, which can change the winner
    subsample_films: int = setting(10_000, ge=100, le=10**9, affects="training", description=(
        "films at most that the shortcut audit's probes and the head-recipe comparison use; a larger split "
        "is subsampled, stratified by label (and site), and the audit or the model card says so"))
    embed_dask_workers: int = setting(0, ge=0, le=1024, affects="execution",
                                      description="Dask embedding shards; 0 = off")
    dask_address: Annotated[str | None, parse(_text), check(r.matches(_DASK, True))] = setting(
        None, affects="execution", description="an existing Dask scheduler; unset = a local cluster",
        allowed=(
            "a Dask scheduler address such as tcp://host:8786 or host:8786, or unset"),
        good="tcp://127.0.0.1:8786", bad=("http://host:8786", "tcp://two hosts"))

    # head training
    head_hidden: Annotated[tuple[int, ...], parse(r.widths), check(r.is_widths)] = setting(
        (512,), affects="training", description="hidden layer widths of the MLP head", allowed=(
            "none (a linear head) or up to 8 comma-separated widths, each an integer in [1, 16384]"),
        good="256,128", bad=("-3", "0", "512,abc", "100000"))
    head_dropout: float = setting(0.2, ge=0, lt=1, affects="training",
                                  description="fraction of units dropped")
    epochs: int = setting(20, ge=1, le=100_000, affects="training",
                          description="passes over the training features")
    batch_size: int = setting(32, ge=1, le=65536, affects="training", description="training rows per step")
    learning_rate: float = setting(1e-3, gt=0, le=1, affects="training", description="Adam step size")
    weight_decay: float = setting(0.0, ge=0, le=1, affects="training",
                                  description="Adam L2 penalty; 0 = none")
    patience: int = setting(5, ge=1, le=100_000, affects="training",
                            description="epochs without a val-loss improvement before stopping")
    train_seed: int = setting(0, **_SEED, affects="training", description="seed of head init and batch order")
    train_threads: int = setting(
        1, ge=0, le=1024, affects="execution",
        description="torch and BLAS threads of the train step (0: the libraries' defaults). One by default: "
                    "a head's batches of 32 rows are too small to share, and a second thread spinning on a "
                    "busy 2-core machine made a 2,000-film retrain 15x slower (docs/benchmarks.md); raise it "
                    "on a dedicated many-core host, for large linear fits. The card records the counts; "
                    "`xray reproduce` fits with them")

    # metrics
    bootstrap_samples: int = setting(1000, ge=1, le=1_000_000,
                                     description="resamples per confidence interval")
    bootstrap_seed: int = setting(0, **_SEED, description="seed of the bootstrap")

    # promotion policy
    min_test_per_class: int = setting(20, ge=1, le=1_000_000,
                                      description="test images per class before a promotion is decided")
    floor_macro_auroc: float = setting(0.80, ge=0, le=1, description="macro AUROC a first model must reach; "
                                       "0 = no floor")
    floor_sensitivity: float = setting(0.70, ge=0, le=1, description="per-class sensitivity a first model "
                                       "must reach; 0 = no floor")
    promotion_metric: Annotated[PromotionMetric, Word] = setting(
        "macro_auroc", bad=("accuracy",), description="the metric the challenger is compared on")
    promotion_mode: Annotated[PromotionMode, Word] = setting(
        "non-inferiority", bad=("better",), description="how the paired difference must compare")
    promotion_margin: float = setting(0.01, ge=0, le=1, description="metric difference: shortfall allowed if "
                                      "non-inferiority, gain needed if superiority")
    target_specificity: float = setting(0.90, gt=0, lt=1, description="a fraction: 0.9 means 90%")
    guardrail_sensitivity_drop: float = setting(0.02, ge=0, le=1, description="largest per-class sensitivity "
                                                "drop a promotion may cause; also the fall in the champion's "
                                                "calls at a drifted site the breach step reports")
    reference_margin: float = setting(0.02, ge=0, le=1, description="how far the lower 95% bound of the "
        "challenger's XRAY_PROMOTION_METRIC may fall below the locked reference's on the same test films "
        "(xray lock; the bio-creep guard)")
    reference_breach: Annotated[Literal["lift", "alert", "rollback"], Word] = setting(
        "lift", bad=("off",), description="when a retrain's drift check flags a site and the champion "
        "measures more than XRAY_REFERENCE_MARGIN below the locked reference on that site's films since "
        "the drift began: lift = a challenger-vs-champion comparison that failed without a measured drop "
        "(point estimate at or above -XRAY_PROMOTION_MARGIN) no longer vetoes (every other check still "
        "does, and the challenger must not measure more than the margin below the champion or the reference "
        "on the site's test films); "
        "alert = report only; rollback = as "
        "lift, and a challenger still kept restores the reference as champion (audited, as xray rollback)")
    test_reuse_budget: int = setting(20, ge=1, le=1_000_000, description="decisions one test set may inform "
        "before reports warn that it is overused (adaptive overfitting)")

    # sites, views and shortcuts
    guardrail_site_drop: float = setting(0.10, ge=0, le=1, description="largest AUROC or per-class "
                                         "sensitivity drop allowed on any site with enough test images")
    guardrail_site_evidence: Annotated[Literal["interval", "point"], Word] = setting(
        "interval", bad=("ci",), description="interval: a site's drop vetoes only when the champion's value "
        "is above the challenger's 95% interval on that site (a drop the site's films can tell from noise); "
        "point: any point drop above XRAY_GUARDRAIL_SITE_DROP vetoes (noisy on small sites)")
    max_negative_flip: float | None = setting(None, ge=0, le=1, description="largest upper 95% bound of the "
        "negative flip rate (films the champion got right, the challenger wrong) a promotion may have; "
        "unset = no veto", allowed="a fraction in [0, 1], e.g. 0.05, or unset (no veto)", good="0.05",
        bad=("1.5", "nan"))
    shortcut_auroc: float = setting(0.80, ge=0.5, le=1, description="AUROC of a shortcut probe above which "
                                    "the audit warns")
    shortcut_policy: Annotated[Literal["warn", "block"], Word] = setting(
        "warn", bad=("ignore",), description="block: a flagged audit blocks automatic promotion")
    # After shortcut_policy: its default is derived from it (a default_factory sees the fields above).
    review: Annotated[ReviewMode, Word] = setting(
        default_factory=lambda data: "blocked" if data.get("shortcut_policy") == "block" else "off",
        default_text="`blocked` under `XRAY_SHORTCUT_POLICY=block`, else `off`", bad=("sometimes",),
        description="which runs wait for a reviewer (a form on the paused Prefect run, or xray review): "
        "blocked = a run the shortcut audit would block, always = also every promotion; off = none")
    review_timeout_h: float = setting(72.0, gt=0, le=720, description="hours a run waits for its reviewer; "
                                      "then it ends Kept (review expired)")
    allowed_views: Annotated[tuple[str, ...], parse(r.views), check(lambda v: all(
            x.replace(" ", "").isalnum() for x in v))] = setting(
        (), description="films of other known views are quarantined; empty = any", allowed=(
            "empty (any view) or comma-separated view names such as PA,AP"), good="PA,AP",
        bad=("PA,<script>",))
    slice_by: Annotated[tuple[str, ...], parse(r.slice_names), check(r.are_slice_names)] = setting(
        ("site", "view"), description="what each evaluation is cut by, with intervals: site and view "
        "(always; the per-site guardrail reads site), and, reported only, sex, age_band (0-17, 18-39, 40-64, "
        "65+), device, laterality, modality, body_part or any manifest attribute",
        allowed="1 to 16 comma-separated names of 1 to 64 characters: site, view, sex, age_band, device, "
        "laterality, modality, body_part or a manifest attribute's column name",
        good="site,view,sex,age_band",
        bad=("site,view,\x01", "a" * 65))
    near_copy_distance: int = setting(3, ge=-1, le=16, description="pHash bits within which a film of "
                                      "another patient is a near copy; -1 = off")

    # files
    file_mode: Annotated[int, parse(r.octal_mode), check(r.is_file_mode)] = setting(
        0o640, affects="execution", default_text="`0640`", description="permission bits of the files people "
        "open (reports, result.json, heatmaps, prediction CSVs and overlays); the store, features and models "
        "stay 0600/0700", allowed="an octal file mode from 000 to 777 without write access for others, e.g. "
        "0640 or 0644", good="0644", bad=("0666", "999", "rw-r-----"))
    # retention: what `xray gc` and maintenance/weekly keep (xray_core.registry.retention)
    keep_rejected: int = setting(5, ge=0, le=100_000, affects="execution", description="model versions never "
                                 "promoted whose files xray gc keeps, newest first; the champion, every "
                                 "model ever promoted and candidates awaiting a decision are always kept")
    keep_reports_days: int = setting(90, ge=1, le=36_500, affects="execution", description="days xray gc "
                                     "keeps a run's report files; result.json and audit rows stay forever")

    # DICOM: which acquisitions ingest accepts, where the site comes from, what is stored
    allowed_modalities: Annotated[tuple[str, ...], parse(r.modalities), check(lambda v: all(
            re.fullmatch(r"[A-Z0-9_]{1,16}", x) for x in v))] = setting(
        ("CR", "DX"), description="DICOM Modality values accepted", allowed=(
            "any, or comma-separated DICOM Modality codes (1-16 of A-Z, 0-9, _) such as CR,DX"),
        good="CR,DX,DR", bad=("CR;DX", "C R"))
    require_chest: Annotated[bool, Word] = setting(
        False, description="films whose BodyPartExamined is not CHEST are quarantined", allowed=_YES_NO,
        good="on", bad=("chest",))
    site_from_dicom: Annotated[Literal["hash", "name", "off"], Word] = setting(
        "hash", bad=("plain",), description="InstitutionName as the site: salted hash, name, or not at all")
    dicom_store: Annotated[Literal["deidentified", "original"], Word] = setting(
        "deidentified", bad=("raw",), description="store a PS3.15 Basic Profile copy or the original bytes")

    # head recipe and calibration (xray_core.model.recipes, xray_core.model.calibrate)
    head_recipe: Annotated[Literal["auto", "linear", "mlp"], Word] = setting(
        "auto", affects="training", bad=("svm",),
        description="auto compares the recipes on held-out patients")
    head_l2_grid: Annotated[tuple[float, ...], parse(r.floats), check(r.is_l2_grid)] = setting(
        (0.001, 0.01, 0.1, 1.0), affects="training", description="the linear candidates", allowed=(
            "one or more comma-separated positive numbers (inverse L2 strengths C of the linear candidates), "
            "e.g. 0.001,0.01,0.1,1"), good="0.01,1", bad=("0", "-1,1", "nan", "a"))
    lr_schedule: Annotated[LrSchedule, Word] = setting(
        "cosine", affects="training", bad=("step",), description="the MLP's learning rate: cosine anneals "
        "to 0 and runs every epoch; none keeps it and stops early")
    recipe_folds: int = setting(5, ge=2, le=20, affects="training", description="patient-grouped folds "
                                "inside train+val for choosing the head recipe")
    recipe_min_val_per_class: int = setting(20, ge=0, le=1_000_000, affects="training", description=(
        "validation images per class below which the recipe is chosen by k-fold"))
    target_sensitivity: float | None = setting(
        None, gt=0, le=1, affects="training", description="threshold for this sensitivity on val; unset = "
        "Youden's J", allowed="a fraction in (0, 1], e.g. 0.95, or unset (Youden's J)", good="0.95",
        bad=("0", "1.5", "nan"))
    ingest_workers: int = setting(0, ge=0, le=256, affects="execution", description="processes that prepare "
                                  "files during ingest; 0 = one per core, 1 = in the ingesting process")

    # monitoring between retrains (xray_core.monitor)
    ood_score: Annotated[Literal["t2q", "knn"], Word] = setting(
        "t2q", bad=("lof",), description="the per-film OOD score a new model's reference stores: t2q = "
        "Hotelling's T² + Q residual of a PCA basis; knn = distance to the nearest training film (keeps up "
        "to 2048 of them, ~9 MB per model)")
    ood_alpha: float = setting(0.05, gt=0, le=0.5, description="a film is flagged out of distribution when "
                               "its conformal p-value (ood_p) is at most this: about this fraction of "
                               "in-distribution films is flagged")
    ood_quantile: float = setting(0.99, ge=0.5, lt=1, description="the stricter alternative, used only when "
                                  "set: flag films scoring above this conformal quantile of the calibration "
                                  "films instead (at most 1 - q of in-distribution films flagged)")
    drift_alpha: float = setting(0.01, gt=0, le=0.5,
                                 description="p-value below which a batch drift test warns; also the "
                                             "breach step's bound on a fall in the champion's calls at a "
                                             "drifted site (Fisher, over the classes judged)")
    drift_permutations: int = setting(999, ge=19, le=100_000,
                                      description="permutations of the batch drift test")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Values given to the constructor only: :func:`load_settings` reads the environment it is given."""
        return (init_settings,)

    def public_dict(self) -> dict[str, Any]:
        """Settings as JSON-able values, without secrets (the patient salt, passwords in URLs)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "patient_salt":
                value = "(set)" if value else "(per-home file)"
            elif name == "database_url":
                value = mask_url(value)  # a PostgreSQL password must not reach a model card or status
            elif name == "storage_url" and value:
                value = mask_userinfo(value)  # credentials in the URL
            elif name == "file_mode":
                value = f"{value:04o}"  # as people write it (XRAY_FILE_MODE=0640), not 416
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[name] = value
        return out

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with ``changes``, not validated (as :func:`dataclasses.replace`): callers set values
        the environment may not (``embed_precision="legacy"`` for old cards); :func:`validate` checks."""
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            raise TypeError(f"Settings has no field(s) {', '.join(sorted(unknown))}")
        return self.model_copy(update=changes)


FIELDS: dict[str, FieldInfo] = Settings.model_fields
ENV_BY_FIELD: dict[str, str] = r.env_names(FIELDS)  # field -> its variable; the folders under home have none
ENV_VARS: tuple[str, ...] = tuple(ENV_BY_FIELD.values())


def setting_default(name: str) -> Any:
    """The declared default of ``name`` (PolicyConfig and HeadConfig take theirs from here)."""
    return FIELDS[name].get_default()


def affecting(kind: r.Affects) -> tuple[str, ...]:
    """The settings marked ``affects=kind``: ``execution`` (where and how fast work runs) or ``training``."""
    return tuple(name for name, f in FIELDS.items() if r.extra(f).get("affects") == kind)


def settings_page() -> str:
    """``docs/settings.md``: every variable with its default and what it allows, from the declaration."""
    return r.settings_page(FIELDS)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default: ``os.environ``) and validate them.

    Every problem is reported at once (one line each), so a user fixes them in one go.
    """
    raws = r.Environment(Settings, os.environ if env is None else env)()
    try:
        return Settings(**raws)
    except ValidationError as exc:
        defaults = {name: r.as_text(f.default) for name, f in FIELDS.items() if not f.default_factory}
        raise SettingsError(r.refusal(exc, FIELDS, {**defaults, **raws})) from None


def validate(s: Settings) -> None:
    """Reject settings built in code (``with_overrides``) that the environment could not have given.

    Raises one :class:`SettingsError` listing every setting outside what it allows.
    """
    try:
        Settings.model_validate(dict(s))
    except ValidationError as exc:
        shown = {name: r.as_text(getattr(s, name)) for name in FIELDS}
        raise SettingsError(r.refusal(exc, FIELDS, shown)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return load_settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI call this after changing the environment)."""
    get_settings.cache_clear()


__all__ = ["Settings", "FIELDS", "ENV_BY_FIELD", "ENV_VARS", "PROMOTION_METRICS", "PROMOTION_MODES",
           "LR_SCHEDULES", "REVIEW_MODES", "DEFAULT_PATIENT_REGEX", "default_allowed_roots",
           "setting_default",
           "affecting", "load_settings", "validate", "get_settings", "reset_settings", "settings_page"]
