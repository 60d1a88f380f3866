"""``xray monitor``: check what arrived since the last check against the champion's reference.

Everything ingested after the later of the last monitor check and the champion's creation is
embedded (view 0, cached) and scored by the champion; the batch tests of
:mod:`xray_core.monitor.drift` run on it as a whole and per site (sites with at least
``MIN_BATCH`` films, patients permuted as wholes; each site against the reference's films of that site,
:func:`xray_core.monitor.drift.check_site`). Predict batches checked meanwhile are listed with
their verdicts (their features are not kept). Each batch check carries the champion's performance
estimated before labels (CBPE, :mod:`xray_core.monitor.performance`); the retrain's own check of its
arrivals, whose labels are catalogued, adds the realised value beside it (``realised``), so the
retrain's report shows both. Each check is a ``drift_checks`` row (the estimate is in its ``result``
JSON); one markdown
report goes to ``reports/monitor-<stamp>/report.md``.

A drift warning is evidence that the inputs changed, not proof that performance fell.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from xray_core.settings import Settings

REPORT = """# Monitor check {{ stamp }}

Champion: {% if r.model %}v{{ r.model }}{% else %}none{% endif %} · images since {{ r.since or "the beginning" }}: {{ r.n }}

**{{ r.summary }}**

{% if r.checks %}| batch | films | unlike training data | MMD p | KS p (probabilities) | estimated prevalence | estimated accuracy (before labels) | verdict |
|---|---|---|---|---|---|---|---|
{% for c in r.checks %}| {{ c.subject }} | {{ c.n }} | {{ c.ood_flagged }} | {{ fmt(c.mmd_p) }} | {{ fmt(c.ks_p) }} | {{ c.prevalence or "" }} | {{ acc(c.performance) }} | {{ c.verdict }} |
{% endfor %}
Performance before labels ({{ r.checks[0].subject }}): {{ line(r.checks[0].performance) }}.
{% for c in r.checks[:1] %}
Per-film flag: {{ c.ood_rule }}{% if c.ood_coarse %}; {{ c.ood_coarse }}{% endif %}.
{% endfor %}{% endif %}
{% if r.predict_checks %}
## Predict batches since the last check
{% for c in r.predict_checks %}- {{ c.subject }}: {{ c.n }} films, {{ c.ood_flagged }} unlike the training data; {{ c.verdict }}
{% endfor %}{% endif %}
A drift warning is evidence that the inputs changed, not proof that performance fell: only labelled
films (a retrain's evaluation) can show that. MMD: embeddings of the new films against held-out
validation films of the champion; KS: its predicted probabilities against theirs; prevalence: BBSE
from its validation confusion matrix (meaningful under label shift only); estimated accuracy: CBPE from
its calibrated probabilities, unreliable where drift is flagged (docs/monitoring.md).
"""  # noqa: E501 - a Markdown table row is one line, and so is a Jinja line without whitespace control


def run_monitor(settings: Settings, *, flow_run_id: str | None = None,
                kind: str = "monitor", folder: Path | None = None) -> dict[str, Any]:
    """Run every check of what arrived since the last one; record them; write the report.

    ``kind``: ``monitor`` (``xray monitor``, the daily deployment) or ``ingest`` (right after an ingest
    flow); either way a film is checked once. ``folder``: where the report goes (a retrain passes a
    folder inside its own report folder, so the two are kept and pruned together); by default
    ``reports/monitor-<stamp>`` or ``reports/<kind>-check-<stamp>``."""
    from jinja2 import Template

    from db import session_scope
    from db.schema import Model
    from xray_core.data.catalogue import open_catalogue
    from xray_core.io.fsutil import atomic_write_text
    from xray_core.monitor.checks import (
        estimates_since,
        images_since,
        last_check_time,
        predict_checks_since,
        record_check,
    )
    from xray_core.monitor.performance import estimate_line
    from xray_core.registry.versions import champion_version

    with session_scope(open_catalogue(settings)) as s:
        version = champion_version(s)
        champion = s.get(Model, version) if version is not None else None
        created = champion.created_at if champion is not None else None
    last = last_check_time(settings)
    last_retrain = last_check_time(settings, ("retrain",)) if kind == "retrain" else None
    since = max([t for t in (last, created) if t is not None], default=None)
    result: dict[str, Any] = {"model": version, "since": since.isoformat() if since else None, "checks": [],
                              "predict_checks": predict_checks_since(settings, last), "n": 0, "drift": False}
    rows = images_since(settings, since) if version is not None else []
    result["n"] = len(rows)
    if version is None:
        result["summary"] = "no champion yet: nothing to check against"
    else:
        result.update(_check_rows(settings, version, rows, with_labels=kind == "retrain"))
    films = result.pop("films", None)  # stored with the check, not returned: a retrain realises it later
    if result["checks"]:
        result["performance"] = result["checks"][0].get("performance")
    overall = {"n": len(rows), "ood_flagged": sum(c["ood_flagged"] for c in result["checks"][:1]),
               "drift": result["drift"], "verdict": result["summary"], "checks": result["checks"],
               **({"performance": result["performance"], "films": films} if films else {})}
    result["id"] = record_check(settings, model_id=version, kind=kind, subject=kind, check=overall,
                                flow_run_id=flow_run_id)
    if kind == "retrain":  # earlier checks since the last retrain's whose films arrived labelled now
        result["earlier"] = estimates_since(settings, last_retrain)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if folder is None:
        folder = settings.reports_dir / (f"monitor-{stamp}" if kind == "monitor" else f"{kind}-check-{stamp}")
    markdown = Template(REPORT).render(r=result, stamp=stamp, fmt=lambda p: "" if p is None else f"{p:.3g}",
                                       acc=accuracy_cell, line=estimate_line)
    atomic_write_text(folder / "report.md", markdown, mode=settings.file_mode)
    result["report"] = str(folder / "report.md")
    result["markdown"] = markdown
    return result


def single_site(sites: Any, reference: Any) -> str | None:
    """The site of a batch whose films all come from one site the reference has films of (at least
    MIN_BATCH drift-sample rows), else None (the pooled comparison: a mix of sites, a site the reference
    has too few or none of, or a reference saved before sites were recorded).

    Such a batch is compared with that site's reference films (:func:`~xray_core.monitor.drift.check_site`),
    as each site of a mixed batch is: against the pooled mix of sites one site's films differ by
    construction, a false alarm every night only one site sends films."""
    from xray_core.monitor.drift import MIN_BATCH

    names = {str(s) for s in sites}
    if len(names) != 1:
        return None
    site = names.pop()
    return site if (reference.site_rows(site) or 0) >= MIN_BATCH else None


def accuracy_cell(est: dict[str, Any] | None) -> str:
    """``84% ± 4%`` (``(unreliable)`` beside drift) for the report's table."""
    if not est or est.get("accuracy") is None:
        return ""
    cell = f"{100 * est['accuracy']:.0f}% ± {100 * est['accuracy_sd']:.0f}%"
    return cell if est.get("reliable", True) else f"{cell} (unreliable)"


def drifted_checks(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks that set the run's drift flag: a per-site check made against the pooled reference (a
    model saved before its reference recorded sites) is reported but does not count."""
    return [c for c in checks if c["drift"] and c.get("counts", True)]


def _check_rows(settings: Settings, version: int, rows: list[tuple], *, with_labels: bool) -> dict[str, Any]:
    """The batch checks of ``rows``; ``with_labels`` (the retrain's check of its arrivals, whose labels
    are in the catalogue): each check's ``realised`` performance beside the estimate."""
    from xray_core.data.catalogue import Row
    from xray_core.evaluate.metrics import positive_index
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache
    from xray_core.model.train import predict_proba
    from xray_core.monitor.drift import MIN_BATCH, check_batch, check_site
    from xray_core.monitor.ood import FlagRule
    from xray_core.monitor.performance import film_record, realised
    from xray_core.monitor.reference import model_reference
    from xray_core.pipeline.features import embed_items
    from xray_core.pipeline.model_settings import settings_for_model
    from xray_core.registry.versions import load_model

    model = load_model(settings, version)
    settings = settings_for_model(settings, model.card)  # auto precision: the champion's own
    backbone = load_backbone(settings)
    reference = model_reference(model)
    if reference is None:
        return {"summary": f"unknown: champion v{version} was saved without a reference (retrain to get one)"}
    if model.card["backbone_fingerprint"] != backbone.fingerprint:
        return {"summary": f"unknown: champion v{version} was trained on another backbone than "
                           "the current one"}
    if not rows:
        return {"summary": "nothing new since the last check"}
    cache = FeatureCache(backbone, settings)
    cache.ensure(embed_items(settings, [Row._make(r[:5]) for r in rows]), [0])
    x = cache.load([r[1] for r in rows], 0)
    probs = predict_proba(model.head, x)
    labels = model.labels
    pos = positive_index(labels, settings.negative_label) if len(labels) == 2 else None
    common: dict[str, Any] = dict(labels=labels, threshold=model.threshold, positive=pos,
                                  alpha=settings.drift_alpha, permutations=settings.drift_permutations,
                                  seed=settings.train_seed, rule=FlagRule.from_settings(settings))
    patients, sites = np.array([r[4] for r in rows]), np.array([r[5] for r in rows])
    y = np.array([labels.index(r[3]) if r[3] in labels else -1 for r in rows])

    def one(subject: str, keep: np.ndarray, site: str | None = None) -> dict[str, Any]:
        args = (x[keep], probs[keep])
        out = {"subject": subject, **({"site": site} if site is not None else {}),  # the site it judged
               **(check_batch(reference, *args, groups=patients[keep], **common) if site is None
                  else check_site(reference, site, *args, groups=patients[keep], **common))}
        if not with_labels:
            return out
        unknown = sorted({r[3] for r, k in zip(rows, keep) if k and r[3] not in labels})
        out["realised"] = (realised(probs[keep], y[keep], threshold=model.threshold, positive=pos)
                           if not unknown else  # the champion cannot be right on them: no comparison
                           {"n": 0, "note": f"{int((y[keep] < 0).sum())} films carry labels the champion "
                                            f"was not trained on ({', '.join(unknown)})"})
        return out

    checks = [one("all new films", np.ones(len(rows), dtype=bool), single_site(sites, reference))]
    for site in sorted(set(sites.tolist())) if len(set(sites.tolist())) > 1 else []:
        keep = sites == site
        if keep.sum() >= MIN_BATCH:
            checks.append(one(f"site {site}", keep, site))
    drifted = drifted_checks(checks)
    summary = (f"drift detected in {', '.join(c['subject'] for c in drifted)}: {drifted[0]['verdict']}"
               if drifted else checks[0]["verdict"])
    films = film_record([r[1] for r in rows], probs, labels=labels, threshold=model.threshold, positive=pos)
    return {"checks": checks, "drift": bool(drifted), "summary": summary, "films": films,
            "sites": sorted(c["subject"].removeprefix("site ")
                            for c in drifted if c["subject"].startswith("site "))}
