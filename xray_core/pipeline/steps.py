"""The retraining recipe's steps: train → evaluate (both models, same test set) → decide → promote.

Each step takes settings and small values and returns a small JSON-able dict, so any executor (direct
calls, Prefect tasks: see :mod:`xray_core.pipeline.cycle`) can run it. Features come from the cache;
nothing here holds images in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from db import session_scope
from db.schema import Evaluation, Model
from xray_core.data.catalogue import open_catalogue
from xray_core.data.snapshot import (
    Row,
    SplitData,
    fingerprint_test_set,
    label_indices,
    load_split_data,
    training_set_fingerprint,
)
from xray_core.errors import CheckpointError, NotEnoughDataError
from xray_core.evaluate.breach import BreachCheck
from xray_core.io.fsutil import json_text
from xray_core.monitor.reference import REFERENCE_FILE
from xray_core.pipeline.embed import EmbedProgress, embed_step
from xray_core.pipeline.features import embed_items, features_for, features_sha256, train_views
from xray_core.pipeline.guards import (
    apply_guards,
    evaluation_slices,
    flips_step,
    reference_summary,
    subgroup_slices,
)
from xray_core.pipeline.lock import retrain_lock
from xray_core.pipeline.model_settings import settings_for_card
from xray_core.settings import Settings


@dataclass(frozen=True)
class Fitted:
    """A challenger head fitted on cached features, not yet saved: what ``train_step`` registers and
    ``xray reproduce`` (:mod:`xray_core.pipeline.reproduce`) hashes."""

    head: Any  # xray_core.model.train.Head, with its normaliser and temperature
    card: dict[str, Any]  # the model card, without the monitoring reference
    x_train: np.ndarray  # (n, views, D) the training features it was fitted on
    x_val: np.ndarray  # (m, D) the validation films' eval view
    val_probs: np.ndarray  # held-out probabilities of the validation films
    y_val: np.ndarray


def train_step(settings: Settings, data: SplitData, *, flow_run_id: str | None = None,
               progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train a challenger head (:func:`fit_challenger`), save it with its monitoring reference, and
    smoke-test the checkpoint reloaded from disk; all on ``XRAY_TRAIN_THREADS`` torch and BLAS threads (the
    reference's fits are as small as the head's)."""
    from xray_core.model.train import fit_threads

    with fit_threads(settings.train_threads):
        return _train(settings, data, flow_run_id=flow_run_id, progress=progress)


def _train(settings: Settings, data: SplitData, *, flow_run_id: str | None,
           progress: Callable[[int, int, dict[str, float]], None] | None) -> dict[str, Any]:
    from xray_core.model.backbone import load_backbone
    from xray_core.model.train import predict_proba
    from xray_core.registry.versions import load_model, save_model

    backbone = load_backbone(settings)
    fitted = fit_challenger(settings, data, progress=progress)
    head, card = fitted.head, dict(fitted.card)
    reference = build_model_reference(settings, data, head, fitted.x_train, fitted.x_val, fitted.val_probs,
                                      fitted.y_val)
    card["reference"] = reference.describe()
    state_dict = {k: v.detach().clone() for k, v in head.state_dict().items()}
    version = save_model(settings, state_dict=state_dict, card=card,
                         train_image_ids=[r.id for r in data.train], val_image_ids=[r.id for r in data.val],
                         flow_run_id=flow_run_id, extra_files={REFERENCE_FILE: reference.to_bytes()})
    # Smoke test: the checkpoint reloaded from disk (sha256-verified) reproduces in-memory predictions.
    reloaded = load_model(settings, version, backbone_fingerprint=backbone.fingerprint)
    x_check = features_for(settings, data.test, dtype=np.float16) if data.test else fitted.x_val
    same = np.array_equal(predict_proba(head, x_check), predict_proba(reloaded.head, x_check))
    if not same:
        raise CheckpointError(f"model {version}: the reloaded checkpoint does not reproduce its predictions")
    training = card["training"]
    return {"version": version, "labels": card["labels"], "threshold": card["threshold"],
            "best_epoch": training["best_epoch"], "epochs_run": training["epochs_run"],
            "recipe": training["recipe"]["name"], "recipe_reason": training["recipe"]["reason"],
            "temperature": card["head"]["temperature"], "val_metrics": key_metrics(card["val_metrics"]),
            "smoke_test": "passed: reloaded checkpoint (sha256 verified) reproduces in-memory predictions",
            "training_set_fingerprint": card["training_set_fingerprint"],
            "backbone_fingerprint": backbone.fingerprint, "backbone_random_init": backbone.random_init}


def fit_challenger(settings: Settings, data: SplitData, *,
                   progress: Callable[[int, int, dict[str, float]], None] | None = None) -> Fitted:
    """Fit a challenger head on cached features and pick its operating point; nothing is written. Run
    inside :func:`~xray_core.model.train.fit_threads` (``train_step``, ``xray reproduce``): the card
    records the thread count.

    Recipe chosen on held-out patients (:mod:`xray_core.model.recipes`), then refitted and
    calibrated by :func:`~xray_core.model.recipes.fit_calibrated`: on the training split with the
    temperature fitted on validation, or, when validation was too small and the choice ran grouped
    k-fold inside train+val, on train+val with the temperature fitted on the k-fold's out-of-fold
    predictions. The threshold is chosen on the same calibrated held-out probabilities, and the
    card's ``val_metrics`` are computed on them (``val_metrics_on`` says which). The normaliser and
    temperature are part of the head's weights. Deterministic on the CPU: the same rows (in id order),
    features and training settings give the same bytes, which ``xray reproduce`` checks.
    """
    from xray_core.data.subsample import stratified_subsample
    from xray_core.evaluate.metrics import (
        brier_score,
        choose_threshold,
        compute_metrics,
        expected_calibration_error,
        positive_index,
    )
    from xray_core.model.backbone import FEATURE_DIM, load_backbone
    from xray_core.model.calibrate import softmax
    from xray_core.model.preprocess import spec_dict
    from xray_core.model.recipes import candidate_recipes, fit_calibrated, select_recipe
    from xray_core.model.train import HeadConfig, predict_proba, training_environment

    labels = data.labels
    backbone = load_backbone(settings)  # the card's fingerprint; features_for loads the same one
    config = HeadConfig.from_settings(settings)
    # float16 as cached (77,000 films' 5 views: 1.7 GB, not 3.4): every use upcasts exactly (float32 batches,
    # float64 in the linear fit, normaliser and reference), so the numbers are a float32 load's
    x_train = features_for(settings, data.train, train_views(settings), dtype=np.float16)
    x_val = features_for(settings, data.val, dtype=np.float16)
    y_train, y_val = label_indices(data.train, labels), label_indices(data.val, labels)
    if len(x_train) == 0 or len(x_val) == 0:
        raise NotEnoughDataError(f"training needs images in the train and val splits (now {len(x_train)} and "
                                 f"{len(x_val)}): ingest more patients (xray ingest PATH)")
    candidates = candidate_recipes(config, choice=settings.head_recipe, l2_grid=tuple(settings.head_l2_grid))
    # above XRAY_SUBSAMPLE_FILMS training films the recipes are compared on a subsample (stratified by
    # label); the winner is refitted on every film below, and the card says so
    pick = stratified_subsample(y_train.tolist(), settings.subsample_films, seed=settings.train_seed)
    some = slice(None) if pick is None else pick
    train_groups = np.array([r.patient_id for r in data.train], dtype=object)
    selection = select_recipe(
        candidates, x_train[some], y_train[some], train_groups[some],
        x_train[some, 0], x_val, y_val,  # held-out training images in k-fold: their eval view
        np.array([r.patient_id for r in data.val], dtype=object), len(labels), folds=settings.recipe_folds,
        min_val_per_class=settings.recipe_min_val_per_class, seed=settings.train_seed)
    if pick is not None:
        subsample = {"films": int(len(pick)), "of": int(len(y_train)), "stratified_by": "label",
                     "seed": settings.train_seed}
        selection = replace(selection, reason=f"{selection.reason} (compared on {len(pick)} of "
                            f"{len(y_train)} training films, stratified by label; winner refitted on all)")
    fitted = fit_calibrated(selection, x_train, y_train, x_val, y_val, len(labels), progress=progress)
    recipe, head, record, temperature = selection.recipe, fitted.head, fitted.record, fitted.temperature
    # held-out probabilities: validation, or out-of-fold over train+val when the head was refitted on both
    # (on validation through the head itself, exactly as prediction computes them, so a validation
    # image's score and the threshold chosen among those scores compare as they will in use)
    on_val = fitted.calibrated_on == "validation"
    before = softmax(fitted.held_logits)
    held_probs = predict_proba(head, x_val) if on_val else softmax(fitted.held_logits, temperature)
    held_y = fitted.held_y
    held_on = ("validation" if on_val
               else "out-of-fold predictions over train+val (grouped k-fold of the recipe choice)")
    calibration = {"method": f"temperature scaling (scipy.optimize, NLL on {held_on})",
                   "temperature": temperature, "fitted_on": held_on, "n": int(len(held_y)),
                   "ece_before": expected_calibration_error(before, held_y),
                   "ece_after": expected_calibration_error(held_probs, held_y),
                   "brier_before": brier_score(before, held_y),
                   "brier_after": brier_score(held_probs, held_y)}
    pos = positive_index(labels, settings.negative_label) if len(labels) == 2 else None
    threshold = None
    if pos is not None:  # on the calibrated probabilities: the threshold is a probability that means it
        threshold = choose_threshold((held_y == pos).astype(np.int64), held_probs[:, pos],
                                     target_sensitivity=settings.target_sensitivity)
    # the validation images' held-out probabilities (for the monitoring reference): OOF rows come last
    val_probs = held_probs[-len(y_val):] if fitted.fitted_on == "train+val" else held_probs
    val_metrics = compute_metrics(held_y, held_probs, labels, threshold=threshold,
                                  negative_label=settings.negative_label,
                                  target_specificity=settings.target_specificity)
    hidden = [] if recipe.kind == "linear" else list(recipe.mlp.hidden)
    dropout = 0.0 if recipe.kind == "linear" else recipe.mlp.dropout
    card = {
        "labels": labels, "threshold": threshold, "input_size": settings.input_size,
        "threshold_rule": (f"sensitivity >= {settings.target_sensitivity} (XRAY_TARGET_SENSITIVITY)"
                           if settings.target_sensitivity is not None else "Youden's J")
        + f" on calibrated held-out probabilities ({held_on})",
        "normalisation": spec_dict(settings).get("normalisation", {}),
        "preprocessing": spec_dict(settings),
        "backbone_fingerprint": backbone.fingerprint, "backbone_weights": settings.backbone_weights,
        "backbone_random_init": backbone.random_init, "backbone_precision": backbone.precision,
        "head": {"in_dim": FEATURE_DIM, "hidden": hidden, "dropout": dropout,
                 "feature_standardisation": f"per-dimension mean/std of the rows the head was fitted on "
                                            f"({fitted.fitted_on}), in head.safetensors",
                 "temperature": temperature},
        "training": {"best_epoch": record["best_epoch"], "epochs_run": record["epochs_run"],
                     "history": record["history"], "train_views": train_views(settings),
                     "n_train": len(data.train), "n_val": len(data.val), "fitted_on": fitted.fitted_on,
                     "recipe": {**recipe.as_dict(), "method": selection.method, "reason": selection.reason,
                                "candidates": selection.scores,
                                **({} if pick is None else {"subsample": subsample})}},
        "calibration": calibration,
        "training_set_fingerprint": training_set_fingerprint(data),
        "settings": settings.public_dict(), "val_metrics": val_metrics, "val_metrics_on": held_on,
        "features_sha256": features_sha256(x_train, x_val), "environment": training_environment(),
    }
    return Fitted(head=head, card=card, x_train=x_train, x_val=x_val, val_probs=val_probs, y_val=y_val)


def build_model_reference(settings: Settings, data: SplitData, head: Any, x_train: np.ndarray,
                          x_val: np.ndarray, val_probs: np.ndarray, y_val: np.ndarray) -> Any:
    """The model's reference (:mod:`xray_core.monitor.reference`), standardised by the head's normaliser.

    The PCA bases are fitted on the training features the head saw (every cached training view, the
    rows the normaliser was fitted on); the drift sample comes from the validation films' eval view,
    which is what prediction sees. The per-film OOD score is XRAY_OOD_SCORE's (t2q: T² + Q, format 2;
    knn: distance to the training films' eval view, format 3), calibrated on the validation films and the
    training films' eval view (embedded for this by ``embed_step``), each scored cross-fitted (without
    its own patients' fold). Each validation film's site (the catalogue's rule, ``image_facts``) is
    recorded for the per-site drift checks.
    ``val_probs`` are held-out probabilities of the validation films (out-of-fold ones when the head was
    refitted on train+val), so the reference does not expect in-sample confidence.
    """
    from xray_core.data.facts import image_facts
    from xray_core.monitor.reference import build_reference

    site_of = image_facts(settings, [r.id for r in data.val])["site"].to_dict()
    return build_reference(x_train, x_val, np.array([r.patient_id for r in data.val], dtype=str), val_probs,
                           y_val,
                           mean=head.feature_mean.numpy(), std=head.feature_std.numpy(),
                           quantile=settings.ood_quantile, seed=settings.train_seed,
                           train_eval=x_train[:, 0],  # train_views starts with the eval view 0
                           train_groups=np.array([r.patient_id for r in data.train], dtype=str),
                           score=settings.ood_score,
                           val_sites=[str(site_of.get(r.id) or "unknown") for r in data.val])


def key_metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_auroc")}


def model_test_probs(settings: Settings, version: int, rows: list[Row]) -> tuple[np.ndarray, Any]:
    """Test-set probabilities of a registered model, with the backbone it was trained on.

    A champion from an older backbone (other weights or preprocessing) gets its test features
    computed with its own backbone, rebuilt from the settings on its card.
    """
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache
    from xray_core.model.train import predict_proba
    from xray_core.registry.versions import load_model

    current = load_backbone(settings)
    model = load_model(settings, version)
    if model.card["backbone_fingerprint"] == current.fingerprint:
        backbone, own = current, settings
    else:
        own = settings_for_card(settings, model.card)
        backbone = load_backbone(own)
        if backbone.fingerprint != model.card["backbone_fingerprint"]:
            raise CheckpointError(
                f"model {version} needs backbone {model.card['backbone_fingerprint'][:12]}… "
                f"({model.card['backbone_weights']}), which can no longer be rebuilt here")
    cache = FeatureCache(backbone, own)
    cache.ensure(embed_items(own, rows), [0])
    x = cache.load([r.sha256 for r in rows], 0)
    return predict_proba(model.head, x), model


def evaluate_step(settings: Settings, version: int, data: SplitData, *,
                  flow_run_id: str | None = None) -> dict[str, Any]:
    """Score one version on the current test split; store an evaluation row; return its metrics."""
    from xray_core.evaluate.intervals import bootstrap_intervals
    from xray_core.evaluate.metrics import compute_metrics

    if not data.test:
        raise NotEnoughDataError("the test split is empty: ingest more patients before evaluating")
    probs, model = model_test_probs(settings, version, data.test)
    labels = model.labels
    rows = [r for r in data.test if r.label in labels]
    keep = np.array([r.label in labels for r in data.test])
    probs = probs[keep]
    y = label_indices(rows, labels)
    patients = np.array([r.patient_id for r in rows])
    metrics = compute_metrics(y, probs, labels, threshold=model.threshold,
                              negative_label=settings.negative_label,
                              target_specificity=settings.target_specificity)
    metrics["intervals"] = bootstrap_intervals(
        y, probs, labels, patients, threshold=model.threshold, negative_label=settings.negative_label,
        n_samples=settings.bootstrap_samples, seed=settings.bootstrap_seed,
        target_specificity=settings.target_specificity, memory_mb=settings.memory_mb)
    metrics["bootstrap"] = {"samples": settings.bootstrap_samples, "seed": settings.bootstrap_seed,
                            "clustered_by": "patient", "patients": int(len(set(patients)))}
    metrics["slices"], sites, views = evaluation_slices(settings, rows, y, probs, labels, model.threshold)
    if subgroups := subgroup_slices(settings, rows, y, probs, labels, model.threshold):
        metrics["subgroups"] = subgroups  # XRAY_SLICE_BY beyond site and view: reported only
    fingerprint = fingerprint_test_set(data.test)
    with session_scope(open_catalogue(settings)) as s:
        s.add(Evaluation(model_id=version, test_set_fingerprint=fingerprint,
                         backbone_fingerprint=model.card["backbone_fingerprint"], n_images=len(rows),
                         metrics=metrics, flow_run_id=flow_run_id))
        row = s.get(Model, version)
        if row is not None and not row.metrics.get("test"):
            row.metrics = {**row.metrics,
                           **{k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_auroc")},
                           "intervals": metrics["intervals"], "test": True}
    # The probabilities travel with the evaluation (n x classes, in test-split order, rows of the
    # model's labels only), so deciding and reporting never re-read the test features.
    return {"version": version, "test_set_fingerprint": fingerprint, "n_images": len(rows),
            "metrics": metrics,
            "labels": labels, "probabilities": np.round(probs.astype(np.float64), 8).tolist(),
            "shas": [r.sha256 for r in rows], "sites": sites, "views": views}


def decide_step(settings: Settings, challenger: dict[str, Any], champion: dict[str, Any] | None,
                data: SplitData, audit: dict[str, Any] | None = None,
                reference: dict[str, Any] | None = None,
                breaches: Sequence[BreachCheck] = ()) -> dict[str, Any]:
    """The promotion policy on two evaluations of the same test set, then the guards (``apply_guards``: a
    breach at a drifted site, per-site, the locked ``reference`` (its evaluation, or None), the audit)."""
    from xray_core.evaluate.intervals import paired_bootstrap_difference
    from xray_core.evaluate.promotion import PolicyConfig, decide

    config = PolicyConfig.from_settings(settings)
    comparison = flips = None
    if champion is not None:
        if champion["test_set_fingerprint"] != challenger["test_set_fingerprint"]:
            raise CheckpointError("champion and challenger were scored on different test sets")
        flips = flips_step(settings, challenger, champion, data)  # also when the label sets differ
        if champion["metrics"]["labels"] != challenger["metrics"]["labels"]:
            # No per-site comparison either (champion None), but the shortcut audit still applies: a
            # new label often arrives with a new site, which is exactly when the label follows the site.
            return apply_guards(settings, {
                "decision": "keep", "promote": False, "checks": [],
                "rationale": (f"The challenger's labels {challenger['metrics']['labels']} differ from the "
                              f"champion's {champion['metrics']['labels']}: the two cannot be compared "
                              "automatically. Keep; promote by hand (xray promote) after review.")},
                challenger, None, audit, flips,
                reference_summary(settings, challenger, champion, reference, None, data))
        labels = challenger["metrics"]["labels"]
        rows = [r for r in data.test if r.label in labels]
        p_new, p_old = (_probabilities(ev, settings, data) for ev in (challenger, champion))
        comparison = paired_bootstrap_difference(
            label_indices(rows, labels), p_new, p_old, labels, np.array([r.patient_id for r in rows]),
            metric=settings.promotion_metric,
            thresholds=(challenger["metrics"].get("threshold"), champion["metrics"].get("threshold")),
            negative_label=settings.negative_label, n_samples=settings.bootstrap_samples,
            seed=settings.bootstrap_seed, target_specificity=settings.target_specificity,
            memory_mb=settings.memory_mb)
    decision = decide(challenger["metrics"], champion["metrics"] if champion else None, comparison, config)
    ref = reference_summary(settings, challenger, champion, reference, comparison, data)
    out = apply_guards(settings, decision.as_dict(), challenger, champion, audit, flips, ref, breaches,
                       comparison)
    out["comparison"] = comparison
    return out


def _probabilities(evaluation: dict[str, Any], settings: Settings, data: SplitData) -> np.ndarray:
    """The evaluation's own test probabilities; recomputed only for an evaluation made without them."""
    if evaluation.get("probabilities") is not None:
        return np.asarray(evaluation["probabilities"], dtype=np.float64)
    probs, model = model_test_probs(settings, evaluation["version"], data.test)
    return probs[np.array([r.label in model.labels for r in data.test])]


def promote_step(settings: Settings, *, challenger: int, decision: dict[str, Any], trigger: str,
                 champion_eval: dict[str, Any] | None, challenger_eval: dict[str, Any],
                 flow_run_id: str | None = None, record_stale_unless_champion: Any = ...,
                 audit: dict[str, Any] | None = None, actor: str | None = None,
                 breach: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Record the decision (with ``breach``, the run's ``BreachCheck.audit_row``s, in its metrics); on
    promote, re-verify the checkpoint and switch the champion atomically.

    ``record_stale_unless_champion``: the version evaluated as champion (None: there was none); when
    given, the switch is compare-and-set: if another process changed the champion since, the decision
    is recorded as ``stale`` and nothing is promoted.
    """
    from xray_core.registry.versions import load_model, record_decision

    if decision["promote"]:
        load_model(settings, challenger)  # sha256 re-verified just before the switch
    metrics = {"challenger": summary_metrics(challenger_eval),
               "champion": summary_metrics(champion_eval) if champion_eval else None,
               "comparison": decision.get("comparison"), "checks": decision.get("checks"),
               "site_drops": decision.get("site_drops"), "audit": audit,
               "negative_flips": decision.get("negative_flips"), "reference": decision.get("reference"),
               "breach": breach or []}
    return record_decision(settings, challenger=challenger, decision=decision["decision"],
                           rationale=decision["rationale"],
                           metrics=json.loads(json_text(metrics, default=str)),  # strict: NaN -> null
                           trigger=trigger, actor=actor, flow_run_id=flow_run_id,
                           promote=bool(decision["promote"]),
                           **({} if record_stale_unless_champion is ...
                              else {"record_stale_unless_champion": record_stale_unless_champion}))


def summary_metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
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
            | {"metrics": summary_metrics(evaluation)}}
