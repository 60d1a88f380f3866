"""SQLAlchemy 2 typed schema of the catalogue and the model registry.

Alembic migrations in ``db/migrations`` create exactly this schema; ``tests`` compare the two.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

SPLITS = ("train", "val", "test")
# Patients set aside for the audit (migration 0008, XRAY_SEQUESTER_FRACTION): never in a routine split.
SEQUESTERED = "sequestered"
MODEL_STATUSES = ("candidate", "champion", "retired", "rejected")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(when: datetime) -> datetime:
    """``when`` as an aware UTC time; a naive ``when`` is taken to be UTC already (what this project
    writes, and what SQLite hands back: it stores no offset)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always reads back an aware UTC datetime, on every backend.

    PostgreSQL returns aware times but SQLite returns naive ones, so callers comparing a stored time
    with ``utcnow()`` used to patch the offset back on by hand. The column's DDL is unchanged
    (``impl``), so the migrations still match this schema.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Source(Base):
    """One ingest run of one folder or manifest."""

    __tablename__ = "sources"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # folder | manifest | demo
    path: Mapped[str] = mapped_column(Text)
    manifest_path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | done | failed
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Patient(Base):
    """A patient's split is assigned once and never changes; all its images follow it. ``sequestered``
    (migration 0008) is no routine split: only the audit reads it (xray_core.pipeline.sequester)."""

    __tablename__ = "patients"
    patient_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    id_source: Mapped[str] = mapped_column(String(16))  # manifest | dicom | filename | image
    split: Mapped[str | None] = mapped_column(String(16))
    assigned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    __table_args__ = (
        CheckConstraint("split IS NULL OR split IN ('train','val','test','sequestered')",
                        name="ck_patient_split"),
    )


class Image(Base):
    """One unique image (by sha256 of its bytes), stored once in the content-addressed store."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    stored_path: Mapped[str] = mapped_column(Text)  # relative to XRAY_HOME
    label: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.patient_id"), index=True)
    view: Mapped[str | None] = mapped_column(String(32))  # e.g. PA / AP, when known
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bit_depth: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))  # png | jpeg | dicom
    phash: Mapped[int] = mapped_column(BigInteger)  # 64-bit perceptual hash, as signed int64
    original_name: Mapped[str] = mapped_column(Text)  # path relative to the source root
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    added_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # Acquisition facts (migration 0002), from DICOM tags or manifest columns; NULL when unknown.
    # Slices and audits (per site, device, sex, age, view) read them; no column holds a clear identifier.
    site: Mapped[str | None] = mapped_column(String(64), index=True)  # salted hash, name or manifest value
    device: Mapped[str | None] = mapped_column(String(128))  # Manufacturer + ManufacturerModelName
    sex: Mapped[str | None] = mapped_column(String(1))  # M | F | O
    age_years: Mapped[float | None] = mapped_column(Float)
    study_hash: Mapped[str | None] = mapped_column(String(32), index=True)  # salted StudyInstanceUID
    study_date: Mapped[date | None] = mapped_column(Date)
    view_position: Mapped[str | None] = mapped_column(String(16))  # DICOM ViewPosition as written
    laterality: Mapped[str | None] = mapped_column(String(1))  # R | L | B | U
    pixel_spacing: Mapped[float | None] = mapped_column(Float)  # mm per pixel (row spacing)
    body_part: Mapped[str | None] = mapped_column(String(16))  # BodyPartExamined, e.g. CHEST
    modality: Mapped[str | None] = mapped_column(String(16))  # CR | DX | ...
    windowing: Mapped[str | None] = mapped_column(String(32))  # voi_lut | window | percentile [+invert]
    # sha256 of the stored bytes when they are not the original's (a de-identified DICOM copy); None = same
    stored_sha256: Mapped[str | None] = mapped_column(String(64))
    # A manifest's own columns, as exported (migration 0006a; xray_core.data.attributes): name -> value.
    # NULL when the film has none. attribute_set: a hash of the names, so status counts them from an index.
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    attribute_set: Mapped[str | None] = mapped_column(String(16), index=True)
    patient: Mapped[Patient] = relationship()
    __table_args__ = (
        # Migration 0005, for xray status at 1M images: its census groups in this order and reads
        # nothing else (no sort, no table rows); label history groups films by patient and label.
        Index("ix_images_census", "label", "site", "source_id", "view", "format", "body_part", "patient_id"),
        Index("ix_images_patient_label", "patient_id", "label"),
    )


class NearPair(Base):
    """Two catalogued images of different patients within ``db.near_pairs.NEAR_PAIR_MAX_DISTANCE`` pHash
    bits (migration 0005), recorded when the second is ingested, whatever the splits are then: splits
    are assigned after ingest, so ``xray status`` joins the pairs to the patients' splits when asked.
    ``image_a < image_b``. Images of one patient are not paired: they always share a split."""

    __tablename__ = "near_pairs"
    image_a: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    image_b: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True, index=True)
    distance: Mapped[int] = mapped_column(Integer)
    __table_args__ = (CheckConstraint("image_a < image_b", name="ck_near_pair_order"),)


class SeenFile(Base):
    """What an ingest concluded about a path at a (size, mtime): lets re-scans skip unchanged files."""

    __tablename__ = "seen_files"
    path: Mapped[str] = mapped_column(Text, primary_key=True)  # absolute path
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    label_key: Mapped[str] = mapped_column(Text, default="")  # label/patient context it was seen with
    sha256: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # added | duplicate | rejected
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Rejection(Base):
    """A file that could not be used, why, and where its quarantined copy is."""

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32), index=True)
    detail: Mapped[str] = mapped_column(Text)
    quarantine_path: Mapped[str | None] = mapped_column(Text)  # relative to XRAY_HOME
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Model(Base):
    """A trained head. ``id`` is the version number shown to users."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    checkpoint_dir: Mapped[str] = mapped_column(Text)  # relative to XRAY_HOME
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))  # of head.safetensors
    card_sha256: Mapped[str] = mapped_column(String(64))  # of card.json
    backbone_fingerprint: Mapped[str] = mapped_column(String(64))
    backbone_weights: Mapped[str] = mapped_column(Text)
    training_set_fingerprint: Mapped[str] = mapped_column(String(64))
    labels: Mapped[list[Any]] = mapped_column(JSON)
    threshold: Mapped[float | None] = mapped_column()
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    # Lineage (migration 0003s): the training and validation image ids, shared between versions.
    split_manifest: Mapped[str | None] = mapped_column(
        ForeignKey("split_manifests.sha256"), index=True)
    # Retention (migration 0007g): when ``xray gc`` deleted this version's files. The row, its lineage,
    # evaluations and audit rows stay; loading a pruned version is refused by name. NULL = files kept.
    pruned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    __table_args__ = (
        CheckConstraint(
            "status IN ('candidate','champion','retired','rejected')", name="ck_model_status"
        ),
        # At most one champion, enforced by the database: a partial unique index.
        Index(
            "uq_models_one_champion",
            "status",
            unique=True,
            sqlite_where=text("status = 'champion'"),
            postgresql_where=text("status = 'champion'"),
        ),
    )


class SplitManifest(Base):
    """Which images trained and validated a model version, once per distinct set (db.split_manifest)."""

    __tablename__ = "split_manifests"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)  # of the canonical text
    encoding: Mapped[str] = mapped_column(String(32))
    n_train: Mapped[int] = mapped_column(Integer)
    n_val: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Evaluation(Base):
    """A model scored on one exact test set (identified by its fingerprint)."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    test_set_fingerprint: Mapped[str] = mapped_column(String(64))
    backbone_fingerprint: Mapped[str] = mapped_column(String(64))
    n_images: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))


class Promotion(Base):
    """Audit trail: every promotion decision, automatic or manual, and every rollback."""

    __tablename__ = "promotions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    from_version: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    to_version: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    # promote|keep|blocked|insufficient_evidence|stale|failed|manual_promote|rollback|reject, and a
    # reviewer's approved|rejected|review_expired (actor: the reviewer)
    decision: Mapped[str] = mapped_column(String(32))
    champion_after: Mapped[int | None] = mapped_column(Integer)
    rationale: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    trigger: Mapped[str] = mapped_column(String(32))  # schedule | manual | cli | flow | test
    actor: Mapped[str | None] = mapped_column(String(128))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))


class DriftCheck(Base):
    """One batch drift check against a model's reference (xray_core.monitor.drift): an ingested source,
    a predict batch or a scheduled monitor run. ``result`` holds every test's statistic and p-value."""

    __tablename__ = "drift_checks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # ingest | predict | monitor
    subject: Mapped[str] = mapped_column(Text)  # what was checked: a source path, a predict folder, a site
    n_images: Mapped[int] = mapped_column(Integer)
    ood_flagged: Mapped[int] = mapped_column(Integer)
    drift: Mapped[bool] = mapped_column(Boolean)
    verdict: Mapped[str] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))


class IncomingBatch(Base):
    """A batch folder of ``XRAY_INCOMING`` that a retrain took (migration 0006b), by name and content
    digest (:mod:`xray_core.data.incoming`): each arrival is ingested once, and a later change to the
    folder (another digest) is a new arrival. Batches waiting or refused are not recorded: they are
    looked at again by every run."""

    __tablename__ = "incoming_batches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)  # the batch folder's name under XRAY_INCOMING (printable)
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of each file's path, size and mtime
    folder: Mapped[str] = mapped_column(Text)  # the incoming folder it was taken from
    layout: Mapped[str] = mapped_column(String(16))  # folders | manifest
    taken_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    files: Mapped[int] = mapped_column(Integer)  # files the digest covers
    added: Mapped[int] = mapped_column(Integer)
    duplicates: Mapped[int] = mapped_column(Integer)
    quarantined: Mapped[int] = mapped_column(Integer)
    site: Mapped[str | None] = mapped_column(String(64))  # from batch.toml, when it names one
    source_id: Mapped[int | None] = mapped_column(ForeignKey("sources.id"))  # the ingest that took it
    note: Mapped[str] = mapped_column(Text, default="")  # e.g. the side files left alone
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (Index("uq_incoming_batches_name_digest", "name", "digest", unique=True),)


class SequesterAudit(Base):
    """One audit of the champion against the locked reference on the sequestered patients (migration
    0008; ``xray audit``, ``audit/monthly``). ``result`` holds both models' metrics and the paired
    comparison; ``degraded``: the champion fell below the reference by more than XRAY_REFERENCE_MARGIN."""

    __tablename__ = "sequester_audits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    champion: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    reference: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    test_set_fingerprint: Mapped[str] = mapped_column(String(64))  # of the sequestered films scored
    n_images: Mapped[int] = mapped_column(Integer)
    degraded: Mapped[bool] = mapped_column(Boolean)
    verdict: Mapped[str] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    trigger: Mapped[str] = mapped_column(String(32))  # cli | schedule | manual | test
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
