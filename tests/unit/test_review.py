"""The recipe's review branch (``XRAY_REVIEW``), with a fake executor playing the reviewer.

``recipe.record`` is the part of the recipe between *decide* and *rescore*: it asks the executor for a
review when the setting says so, then records the decision with the real ``promote`` step on a real
catalogue (tiny heads from tests/registry_heads.py, no backbone). Shown: approve promotes (one audit row,
the reviewer as its actor), reject and expiry keep the champion, an approval after the champion moved is
recorded ``stale``, the retrain lock is free while the run waits, and a run with nobody to ask keeps its
decision and says so. The same against a real Prefect server: tests/flows/test_review_server.py.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from registry_heads import champions, db_count, save, status_of

from db.schema import Promotion
from xray_core.errors import RetrainBusyError
from xray_core.pipeline.executor import DirectExecutor
from xray_core.pipeline.lock import hold_retrain_lock, retrain_lock
from xray_core.pipeline.recipe import RetrainRequest, record
from xray_core.pipeline.review import ReviewAnswer, ReviewRequest, review_applies, review_markdown
from xray_core.registry.listing import history
from xray_core.registry.versions import promote_manually
from xray_core.results import Evaluation, RunResult, Verdict, run_state
from xray_core.settings import Settings, load_settings, reset_settings

FINGERPRINT = "f" * 64
BLOCKED = Verdict(
    decision="blocked",
    promote=False,
    checks=[
        {"name": "non_inferiority", "passed": True, "detail": "macro AUROC +0.010"},
        {"name": "shortcut_audit", "passed": False, "detail": "covid19 films come only from site adult"},
    ],
    rationale="Not promoted: the shortcut audit flagged the data (covid19 films come only from site adult).",
)
PROMOTE = Verdict(decision="promote", promote=True, checks=[], rationale="Promote: macro AUROC +0.020.")


class Reviewer(DirectExecutor):
    """Direct calls for the steps; ``review`` gives ``answer`` after ``meanwhile`` runs (while the run
    waits), noting what it was asked and whether the retrain lock was free."""

    def __init__(
        self, settings: Settings, answer: ReviewAnswer, meanwhile: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self.settings, self.answer, self.meanwhile = settings, answer, meanwhile
        self.asked: list[ReviewRequest] = []
        self.lock_free_while_waiting: bool | None = None

    def review(self, ask: ReviewRequest, *, before_waiting: Callable[[], None] | None = None) -> ReviewAnswer:
        self.asked.append(ask)
        if before_waiting is not None:
            before_waiting()
        try:
            with retrain_lock(self.settings):  # what a nightly retrain would do meanwhile
                self.lock_free_while_waiting = True
        except RetrainBusyError:
            self.lock_free_while_waiting = False
        if self.meanwhile is not None:
            self.meanwhile()
        return self.answer


def answer(
    decision: str, reviewer: str | None = "alice", reason: str = "site confound explained"
) -> ReviewAnswer:
    return ReviewAnswer(decision, reviewer, reason, datetime.now(UTC))  # type: ignore[arg-type]  # any word, on purpose


@pytest.fixture
def blocking(xray_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The shortcut audit blocks, so review defaults to ``blocked``."""
    monkeypatch.setenv("XRAY_SHORTCUT_POLICY", "block")
    reset_settings()
    settings = load_settings()
    assert settings.review == "blocked"
    return settings


def evaluation(version: int) -> Evaluation:
    metrics = {"macro_auroc": 0.9, "intervals": {"macro_auroc": {"low": 0.8, "high": 0.97}}}
    return Evaluation(
        version=version,
        test_set_fingerprint=FINGERPRINT,
        n_images=26,
        metrics=metrics,
        labels=["normal", "pneumonia"],
        probabilities=[],
        shas=[],
        sites=[],
        views=[],
    )


def run_record(
    settings: Settings, executor: Any, verdict: Verdict, challenger: int, champion: int | None
) -> tuple[RunResult, Any, bool]:
    """``recipe.record`` as the recipe calls it, under the retrain lock; (result, recorded, whether the
    run still held the lock afterwards)."""
    result = RunResult(
        flow_run_id="run-1",
        run_name="calm-otter",
        trigger="schedule",
        backbone_weights="random",
        backbone_random_init=True,
        run_dir=str(settings.reports_dir),
    )
    result.challenger_eval = evaluation(challenger)
    result.champion_eval = evaluation(champion) if champion is not None else None
    request = RetrainRequest(trigger="schedule", flow_run_id="run-1", run_name="calm-otter")
    with hold_retrain_lock(settings) as lock:
        recorded = record(settings, request, executor, result, verdict, lock)
        return result, recorded, lock.held


def two_versions(settings: Settings) -> tuple[int, int]:
    v1, v2 = save(settings, seed=1), save(settings, seed=2)
    promote_manually(settings, v1, reason="first")
    return v1, v2


def test_approve_promotes_with_one_audit_row_naming_the_reviewer(blocking: Settings):
    v1, v2 = two_versions(blocking)
    reviewer = Reviewer(blocking, answer("approve"))
    result, recorded, held = run_record(blocking, reviewer, BLOCKED, v2, v1)

    (ask,) = reviewer.asked
    assert (ask.version, ask.champion, ask.decision, ask.mode, ask.flow_run_id) == (
        v2,
        v1,
        "blocked",
        "blocked",
        "run-1",
    )
    assert reviewer.lock_free_while_waiting and not held  # nightlies can run while it waits
    assert (recorded.decision, recorded.champion_after) == ("approved", v2)
    assert champions(blocking) == [v2] and status_of(blocking, v1) == "retired"
    assert run_state("completed", recorded.decision) == "Promoted"
    row = history(blocking)[-1]
    assert db_count(blocking, Promotion) == 2  # the manual promotion of v1, then this run's one row
    assert (row["decision"], row["actor"], row["from_version"], row["to_version"]) == (
        "approved",
        "alice",
        v1,
        v2,
    )
    assert row["rationale"].startswith(
        "Approved in review by alice: site confound explained. Without review: "
        "Not promoted: the shortcut audit flagged"
    )
    assert row["flow_run_id"] == "run-1" and row["trigger"] == "schedule"
    review = result.as_dict()["decision"]["review"]
    assert (review["answer"], review["reviewer"], review["reason"], review["mode"]) == (
        "approve",
        "alice",
        "site confound explained",
        "blocked",
    )


def test_reject_keeps_the_champion_and_closes_the_challenger(blocking: Settings):
    v1, v2 = two_versions(blocking)
    _, recorded, _ = run_record(
        blocking, Reviewer(blocking, answer("reject", "bob", "label follows the site")), BLOCKED, v2, v1
    )
    assert (recorded.decision, recorded.champion_after) == ("rejected", v1)
    assert run_state("completed", recorded.decision) == "Kept"
    assert champions(blocking) == [v1] and status_of(blocking, v2) == "rejected"
    row = history(blocking)[-1]
    assert (row["decision"], row["actor"]) == ("rejected", "bob")
    assert row["rationale"].startswith("Rejected in review by bob: label follows the site.")


def test_no_answer_in_time_keeps_the_champion_as_review_expired(blocking: Settings):
    v1, v2 = two_versions(blocking)
    _, recorded, _ = run_record(blocking, Reviewer(blocking, ReviewAnswer.expired()), BLOCKED, v2, v1)
    assert (recorded.decision, recorded.champion_after) == ("review_expired", v1)
    assert run_state("completed", recorded.decision) == "Kept"
    assert champions(blocking) == [v1] and status_of(blocking, v2) == "rejected"
    row = history(blocking)[-1]
    assert row["decision"] == "review_expired" and row["actor"] is None
    assert row["rationale"].startswith("Review expired: nobody answered within 72 h (XRAY_REVIEW_TIMEOUT_H)")


def test_an_approval_after_the_champion_moved_is_recorded_stale(blocking: Settings):
    v1, v2 = two_versions(blocking)
    v3 = save(blocking, seed=3)

    def moved() -> None:
        promote_manually(blocking, v3, reason="promoted by hand while the review waited")

    _, recorded, _ = run_record(
        blocking, Reviewer(blocking, answer("approve"), meanwhile=moved), BLOCKED, v2, v1
    )
    assert (recorded.decision, recorded.champion_after) == ("stale", v3)
    assert run_state("completed", recorded.decision) == "Kept"
    assert champions(blocking) == [v3] and status_of(blocking, v2) == "candidate"
    row = history(blocking)[-1]
    assert (row["decision"], row["actor"]) == ("stale", "alice")
    assert f"champion changed from v{v1} to v{v3} since evaluation" in row["rationale"]
    assert "the 'approved' decision" in row["rationale"] and "Approved in review by alice" in row["rationale"]


def test_a_first_model_approved_becomes_the_first_champion(blocking: Settings):
    v1 = save(blocking, seed=1)
    _, recorded, _ = run_record(blocking, Reviewer(blocking, answer("approve")), BLOCKED, v1, None)
    assert (recorded.decision, recorded.champion_after) == ("approved", v1) and champions(blocking) == [v1]


def test_a_run_with_nobody_to_ask_ends_blocked_and_says_so(blocking: Settings):
    v1, v2 = two_versions(blocking)
    result, recorded, held = run_record(blocking, DirectExecutor(), BLOCKED, v2, v1)
    assert (recorded.decision, recorded.champion_after) == ("blocked", v1)
    assert run_state("completed", recorded.decision) == "Blocked"
    assert held  # nobody waited: the run kept its lock to the end
    assert (
        "XRAY_REVIEW=blocked asks for a reviewer, but a run without Prefect (xray retrain --local) has no "
        f"reviewer, so it ends Blocked (after review, promote it by hand: xray promote {v2} --reason ...)."
        in recorded.rationale
    )
    assert result.as_dict()["decision"]["review"]["answer"] == "none"
    assert status_of(blocking, v2) == "candidate" and history(blocking)[-1]["actor"] is None


def test_review_off_asks_nobody_and_records_as_before(blocking: Settings):
    v1, v2 = two_versions(blocking)
    settings = blocking.with_overrides(review="off")
    reviewer = Reviewer(settings, answer("approve"))
    result, recorded, held = run_record(settings, reviewer, BLOCKED, v2, v1)
    assert reviewer.asked == [] and held
    assert recorded.decision == "blocked" and "review" not in result.as_dict()["decision"]


@pytest.mark.parametrize(
    ("mode", "verdict", "asks"),
    [
        ("off", BLOCKED, False),
        ("off", PROMOTE, False),
        ("blocked", BLOCKED, True),
        ("blocked", PROMOTE, False),
        ("always", BLOCKED, True),
        ("always", PROMOTE, True),
        ("always", Verdict(decision="keep", promote=False, checks=[], rationale="worse"), False),
    ],
)
def test_which_verdicts_wait_for_a_reviewer(settings: Settings, mode: str, verdict: Verdict, asks: bool):
    assert review_applies(settings.with_overrides(review=mode), verdict) is asks


def test_review_defaults_follow_the_shortcut_policy(xray_env: dict[str, str]):
    assert load_settings({**xray_env}).review == "off"
    assert load_settings({**xray_env, "XRAY_SHORTCUT_POLICY": "block"}).review == "blocked"
    assert load_settings({**xray_env, "XRAY_SHORTCUT_POLICY": "block", "XRAY_REVIEW": "off"}).review == "off"
    assert load_settings({**xray_env, "XRAY_REVIEW": "always"}).review == "always"


def test_the_form_says_what_each_answer_does_and_until_when(blocking: Settings):
    v1, v2 = two_versions(blocking)
    reviewer = Reviewer(blocking.with_overrides(review_timeout_h=0.5), answer("approve"))
    run_record(blocking.with_overrides(review_timeout_h=0.5), reviewer, BLOCKED, v2, v1)
    (ask,) = reviewer.asked
    assert ask.timeout_s == 1800 and ask.deadline - ask.requested_at == timedelta(minutes=30)
    text = review_markdown(ask)
    assert f"### Review challenger v{v2}" in text and "the shortcut audit flagged the data" in text
    assert f"challenger v{v2}: macro AUROC 0.900 [0.800, 0.970], n=26 test films" in text
    assert "FAILED shortcut_audit: covid19 films come only from site adult" in text
    assert f"**approve**: v{v2} becomes champion, if v{v1} is still the champion" in text
    assert f"**reject**: v{v1} stays champion; v{v2} is rejected" in text
    assert f"no answer by {ask.deadline:%Y-%m-%d %H:%M} UTC (XRAY_REVIEW_TIMEOUT_H=0.5)" in text
    assert f"xray review {v2} --approve|--reject" in text


def test_always_asks_before_a_promotion_and_without_a_reviewer_promotes_as_before(blocking: Settings):
    v1, v2 = two_versions(blocking)
    always = blocking.with_overrides(review="always")
    reviewer = Reviewer(always, answer("reject", "dana", "wait for the next site"))
    _, recorded, _ = run_record(always, reviewer, PROMOTE, v2, v1)
    assert [a.decision for a in reviewer.asked] == ["promote"]
    assert (recorded.decision, recorded.champion_after) == ("rejected", v1)

    v3 = save(blocking, seed=3)
    _, recorded, _ = run_record(always, DirectExecutor(), PROMOTE, v3, v1)
    assert (recorded.decision, recorded.champion_after) == ("promote", v3)
    assert "XRAY_REVIEW=always asks for a reviewer, but" in recorded.rationale
    assert recorded.rationale.endswith("so the policy's decision stands, as without review.")


def test_xray_review_refuses_in_one_line_without_an_api_or_a_prefect_run(
    blocking: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.review import send_review
    from xray_cli import main as cli
    from xray_core.errors import UsageError

    v1 = save(blocking, seed=1)  # registered without a flow run, as xray retrain --local does
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        code = cli.main(["review", str(v1), "--approve", "--reason", "fine"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("xray review: no Prefect API is configured: set PREFECT_API_URL")
    assert len(err.splitlines()) == 1

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never reached
        with pytest.raises(
            UsageError, match=f"v{v1} was trained without Prefect .* xray promote {v1} --reason"
        ):
            send_review(f"v{v1}", approve=True, reason="fine", reviewer="alice", settings=blocking)
        with pytest.raises(UsageError, match="model version 99 does not exist"):
            send_review("99", approve=False, reason="no", reviewer="alice", settings=blocking)
        with pytest.raises(UsageError, match="needs --reason"):
            send_review("1", approve=True, reason="  ", reviewer="alice", settings=blocking)
