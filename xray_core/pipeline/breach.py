"""The locked reference at a drifted site, in the recipe (issue 26; the rule is
:mod:`xray_core.evaluate.breach`).

When the run's drift step flags a site (a counted per-site check, as the ``xray.drift.detected`` events
name it) and the locked reference is not the champion, :func:`measure_breaches` scores both on the site's
labelled films catalogued after both models were created (``images.added_at`` after the later
``models.created_at``; a model is created after its training snapshot, so neither trained on them), in
every routine split (train, val and test of this run's snapshot; sequestered films never reach a routine
decision), from the feature cache (:func:`xray_core.pipeline.sequester.score`). The paired,
patient-clustered difference (champion minus reference, ``XRAY_PROMOTION_METRIC``) is judged as the
sequestered audit judges it (:func:`xray_core.pipeline.sequester.judge`): a breach when the champion is
*measured* more than ``XRAY_REFERENCE_MARGIN`` below. Fewer than ``XRAY_MIN_TEST_PER_CLASS`` films of a
class: "not enough films", no action. Under ``lift`` and ``rollback`` a breached site also measures the
challenger against the champion on the site's films catalogued after the champion that are outside the
challenger's training split (val and test, or test only when its head was fitted on train+val).

:func:`restore_reference` (``XRAY_REFERENCE_BREACH=rollback``) runs after the decision is recorded: a
challenger not promoted leaves the champion in place, so the locked reference is restored through
:func:`xray_core.registry.versions.rollback` (compare-and-set on the champion, audit row with the reason).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import datetime
from typing import Any

from xray_core.data.catalogue import Row
from xray_core.data.snapshot import SplitData
from xray_core.errors import UsageError
from xray_core.evaluate.breach import (
    BREACH,
    HELD,
    LIFTED,
    REPORTED,
    RESTORED,
    THIN,
    BreachCheck,
    breach_words,
    measure_words,
    site_condition,
)
from xray_core.pipeline.executor import Executor, step
from xray_core.results import NOT_REACHED, Evaluation, RunResult, Snapshot
from xray_core.settings import Settings


def flagged_sites(drift: dict[str, Any] | None) -> list[str]:
    """The sites the run's drift step flagged: its per-site checks (``site S``) that set the run's flag
    (a check made against the pooled reference reports ``drift`` False: it does not count)."""
    checks = (drift or {}).get("checks") or []
    return sorted({c["subject"].removeprefix("site ") for c in checks
                   if c.get("drift") and str(c.get("subject", "")).startswith("site ")})


def too_few(rows: list[Row], labels: list[str], minimum: int) -> str | None:
    """Why ``rows`` are too few to judge (fewer than ``minimum`` films of a label), None when enough."""
    counts = Counter(r.label for r in rows)
    short = [f"{label} {counts[label]}" for label in labels if counts[label] < minimum]
    return (f"{', '.join(short)} film(s), fewer than XRAY_MIN_TEST_PER_CLASS={minimum} of each"
            if short else None)


def thin(settings: Settings, site: str, versions: tuple[int, int], films: int, since: str | None,
         short: str) -> BreachCheck:
    """The check of a site with too few films to judge (``short`` says which): reported, no action."""
    return BreachCheck(site=site, champion=versions[0], reference=versions[1], status=THIN, films=films,
                       since=since, metric=settings.promotion_metric, margin=settings.reference_margin,
                       mode=settings.reference_breach,
                       detail=f"not enough films at site {site} since both models were trained: {short}")


def judge_site(settings: Settings, site: str, rows: list[Row], champion: Evaluation, reference: Evaluation,
               since: str | None) -> BreachCheck:
    """The breach check of one site from the two models' scores of the same ``rows``."""
    from xray_core.pipeline.sequester import judge

    kept = [r for r in rows if r.label in champion.labels]
    versions = (champion.version, reference.version)
    if (short := too_few(kept, champion.labels, settings.min_test_per_class)) is not None:
        return thin(settings, site, versions, len(kept), since, short)
    judged = judge(settings, champion, reference, rows)
    comparison = judged["comparison"] or {}
    check = BreachCheck(site=site, champion=versions[0], reference=versions[1],
                        status=BREACH if judged["degraded"] else HELD, films=len(kept), since=since,
                        metric=settings.promotion_metric, margin=settings.reference_margin,
                        mode=settings.reference_breach, detail="",
                        difference=comparison.get("difference"), low=comparison.get("low"),
                        high=comparison.get("high"), champion_value=comparison.get("challenger"),
                        reference_value=comparison.get("champion"))
    if judged["comparison"] is None:  # e.g. the two models' labels differ: said by the check
        return replace(check, detail=f"not measured at site {site}: {judged['check']['detail']}")
    action = (REPORTED if settings.reference_breach == "alert" else LIFTED) if check.breached else "none"
    return replace(check, action=action, detail=measure_words(check))


@step("breach")
def measure_breaches(settings: Settings, drift: dict[str, Any] | None, champion: int | None,
                     challenger: int, snapshot: Snapshot) -> list[BreachCheck]:
    """The breach check of each site the drift step flagged (none without a flag, a champion, or a locked
    reference other than the champion); with ``lift``/``rollback``, a breached site's challenger check."""
    from xray_core.pipeline.sequester import score
    from xray_core.registry.reference import reference_version

    sites, reference = flagged_sites(drift), reference_version(settings)
    if not sites or champion is None or reference is None or reference == champion:
        return []
    (created, labels), (created_ref, _) = model_facts(settings, champion), model_facts(settings, reference)
    since = max(created, created_ref)
    data = snapshot.load()
    routine = {r.id: r for r in (*data.train, *data.val, *data.test)}
    newer = by_site(settings, routine, since)
    out = []
    for site in sites:
        rows = [r for r in newer.get(site, []) if r.label in labels]
        short = too_few(rows, labels, settings.min_test_per_class)
        if short is not None:  # nothing scored
            out.append(thin(settings, site, (champion, reference), len(rows), since.isoformat(), short))
            continue
        check = judge_site(settings, site, rows, score(settings, champion, rows),
                           score(settings, reference, rows), since.isoformat())
        if check.breached and settings.reference_breach != "alert":
            mine = rows if since == created else by_site(settings, routine, created).get(site, [])
            check = replace(check, challenger_check=challenger_at_site(settings, site, champion, challenger,
                                                                       mine, data))
        out.append(check)
    return out


def model_facts(settings: Settings, version: int) -> tuple[datetime, list[str]]:
    """When ``version`` was created (after its training snapshot was frozen), and its labels."""
    from db import session_scope
    from xray_core.data.catalogue import open_catalogue
    from xray_core.registry.versions import existing_model

    with session_scope(open_catalogue(settings)) as s:
        model = existing_model(s, version)
        return model.created_at, list(model.labels)


def by_site(settings: Settings, routine: dict[int, Row], since: datetime) -> dict[str, list[Row]]:
    """The run's routine rows catalogued after ``since``, by site (the drift check's site rule)."""
    from xray_core.monitor.checks import images_since

    out: dict[str, list[Row]] = {}
    for image in images_since(settings, since):
        if image[0] in routine:
            out.setdefault(str(image[5]), []).append(routine[image[0]])
    return out


def challenger_at_site(settings: Settings, site: str, champion: int, challenger: int, rows: list[Row],
                       data: SplitData) -> dict[str, Any]:
    """The ``breach_site`` check: the challenger against the champion on ``rows`` (the site's films since
    the champion) outside the challenger's training split."""
    from xray_core.pipeline.sequester import paired, score
    from xray_core.registry.versions import load_model

    model = load_model(settings, challenger)
    fitted_on = model.card["training"].get("fitted_on")
    held = {r.id for r in (data.test if fitted_on == "train+val" else (*data.val, *data.test))}
    kept = [r for r in rows if r.id in held and r.label in model.labels]
    if (short := too_few(kept, model.labels, settings.min_test_per_class)) is not None:
        return site_condition(None, site, len(kept), champion,
                              why_not=f"{len(kept)} films outside its training split: {short}")
    new, old = score(settings, challenger, kept), score(settings, champion, kept)
    if old.labels != new.labels:
        return site_condition(None, site, len(kept), champion, why_not="the two models' labels differ")
    return site_condition(paired(settings, new, old, kept), site, len(kept), champion)


@step("restore-reference")
def rollback_to_reference(settings: Settings, champion: int, reference: int, reason: str, trigger: str,
                          flow_run_id: str | None) -> dict[str, Any]:
    """Restore the locked reference as champion while ``champion`` still is (audited as a rollback)."""
    from xray_core.registry.versions import rollback

    return rollback(settings, reason=reason, trigger=trigger, flow_run_id=flow_run_id, to=reference,
                    from_champion=champion)


def restore_reference(settings: Settings, run: Executor, result: RunResult, trigger: str,
                      flow_run_id: str | None) -> None:
    """``XRAY_REFERENCE_BREACH=rollback``, once the decision is recorded: a breach with the challenger not
    promoted (the champion unchanged) restores the locked reference as champion; ``result``'s
    ``champion_after`` and each breach's ``action`` say what happened. Nothing under lift or alert."""
    breached = [b for b in result.breach_checks if b.breached]
    if settings.reference_breach != "rollback" or not breached or result.champion_after is NOT_REACHED:
        return
    first = breached[0]
    if result.champion_after == result.version:
        action = f"{LIFTED}; challenger v{result.version} promoted"
    elif result.champion_after != first.champion:  # a stale decision: someone moved the champion
        action = f"{LIFTED}; not restored: the champion is v{result.champion_after} now"
    else:
        reason = (f"XRAY_REFERENCE_BREACH=rollback: {'; '.join(breach_words(b) for b in breached)}; "
                  f"challenger v{result.version} not promoted")
        try:
            row = run.step(rollback_to_reference)(settings, first.champion, first.reference, reason, trigger,
                                                  flow_run_id)
        except UsageError as exc:  # the champion moved meanwhile: nothing restored, said in the result
            action = f"{LIFTED}; not restored: {exc}"
        else:
            result.champion_after, action = row["champion_after"], RESTORED
    result.breach_checks = [replace(b, action=action) if b.breached else b for b in result.breach_checks]


__all__ = ["by_site", "challenger_at_site", "flagged_sites", "judge_site", "measure_breaches", "model_facts",
           "restore_reference", "rollback_to_reference", "thin", "too_few"]
