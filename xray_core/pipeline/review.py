"""Review: a run whose decision needs a person waits for one, between *decide* and *record*.

With ``XRAY_REVIEW=blocked`` (the default under ``XRAY_SHORTCUT_POLICY=block``) a run the shortcut audit
would block asks a reviewer; with ``always``, a run the policy would promote asks too. The recipe
builds a :class:`ReviewRequest` (:func:`review_request`), the executor asks someone
(``Executor.review``: the Prefect executor pauses the flow run with a form; direct calls have nobody
to ask) and returns a :class:`ReviewAnswer`, and :func:`reviewed` turns the answer into the verdict
that is recorded, in one audit row with the reviewer:

- approve: ``approved``, promoted with compare-and-set (``stale``, nothing promoted, if the champion
  moved meanwhile): Promoted (Kept if stale);
- reject: ``rejected``: Kept;
- no answer within ``XRAY_REVIEW_TIMEOUT_H``: ``review_expired``: Kept;
- nobody to ask (``--local``, no Prefect API): the recipe's own decision, as before review existed (Blocked,
  or Promoted under ``always``), and the rationale says so.

While a run waits, nightly retrains go on (the run gave up the retrain lock); one with nothing new
skips instead of asking the same question again (:func:`nothing_new_since_pending_review`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from xray_core.data.snapshot import SplitData
from xray_core.results import Evaluation, Verdict
from xray_core.settings import Settings

Answer = Literal["approve", "reject", "expired", "none"]
# What each answer records (the promotion audit row's decision).
REVIEWED_DECISIONS = {"approve": "approved", "reject": "rejected", "expired": "review_expired"}


@dataclass(frozen=True)
class ReviewRequest:
    """What a reviewer is asked, and what they need to answer (the form's text: :func:`review_markdown`)."""

    version: int  # the challenger
    champion: int | None  # the champion it was compared with: an approval promotes only if it still is
    decision: str  # the recipe's decision without review: blocked | promote
    rationale: str  # the policy's rationale (after the guardrails and the audit)
    mode: str  # XRAY_REVIEW: blocked | always
    timeout_h: float  # XRAY_REVIEW_TIMEOUT_H
    requested_at: datetime  # UTC
    flow_run_id: str | None = None
    run_name: str | None = None
    checks: tuple[str, ...] = ()  # one line per check: "passed|FAILED name: detail"
    scores: tuple[str, ...] = ()  # one line per model: "v5: macro AUROC 0.91 [0.85, 0.95], n=26"
    breaches: tuple[str, ...] = ()  # one line per breach of the locked reference at a drifted site

    @property
    def deadline(self) -> datetime:
        """When an unanswered review expires (UTC)."""
        return self.requested_at + timedelta(hours=self.timeout_h)

    @property
    def timeout_s(self) -> int:
        """The wait in whole seconds, at least 1 (Prefect's pause timeout is an integer)."""
        return max(1, round(self.timeout_h * 3600))


@dataclass(frozen=True)
class ReviewAnswer:
    """A reviewer's answer; ``expired`` when nobody answered in time, ``none`` when there was nobody to
    ask (``reason`` then says why: a ``--local`` run, no Prefect API)."""

    decision: Answer
    reviewer: str | None = None
    reason: str = ""
    answered_at: datetime | None = None

    @classmethod
    def nobody(cls, why: str) -> ReviewAnswer:
        return cls("none", None, why)

    @classmethod
    def expired(cls) -> ReviewAnswer:
        return cls("expired", None, "", datetime.now(UTC))


def review_applies(settings: Settings, verdict: Verdict) -> bool:
    """Whether this verdict waits for a reviewer under ``XRAY_REVIEW``."""
    if settings.review == "off":
        return False
    return verdict.decision == "blocked" or (settings.review == "always" and verdict.promote)


def review_request(settings: Settings, verdict: Verdict, challenger: Evaluation, champion: Evaluation | None,
                   *, flow_run_id: str | None = None, run_name: str | None = None,
                   breaches: Sequence[str] = ()) -> ReviewRequest | None:
    """The question for a reviewer, or None when this verdict does not wait for one. ``breaches``: the
    details of the run's breaches of the locked reference (said on the form: a rejection or no answer keeps
    the champion, and the reference is not restored after a review)."""
    if not review_applies(settings, verdict):
        return None
    checks = tuple(f"{'passed' if c.get('passed') else 'FAILED'} {c.get('name')}: {c.get('detail')}"
                   for c in verdict.checks or [])
    scores = tuple(_score(ev, role) for ev, role in ((challenger, "challenger"), (champion, "champion"))
                   if ev is not None)
    return ReviewRequest(version=challenger.version, champion=champion.version if champion else None,
                         decision=verdict.decision, rationale=verdict.rationale, mode=settings.review,
                         timeout_h=settings.review_timeout_h, requested_at=datetime.now(UTC),
                         flow_run_id=flow_run_id, run_name=run_name, checks=checks, scores=scores,
                         breaches=tuple(breaches))


def _score(ev: Evaluation, role: str) -> str:
    point = ev.metrics.get("macro_auroc")
    ci = (ev.metrics.get("intervals") or {}).get("macro_auroc") or {}
    shown = "n/a" if point is None else f"{point:.3f}"
    if ci.get("low") is not None and ci.get("high") is not None:
        shown += f" [{ci['low']:.3f}, {ci['high']:.3f}]"
    return f"{role} v{ev.version}: macro AUROC {shown}, n={ev.n_images} test films"


def reviewed(verdict: Verdict, ask: ReviewRequest, answer: ReviewAnswer) -> Verdict:
    """The verdict to record after ``answer``; its rationale starts with who decided and why, then the
    recipe's own rationale. ``review`` holds the answer (result.json's ``decision.review``)."""
    record: dict[str, Any] = {
        "mode": ask.mode, "answer": answer.decision, "reviewer": answer.reviewer, "reason": answer.reason,
        "requested_at": ask.requested_at.isoformat(), "deadline": ask.deadline.isoformat(),
        "answered_at": answer.answered_at.isoformat() if answer.answered_at else None}
    before = f"Without review: {verdict.rationale}"
    if answer.decision == "approve":
        return replace(verdict, decision="approved", promote=True, review=record,
                       rationale=f"Approved in review by {answer.reviewer}: {answer.reason}. {before}")
    if answer.decision == "reject":
        return replace(verdict, decision="rejected", promote=False, review=record,
                       rationale=f"Rejected in review by {answer.reviewer}: {answer.reason}. {before}")
    if answer.decision == "expired":
        return replace(verdict, decision="review_expired", promote=False, review=record, rationale=(
            f"Review expired: nobody answered within {ask.timeout_h:g} h (XRAY_REVIEW_TIMEOUT_H); not "
            f"promoted (xray promote {ask.version} --reason ... still can). {before}"))
    ended = (f"it ends Blocked (after review, promote it by hand: xray promote {ask.version} --reason ...)"
             if verdict.decision == "blocked" else "the policy's decision stands, as without review")
    return replace(verdict, review=record, rationale=(
        f"{verdict.rationale} XRAY_REVIEW={ask.mode} asks for a reviewer, but {answer.reason}, so {ended}."))


def review_markdown(ask: ReviewRequest) -> str:
    """The text above the form on the paused run (markdown): what was decided, the numbers, what each
    answer does, and the deadline."""
    champion = f"v{ask.champion}" if ask.champion is not None else "no champion"
    why = ("the shortcut audit flagged the data" if ask.decision == "blocked"
           else "the policy would promote it and XRAY_REVIEW=always asks a person first")
    stays = f"{champion} stays champion" if ask.champion is not None else "there stays no champion"
    lines = [f"### Review challenger v{ask.version}", "",
             f"This run waits for a reviewer: {why} (XRAY_REVIEW={ask.mode}).", "",
             f"**Without review:** {ask.decision}. {ask.rationale}", ""]
    lines += [f"- {s}" for s in ask.scores] + ([""] if ask.scores else [])
    lines += [(f"**A breach at a drifted site was measured:** {b}. The champion stays if you reject or "
               "nobody answers: the reference is not restored after a review (xray rollback can).")
              for b in ask.breaches] + ([""] if ask.breaches else [])
    lines += [f"- {c}" for c in ask.checks] + ([""] if ask.checks else [])
    lines += [(f"- **approve**: v{ask.version} becomes champion, if {champion} is still the champion when "
               "the answer arrives (otherwise nothing is promoted and the run records `stale`);"),
              f"- **reject**: {stays}; v{ask.version} is rejected;",
              (f"- no answer by {ask.deadline:%Y-%m-%d %H:%M} UTC (XRAY_REVIEW_TIMEOUT_H={ask.timeout_h:g}): "
               f"{stays} (review expired)."), "",
              ("Your name and reason go into the audit trail (`xray models --history`). From a shell: "
               f"`xray review {ask.version} --approve|--reject --reason \"...\"`.")]
    return "\n".join(lines)


def nothing_new_since_pending_review(settings: Settings, data: SplitData) -> str | None:
    """Why retraining would only ask a reviewer the same question again, or None.

    A run waiting for its reviewer (``XRAY_REVIEW``) gives up the retrain lock, so nightly retrains go
    on meanwhile; without this, each night with nothing new would train the same challenger again and
    pause for a second, identical review. The newest model is still a candidate with no decision
    recorded and younger than ``XRAY_REVIEW_TIMEOUT_H`` (a run killed while waiting stops counting
    then), and neither the training and validation images, its test set, the backbone nor a setting
    but where and how fast work runs changed since: the rerun skips and says which review it waits for.
    """
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Evaluation, Model, Promotion, as_utc
    from xray_core.data.catalogue import open_catalogue
    from xray_core.data.snapshot import fingerprint_test_set, training_set_fingerprint
    from xray_core.pipeline.model_settings import settings_for_fingerprint
    from xray_core.pipeline.unchanged import EXECUTION_SETTINGS

    if settings.review == "off":
        return None
    with session_scope(open_catalogue(settings)) as s:
        newest = s.scalar(select(Model).order_by(Model.id.desc()).limit(1))
        if newest is None or newest.status != "candidate" or newest.created_at is None or s.scalar(
                select(Promotion.id).where(Promotion.to_version == newest.id).limit(1)) is not None:
            return None
        evaluated = s.scalar(select(Evaluation.test_set_fingerprint).where(Evaluation.model_id == newest.id)
                             .order_by(Evaluation.id.desc()).limit(1))
        version, since, run = newest.id, as_utc(newest.created_at), newest.flow_run_id
        trained_on, backbone = newest.training_set_fingerprint, newest.backbone_fingerprint
        config = dict(newest.config)
    if datetime.now(UTC) - since > timedelta(hours=settings.review_timeout_h):
        return None
    now = settings.public_dict()
    changed = [k for k in set(now) | set(config)
               if k not in EXECUTION_SETTINGS and config.get(k) != now.get(k)]
    same_data = trained_on == training_set_fingerprint(data) and evaluated == fingerprint_test_set(data.test)
    if not same_data or changed or settings_for_fingerprint(settings, backbone) is None:
        return None
    return (f"nothing new since v{version} (trained {since:%Y-%m-%d %H:%M} UTC"
            f"{f' by flow run {run}' if run else ''}), which waits for its reviewer: the same images, test "
            f"set, backbone and settings would ask the same question (answer it on the paused run's form or "
            f"with xray review {version}); retrain with force=True (CLI --force) to run anyway")
