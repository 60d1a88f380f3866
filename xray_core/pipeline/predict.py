"""Batch prediction with a registered model (the champion by default).

Reads a folder (``<root>/<label>/<image>`` or any files below it) or a manifest; labels are optional.
Writes one CSV row per file: sha256, predicted label, per-class probabilities, the threshold used,
the model version and backbone fingerprint. Unreadable files get a row with their rejection reason;
they never stop the batch. Features of images already in the cache are reused, and view 0 of the others
is filed in it, so a film predicted now and ingested labelled later is embedded once. With ``heatmaps`` a
Grad-CAM overlay PNG of the predicted class is written per predicted image (see ``heatmap.py``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from db.urls import sqlite_file
from xray_core.errors import ImageRejected, SourceError, UsageError
from xray_core.io.fsutil import atomic_write_bytes, atomic_write_text, printable, sha256_bytes
from xray_core.monitor.ood import FlagRule
from xray_core.settings import Settings

Progress = Callable[[int, int], None]

# Decoded films waiting for one backbone forward hold at most about this many pixels (128 MB as float32)
# plus the film that crossed it: a batch of 50 MP films is embedded a film or two at a time instead of
# holding a whole forward batch of them. The backbone pads every forward to the batch size, so an early
# flush changes no number.
HELD_PIXELS = 32_000_000


@dataclass
class PredictFile:
    path: Path
    rel: str
    label: str | None
    problem: tuple[str, str] | None = None  # (reason, detail) known before reading: never read then


def list_files(path: Path, manifest: Path | None = None) -> list[PredictFile]:
    """The files to predict: a manifest's rows, a single file, or every non-hidden file below a folder.

    A manifest row that leaves the manifest's folder (``/etc/passwd``, ``../x``) keeps the reason
    :func:`~xray_core.data.scan.scan_manifest` found and is never read: prediction obeys the same
    boundary as ingest. A folder that cannot be listed becomes an ``unreadable_path`` row, so a
    permission problem shows in the CSV instead of silently shrinking the batch.
    """
    from xray_core.data.scan import is_hidden, scan_manifest, validate_manifest, walk_error_problem

    if manifest is not None:
        validate_manifest(manifest)
        return [PredictFile(c.path, c.rel, c.label or None, c.problem) for c in scan_manifest(manifest)]
    if path.is_file():
        return [PredictFile(path, path.name, None)]
    if not path.is_dir():
        raise SourceError(f"{path} is not a file or folder")
    out = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=errors.append, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            if is_hidden(name) or Path(name).suffix.lower() in (".csv", ".md", ".txt", ".json"):
                continue
            p = Path(dirpath) / name
            rel = p.relative_to(path).as_posix()
            parts = rel.split("/")
            # printable(): a non-UTF-8 file name must not break the CSV (it is escaped as \xNN)
            out.append(PredictFile(p, printable(rel), printable(parts[0]) if len(parts) > 1 else None))
    for exc in errors:
        where, problem = walk_error_problem(exc, path)
        out.append(PredictFile(where, printable(_relative(where, path)), None, problem))
    return out


def _relative(where: Path, root: Path) -> str:
    try:
        return where.relative_to(root).as_posix()
    except ValueError:
        return str(where)


def _decoded(files: list[PredictFile],
             settings: Settings) -> Iterator[tuple[PredictFile, str | None, Any, str | None]]:
    from xray_core.data.images import decode_image

    for f in files:
        if f.problem is not None:
            yield f, None, None, f"{f.problem[0]}: {f.problem[1]}"
            continue
        try:
            if f.path.is_symlink() and not f.path.resolve().is_relative_to(f.path.parent.resolve()):
                raise ImageRejected("outside_root", "symbolic link points elsewhere; not followed")
            if not f.path.is_file():  # a FIFO or device would block or never end
                raise ImageRejected("not_an_image", "not a regular file")
            if f.path.stat().st_size > settings.max_file_bytes:
                raise ImageRejected("file_too_large", f"over XRAY_MAX_FILE_BYTES={settings.max_file_bytes}")
            data = f.path.read_bytes()
        except ImageRejected as rej:
            yield f, None, None, f"{rej.reason}: {rej.detail}"
            continue
        except OSError as exc:
            yield f, None, None, f"unreadable_file: {exc.strerror or exc}"
            continue
        sha = sha256_bytes(data)
        try:
            decoded = decode_image(data, min_side=settings.min_image_side, max_pixels=settings.max_pixels)
        except ImageRejected as rej:
            yield f, sha, None, f"{rej.reason}: {rej.detail}"
            continue
        yield f, sha, decoded.pixels, None


HEATMAP_NAME_BYTES = 200  # below the usual 255-byte file-name limit, leaving room for a -<sha> suffix


def heatmap_name(rel: str) -> str:
    """The overlay's file name for an input path: folders joined with ``__``, ending in ``.png``.

    A deep or long path would give a name over the file system's 255-byte limit and lose the whole
    batch (ENAMETOOLONG); such names keep their last characters and a digest of the full path.
    """
    flat = rel.replace("/", "__")
    name = flat if flat.lower().endswith(".png") else flat + ".png"
    if len(name.encode()) <= HEATMAP_NAME_BYTES:
        return name
    digest = sha256_bytes(rel.encode())[:12]
    tail = name.encode()[-(HEATMAP_NAME_BYTES - 20):].decode("utf-8", errors="ignore")
    return f"{digest}-{tail}"


def predict_folder(settings: Settings, path: Path, *, out: Path | None = None, manifest: Path | None = None,
                   version: int | None = None, progress: Progress | None = None,
                   heatmaps: Path | None = None) -> dict[str, Any]:
    """Predict every file; write the CSV to ``out`` (atomically) and return a summary with the rows.

    ``heatmaps``: a folder for one Grad-CAM overlay PNG per predicted image (the predicted class's
    map, with label, probability and model version drawn in); the CSV's ``heatmap`` column names it.
    """
    import torch

    from db import session_scope
    from xray_core.data.catalogue import open_catalogue
    from xray_core.evaluate.metrics import positive_index, predict_labels
    from xray_core.model.backbone import effective_batch_size, load_backbone
    from xray_core.model.features import FeatureCache, FeatureCacheError
    from xray_core.model.preprocess import make_view
    from xray_core.model.train import predict_proba
    from xray_core.monitor.reference import model_reference
    from xray_core.pipeline.model_settings import settings_for_model
    from xray_core.registry.versions import champion_version, load_model, require_backbone

    if out is not None:
        check_out_path(settings, Path(out))
    if version is None:
        with session_scope(open_catalogue(settings)) as s:
            version = champion_version(s)
        if version is None:
            raise UsageError("there is no champion yet; train and promote a model first, or pass --version N")
    model = load_model(settings, version)
    settings = settings_for_model(settings, model.card)  # auto precision: the model's own
    backbone = load_backbone(settings)
    require_backbone(model.card, version, backbone.fingerprint)
    labels, threshold = model.labels, model.threshold
    reference = model_reference(model)  # None for models saved before references: OOD "unknown"
    scored: list[tuple[np.ndarray, np.ndarray]] = []  # (features, probabilities): the batch drift test
    scored_shas: list[str] = []  # their films, in the same order (stored for a later realised value)
    ood_exact: list[float] = []  # unrounded OOD scores of the predicted films (the summary counts from them)
    # films per flush = images per backbone forward (the backbone pads every forward to it)
    flush_size = effective_batch_size(settings)
    pos = positive_index(labels, settings.negative_label) if len(labels) == 2 else None
    cache = FeatureCache(backbone, settings)
    files = list_files(Path(path), manifest)
    rows: list[dict[str, Any]] = []
    batch: list[tuple[PredictFile, str, Any]] = []
    rule = FlagRule.from_settings(settings)  # ood_p <= XRAY_OOD_ALPHA, or XRAY_OOD_QUANTILE when set
    heatmap_names: set[str] = set()

    def write_heatmaps(probs: np.ndarray, preds: np.ndarray, out_of: Any) -> list[str]:
        from xray_core.model.heatmap import gradcam_batch, heatmap_caption, overlay_png

        assert heatmaps is not None  # called only with a heatmaps folder

        cams = gradcam_batch(backbone, model.head, [px for _, _, px in batch],
                             class_indices=[int(k) for k in preds], settings=settings)
        paths = []
        for (f, sha, px), cam, p, k, oo in zip(batch, cams, probs, preds, out_of):
            name = heatmap_name(f.rel)
            if name in heatmap_names:  # e.g. "a/b.png" and "a__b.png": keep both
                name = f"{name[:-4]}-{sha[:8]}.png"
            heatmap_names.add(name)
            target = Path(heatmaps) / name
            caption = heatmap_caption(labels[int(k)], float(p[int(k)]), version)
            caption += " · OUT OF DISTRIBUTION" if oo else ""  # the overlay says it where people look
            atomic_write_bytes(target, overlay_png(px, cam, text=caption), mode=settings.file_mode)
            paths.append(str(target))
        return paths

    cache_fill: dict[str, Any] = {"reused": 0, "filled": 0, "error": None}

    def fill_cache(sha: str, feat: np.ndarray) -> None:
        """File the view 0 just computed, so the film is embedded once even if it is ingested later. A
        features area this user cannot write (a read-only share) costs only that: prediction goes on."""
        if cache_fill["error"] is not None:
            return
        try:
            cache.put(sha, {0: feat})
            cache_fill["filled"] += 1
        except OSError as exc:
            cache_fill["error"] = f"features not cached ({exc.strerror or exc}); prediction is unaffected"

    def flush() -> None:
        if not batch:
            return
        cached = {}
        for _f, sha, _pixels in batch:
            try:
                cached[sha] = cache.load([sha], 0)[0]
            except FeatureCacheError:  # not cached (or unusable): embedded below
                pass
        todo = [(f, sha, px) for f, sha, px in batch if sha not in cached]
        cache_fill["reused"] += len(batch) - len(todo)
        if todo:
            x = torch.stack([make_view(px, 0, sha, settings) for _, sha, px in todo])
            # Rounded through float16 like cached features, so an image gets the same probabilities
            # whether its features came from the cache or were computed just now.
            feats = backbone.embed(x).numpy().astype(np.float16).astype(np.float32)
            for (_, sha, _), feat in zip(todo, feats):
                cached[sha] = feat
                fill_cache(sha, feat)
        feats = np.stack([cached[sha] for _, sha, _ in batch])
        probs = predict_proba(model.head, feats)
        preds = predict_labels(probs, threshold=threshold, positive_index=pos)
        ood: Any = reference.scores(feats) if reference is not None else [None] * len(batch)
        ood_p: Any = reference.p_values(ood) if reference is not None else [None] * len(batch)
        out_of: Any = reference.flags(ood, rule) if reference is not None else [None] * len(batch)
        maps = write_heatmaps(probs, preds, out_of) if heatmaps is not None else [""] * len(batch)
        scored.append((feats, probs))
        scored_shas.extend(sha for _, sha, _ in batch)
        if reference is not None:
            ood_exact.extend(float(o) for o in ood)
        for (f, sha, _), p, k, hm, o, op, oo in zip(batch, probs, preds, maps, ood, ood_p, out_of):
            rows.append({"file": f.rel, "predicted_label": labels[int(k)],
                         **{f"p_{lab}": round(float(v), 6) for lab, v in zip(labels, p)},
                         "threshold": "" if threshold is None else threshold,
                         "ood_score": "" if o is None else round(float(o), 4),
                         "ood_p": "" if op is None else round(float(op), 4),
                         "in_distribution": "" if oo is None else str(not oo).lower(),
                         "sha256": sha, "status": "ok",
                         "error": "", "true_label": f.label or "", "model_version": version,
                         "backbone_fingerprint": backbone.fingerprint, "heatmap": hm})
        batch.clear()

    for i, (f, sha, pixels, error) in enumerate(_decoded(files, settings), start=1):
        if error is not None:
            rows.append({"file": f.rel, "predicted_label": "", **{f"p_{lab}": "" for lab in labels},
                         "threshold": "" if threshold is None else threshold, "ood_score": "", "ood_p": "",
                         "in_distribution": "", "sha256": sha or "", "status": "rejected", "error": error,
                         "true_label": f.label or "",
                         "model_version": version,
                         "backbone_fingerprint": backbone.fingerprint, "heatmap": ""})
        else:
            assert sha is not None  # a decoded file has its sha256
            batch.append((f, sha, pixels))
            if len(batch) >= flush_size or sum(px.size for _, _, px in batch) >= HELD_PIXELS:
                flush()
        if progress:
            progress(i, len(files))
    flush()
    rows.sort(key=lambda r: r["file"])
    # For people first (what was predicted, how sure, against which threshold), provenance last.
    columns = ["file", "predicted_label", *[f"p_{lab}" for lab in labels], "threshold", "ood_score", "ood_p",
               "in_distribution", "sha256", "status",
               "error", "true_label", "model_version", "backbone_fingerprint", "heatmap"]
    if out is not None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_safe(v) for k, v in r.items()})
        atomic_write_text(Path(out), buf.getvalue(), mode=settings.file_mode)
    ok = [r for r in rows if r["status"] == "ok"]
    return {"model_version": version, "labels": labels, "threshold": threshold, "files": len(rows),
            "predicted": len(ok), "rejected": len(rows) - len(ok), "out": str(out) if out else None,
            "heatmaps": str(heatmaps) if heatmaps is not None else None,
            "backbone_fingerprint": backbone.fingerprint, "backbone_random_init": backbone.random_init,
            "feature_cache": {"reused": cache_fill["reused"], "filled": cache_fill["filled"],
                              "note": cache_fill["error"]},
            "ood": ood_summary(ok, reference, ood_exact, rule),
            **batch_checks(settings, model, reference, scored, scored_shas, subject=str(path)), "rows": rows}


def ood_summary(ok_rows: list[dict[str, Any]], reference: Any, scores: list[float],
                rule: FlagRule) -> dict[str, Any]:
    """How many predicted films look unlike the model's training data (flagged by ``rule``), as numbers
    and one sentence; ``scores``: the ok rows' unrounded OOD scores (the CSV rounds them to 4 places)."""
    from xray_core.monitor.ood import ood_line

    if reference is None:
        return {"known": False, "flagged": None, "scored": 0, "threshold": None,
                "line": "out-of-distribution check unknown: this model was saved without a reference"}
    flagged, expected = reference.ood_counts(np.asarray(scores, dtype=np.float64), rule)
    coarse = reference.coarse(rule)
    return {"known": True, "flagged": flagged, "expected": round(expected, 2), "scored": len(ok_rows),
            "rule": rule.describe(), "alpha": rule.alpha, "quantile": rule.quantile,
            "threshold": reference.cut(rule)[0], "calibration_films": len(reference.calibration_scores),
            "coarse": coarse, "line": ood_line(flagged, len(ok_rows), expected, rule, coarse)}


def batch_checks(settings: Settings, model: Any, reference: Any, scored: list[tuple[np.ndarray, np.ndarray]],
                 shas: list[str], *, subject: str) -> dict[str, Any]:
    """``drift`` (the batch tests, or None) and ``performance``: the CBPE estimate of the predicted
    films (:mod:`xray_core.monitor.performance`), the drift check's own when there is one (marked
    unreliable beside a drift warning), else from the probabilities alone (drift untested)."""
    from xray_core.evaluate.metrics import positive_index
    from xray_core.monitor.performance import estimate

    drift = batch_drift(settings, model, reference, scored, shas, subject=subject)
    if drift is not None:
        return {"drift": drift, "performance": drift["performance"]}
    probs = np.concatenate([p for _, p in scored]) if scored else np.zeros((0, len(model.labels)))
    pos = positive_index(model.labels, settings.negative_label) if len(model.labels) == 2 else None
    return {"drift": None, "performance": estimate(probs, threshold=model.threshold, positive=pos)}


def batch_drift(settings: Settings, model: Any, reference: Any, scored: list[tuple[np.ndarray, np.ndarray]],
                shas: list[str], *, subject: str) -> dict[str, Any] | None:
    """The batch drift tests of the predicted films against the model's reference, recorded in the
    catalogue (``drift_checks``, kind ``predict``; with the films' sha256 and probabilities, so a retrain
    that later ingests them labelled sets the realised performance beside the estimate); None without a
    reference or films.

    Each film counts as its own patient: prediction does not know patients."""
    from xray_core.evaluate.metrics import positive_index
    from xray_core.monitor.checks import record_check
    from xray_core.monitor.drift import check_batch
    from xray_core.monitor.performance import film_record

    if reference is None or not scored:
        return None
    feats, probs = np.concatenate([f for f, _ in scored]), np.concatenate([p for _, p in scored])
    labels = model.labels
    pos = positive_index(labels, settings.negative_label) if len(labels) == 2 else None
    check = check_batch(reference, feats, probs, labels=labels, threshold=model.threshold, positive=pos,
                        rule=FlagRule.from_settings(settings),
                        alpha=settings.drift_alpha, permutations=settings.drift_permutations,
                        seed=settings.train_seed)
    films = film_record(shas, probs, labels=labels, threshold=model.threshold, positive=pos)
    check["id"] = record_check(settings, model_id=model.version, kind="predict", subject=subject,
                               check={**check, "films": films})
    return check


def check_out_path(settings: Settings, out: Path) -> None:
    """Refuse an ``--out`` that is not a new path or a regular file, or that is the system's own state.

    The CSV is written to a temp file and renamed over ``out``, which would silently turn a device
    node (``/dev/null`` as root) or a symlink into a regular file and could replace the catalogue or
    a stored original; a folder would fail only after the whole batch was predicted. All of these
    raise UsageError (exit 2) before anything is read.
    """
    allowed = ("give a new file name or an existing regular file outside XRAY_HOME's catalogue, store, "
               "features and models")
    if os.path.lexists(out):
        if out.is_symlink():
            raise UsageError(f"--out {out} is a symbolic link; it would be replaced, not followed. {allowed}")
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; {allowed}")
        if not out.is_file():
            raise UsageError(f"--out {out} is not a regular file (a device, pipe or socket); {allowed}")
    target = out.resolve()
    if not target.parent.is_dir() and target.parent.exists():
        raise UsageError(f"--out {out}: {target.parent} is not a folder; {allowed}")
    protected = [Path(settings.store_dir), Path(settings.features_dir), Path(settings.models_dir),
                 Path(settings.quarantine_dir)]
    database = sqlite_file(settings.database_url)
    for folder in protected:
        if target == folder.resolve() or target.is_relative_to(folder.resolve()):
            raise UsageError(f"--out {out} is inside {folder}, which holds the system's own files; {allowed}")
    if database is not None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            if target == Path(str(database.resolve()) + suffix):
                raise UsageError(f"--out {out} is the catalogue database {database}; {allowed}")


def _csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formulas in text cells (CSV injection): prefix with a quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
