"""``xray reproduce N``: rebuild model N's head from what the registry recorded, and compare its bytes.

The recorded inputs: the version's split manifest (its training and validation images, by id), the
training-affecting settings it was trained with (``affects="training"`` in :mod:`xray_core.settings`, the
train seed among them, as stored in its catalogue row and card), its backbone (rebuilt from the recorded
weights, preprocessing and precision, and checked by fingerprint) and, on cards written since they were
recorded, the sha256 of the features it was fitted on and the libraries and torch (and since recorded,
BLAS) thread counts it was trained with. The head is refitted by
:func:`~xray_core.pipeline.steps.fit_challenger`, the very function the retrain's train step runs, and
hashed as the registry hashes a checkpoint. Nothing is registered: the catalogue and the models are only
read; missing features of the recorded backbone are embedded into the feature cache (as a retrain would),
and ``out`` receives the rebuilt files.

Refused (:class:`ReproduceRefused`, exit 2) when a recorded input is missing: an unknown version, no
split manifest, images gone from the catalogue, a backbone that cannot be rebuilt here, features that
are neither cached nor embeddable. When the head differs, the result names the recorded inputs that
differ (or says that none does: a determinism bug).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from db import in_blocks, session_scope
from db.schema import Image
from xray_core.data.catalogue import Row, open_catalogue
from xray_core.data.snapshot import SplitData, training_set_fingerprint
from xray_core.errors import UsageError, XrayError
from xray_core.io.fsutil import sha256_bytes
from xray_core.pipeline.features import embed_items, train_views
from xray_core.pipeline.model_settings import settings_for_card
from xray_core.settings import Settings, affecting

TRAINING_SETTINGS = affecting("training")
_TUPLES = ("head_hidden", "head_l2_grid", "aug_crop_scale")  # stored as JSON lists; Settings holds tuples


class ReproduceRefused(UsageError):
    """A recorded input of the model is missing here; the message names it (exit 2)."""


def reproduce(settings: Settings, version: int, *, out: Path | None = None) -> dict[str, Any]:
    """Rebuild ``version``'s head and compare its sha256 with the registry's. ``identical`` in the result
    says whether the bytes match; ``reasons`` says which recorded input differs when they do not."""
    import torch

    from xray_core.model.train import fit_threads
    from xray_core.pipeline.steps import fit_challenger
    from xray_core.registry.versions import checkpoint_bytes

    recorded = _recorded(settings, version)
    card, config = recorded["card"], recorded["config"]
    own, notes = _recorded_settings(settings, config, card)
    own, backbone_fp = _backbone(own, config, card, recorded["backbone_fingerprint"], version)
    data = _split_data(settings, version, recorded)
    result: dict[str, Any] = {
        "version": version, "identical": False, "stored_sha256": recorded["checkpoint_sha256"],
        "rebuilt_sha256": None, "split_manifest": recorded["split_manifest"], "n_train": len(data.train),
        "n_val": len(data.val), "train_seed": own.train_seed, "backbone_fingerprint": backbone_fp,
        "card": "card.json" if card else "none (its files are gone): the catalogue row's record",
        "notes": notes, "reasons": [], "tensors": [], "out": None}
    rebuilt_fp = training_set_fingerprint(data)
    if rebuilt_fp != recorded["training_set_fingerprint"]:
        result["reasons"].append(
            f"training set fingerprint differs: recorded {recorded['training_set_fingerprint'][:12]}…, the "
            f"manifest's images now give {rebuilt_fp[:12]}… (a label or an image changed since); not rebuilt")
        return result
    result["embedded"] = _ensure_features(own, data, version)
    environment = card.get("environment", {}) if card else {}
    # the recorded counts; one a card lacks is left at this machine's default, as such a model was fitted
    counts = [n if isinstance(n := environment.get(k), int) and n > 0 else 0
              for k in ("torch_threads", "blas_threads")]
    with fit_threads(*counts):
        fitted = fit_challenger(own, data)
    state = {k: v.detach().clone() for k, v in fitted.head.state_dict().items()}
    head = checkpoint_bytes(state)
    result["rebuilt_sha256"] = sha256_bytes(head)
    result["identical"] = result["rebuilt_sha256"] == recorded["checkpoint_sha256"]
    if out is not None:
        from xray_core.io.fsutil import atomic_write_bytes, json_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "head.safetensors", head)
        atomic_write_bytes(out / "card.json", json_text(fitted.card, indent=2, sort_keys=True,
                                                          default=str).encode())
        result["out"] = str(out)
    if not result["identical"]:
        result["reasons"] = _why(recorded, fitted.card, result["embedded"], notes, environment, torch)
        result["tensors"] = _tensor_differences(settings, version, state)
    return result


def _recorded(settings: Settings, version: int) -> dict[str, Any]:
    """What the registry recorded of ``version``: its row's facts and, when its files remain, its card
    (verified against the catalogue's sha256)."""
    from xray_core.io.storage import get_storage
    from xray_core.registry.versions import existing_model, validate_card

    with session_scope(open_catalogue(settings)) as s:
        model = existing_model(s, version)  # UsageError (exit 2) for an unknown version
        recorded = {"checkpoint_sha256": model.checkpoint_sha256, "card_sha256": model.card_sha256,
                    "folder": model.checkpoint_dir, "split_manifest": model.split_manifest,
                    "training_set_fingerprint": model.training_set_fingerprint,
                    "backbone_fingerprint": model.backbone_fingerprint, "labels": list(model.labels),
                    "config": dict(model.config or {})}
    if recorded["split_manifest"] is None:
        raise ReproduceRefused(f"model {version} has no recorded split manifest (trained before lineage was "
                               "recorded): its training and validation images are unknown")
    recorded["card"] = None
    try:
        data = get_storage(settings).read_bytes(f"{recorded['folder']}/card.json")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        data = None  # pruned: the catalogue row still records the settings, backbone and hashes
    if data is not None:
        if sha256_bytes(data) != recorded["card_sha256"]:
            raise ReproduceRefused(f"model {version}: card.json does not match the catalogue's sha256 "
                                   "(altered or corrupted); its recorded settings cannot be trusted")
        recorded["card"] = validate_card(json.loads(data))
    return recorded


def _recorded_settings(settings: Settings, config: dict[str, Any],
                       card: dict[str, Any] | None) -> tuple[Settings, list[str]]:
    """The current settings with every training setting as recorded; notes name those not recorded."""
    changes = {k: tuple(v) if k in _TUPLES and isinstance(v, list) else v
               for k, v in config.items() if k in TRAINING_SETTINGS}
    missing = [k for k in TRAINING_SETTINGS if k not in config]
    notes = ([f"not recorded on this model, the current value is used: {', '.join(missing)}"]
             if missing else [])
    return settings.with_overrides(**changes), notes


def _backbone(own: Settings, config: dict[str, Any], card: dict[str, Any] | None, fingerprint: str,
              version: int) -> tuple[Settings, str]:
    """The recorded backbone's settings, checked by fingerprint; refused when it cannot be rebuilt."""
    from xray_core.model.backbone import load_backbone

    precisions = [str(card.get("backbone_precision") or "legacy")] if card else ["fp32", "bf16", "legacy"]
    tried: list[str] = []
    for precision in precisions:
        candidate = settings_for_card(own, {"settings": config, "backbone_precision": precision})
        try:
            now = load_backbone(candidate).fingerprint
        except XrayError as exc:
            raise ReproduceRefused(f"model {version}: its backbone ({config.get('backbone_weights')}) cannot "
                                   f"be loaded here: {exc}") from None
        if now == fingerprint:
            return candidate, now
        tried.append(now[:12])
    raise ReproduceRefused(
        f"model {version}: backbone {fingerprint[:12]}… ({config.get('backbone_weights')}) cannot be rebuilt "
        f"here: its recorded weights, preprocessing and precision give {', '.join(tried)}… (another weights "
        "file, device or library version)")


def _split_data(settings: Settings, version: int, recorded: dict[str, Any]) -> SplitData:
    """The manifest's training and validation rows, in id order as a run reads them."""
    from xray_core.registry.manifests import split_manifest_ids

    with session_scope(open_catalogue(settings)) as s:
        ids = split_manifest_ids(s, recorded["split_manifest"])
        rows: dict[int, Row] = {}
        wanted = sorted(ids["train"] + ids["val"])
        columns = select(Image.id, Image.sha256, Image.stored_path, Image.label, Image.patient_id)
        for block in in_blocks(wanted):
            for r in s.execute(columns.where(Image.id.in_(block))):
                rows[r[0]] = Row._make(r)
    gone = [i for i in wanted if i not in rows]
    if gone:
        raise ReproduceRefused(f"model {version}: {len(gone)} image(s) of its split manifest are no longer "
                               f"in the catalogue (e.g. image {gone[0]})")
    return SplitData(recorded["labels"], [rows[i] for i in ids["train"]], [rows[i] for i in ids["val"]], [])


def _ensure_features(own: Settings, data: SplitData, version: int) -> int:
    """Embed the (image, view) pairs the recorded backbone has not cached; returns how many it embedded."""
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache

    cache = FeatureCache(load_backbone(own), own)
    try:
        stats = [cache.ensure(embed_items(own, data.train), train_views(own)),
                 cache.ensure(embed_items(own, data.val), [0])]
    except (XrayError, OSError) as exc:
        raise ReproduceRefused(f"model {version}: features of its images are not all cached for backbone "
                               f"{cache.backbone.fingerprint[:12]}… and cannot be embedded again: {exc}"
                               ) from None
    return sum(s.computed for s in stats)


def _why(recorded: dict[str, Any], rebuilt: dict[str, Any], embedded: int, notes: list[str],
         environment: dict[str, Any], torch: Any) -> list[str]:
    """The recorded inputs that differ from the rebuild's, most likely first."""
    from xray_core.model.train import training_environment

    card = recorded["card"] or {}
    reasons: list[str] = []
    was = card.get("features_sha256")
    if was is None:
        reasons.append("the features it was fitted on were not recorded (a model older than that record)")
    elif was != rebuilt["features_sha256"]:
        reasons.append("the cached features differ from those it was fitted on"
                       + (f" ({embedded} (image, view) pair(s) were embedded again)" if embedded else
                          " (the cache was rebuilt since)"))
    now = training_environment()
    changed = [f"{k} {environment[k]} -> {now.get(k)}" for k in sorted(environment)
               if k not in ("torch_threads", "blas_threads") and environment[k] != now.get(k)]
    if changed:
        reasons.append(f"the environment differs: {', '.join(changed)}")
    elif not environment:
        reasons.append(f"library versions were not recorded (torch now {torch.__version__})")
    if environment and "blas_threads" not in environment:
        reasons.append(f"its BLAS thread count was not recorded (a card older than that record): rebuilt "
                       f"with this machine's default ({now.get('blas_threads')}); a linear head's bytes can "
                       "depend on it")
    reasons += notes
    if not reasons:
        reasons.append("every recorded input matches: training is not deterministic here (a bug; please "
                       "report it with this output)")
    return reasons


def _tensor_differences(settings: Settings, version: int, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Per tensor of the stored head (when its file remains): the largest absolute difference."""
    from xray_core.registry.versions import load_model

    try:
        stored = load_model(settings, version).head.state_dict()
    except XrayError:
        return []
    out: list[dict[str, Any]] = []
    for name, tensor in state.items():
        old = stored.get(name)
        if old is None or tuple(old.shape) != tuple(tensor.shape):
            out.append({"tensor": name, "max_abs_diff": None})
        elif not bool((old == tensor).all()):
            diff = float(np.max(np.abs(old.double().numpy() - tensor.double().numpy())))
            out.append({"tensor": name, "max_abs_diff": diff})
    return out
