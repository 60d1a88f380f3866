"""The retraining recipe as plain steps: data → embed → train → evaluate both → decide → promote.

Each step takes settings and small values and returns a small JSON-able dict, so the Prefect flow
(``flows/retrain.py``) can call them as thin tasks and ``xray train`` can call them without Prefect.
Features come from the cache; nothing here holds images in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from db import session_scope
from sqlalchemy import select

from db.schema import Evaluation
from xray_core.catalogue import open_catalogue, split_image_rows
from xray_core.faults import crash_point
from xray_core.errors import CheckpointError, NotEnoughDataError, RetrainBusyError
from xray_core.settings import Settings

Row = tuple[int, str, str, str, str]  # image id, sha256, stored path, label, patient id
EmbedProgress = Callable[[int, int], None]


# --------------------------------------------------------------------------- one retrain at a time


@contextlib.contextmanager
def retrain_lock(settings: Settings, *, wait_seconds: float = 0.0) -> Iterator[None]:
    """An exclusive lock on ``XRAY_HOME/retrain.lock`` held for a whole retrain.

    A second retrain (flow, ad-hoc run or CLI, any process) waits up to ``wait_seconds`` and then
    fails with :class:`RetrainBusyError`, so two retrains never interleave. The OS releases the lock
    when the holder dies, so a crashed run never blocks the next one.
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / "retrain.lock"
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    raise RetrainBusyError(
                        f"another retrain is running ({holder}); wait for it to finish, or retry later") from None
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SplitData:
    labels: list[str]  # class order of the model to train: sorted labels present in train
    train: list[Row]
    val: list[Row]
    test: list[Row]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name in ("train", "val", "test"):
            rows = getattr(self, name)
            out[name] = {label: sum(1 for r in rows if r[3] == label) for label in self.labels}
        return out


def load_split_data(settings: Settings) -> SplitData:
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        train, val, test = (split_image_rows(s, name) for name in ("train", "val", "test"))
    labels = sorted({r[3] for r in train})
    if len(labels) < 2:
        raise NotEnoughDataError(
            f"training needs images of at least 2 labels in the train split; found {labels or 'none'}. "
            "Ingest more data (xray ingest PATH)")
    return SplitData(labels, train, [r for r in val if r[3] in labels], [r for r in test if r[3] in labels])


def set_fingerprint(rows: list[Row], *, role: str) -> str:
    """sha256 over the sorted (sha256, label) pairs: identifies an exact image set and its labels."""
    h = hashlib.sha256(role.encode())
    for sha, label in sorted((r[1], r[3]) for r in rows):
        h.update(f"{sha}:{label}\n".encode())
    return h.hexdigest()


def training_set_fingerprint(data: SplitData) -> str:
    return hashlib.sha256((set_fingerprint(data.train, role="train")
                           + set_fingerprint(data.val, role="val")).encode()).hexdigest()


def test_set_fingerprint(rows: list[Row]) -> str:
    return set_fingerprint(rows, role="test")


test_set_fingerprint.__test__ = False  # not a test: pytest would collect it wherever it is imported


def _items(settings: Settings, rows: list[Row]) -> list:
    from xray_core.features import EmbedItem

    return [EmbedItem(sha256=r[1], path=settings.home / r[2], key=r[2]) for r in rows]


def train_views(settings: Settings) -> list[int]:
    """Training samples the augmented views 1..K; with K = 0 it trains on the eval view."""
    return list(range(1, settings.views + 1)) or [0]


# --------------------------------------------------------------------------- steps


def embed_step(settings: Settings, data: SplitData, progress: EmbedProgress | None = None) -> dict[str, Any]:
    """Embed every missing (image, view) pair the next training and evaluation need."""
    from xray_core.backbone import load_backbone
    from xray_core.features import FeatureCache

    backbone = load_backbone(settings)
    cache = FeatureCache(backbone, settings)
    total = len(data.train) + len(data.val) + len(data.test)

    def _progress(offset: int) -> EmbedProgress | None:
        if progress is None:
            return None
        return lambda done, _n: progress(offset + done, total)

    stats_train = cache.ensure(_items(settings, data.train), train_views(settings), progress=_progress(0))
    stats_eval = cache.ensure(_items(settings, data.val + data.test), [0], progress=_progress(len(data.train)))
    merged = {k: getattr(stats_train, k) + getattr(stats_eval, k)
              for k in ("requested", "cached", "computed", "recomputed_corrupt", "images")}
    merged["seconds"] = round(stats_train.seconds + stats_eval.seconds, 3)
    merged["backbone_fingerprint"] = backbone.fingerprint
    merged["backbone_random_init"] = backbone.random_init
    merged["backbone_calls"] = backbone.calls
    return merged


def shard_of(sha256: str, shards: int) -> int:
    """The shard an image belongs to: stable, and independent of the image's position in the split."""
    return int(sha256[:8], 16) % shards


def embed_shard(settings: Settings, data: SplitData, shard: int, shards: int, *,
                threads: int | None = None) -> dict[str, Any]:
    """:func:`embed_step` for the images of one shard (for fan-out over Dask workers).

    Features do not depend on how images are batched (see ``Backbone.embed``), so any sharding
    caches byte-identical files to the single-process path.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)  # n workers on one host share its cores
    pick = lambda rows: [r for r in rows if shard_of(r[1], shards) == shard]  # noqa: E731
    stats = embed_step(settings, SplitData(data.labels, pick(data.train), pick(data.val), pick(data.test)))
    return {**stats, "shard": shard, "torch_threads": torch.get_num_threads()}


def merge_embed_stats(parts: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One embed summary from the shards' (wall time measured by the caller)."""
    merged = {k: sum(p[k] for p in parts) for k in ("requested", "cached", "computed", "recomputed_corrupt", "images")}
    first = parts[0]
    return {**merged, "seconds": round(seconds, 3), "backbone_fingerprint": first["backbone_fingerprint"],
            "backbone_random_init": first["backbone_random_init"], "backbone_calls": sum(p["backbone_calls"] for p in parts),
            "shards": len(parts), "shard_seconds": [p["seconds"] for p in parts],
            "threads": [p.get("torch_threads") for p in parts]}


def _features(settings: Settings, rows: list[Row], views: list[int] | None = None) -> np.ndarray:
    from xray_core.backbone import load_backbone
    from xray_core.features import FeatureCache

    cache = FeatureCache(load_backbone(settings), settings)
    shas = [r[1] for r in rows]
    if views is None:
        return cache.load(shas, 0)
    return cache.load_views(shas, views)


def _y(rows: list[Row], labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[r[3]] for r in rows], dtype=np.int64)


def train_step(settings: Settings, data: SplitData, *, flow_run_id: str | None = None,
               progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train a challenger head on cached features, pick its operating point, save and smoke-test it."""
    from xray_core.backbone import FEATURE_DIM, load_backbone
    from xray_core.metrics import choose_threshold, compute_metrics, positive_index
    from xray_core.preprocess import spec_dict
    from xray_core.registry import load_model, save_model
    from xray_core.train import HeadConfig, load_head, predict_proba, train_head

    labels = data.labels
    backbone = load_backbone(settings)
    config = HeadConfig.from_settings(settings)
    x_train = _features(settings, data.train, train_views(settings))
    x_val = _features(settings, data.val)
    y_train, y_val = _y(data.train, labels), _y(data.val, labels)
    result = train_head(x_train, y_train, x_val, y_val, len(labels), config, progress=progress)
    head = load_head(result.state_dict, FEATURE_DIM, len(labels), hidden=config.hidden, dropout=config.dropout)
    val_probs = predict_proba(head, x_val)
    pos = positive_index(labels, settings.negative_label) if len(labels) == 2 else None
    threshold = None
    if pos is not None:
        threshold = choose_threshold((y_val == pos).astype(np.int64), val_probs[:, pos])
    val_metrics = compute_metrics(y_val, val_probs, labels, threshold=threshold,
                                  negative_label=settings.negative_label,
                                  target_specificity=settings.target_specificity)
    card = {
        "labels": labels, "threshold": threshold, "input_size": settings.input_size,
        "normalisation": spec_dict(settings).get("normalisation", {}),
        "preprocessing": spec_dict(settings),
        "backbone_fingerprint": backbone.fingerprint, "backbone_weights": settings.backbone_weights,
        "backbone_random_init": backbone.random_init,
        "head": {"in_dim": FEATURE_DIM, "hidden": list(config.hidden), "dropout": config.dropout},
        "training": {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                     "history": result.history, "train_views": train_views(settings),
                     "n_train": len(data.train), "n_val": len(data.val)},
        "training_set_fingerprint": training_set_fingerprint(data),
        "settings": settings.public_dict(), "val_metrics": val_metrics,
    }
    version = save_model(settings, state_dict=result.state_dict, card=card,
                         train_image_ids=[r[0] for r in data.train], val_image_ids=[r[0] for r in data.val],
                         flow_run_id=flow_run_id)
    # Smoke test: the checkpoint reloaded from disk (sha256-verified) reproduces in-memory predictions.
    reloaded = load_model(settings, version, backbone_fingerprint=backbone.fingerprint)
    x_check = _features(settings, data.test) if data.test else x_val
    same = np.array_equal(predict_proba(head, x_check), predict_proba(reloaded.head, x_check))
    if not same:
        raise CheckpointError(f"model {version}: the reloaded checkpoint does not reproduce its predictions")
    return {"version": version, "labels": labels, "threshold": threshold, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "val_metrics": _headline(val_metrics),
            "smoke_test": "passed: reloaded checkpoint (sha256 verified) reproduces in-memory predictions",
            "training_set_fingerprint": card["training_set_fingerprint"],
            "backbone_fingerprint": backbone.fingerprint, "backbone_random_init": backbone.random_init}


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_auroc")}


def _model_test_probs(settings: Settings, version: int, rows: list[Row]) -> tuple[np.ndarray, Any]:
    """Test-set probabilities of a registered model, with the backbone it was trained on.

    A champion from an older backbone (other weights or preprocessing) gets its test features
    computed with its own backbone, rebuilt from the settings on its card.
    """
    from xray_core.backbone import load_backbone
    from xray_core.features import FeatureCache
    from xray_core.registry import load_model
    from xray_core.train import predict_proba

    current = load_backbone(settings)
    model = load_model(settings, version)
    if model.card["backbone_fingerprint"] == current.fingerprint:
        backbone, own = current, settings
    else:
        own = _settings_for_card(settings, model.card)
        backbone = load_backbone(own)
        if backbone.fingerprint != model.card["backbone_fingerprint"]:
            raise CheckpointError(
                f"model {version} needs backbone {model.card['backbone_fingerprint'][:12]}… "
                f"({model.card['backbone_weights']}), which can no longer be rebuilt here")
    cache = FeatureCache(backbone, own)
    cache.ensure(_items(own, rows), [0])
    x = cache.load([r[1] for r in rows], 0)
    return predict_proba(model.head, x), model


def _settings_for_card(settings: Settings, card: dict[str, Any]) -> Settings:
    saved = card.get("settings", {})
    keys = ("backbone_weights", "backbone_seed", "input_size", "aug_rotation", "aug_hflip")
    changes = {k: saved[k] for k in keys if k in saved}
    if "aug_crop_scale" in saved:
        changes["aug_crop_scale"] = tuple(saved["aug_crop_scale"])
    return settings.with_overrides(**changes)


def evaluate_step(settings: Settings, version: int, data: SplitData, *,
                  flow_run_id: str | None = None) -> dict[str, Any]:
    """Score one version on the current test split; store an evaluation row; return its metrics."""
    from xray_core.metrics import bootstrap_intervals, compute_metrics

    if not data.test:
        raise NotEnoughDataError("the test split is empty: ingest more patients before evaluating")
    probs, model = _model_test_probs(settings, version, data.test)
    labels = model.labels
    rows = [r for r in data.test if r[3] in labels]
    keep = np.array([r[3] in labels for r in data.test])
    probs = probs[keep]
    y = _y(rows, labels)
    patients = np.array([r[4] for r in rows])
    metrics = compute_metrics(y, probs, labels, threshold=model.threshold, negative_label=settings.negative_label,
                              target_specificity=settings.target_specificity)
    metrics["intervals"] = bootstrap_intervals(
        y, probs, labels, patients, threshold=model.threshold, negative_label=settings.negative_label,
        n_samples=settings.bootstrap_samples, seed=settings.bootstrap_seed,
        target_specificity=settings.target_specificity)
    metrics["bootstrap"] = {"samples": settings.bootstrap_samples, "seed": settings.bootstrap_seed,
                            "clustered_by": "patient", "patients": int(len(set(patients)))}
    fingerprint = test_set_fingerprint(data.test)
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        s.add(Evaluation(model_id=version, test_set_fingerprint=fingerprint,
                         backbone_fingerprint=model.card["backbone_fingerprint"], n_images=len(rows),
                         metrics=metrics, flow_run_id=flow_run_id))
        from db.schema import Model

        row = s.get(Model, version)
        if row is not None and not row.metrics.get("test"):
            row.metrics = {**row.metrics, **{k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_auroc")},
                           "intervals": metrics["intervals"], "test": True}
    return {"version": version, "test_set_fingerprint": fingerprint, "n_images": len(rows), "metrics": metrics}


def current_champion(settings: Settings) -> int | None:
    from xray_core.registry import champion_version

    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        return champion_version(s)


# Settings that change what training produces from the same features.
TRAINING_SETTINGS = ("head_hidden", "head_dropout", "epochs", "batch_size", "learning_rate", "weight_decay",
                     "patience", "train_seed", "views", "negative_label")


def nothing_new_since_champion(settings: Settings, data: SplitData) -> str | None:
    """Why retraining would only reproduce the champion, or None when there is something new.

    Training is deterministic, so with the champion's exact training and validation images, backbone
    and training settings a new run would train the same weights again (and, being non-inferior to
    itself, replace the champion with a copy every night). The scheduled run skips instead.
    """
    from db.schema import Model
    from xray_core.backbone import load_backbone

    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        champion = s.scalar(select(Model).where(Model.status == "champion"))
        if champion is None:
            return None
        version, trained_on = champion.id, champion.training_set_fingerprint
        backbone, config = champion.backbone_fingerprint, dict(champion.config)
    if trained_on != training_set_fingerprint(data) or backbone != load_backbone(settings).fingerprint:
        return None
    now = settings.public_dict()
    changed = [k for k in TRAINING_SETTINGS if config.get(k) != now.get(k)]
    if changed:
        return None
    return (f"nothing new since champion v{version}: the same training and validation images, backbone and "
            "training settings would train the same weights again; retrain with force=True (CLI --force) to "
            "run anyway")


def decide_step(settings: Settings, challenger: dict[str, Any], champion: dict[str, Any] | None,
                data: SplitData) -> dict[str, Any]:
    """Apply the promotion policy to two evaluations on the identical test set."""
    from xray_core.metrics import paired_bootstrap_difference
    from xray_core.promotion import PolicyConfig, decide

    config = PolicyConfig.from_settings(settings)
    comparison = None
    if champion is not None:
        if champion["test_set_fingerprint"] != challenger["test_set_fingerprint"]:
            raise CheckpointError("champion and challenger were scored on different test sets")
        if champion["metrics"]["labels"] != challenger["metrics"]["labels"]:
            return {"decision": "keep", "promote": False, "checks": [],
                    "rationale": (f"The challenger's labels {challenger['metrics']['labels']} differ from the "
                                  f"champion's {champion['metrics']['labels']}: the two cannot be compared "
                                  "automatically. Keep; promote by hand (xray promote) after review.")}
        p_new, _ = _model_test_probs(settings, challenger["version"], data.test)
        p_old, _ = _model_test_probs(settings, champion["version"], data.test)
        labels = challenger["metrics"]["labels"]
        rows = [r for r in data.test if r[3] in labels]
        keep = np.array([r[3] in labels for r in data.test])
        comparison = paired_bootstrap_difference(
            _y(rows, labels), p_new[keep], p_old[keep], labels, np.array([r[4] for r in rows]),
            metric=settings.promotion_metric,
            thresholds=(challenger["metrics"].get("threshold"), champion["metrics"].get("threshold")),
            negative_label=settings.negative_label, n_samples=settings.bootstrap_samples,
            seed=settings.bootstrap_seed, target_specificity=settings.target_specificity)
    decision = decide(challenger["metrics"], champion["metrics"] if champion else None, comparison, config)
    out = decision.as_dict()
    out["comparison"] = comparison
    return out


def promote_step(settings: Settings, *, challenger: int, decision: dict[str, Any], trigger: str,
                 champion_eval: dict[str, Any] | None, challenger_eval: dict[str, Any],
                 flow_run_id: str | None = None) -> dict[str, Any]:
    """Record the decision; on promote, re-verify the checkpoint and switch the champion atomically."""
    from xray_core.registry import load_model, record_decision

    if decision["promote"]:
        load_model(settings, challenger)  # sha256 re-verified just before the switch
    metrics = {"challenger": _summary_metrics(challenger_eval),
               "champion": _summary_metrics(champion_eval) if champion_eval else None,
               "comparison": decision.get("comparison"), "checks": decision.get("checks")}
    return record_decision(settings, challenger=challenger, decision=decision["decision"],
                           rationale=decision["rationale"], metrics=json.loads(json.dumps(metrics, default=str)),
                           trigger=trigger, flow_run_id=flow_run_id, promote=bool(decision["promote"]))


def _summary_metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
    m = evaluation["metrics"]
    keys = ("accuracy", "balanced_accuracy", "macro_auroc", "brier", "ece")
    return {"version": evaluation["version"], "test_set_fingerprint": evaluation["test_set_fingerprint"],
            **{k: {"point": m.get(k), "low": m["intervals"].get(k, {}).get("low"),
                   "high": m["intervals"].get(k, {}).get("high")} for k in keys},
            "per_class": m.get("per_class")}


def run_train(settings: Settings, *, progress: EmbedProgress | None = None) -> dict[str, Any]:
    """``xray train``: embed what is missing, train a challenger, evaluate it on the test split."""
    with retrain_lock(settings):
        data = load_split_data(settings)
        embed = embed_step(settings, data, progress)
        trained = train_step(settings, data)
        evaluation = evaluate_step(settings, trained["version"], data)
    return {"data": data.counts(), "embed": embed, "train": trained,
            "test": {k: evaluation[k] for k in ("test_set_fingerprint", "n_images")}
            | {"metrics": _summary_metrics(evaluation)}}


def write_json(path: Path, payload: Any) -> None:
    from xray_core.fsutil import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=2, default=str).encode())


def save_snapshot(path: Path, data: SplitData) -> Path:
    """Freeze the split a run works on, so every step (and the report) sees the same images even
    while another process ingests more."""
    write_json(path, {"labels": data.labels, "train": data.train, "val": data.val, "test": data.test})
    return path


def load_snapshot(path: Path) -> SplitData:
    raw = json.loads(Path(path).read_text())
    return SplitData(raw["labels"], *([tuple(r) for r in raw[k]] for k in ("train", "val", "test")))


def run_cycle(settings: Settings, *, sources: list[str] | tuple[str, ...] = (),
              manifests: list[str] | tuple[str, ...] = (), trigger: str = "cli",
              wait_seconds: float = 0.0, force: bool = False) -> dict[str, Any]:
    """One whole retrain without Prefect (``xray retrain --local``, crash tests): the flow's recipe.

    The Prefect flow (``flows/retrain.py``) runs the same steps as tasks, with artifacts.
    """
    from xray_core.ingest import ingest_source
    from xray_core.registry import record_decision

    with retrain_lock(settings, wait_seconds=wait_seconds):
        result: dict[str, Any] = {"trigger": trigger, "ingests": []}
        version = None
        try:
            for src in sources:
                result["ingests"].append(ingest_source(Path(src), settings=settings).as_dict())
            for manifest in manifests:
                result["ingests"].append(
                    ingest_source(Path(manifest).parent, manifest=Path(manifest), settings=settings).as_dict())
            data = load_split_data(settings)
            skip = None if force else nothing_new_since_champion(settings, data)
            if skip:
                return {**result, "status": "skipped", "summary": skip, "champion_after": current_champion(settings)}
            result["embed"] = embed_step(settings, data)
            trained = train_step(settings, data)
            version = result["version"] = trained["version"]
            crash_point("retrain.after_train")
            challenger = evaluate_step(settings, version, data)
            crash_point("retrain.after_evaluate")
            champion_version = current_champion(settings)
            champion = evaluate_step(settings, champion_version, data) if champion_version else None
            decision = decide_step(settings, challenger, champion, data)
            audit = promote_step(settings, challenger=version, decision=decision, trigger=trigger,
                                 champion_eval=champion, challenger_eval=challenger)
        except Exception as exc:
            record_decision(settings, challenger=version, decision="failed", trigger=trigger, metrics={},
                            rationale=f"run failed before a decision; champion unchanged. {type(exc).__name__}: {exc}")
            raise
        result.update(status="completed", decision={k: decision[k] for k in ("decision", "promote", "rationale")},
                      champion_after=audit["champion_after"],
                      challenger=_summary_metrics(challenger), champion=_summary_metrics(champion) if champion else None)
        return result
