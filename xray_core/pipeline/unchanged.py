"""Whether a run has anything to do: the champion now, and whether retraining would only repeat the
champion or the last decision not to promote (the run is then ``Skipped``, unless forced)."""

from __future__ import annotations

from sqlalchemy import select

from db import session_scope
from db.schema import Model
from xray_core.data.catalogue import open_catalogue
from xray_core.data.snapshot import SplitData, fingerprint_test_set, training_set_fingerprint
from xray_core.pipeline.model_settings import settings_for_fingerprint
from xray_core.settings import Settings, affecting


def current_champion(settings: Settings) -> int | None:
    from xray_core.registry.versions import champion_version

    with session_scope(open_catalogue(settings)) as s:
        return champion_version(s)


# Settings that change what training produces from the same features (marked affects="training").
TRAINING_SETTINGS = affecting("training")


def nothing_new_since_champion(settings: Settings, data: SplitData) -> str | None:
    """Why retraining would only reproduce the champion, or None when there is something new.

    Training is deterministic, so with the champion's exact training and validation images, backbone
    and training settings a new run would train the same weights again (and, being non-inferior to
    itself, replace the champion with a copy every night). The scheduled run skips instead.
    """
    with session_scope(open_catalogue(settings)) as s:
        champion = s.scalar(select(Model).where(Model.status == "champion"))
        if champion is None:
            return None
        version, trained_on = champion.id, champion.training_set_fingerprint
        backbone, config = champion.backbone_fingerprint, dict(champion.config)
    # any precision auto would serve the champion with: an fp32 champion is not retrained nightly
    # only because auto now embeds new models in bf16 (the next data change retrains in bf16)
    if trained_on != training_set_fingerprint(data) or settings_for_fingerprint(settings, backbone) is None:
        return None
    now = settings.public_dict()
    changed = [k for k in TRAINING_SETTINGS if config.get(k) != now.get(k)]
    if changed:
        return None
    return (f"nothing new since champion v{version}: the same training and validation images, backbone and "
            "training settings would train the same weights again; retrain with force=True (CLI --force) to "
            "run anyway")


# Decisions a rerun on the same inputs would repeat (training, evaluation and policy are deterministic);
# a failed run is retried, a promotion leaves a champion that nothing_new_since_champion covers.
# A reviewer's "no" and a review nobody answered count too: the same run would ask the same question.
REPEATABLE_DECISIONS = ("keep", "blocked", "insufficient_evidence", "rejected", "review_expired")
# Settings that change where and how fast work runs, not the features, weights or decision
# (marked affects="execution" in xray_core.settings).
EXECUTION_SETTINGS = frozenset(affecting("execution"))


def nothing_new_since_last_decision(settings: Settings, data: SplitData) -> str | None:
    """Why retraining would only repeat the newest challenger's decision not to promote, or None.

    When the newest model was kept, blocked or judged on insufficient evidence, and since then neither
    the training and validation images, the test set the decision was made on, the backbone, any
    setting but where and how fast work runs (``EXECUTION_SETTINGS``) nor the champion changed, a
    rerun trains the same weights and reaches the same decision. Without this, an ingest that drifts
    (which sends both ``xray.batch.ingested`` and ``xray.drift.detected``) queued two identical
    retrains, and a nightly schedule retrained a rejected challenger every night. The backbone counts
    as unchanged at any precision ``auto`` would serve the model with (as for the champion): an fp32
    challenger is not retrained only because ``auto`` now picks bf16. Code changes are not seen: after
    an upgrade that changes training or the policy, retrain with ``force``.
    """
    from db.schema import Promotion

    with session_scope(open_catalogue(settings)) as s:
        newest = s.scalar(select(Model).order_by(Model.id.desc()).limit(1))
        last = s.scalar(select(Promotion).order_by(Promotion.id.desc()).limit(1))
        if (newest is None or last is None or last.to_version != newest.id
                or last.decision not in REPEATABLE_DECISIONS):
            return None
        champion = s.scalar(select(Model.id).where(Model.status == "champion"))
        # the test set of the decision itself, not any evaluation of the model: `xray models` re-scores
        # a model on a newer test set without deciding anything
        decided_on = ((last.metrics or {}).get("challenger") or {}).get("test_set_fingerprint")
        version, decision, when = newest.id, last.decision, last.created_at
        trained_on, backbone, config = (newest.training_set_fingerprint,
                                        newest.backbone_fingerprint, dict(newest.config))
        champion_then = last.champion_after
    now = settings.public_dict()
    changed = [k for k in set(now) | set(config) if k not in EXECUTION_SETTINGS
               and config.get(k) != now.get(k)]
    if (champion != champion_then or trained_on != training_set_fingerprint(data) or changed
            or fingerprint_test_set(data.test) != decided_on
            or settings_for_fingerprint(settings, backbone) is None):
        return None
    return (f"nothing new since v{version} was not promoted ({decision}, {when:%Y-%m-%d %H:%M}): the same "
            "images, test set, backbone, settings and champion would repeat that decision; retrain with "
            "force=True (CLI --force) to run anyway")
