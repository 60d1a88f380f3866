"""Model registry: checkpoints on disk, versions in the catalogue, the champion pointer, the audit trail.

Atomicity, in order:
1. ``head.safetensors`` and ``card.json`` are written atomically into ``models/.staging/<uuid>/``
   and read back and hashed (verified) there;
2. one transaction inserts the version row, renames the folder to ``models/<version>/`` and commits.
   A crash before the commit leaves at most an unnamed folder (moved aside next time), never a row
   naming missing files. On an object store (XRAY_STORAGE_URL=s3://...) the "rename" is a copy
   verified byte for byte, then a delete of the staging copy, still before the commit;
3. switching the champion (retire old + crown new) and its audit row commit in one transaction; the
   database's partial unique index makes two champions impossible even for racing processes.
Every load hashes the bytes it reads against the sha256 stored in the catalogue and parses those same
bytes (no second read). Nothing is unpickled. Files go through :mod:`xray_core.io.storage`.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors.torch import load, save
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import session_scope
from db.schema import Model, Promotion
from xray_core.data.catalogue import open_catalogue
from xray_core.data.labels import is_safe_label
from xray_core.errors import CheckpointError, UsageError
from xray_core.faults import crash_point
from xray_core.io.fsutil import json_text, sha256_bytes
from xray_core.io.storage import Storage, get_storage
from xray_core.model.train import load_head
from xray_core.registry.manifests import put_split_manifest
from xray_core.settings import Settings

CARD_SCHEMA_VERSION = 1
CODE_VERSION = "0.1.0"


@dataclass
class LoadedModel:
    version: int
    head: torch.nn.Module
    card: dict[str, Any]
    # Extra files named in card["files"] (e.g. reference.safetensors), sha256-verified, as bytes.
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.card["labels"])

    @property
    def threshold(self) -> float | None:
        return self.card.get("threshold")


def _number(value: Any) -> bool:
    """A finite int or float; bool is not a number here (JSON true would pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_card(card: Any) -> dict[str, Any]:
    """Check a model card's shape before trusting it (a schema in code: no extra dependency).

    Every field a loader or report reads is checked for its type and range, so a hand-edited or
    foreign card fails here with CheckpointError naming the field, never later with a KeyError.
    """
    required = {"schema": int, "labels": list, "input_size": int, "normalisation": dict,
                "backbone_fingerprint": str, "backbone_weights": str, "head": dict,
                "training_set_fingerprint": str}
    if not isinstance(card, dict):
        raise CheckpointError("card.json is not a JSON object")
    for key, typ in required.items():
        value = card.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise CheckpointError(f"card.json: field {key!r} missing or not a {typ.__name__}")
    if card["schema"] != CARD_SCHEMA_VERSION:
        raise CheckpointError(f"card.json schema {card['schema']} is not supported (expected "
                              f"{CARD_SCHEMA_VERSION})")
    labels = card["labels"]
    if len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise CheckpointError("card.json: labels must be a list of at least two names")
    if len(set(labels)) != len(labels) or not all(is_safe_label(x) for x in labels):
        raise CheckpointError("card.json: labels must be distinct names of 1-64 characters a-z, "
                              "0-9, '_' or '-'")
    threshold = card.get("threshold")
    if threshold is not None and not (_number(threshold) and 0.0 <= threshold <= 1.0):
        raise CheckpointError("card.json: threshold must be null or a number between 0 and 1")
    if not _positive_int(card["input_size"]):
        raise CheckpointError("card.json: input_size must be a positive integer (pixels)")
    head = card["head"]
    if not (_positive_int(head.get("in_dim")) and isinstance(head.get("hidden"), list)
            and all(_positive_int(h) for h in head["hidden"])
            and _number(head.get("dropout")) and 0.0 <= head["dropout"] < 1.0):
        raise CheckpointError("card.json: head must hold in_dim (a positive integer), hidden (a list of "
                              "positive integers) and dropout (a number in [0, 1))")
    # Optional (cards before the head carried its standardisation and temperature lack them).
    if "temperature" in head and not (_number(head["temperature"]) and head["temperature"] > 0):
        raise CheckpointError("card.json: head.temperature must be a positive number")
    for key in ("calibration", "training"):
        if key in card and not isinstance(card[key], dict):
            raise CheckpointError(f"card.json: {key} must be an object")
    files = card.get("files", {})
    if not (isinstance(files, dict) and all(
            isinstance(n, str) and re.fullmatch(r"[a-z0-9_]+\.safetensors", n) and n != "head.safetensors"
            and isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for n, h in files.items())):
        raise CheckpointError("card.json: files must map extra file names (a-z, 0-9, '_', ending "
                              ".safetensors) to their sha256 (64 hex digits)")
    recipe = card.get("training", {}).get("recipe")
    if recipe is not None and not (isinstance(recipe, dict) and isinstance(recipe.get("name"), str)
                                   and isinstance(recipe.get("reason"), str)):
        raise CheckpointError("card.json: training.recipe must be an object with a name and a reason")
    return card


def save_model(settings: Settings, *, state_dict: dict[str, torch.Tensor], card: dict[str, Any],
               train_image_ids: list[int], val_image_ids: list[int], flow_run_id: str | None = None,
               extra_files: dict[str, bytes] | None = None) -> int:
    """Write and verify the checkpoint, then register it as a candidate version. Returns the version.

    ``extra_files`` (name -> bytes, e.g. ``reference.safetensors``) are written beside the head; each
    one's sha256 goes into ``card["files"]``, so the card's own sha256 in the catalogue covers them.
    """
    extra = dict(extra_files or {})
    card = {**card, "files": {name: sha256_bytes(data) for name, data in extra.items()}} if extra else card
    card = validate_card({"schema": CARD_SCHEMA_VERSION, "code_version": CODE_VERSION, **card})
    store = get_storage(settings, "models")
    staging = f".staging/{uuid.uuid4().hex}"
    head_bytes = checkpoint_bytes(state_dict)
    card_bytes = json_text(card, indent=2, sort_keys=True, default=str).encode()
    try:
        for name, data in extra.items():
            store.write_bytes(f"{staging}/{name}", data)
            if sha256_bytes(store.read_bytes(f"{staging}/{name}")) != card["files"][name]:
                raise CheckpointError(f"{name} read back differently from what was written")
        store.write_bytes(f"{staging}/head.safetensors", head_bytes)
        store.write_bytes(f"{staging}/card.json", card_bytes)
        head_read = store.read_bytes(f"{staging}/head.safetensors")
        head_sha, card_sha = sha256_bytes(head_read), sha256_bytes(store.read_bytes(f"{staging}/card.json"))
        load(head_read)  # verify it parses before anything names it
    except Exception:
        # E.g. StorageFullError: no half-staged folder stays behind (a crash still may leave one;
        # remove_staging_leftovers clears those). Nothing names it yet, so removing it is safe.
        store.delete_prefix(staging)
        raise
    crash_point("registry.staged")
    engine = open_catalogue(settings)
    renamed: str | None = None
    try:
        with session_scope(engine) as s:
            model = Model(status="candidate", checkpoint_dir="",
                          checkpoint_sha256=head_sha, card_sha256=card_sha,
                          backbone_fingerprint=card["backbone_fingerprint"],
                          backbone_weights=card["backbone_weights"],
                          training_set_fingerprint=card["training_set_fingerprint"], labels=card["labels"],
                          threshold=card.get("threshold"), config=card.get("settings", {}),
                          metrics=card.get("metrics", {}), flow_run_id=flow_run_id)
            s.add(model)
            s.flush()
            final = str(model.id)
            if store.has_prefix(final):  # left by a SIGKILL between rename and commit (SQLite reuses the id)
                _move_aside(store, final)
            store.rename_prefix(staging, final)  # local: one rename + folder fsync
            renamed = final
            crash_point("registry.renamed_before_commit")
            model.checkpoint_dir = f"models/{model.id}"
            # One shared manifest, not a row per image: see xray_core.registry.manifests.
            model.split_manifest = put_split_manifest(s, train_image_ids, val_image_ids)
            crash_point("registry.before_commit")  # the folder renamed, the rows added, not yet committed
            version = model.id
    except BaseException:
        # The transaction rolled back: no row names the folder. Move it aside (never trusted, kept
        # for inspection) so the version number stays free of stray files on every database.
        if renamed is not None and store.has_prefix(renamed):
            _move_aside(store, renamed)
        store.delete_prefix(staging)
        raise
    crash_point("registry.saved")
    return version


def checkpoint_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """``head.safetensors`` as saved (``xray reproduce`` hashes a rebuilt head through this too)."""
    return save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def _move_aside(store: Storage, folder: str) -> None:
    store.rename_prefix(folder, f".orphaned/{folder}-{uuid.uuid4().hex[:8]}")


def require_backbone(card: dict[str, Any], version: int, backbone_fingerprint: str) -> None:
    """CheckpointError unless the model was trained on the backbone with this fingerprint."""
    if card["backbone_fingerprint"] != backbone_fingerprint:
        raise CheckpointError(
            f"model {version} was trained on backbone {card['backbone_fingerprint'][:12]}… but the current "
            f"backbone is {backbone_fingerprint[:12]}… (XRAY_BACKBONE_WEIGHTS / preprocessing / "
            "XRAY_EMBED_PRECISION changed)")


def load_model(settings: Settings, version: int, *, backbone_fingerprint: str | None = None) -> LoadedModel:
    """Load a registered version, verifying both files' sha256 against the catalogue.

    With ``backbone_fingerprint`` given, a model trained on another backbone is refused.
    """
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        model = existing_model(s, version)
        refuse_pruned(model)
        folder = model.checkpoint_dir  # "models/<version>", relative to the storage root
        head_sha, card_sha = model.checkpoint_sha256, model.card_sha256
    store = get_storage(settings)
    blobs: dict[str, bytes] = {}
    for name, expected in (("head.safetensors", head_sha), ("card.json", card_sha)):
        blobs[name] = _read_verified(store, folder, name, expected, version, against="the catalogue's")
    card = validate_card(json.loads(blobs["card.json"]))
    for name, expected in card.get("files", {}).items():  # verified through the card's own sha256
        blobs[name] = _read_verified(store, folder, name, expected, version, against="the card's")
    if backbone_fingerprint is not None:
        require_backbone(card, version, backbone_fingerprint)
    try:
        state = load(blobs["head.safetensors"])  # safetensors: tensors only, never a pickle
    except Exception as exc:  # noqa: BLE001 - SafetensorError: only possible if the catalogue row was altered too
        raise CheckpointError(f"model {version}: head.safetensors is not a readable safetensors file "
                              f"({type(exc).__name__}: {exc})") from None
    head_cfg = card["head"]
    head = load_head(state, int(head_cfg["in_dim"]), len(card["labels"]), hidden=tuple(head_cfg["hidden"]),
                     dropout=float(head_cfg["dropout"]))
    return LoadedModel(version=version, head=head, card=card,
                       files={name: blobs[name] for name in card.get("files", {})})


def _read_verified(store: Storage, folder: str, name: str, expected: str, version: int,
                   *, against: str) -> bytes:
    """A model file's bytes, hashed against the sha256 recorded for it (the caller parses these same
    bytes)."""
    key = f"{folder}/{name}"
    try:
        data = store.read_bytes(key)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"model {version}: {store.url_for(key)} is missing") from None
    actual = sha256_bytes(data)
    if actual != expected:
        raise CheckpointError(f"model {version}: {name} sha256 {actual[:12]}… does not match {against} "
                              f"{expected[:12]}…; the file was altered or corrupted")
    return data


def champion_version(session: Session) -> int | None:
    return session.scalar(select(Model.id).where(Model.status == "champion"))


def existing_model(session: Session, version: int) -> Model:
    """The registry row of ``version``; a UsageError (exit 2) that points at ``xray models`` if none."""
    model = session.get(Model, version)
    if model is None:
        raise UsageError(f"model version {version} does not exist (see xray models)")
    return model


def refuse_pruned(model: Model) -> None:
    """UsageError (exit 2) naming the version as pruned when ``xray gc`` deleted its files."""
    if model.pruned_at is not None:
        raise UsageError(f"model version {model.id} was pruned by xray gc on {model.pruned_at:%Y-%m-%d} (its "
                         "files are deleted; its row and lineage stay: xray models show "
                         f"{model.id}); it cannot be loaded, promoted or used to predict")


# Decisions that close a candidate (status rejected). A blocked or stale one stays a candidate: a person
# may still promote it by hand.
CLOSING_DECISIONS = ("keep", "insufficient_evidence", "reject", "failed", "rejected", "review_expired")
_ANY = object()  # sentinel: record_decision does not check which version is champion beforehand


def record_decision(settings: Settings, *, challenger: int | None, decision: str, rationale: str,
                    metrics: dict[str, Any], trigger: str, actor: str | None = None,
                    flow_run_id: str | None = None, promote: bool = False,
                    raise_unless_champion: Any = _ANY,
                    record_stale_unless_champion: Any = _ANY) -> dict[str, Any]:
    """Record a decision; when ``promote``, switch the champion in the same transaction.

    ``raise_unless_champion`` (a version or None): raise UsageError, writing nothing, unless that is
    still the champion inside this transaction; a caller that chose its target from an earlier read
    (rollback) so never acts on a champion that changed meanwhile. Returns the audit row as a dict.

    ``record_stale_unless_champion`` (a version or None): compare-and-set for an automatic decision.
    The retrain compared the challenger with the champion it read at evaluation time; if someone
    promoted or rolled back since, that comparison says nothing about the new champion. The decision
    is then recorded as ``stale`` (its rationale says what changed) and nothing is promoted, instead
    of silently overriding the manual change and auditing a comparison that never happened.
    """
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        previous = champion_version(s)
        if raise_unless_champion is not _ANY and previous != raise_unless_champion:
            raise UsageError(f"the champion changed meanwhile (now {previous}, expected "
                             f"{raise_unless_champion}); check xray models --history and retry")
        expected = record_stale_unless_champion
        if expected is not _ANY and previous != expected:
            rationale = (f"champion changed from {_v(expected)} to {_v(previous)} since evaluation; "
                         f"nothing promoted (the {decision!r} decision compared v{challenger} with "
                         f"{_v(expected)}). Original rationale: {rationale}")
            decision, promote = "stale", False
        if promote:
            if challenger is None:
                raise UsageError("a promotion needs a version to promote")
            _switch(s, previous, challenger)
            crash_point("registry.switched_before_audit")
        elif challenger is not None and decision in CLOSING_DECISIONS:
            model = s.get(Model, challenger)
            if model is not None and model.status == "candidate":
                model.status = "rejected"
        row = Promotion(from_version=previous, to_version=challenger, decision=decision,
                        champion_after=challenger if promote else previous, rationale=rationale,
                        metrics=metrics, trigger=trigger, actor=actor, flow_run_id=flow_run_id)
        s.add(row)
        s.flush()
        crash_point("registry.decision_before_commit")
        out = promotion_dict(row)
    crash_point("registry.decision_committed")
    return out


def _v(version: int | None) -> str:
    return "no champion" if version is None else f"v{version}"


def _switch(s: Session, previous: int | None, new: int) -> None:
    model = existing_model(s, new)
    refuse_pruned(model)  # in the switch's transaction: gc cannot prune it between a check and this
    if model.status == "champion":
        raise UsageError(f"model version {new} is already the champion")
    if previous is not None:
        retired = s.get(Model, previous)
        assert retired is not None  # the champion this transaction read
        retired.status = "retired"
        s.flush()  # retire first: the unique index allows one champion at a time
    model.status = "champion"
    s.flush()


def promote_manually(settings: Settings, version: int, *, reason: str, trigger: str = "cli",
                     actor: str | None = None, flow_run_id: str | None = None) -> dict[str, Any]:
    """Make ``version`` the champion by hand (after verifying its files), audited with ``reason``."""
    if not reason.strip():
        raise UsageError("a manual promotion needs --reason")
    load_model(settings, version)  # refuses a version whose files are missing or altered
    return record_decision(settings, challenger=version, decision="manual_promote", rationale=reason,
                           metrics={}, trigger=trigger, actor=actor, flow_run_id=flow_run_id, promote=True)


def rollback(settings: Settings, *, reason: str, trigger: str = "cli", actor: str | None = None,
             flow_run_id: str | None = None, to: int | None = None,
             from_champion: int | None = None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return to the champion that the current one replaced, audited with ``reason`` (and ``metrics``).

    The target is the ``from`` of the latest promotion (automatic or manual, not a rollback) that
    made the current version champion, so repeated rollbacks walk back through earlier champions
    (3 -> 2 -> 1) instead of bouncing back to the version just rolled back from (3 -> 2 -> 3).
    ``to``: that version instead (a retrain restoring the locked reference, XRAY_REFERENCE_BREACH=rollback),
    only while ``from_champion`` (when given) is still the champion.
    """
    if not reason.strip():
        raise UsageError("a rollback needs --reason")
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        current = champion_version(s)
        if current is None:
            raise UsageError("there is no champion to roll back from")
        if from_champion is not None and current != from_champion:
            raise UsageError(f"the champion changed meanwhile (now {current}, expected {from_champion})")
        crowned = s.scalars(select(Promotion).where(Promotion.champion_after == current,
                                                    Promotion.to_version == current,
                                                    Promotion.decision.not_in(("rollback", "lock")))
                            .order_by(Promotion.id.desc())).first()
        target = to if to is not None else crowned.from_version if crowned is not None else None
        if target is None or target == current:
            raise UsageError(f"champion {current} has no earlier champion to roll back to")
    load_model(settings, target)
    return record_decision(settings, challenger=target, decision="rollback",
                           rationale=f"rollback from {current} to {target}: {reason}", metrics=metrics or {},
                           trigger=trigger, actor=actor, flow_run_id=flow_run_id, promote=True,
                           raise_unless_champion=current)


def promotion_dict(r: Promotion) -> dict[str, Any]:
    return {"id": r.id, "time": (r.created_at or datetime.now(UTC)).isoformat(),
            "from_version": r.from_version, "to_version": r.to_version, "decision": r.decision,
            "champion_after": r.champion_after, "rationale": r.rationale, "trigger": r.trigger,
            "actor": r.actor, "flow_run_id": r.flow_run_id, "metrics": r.metrics}


def remove_staging_leftovers(settings: Settings) -> int:
    """Delete staging folders left by crashed saves (never referenced by the catalogue)."""
    store = get_storage(settings, "models")
    n = 0
    for child in store.folders(".staging"):
        store.delete_prefix(f".staging/{child}")
        n += 1
    return n
