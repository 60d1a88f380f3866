"""The locked reference at a drifted site (issue 26): what a measured breach is, and what it does to the
promotion decision. Pure functions over numbers; :mod:`xray_core.pipeline.breach` measures them.

The routine test split judges the challenger against the champion; when one site's scanner changes, that
split still holds mostly the site's old films, so a champion that fell below the locked reference on the
new ones can veto every better challenger for weeks. When the retrain's drift check flags a site, the
champion and the reference are scored on that site's labelled films that neither was trained on. A
**breach** is the champion measured below the reference by more than ``XRAY_REFERENCE_MARGIN`` (the point
difference, as the sequestered audit's "degraded"), or (``kind`` "sensitivity") the champion's detection
of a disease class measured to have fallen on those films: fewer of their positives called than of the
site's earlier test films, by more than ``XRAY_GUARDRAIL_SENSITIVITY_DROP``, one-sided Fisher exact p
below ``XRAY_DRIFT_ALPHA`` over the classes judged (:func:`detection_drop`). Why both: a scanner change
can shift a champion's scores below its threshold while it still ranks the films well (bench/year.py,
night 21: the champion called 0 of site A's pneumonia films for a night, its AUROC on those 10 films
measured above the reference's). Both kinds are reported (result, report, audit rows,
``xray.reference.breach``); a detection breach changes no decision (:attr:`BreachCheck.acts`), a ranking
breach does what ``XRAY_REFERENCE_BREACH`` says:

- ``lift``: the champion has lost its standing at the site, so a challenger-vs-champion ``comparison``
  check that failed without a measured drop (its point estimate at or above ``-XRAY_PROMOTION_MARGIN``:
  only the interval was too wide) does not veto (:func:`apply_breaches`); a measured drop still does, and
  so does every other check. The challenger must also not measure below the champion, nor below the locked
  reference, by more than ``XRAY_REFERENCE_MARGIN`` on the site's TEST films of the drift episode (check
  ``breach_site``, the breach's own standard; never val, where the challenger was tuned; too few films:
  not measurable, no veto).
- ``alert``: reported only.
- ``rollback``: as ``lift``; a challenger still not promoted restores the reference as champion.

A breach step that fails (status ``failed``) is reported and changes nothing, as a failed drift check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

_TOL = 1e-9  # as the policy's: equal on paper may differ in the last bits

BREACH, HELD, THIN, FAILED = "breach", "held", "not enough films", "failed"
UNMEASURED = "not measured"  # the difference is undefined on the films (e.g. one class), or the labels differ
LIFTED, REPORTED, RESTORED = "comparison lifted", "reported", "reference restored"
RANKING, DETECTION = "auroc", "sensitivity"  # a breach's kind: below the reference; its own calls fell


@dataclass(frozen=True)
class BreachCheck:
    """The champion against the locked reference on one drifted site's new films (result.json
    ``breach_checks``, one per site the drift check flagged)."""

    site: str
    champion: int
    reference: int | None  # None only in a failed check that could not read it
    status: str  # breach | held | not enough films | not measured | failed
    films: int  # labelled films of the site catalogued after ``since`` (any split)
    since: str | None  # ISO time: the later of the two models' creation and the drift episode's start
    metric: str  # XRAY_PROMOTION_METRIC
    margin: float  # XRAY_REFERENCE_MARGIN
    mode: str  # XRAY_REFERENCE_BREACH
    detail: str
    difference: float | None = None  # champion minus reference, with its paired 95% interval
    low: float | None = None
    high: float | None = None
    champion_value: float | None = None
    reference_value: float | None = None
    action: str = "none"  # none | reported | comparison lifted | reference restored | ...: what it did
    # the challenger against the champion on the site's films outside its training split (lift, rollback):
    # {"name": "breach_site", "passed", "detail", "measurable", "films", "difference", "low", "high"}
    challenger_check: dict[str, Any] | None = None
    # ISO time of the first drift check of the site's current episode (None: none recorded, the films are
    # those since both models were created); films_from: which bound ``since`` is, "drift" or "models"
    drift_began: str | None = None
    films_from: str = "models"
    kind: str = RANKING  # what was breached: auroc (below the reference) | sensitivity (detection fell)
    # the champion's calls, the episode's films against the site's earlier test films (detection_drop)
    detection: dict[str, Any] | None = None

    @property
    def breached(self) -> bool:
        return self.status == BREACH

    @property
    def acts(self) -> bool:
        """A breach the decision acts on (``lift``/``rollback``): a ranking breach. A fall in detection is
        reported only: acting on it as ``lift`` was measured over bench/year.py's year and reverted (see
        :func:`detection_drop`)."""
        return self.breached and self.kind == RANKING and self.mode in ("lift", "rollback")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BreachCheck:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def audit_row(self) -> dict[str, Any]:
        """The numbers the promotion/keep and the restore audit rows keep (their ``metrics["breach"]``):
        site, status, gap (champion minus reference) and its interval, films, action, and whether the
        challenger passed ``breach_site``."""
        site = self.challenger_check
        return {"site": self.site, "status": self.status, "champion": self.champion,
                "reference": self.reference, "gap": self.difference, "low": self.low, "high": self.high,
                "films": self.films, "since": self.since, "action": self.action, "kind": self.kind,
                "detection": self.detection,
                "breach_site": None if site is None else site.get("passed")}


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def when(iso: str | None) -> str:
    """``2026-05-25 02:13 UTC`` from an ISO time (``?`` for None)."""
    return "?" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


def films_words(check: BreachCheck) -> str:
    """Which films were measured: ``site A's 12 films since the drift began on 2026-05-25 02:13 UTC``;
    ``... since both models were created (2026-06-01 ...; the drift began on ...)`` when a model is newer
    than the episode; ``40 new films of site A`` without a recorded episode (films since both models)."""
    if check.drift_began is None:
        return f"{check.films} new films of site {check.site}"
    if check.films_from == "drift":
        return f"site {check.site}'s {check.films} films since the drift began on {when(check.drift_began)}"
    return (f"site {check.site}'s {check.films} films since both models were created ({when(check.since)}; "
            f"the drift began on {when(check.drift_began)})")


def detection_words(detection: Mapping[str, Any]) -> str:
    """``called pneumonia on 0 of its 5 pneumonia films, against 26 of 30 of the site's earlier test films
    (one-sided Fisher p=0.00039)`` (a binary model calls the disease at its threshold, a multi-class one
    the most probable class)."""
    (ka, na), (kb, nb) = detection["after"], detection["before"]
    label = detection["label"]
    return (f"called {label} on {ka} of its {na} {label} films, against {kb} of {nb} of the site's earlier "
            f"test films (one-sided Fisher p={detection['p']:.2g})")


def breach_words(check: BreachCheck) -> str:
    """``champion v17 measured 0.114 below the locked reference v2 at site A on 40 new films``; a
    detection breach: ``champion v17 called pneumonia on 0 of its 5 pneumonia films, against ... on site
    A's 10 films since the drift began ...``."""
    if check.kind == DETECTION and check.detection is not None:
        where = (f"at site {check.site} on {check.films} new films" if check.drift_began is None
                 else f"on {films_words(check)}")
        return f"champion v{check.champion} {detection_words(check.detection)}, {where}"
    gap = abs(check.difference or 0.0)
    head = f"champion v{check.champion} measured {gap:.3f} below the locked reference v{check.reference}"
    if check.drift_began is None:
        return f"{head} at site {check.site} on {check.films} new films"
    return f"{head} on {films_words(check)}"


def measure_words(check: BreachCheck) -> str:
    """The numbers of a measured site and what they mean, in one sentence."""
    numbers = (f"{check.metric} champion v{check.champion} {_f(check.champion_value)} vs locked reference "
               f"v{check.reference} {_f(check.reference_value)} on {films_words(check)}, difference "
               f"{_signed(check.difference)}, 95% CI [{_signed(check.low)}, {_signed(check.high)}]")
    if check.breached and check.kind == DETECTION:
        return (f"{breach_words(check)}: its detection fell by more than XRAY_GUARDRAIL_SENSITIVITY_DROP "
                f"({numbers})")
    fell = check.detection is not None and check.detection["collapsed"]
    calls = ("" if check.detection is None else
             f"; its detection {'fell too' if fell else 'held'}: it {detection_words(check.detection)}")
    if check.breached:
        return f"{breach_words(check)} ({numbers}; XRAY_REFERENCE_MARGIN={check.margin:g}){calls}"
    return (f"no breach: {numbers}; not measured more than XRAY_REFERENCE_MARGIN={check.margin:g} below "
            f"(a wide interval alone is not a measured drop){calls}")


def detection_drop(labels: Sequence[str], negative_label: str, before: Sequence[Sequence[int]],
                   after: Sequence[Sequence[int]], allowed_drop: float, alpha: float,
                   min_per_class: int) -> dict[str, Any] | None:
    """Did the champion's detection of a disease class fall? ``before``/``after``: its confusion matrices
    (rows true, columns called, in ``labels`` order) on the site's earlier films and on the episode's. Per
    disease class with at least ``min_per_class`` positives on each side: the share called, before minus
    after, and the one-sided Fisher exact p of "fewer called after" (scipy's ``fisher_exact``; exact, as a
    handful of new positives needs). ``collapsed`` when the drop exceeds ``allowed_drop`` and p is below
    ``alpha`` divided by the number of classes judged (Bonferroni: any one class may fire). Returns the
    most significant class's entry, None when no class has enough films. Fisher rather than a bound on the
    old share: the earlier films are a sample too. It counts films as independent: a patient with several
    films counts several times (the ranking check's bootstrap clusters by patient).

    Reported, never acted on (:attr:`BreachCheck.acts`): treated as a ranking breach under ``lift``, the
    year's one detection breach (night 21, 0 of 5 called against 29 of 31, p = 6e-5) promoted a challenger
    that called 0.99 of A's pneumonia films; the chain of champions it started then met four more ranking
    breaches on 8-10 films, 10 models were promoted instead of 6, and the home ended at 68.2 MB against
    its 53.0 MB bound (every promoted model is kept)."""
    from scipy.stats import fisher_exact

    from xray_core.evaluate.metrics import disease_indices

    found: list[dict[str, Any]] = []
    for c in disease_indices(labels, negative_label):
        kb, nb = int(before[c][c]), int(sum(before[c]))
        ka, na = int(after[c][c]), int(sum(after[c]))
        if min(nb, na) < max(min_per_class, 1):
            continue
        p = float(fisher_exact([[kb, nb - kb], [ka, na - ka]], alternative="greater").pvalue)
        found.append({"label": labels[c], "before": [kb, nb], "after": [ka, na], "drop": kb / nb - ka / na,
                      "p": p})
    for d in found:
        d["collapsed"] = bool(d["drop"] > allowed_drop + _TOL and d["p"] < alpha / len(found))
        d["drop"] = round(d["drop"], 4)
    return min(found, key=lambda d: (not d["collapsed"], d["p"])) if found else None


def _site_numbers(comparison: Mapping[str, Any], other: str) -> str:
    return (f"challenger {_f(comparison.get('challenger'))} vs {other} {_f(comparison.get('champion'))}, "
            f"difference {_signed(comparison.get('difference'))} [{_signed(comparison.get('low'))}, "
            f"{_signed(comparison.get('high'))}]")


def site_condition(comparison: Mapping[str, Any] | None, site: str, films: int, champion: int, margin: float,
                   why_not: str | None = None, *, reference: int | None = None,
                   vs_reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``breach_site`` check: on site ``site``'s test films of the drift episode (never val: the
    challenger chose its recipe, epoch, temperature and threshold on val) the challenger must not measure
    below the champion (``comparison``: challenger minus champion) by more than ``margin``
    (XRAY_REFERENCE_MARGIN: the point difference, as the breach itself and the sequestered audit's
    "degraded"), nor below the locked reference v``reference`` (``vs_reference``: challenger minus
    reference) by more than ``margin``: it must not itself be in breach there. ``why_not``: why it could not
    be measured (reported, passed: no veto)."""
    base = {"name": "breach_site", "films": films}
    diff = None if comparison is None else comparison.get("difference")
    if why_not is not None or comparison is None or diff is None:
        reason = why_not or "the difference could not be estimated on them"
        return {**base, "passed": True, "measurable": False,
                "detail": f"challenger vs champion v{champion} at site {site}: not measurable ({reason}); "
                          "no veto (XRAY_REFERENCE_BREACH)"}
    ref_diff = None if vs_reference is None else vs_reference.get("difference")
    below = [f"{abs(diff):.3f} below the champion it would replace"] if diff < -margin - _TOL else []
    if ref_diff is not None and ref_diff < -margin - _TOL:
        below.append(f"{abs(ref_diff):.3f} below the locked reference v{reference} (in breach itself)")
    numbers = f"{_site_numbers(comparison, f'champion v{champion}')}"
    if vs_reference is not None:
        numbers += f"; {_site_numbers(vs_reference, f'locked reference v{reference}')}"
    numbers += f", on {films} test films of site {site}"
    passed = not below
    verdict = (f"not measured more than XRAY_REFERENCE_MARGIN={margin:g} below the champion "
               + ("or the locked reference " if vs_reference is not None else "") + "there" if passed
               else f"measured {' and '.join(below)} there, more than XRAY_REFERENCE_MARGIN={margin:g}")
    return {**base, "passed": passed, "measurable": True, "difference": diff, "low": comparison.get("low"),
            "high": comparison.get("high"), "reference_difference": ref_diff,
            "detail": f"{numbers}: {verdict} (XRAY_REFERENCE_BREACH)"}


def apply_breaches(decision: dict[str, Any], breaches: Sequence[BreachCheck],
                   comparison: Mapping[str, Any] | None = None, margin: float = 0.0) -> dict[str, Any]:
    """The policy's decision after the breaches (``lift``/``rollback``; ``alert`` and held sites change
    nothing): a ``comparison`` check that failed WITHOUT a measured drop (``comparison``, the policy's
    challenger-minus-champion difference: its point estimate at or above ``-margin``, the promotion margin)
    no longer vetoes (it stays failed, ``lifted``, its detail says why), so the policy's keep becomes
    promote when it was the only failed check; a measured drop (or an unknown difference) still vetoes,
    its detail says so. Then each breached site's ``breach_site`` check vetoes a challenger measured below
    the champion or the reference there. The other guards (per-site guardrail, flips, locked reference,
    audit) apply after this, as before. A new dict."""
    acting = [b for b in breaches if b.acts]
    if not acting:
        return decision
    out = {**decision, "checks": [dict(c) for c in decision.get("checks") or []]}
    why = (f"{'; '.join(breach_words(b) for b in acting)}, so the champion has lost its standing "
           f"(XRAY_REFERENCE_BREACH={acting[0].mode})")
    failed = [c for c in out["checks"] if not c.get("passed")]
    check = next((c for c in failed if c.get("name") == "comparison"), None)
    diff = None if comparison is None else comparison.get("difference")
    if check is not None and (diff is None or diff < -margin - _TOL):
        measured = ("its difference is unknown" if diff is None
                    else f"it measured the challenger {abs(diff):.3f} below the champion, more than the "
                         f"promotion margin {margin:g}")
        check.update(lifted=False, detail=f"still vetoes ({measured}), although {why}; {check['detail']}")
    elif check is not None:
        check.update(lifted=True,
                     detail=f"no veto: {why}, and the comparison failed without a measured drop "
                            f"(difference {diff:+.3f}, not below -{margin:g}); {check['detail']}")
        if len(failed) == 1 and out.get("decision") == "keep":
            out.update(decision="promote", promote=True,
                       rationale=f"Promote unless a guard vetoes: {why}, and the comparison with it does not "
                                 f"veto. The comparison said: {decision['rationale']}")
    for b in acting:
        site = b.challenger_check
        if site is None:
            continue
        out["checks"].append({k: site[k] for k in ("name", "passed", "detail")})
        if not site["passed"] and out.get("promote"):
            out.update(decision="keep", promote=False,
                       rationale=f"Keep, because the challenger must not be worse than the champion it "
                                 f"replaces, nor in breach itself, at the drifted site: {site['detail']}. "
                                 f"Without this check: {out['rationale']}")
    return out


def settled_actions(breaches: Sequence[BreachCheck],
                    checks: Sequence[Mapping[str, Any]]) -> list[BreachCheck]:
    """Each lifting breach's ``action`` once the decision is made, saying what the lift did: the
    comparison's veto lifted, not lifted (a measured drop), or nothing to lift (it did not veto); a breach
    is measured before the decision, so its first action only says what it was allowed to do."""
    comparison = next((c for c in checks if c.get("name") == "comparison"), None)
    if comparison is None or comparison.get("passed"):
        done = "nothing to lift: the comparison did not veto"
    elif comparison.get("lifted"):
        done = LIFTED
    else:
        done = "not lifted: the comparison measured a drop"
    return [replace(b, action=done) if b.breached and b.action == LIFTED else b for b in breaches]


__all__ = ["BREACH", "DETECTION", "FAILED", "HELD", "LIFTED", "RANKING", "REPORTED", "RESTORED", "THIN",
           "UNMEASURED", "BreachCheck", "apply_breaches", "breach_words", "detection_drop", "detection_words",
           "films_words", "measure_words", "settled_actions", "site_condition", "when"]
