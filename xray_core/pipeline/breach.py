"""The locked reference at a drifted site, in the recipe (issue 26; the rule is
:mod:`xray_core.evaluate.breach`).

When the run's drift step flags a site (a counted per-site check, as the ``xray.drift.detected`` events name
it, or the check of a batch that came from that one site alone: :func:`site_flags`), or a site's drift
episode is open (:func:`drifting_sites`: the newest recorded drift check that tested it flagged it, after
the champion was created; a retrain on drift ingests nothing, so its own drift step never runs), and the
locked reference is not the champion, :func:`measure_breaches` scores both on the site's labelled films of
the current **drift episode** catalogued after both models were created (``images.added_at`` after the later
``models.created_at``; a model is created after its training snapshot, so neither trained on them), less the
films of patients in either model's split manifest (:func:`trained_patients`: a new film of a patient a
model trained on is not new to it). The episode (:func:`drift_episode`, from the ``drift_checks`` table) is
the site's run of consecutive flagged drift checks, tonight's included, back to the last check that tested
the site and did not flag it (a check that did not test it, e.g. a night it sent no films, does not end it);
its films are those added after the check before its first. Without a recorded episode (older checks) the
films are all the site's since both models were created. Scored in every routine split (train, val and test
of this run's snapshot; sequestered films never reach a routine decision), from the feature cache
(:func:`xray_core.pipeline.sequester.score`). The paired, patient-clustered difference (champion minus
reference, ``XRAY_PROMOTION_METRIC``) is judged as the sequestered audit judges it
(:func:`xray_core.pipeline.sequester.judge`): a breach when the champion is *measured* more than
``XRAY_REFERENCE_MARGIN`` below. The champion's calls on those films are also set against its calls on
the site's test films from before the episode (:mod:`xray_core.pipeline.detection`): a disease class
called markedly less often (:func:`detection_drop`) is a breach too (``kind``
"sensitivity"), though the ranking held; it is reported, and changes no decision. Fewer than
``XRAY_MIN_TEST_PER_CLASS`` films of a class: "not enough films", no action. Under ``lift`` and ``rollback``
a site in ranking breach also measures the challenger against the champion and the reference on the site's
films of the episode catalogued after the champion that are in the run's TEST split (never val: the
challenger was tuned there); it vetoes when the challenger measures more than ``XRAY_REFERENCE_MARGIN``
below either. The step is best effort, as the drift step: an error is a ``failed`` check, reported, with no
lift and no rollback.

:func:`restore_reference` (``XRAY_REFERENCE_BREACH=rollback``) runs after the decision is recorded: a
challenger not promoted leaves the champion in place, so the locked reference is restored through
:func:`xray_core.registry.versions.rollback` (compare-and-set on the champion, audit row with the reason).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from xray_core.data.catalogue import Row
from xray_core.data.snapshot import SplitData
from xray_core.errors import XrayError
from xray_core.evaluate.breach import (
    BREACH,
    DETECTION,
    FAILED,
    HELD,
    LIFTED,
    REPORTED,
    RESTORED,
    THIN,
    UNMEASURED,
    BreachCheck,
    breach_words,
    detection_drop,
    films_words,
    measure_words,
    site_condition,
)
from xray_core.pipeline.detection import earlier_calls
from xray_core.pipeline.executor import Executor, step
from xray_core.pipeline.review import REVIEWED_DECISIONS as REVIEWED
from xray_core.results import NOT_REACHED, Evaluation, RunResult, Snapshot
from xray_core.settings import Settings


def site_flags(checks: Sequence[Mapping[str, Any]]) -> dict[str, bool]:
    """What one drift check said of each site it tested: True flagged, False tested and not flagged (a site
    it did not test is absent). A site's own check (``site S``) counts, and so does the check of ``all new
    films`` when they all came from one site the model's reference knows (``site``, set by
    :func:`xray_core.pipeline.monitor.single_site`: that check was made against the site's own films). A
    check against the pooled reference that does not count (``counts`` False, ``drift`` False) and a batch
    too small to test (fewer than ``MIN_BATCH`` films, never flagged) say nothing of the site."""
    from xray_core.monitor.drift import MIN_BATCH

    out: dict[str, bool] = {}
    for c in checks:
        subject = str(c.get("subject", ""))
        site = subject.removeprefix("site ") if subject.startswith("site ") else c.get("site")
        if site is None or subject not in (f"site {site}", "all new films") or c.get("counts") is False:
            continue
        if c.get("drift") or int(c.get("n") or 0) >= MIN_BATCH:
            out[str(site)] = out.get(str(site), False) or bool(c.get("drift"))
    return out


def flagged_sites(drift: dict[str, Any] | None) -> list[str]:
    """The sites the run's drift step flagged (:func:`site_flags` of its checks): a per-site check that set
    the run's flag, or the check of a batch that came from one known site (a check made against the
    pooled reference reports ``drift`` False: it does not count)."""
    return sorted(site for site, flagged in site_flags((drift or {}).get("checks") or []).items() if flagged)


def episode(newest_first: Iterable[tuple[datetime, Sequence[Mapping[str, Any]]]],
            site: str) -> tuple[datetime | None, datetime] | None:
    """The site's current drift episode from the recorded drift checks, newest first (each: when, and its
    batch checks): the run of consecutive checks that flagged it, back to the last check that tested it
    and did not (one that did not test it, e.g. a night the site sent no films, does not end the run).
    Returns (the films' bound: when the check before the episode's first ran, None when there was none;
    when the first flagged check ran), or None when the newest check that tested the site did not flag it
    (or none did)."""
    began: datetime | None = None
    bound: datetime | None = None
    for created, checks in newest_first:
        if began is not None and bound is None:
            bound = created  # the check before the episode's first so far: its films came after it
        flag = site_flags(checks).get(site)
        if flag is False:
            break
        if flag:
            began, bound = created, None
    return None if began is None else (bound, began)


def open_sites(newest_first: Iterable[tuple[datetime, Sequence[Mapping[str, Any]]]],
               after: datetime) -> set[str]:
    """The sites whose current drift episode is open (the recorded drift checks, newest first, each: when,
    and its batch checks): the newest check that tested the site flagged it, and it ran after ``after``
    (when the champion was created). Reads no check older than ``after``."""
    seen: dict[str, bool] = {}
    for created, checks in newest_first:
        if created <= after:
            break
        for site, flagged in site_flags(checks).items():
            seen.setdefault(site, flagged)
    return {site for site, flagged in seen.items() if flagged}


def drifting_sites(settings: Settings, after: datetime) -> set[str]:
    """:func:`open_sites` from the ``drift_checks`` table: the retrain on drift (``retrain/on-drift``)
    ingests nothing, so its own drift step does not run; the monitor's and the ingests' checks say which
    sites drift."""
    return open_sites(recorded_checks(settings), after)


def recorded_checks(settings: Settings) -> Iterator[tuple[datetime, list[Mapping[str, Any]]]]:
    """The recorded drift checks of catalogued films (those of ``xray monitor``, an ingest and a retrain,
    the ones that set the next check's start), newest first: when, and its batch checks."""
    from sqlalchemy import select

    from db import session_scope
    from db.schema import DriftCheck
    from xray_core.data.catalogue import open_catalogue

    query = (select(DriftCheck.created_at, DriftCheck.result)
             .where(DriftCheck.kind.in_(("monitor", "ingest", "retrain"))).order_by(DriftCheck.id.desc()))
    with session_scope(open_catalogue(settings)) as s:
        for when, result in s.execute(query.execution_options(yield_per=50)):
            yield when, list((result or {}).get("checks") or [])


def drift_episode(settings: Settings, site: str) -> tuple[datetime | None, datetime] | None:
    """:func:`episode` of ``site`` from the ``drift_checks`` table (:func:`recorded_checks`)."""
    return episode(recorded_checks(settings), site)


def too_few(rows: list[Row], labels: list[str], minimum: int) -> str | None:
    """Why ``rows`` are too few to judge (fewer than ``minimum`` films of a label), None when enough."""
    counts = Counter(r.label for r in rows)
    short = [f"{label} {counts[label]}" for label in labels if counts[label] < minimum]
    return (f"{', '.join(short)} film(s), fewer than XRAY_MIN_TEST_PER_CLASS={minimum} of each"
            if short else None)


def thin(settings: Settings, site: str, versions: tuple[int, int], films: int, since: str | None,
         short: str, **about: Any) -> BreachCheck:
    """The check of a site with too few films to judge (``short`` says which): reported, no action.
    ``about``: the check's ``drift_began`` and ``films_from``."""
    check = BreachCheck(site=site, champion=versions[0], reference=versions[1], status=THIN, films=films,
                        since=since, metric=settings.promotion_metric, margin=settings.reference_margin,
                        mode=settings.reference_breach, detail="", **about)
    which = (f"at site {site} since both models were trained" if check.drift_began is None
             else f"among {films_words(check)}")
    return replace(check, detail=f"not enough films {which}: {short}")


def failed(settings: Settings, site: str, champion: int, reference: int | None,
           exc: Exception) -> BreachCheck:
    """A breach check that could not be made: reported, no action (as a drift check that fails)."""
    return BreachCheck(site=site, champion=champion, reference=reference, status=FAILED, films=0, since=None,
                       metric=settings.promotion_metric, margin=settings.reference_margin,
                       mode=settings.reference_breach,
                       detail=f"breach check failed: {type(exc).__name__}: {exc}; no action")


def judge_site(settings: Settings, site: str, rows: list[Row], champion: Evaluation, reference: Evaluation,
               since: str | None, earlier: Evaluation | None = None, earlier_note: str | None = None,
               **about: Any) -> BreachCheck:
    """The breach check of one site from the two models' scores of the same ``rows``; ``earlier``: the
    champion scored on the site's test films from before the episode (its detection there against on
    ``rows``: :func:`detection_drop`), or ``earlier_note``: why there is none; ``about``: the check's
    ``drift_began`` and ``films_from`` (the words of its films)."""
    from xray_core.pipeline.sequester import judge

    kept = [r for r in rows if r.label in champion.labels]
    versions = (champion.version, reference.version)
    if (short := too_few(kept, champion.labels, settings.min_test_per_class)) is not None:
        return thin(settings, site, versions, len(kept), since, short, **about)
    judged = judge(settings, champion, reference, rows)
    comparison = judged["comparison"] or {}
    check = BreachCheck(site=site, champion=versions[0], reference=versions[1],
                        status=BREACH if judged["degraded"] else HELD, films=len(kept), since=since,
                        metric=settings.promotion_metric, margin=settings.reference_margin,
                        mode=settings.reference_breach, detail="",
                        difference=comparison.get("difference"), low=comparison.get("low"),
                        high=comparison.get("high"), champion_value=comparison.get("challenger"),
                        reference_value=comparison.get("champion"), **about)
    action = REPORTED if settings.reference_breach == "alert" else LIFTED
    detection = None
    if earlier is not None and earlier.labels == champion.labels:
        detection = detection_drop(champion.labels, settings.negative_label,
                                   earlier.metrics["confusion_matrix"], champion.metrics["confusion_matrix"],
                                   settings.guardrail_sensitivity_drop, settings.drift_alpha,
                                   settings.min_test_per_class)
    check = replace(check, detection=detection)
    if not check.breached and detection is not None and detection["collapsed"]:
        check = replace(check, status=BREACH, kind=DETECTION)  # reported only (BreachCheck.acts)
        return replace(check, action=REPORTED, detail=measure_words(check))
    if check.difference is None or check.low is None:  # the labels differ, one class...: said by the check
        return replace(check, status=UNMEASURED,
                       detail=f"not measured at site {site}: {judged['check']['detail']}")
    note = f"; its detection not judged: {earlier_note}" if earlier_note and detection is None else ""
    return replace(check, action=action if check.breached else "none", detail=measure_words(check) + note)


@step("breach")
def measure_breaches(settings: Settings, drift: dict[str, Any] | None, champion: int | None,
                     challenger: int, snapshot: Snapshot) -> list[BreachCheck]:
    """The breach check of each site the run's drift step flagged and each site whose drift episode is open
    (:func:`drifting_sites`: the newest recorded check that tested it flagged it, after the champion was
    created; none without a flag, a champion, or a locked reference other than the champion); with
    ``lift``/``rollback``, the challenger check of a site in ranking breach.
    Best effort, as the drift step: an error is a ``failed`` check per flagged site, which changes nothing
    (the run goes on; the result and the report say "breach check failed: <reason>")."""
    from xray_core.registry.reference import reference_version

    if champion is None:
        return []
    sites, reference = flagged_sites(drift), None
    try:
        reference = reference_version(settings)
        if reference is None or reference == champion:
            return []
        sites = sorted(set(sites) | drifting_sites(settings, model_facts(settings, champion)[0]))
        return measure_sites(settings, sites, champion, reference, challenger, snapshot) if sites else []
    except Exception as exc:  # noqa: BLE001 - see docstring
        return [failed(settings, site, champion, reference, exc) for site in sites]


def measure_sites(settings: Settings, sites: list[str], champion: int, reference: int, challenger: int,
                  snapshot: Snapshot) -> list[BreachCheck]:
    """:func:`measure_breaches` of ``sites``: each on its films of the current drift episode
    (:func:`drift_episode`) catalogued after both models were created; without a recorded episode
    (e.g. checks stored before the breach step), on all its films since both models were created."""
    from xray_core.pipeline.sequester import score

    (created, labels), (created_ref, _) = model_facts(settings, champion), model_facts(settings, reference)
    models = max(created, created_ref)
    data = snapshot.load()
    seen = trained_patients(settings, champion) | trained_patients(settings, reference)
    routine = {r.id: r for r in (*data.train, *data.val, *data.test) if r.patient_id not in seen}
    newer = by_site(settings, routine, models)
    test = {r.id: r for r in data.test}
    out = []
    for site in sites:
        found = drift_episode(settings, site)
        bound, began = found if found is not None else (None, None)
        since = max(models, bound) if bound is not None else models
        about = {"drift_began": began.isoformat() if began is not None else None,
                 "films_from": "drift" if bound is not None and bound >= models else "models"}
        rows = [r for r in (newer if since == models else by_site(settings, routine, since)).get(site, [])
                if r.label in labels]
        short = too_few(rows, labels, settings.min_test_per_class)
        if short is not None:  # nothing scored
            out.append(thin(settings, site, (champion, reference), len(rows), since.isoformat(), short,
                            **about))
            continue
        # the champion's calls on the site's test films from before the episode: its detection baseline
        earlier, note = earlier_calls(settings, site, champion, test, bound or models, labels)
        check = judge_site(settings, site, rows, score(settings, champion, rows),
                           score(settings, reference, rows), since.isoformat(), earlier=earlier,
                           earlier_note=note, **about)
        if check.acts:
            start = max(created, bound) if bound is not None else created  # the episode since the champion
            mine = rows if start == since else by_site(settings, routine, start).get(site, [])
            check = replace(check, challenger_check=challenger_at_site(settings, site, champion, challenger,
                                                                       mine, data, reference))
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


def trained_patients(settings: Settings, version: int) -> set[str]:
    """The patients of ``version``'s recorded training and validation images (its split manifest, as
    ``xray reproduce`` reads it): a new film of one of them is not new to the model (empty without a
    manifest)."""
    from db import session_scope
    from xray_core.data.catalogue import open_catalogue
    from xray_core.registry.manifests import split_manifest_images
    from xray_core.registry.versions import existing_model

    with session_scope(open_catalogue(settings)) as s:
        manifest = existing_model(s, version).split_manifest
        return {str(image[4]) for image in split_manifest_images(s, manifest)}


def by_site(settings: Settings, routine: dict[int, Row], since: datetime) -> dict[str, list[Row]]:
    """The run's routine rows catalogued after ``since``, by site (the drift check's site rule)."""
    from xray_core.monitor.checks import images_since

    out: dict[str, list[Row]] = {}
    for image in images_since(settings, since):
        if image[0] in routine:
            out.setdefault(str(image[5]), []).append(routine[image[0]])
    return out


def challenger_at_site(settings: Settings, site: str, champion: int, challenger: int, rows: list[Row],
                       data: SplitData, reference: int | None = None) -> dict[str, Any]:
    """The ``breach_site`` check: the challenger against the champion and the locked reference on ``rows``
    (the site's films since the champion, of the drift episode) of the run's TEST split only: the
    challenger trained on train and chose its recipe, epoch, temperature and threshold on val."""
    from xray_core.pipeline.sequester import paired, score

    margin = settings.reference_margin
    labels = model_facts(settings, challenger)[1]  # the catalogue's: score() loads the checkpoint itself
    held = {r.id for r in data.test}
    kept = [r for r in rows if r.id in held and r.label in labels]
    if (short := too_few(kept, labels, settings.min_test_per_class)) is not None:
        return site_condition(None, site, len(kept), champion, margin,
                              why_not=f"{len(kept)} of them in the test split: {short}")
    new, old = score(settings, challenger, kept), score(settings, champion, kept)
    if old.labels != new.labels:
        return site_condition(None, site, len(kept), champion, margin,
                              why_not="the two models' labels differ")
    vs_reference = None
    if reference is not None:
        ref = score(settings, reference, kept)
        vs_reference = paired(settings, new, ref, kept) if ref.labels == new.labels else None
    return site_condition(paired(settings, new, old, kept), site, len(kept), champion, margin,
                          reference=reference, vs_reference=vs_reference)


@step("restore-reference")
def rollback_to_reference(settings: Settings, champion: int, reference: int, reason: str, trigger: str,
                          flow_run_id: str | None,
                          breach: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Restore the locked reference as champion while ``champion`` still is (audited as a rollback; the
    row's ``metrics["breach"]``: the run's breach checks, ``BreachCheck.audit_row``)."""
    from xray_core.registry.versions import rollback

    return rollback(settings, reason=reason, trigger=trigger, flow_run_id=flow_run_id, to=reference,
                    from_champion=champion, metrics={"breach": breach or []})


def restore_reference(settings: Settings, run: Executor, result: RunResult, trigger: str,
                      flow_run_id: str | None) -> None:
    """``XRAY_REFERENCE_BREACH=rollback``, once the decision is recorded: a breach with the challenger not
    promoted (the champion unchanged) restores the locked reference as champion; ``result``'s
    ``champion_after`` and each breach's ``action`` say what happened. Nothing under lift or alert, nor
    when a reviewer decided (rejected, or nobody answered in time): that may be days after the breach was
    measured, and the review form said it was."""
    breached = [b for b in result.breach_checks if b.acts]
    if settings.reference_breach != "rollback" or not breached or result.champion_after is NOT_REACHED:
        return
    first = breached[0]
    if first.reference is None:  # a breach is measured against a known reference: never here
        return
    if result.champion_after == result.version:
        action = f"{first.action}; challenger v{result.version} promoted"
    elif result.champion_after != first.champion:  # a stale decision: someone moved the champion
        action = f"{first.action}; not restored: the champion is v{result.champion_after} now"
    elif result.decision is not None and (result.decision.review or {}).get("answer") in REVIEWED:
        # maybe days after the breach
        action = f"{first.action}; not restored: the decision came from a review"
    else:
        reason = (f"XRAY_REFERENCE_BREACH=rollback: {'; '.join(breach_words(b) for b in breached)}; "
                  f"challenger v{result.version} not promoted")
        try:
            rows = [(replace(b, action=RESTORED) if b.acts else b).audit_row()
                    for b in result.breach_checks]
            row = run.step(rollback_to_reference)(settings, first.champion, first.reference, reason, trigger,
                                                  flow_run_id, rows)
        except XrayError as exc:  # the champion moved meanwhile, the reference's files are unreadable...:
            # nothing restored, said in the result; the decision is recorded and the run ends as it did
            action = f"{first.action}; not restored: {exc}"
        else:
            result.champion_after, action = row["champion_after"], RESTORED
    result.breach_checks = [replace(b, action=action) if b.acts else b for b in result.breach_checks]


__all__ = ["by_site", "challenger_at_site", "drift_episode", "drifting_sites", "episode", "failed",
           "flagged_sites", "judge_site", "measure_breaches", "measure_sites", "model_facts", "open_sites",
           "recorded_checks", "restore_reference", "rollback_to_reference", "site_flags", "thin", "too_few",
           "trained_patients"]
