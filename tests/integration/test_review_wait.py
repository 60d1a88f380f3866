"""A run waiting for its reviewer does not hold up the nightly retrain, and the nightly does not ask again.

A real retrain (the recipe with direct calls) on a confounded two-site collection under
``XRAY_SHORTCUT_POLICY=block``: the shortcut audit blocks, so ``XRAY_REVIEW`` (default ``blocked``) asks
for a reviewer. The executor here plays the waiting run: while it "waits", a nightly retrain runs in
full. It gets the retrain lock at once (the waiting run gave it up), and skips, because training on the
same films would only ask the same reviewer the same question. Then the reviewer approves, and the
challenger becomes champion with the reviewer in the audit row. The same over a real Prefect server, with
the form: tests/flows/test_review_server.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conftest import BLOCKING_POLICY, write_confounded_sites

from xray_core.pipeline.cycle import run_retrain
from xray_core.pipeline.executor import DirectExecutor
from xray_core.pipeline.recipe import RetrainRequest
from xray_core.pipeline.review import ReviewAnswer, ReviewRequest
from xray_core.registry.listing import history
from xray_core.settings import load_settings, reset_settings

POLICY = BLOCKING_POLICY


class NightlyWhileWaiting(DirectExecutor):
    """Direct calls; its review runs a nightly retrain while it waits, then approves."""

    def __init__(self) -> None:
        super().__init__()
        self.nightly: dict[str, Any] | None = None

    def review(self, ask: ReviewRequest, *, before_waiting: Callable[[], None] | None = None) -> ReviewAnswer:
        assert before_waiting is not None
        before_waiting()
        self.nightly = run_retrain(load_settings(), RetrainRequest(trigger="schedule")).as_dict()
        return ReviewAnswer("approve", "carol", "both sites send both diagnoses from next month")


def test_a_nightly_run_while_a_review_waits_runs_and_skips(xray_env, tmp_path, monkeypatch):
    for key, value in POLICY.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    manifests = write_confounded_sites(tmp_path)
    executor = NightlyWhileWaiting()
    result = run_retrain(
        load_settings(), RetrainRequest(manifests=manifests, trigger="manual"), executor
    ).as_dict()

    nightly = executor.nightly
    assert nightly is not None and nightly["status"] == "skipped", nightly
    assert "nothing new since v1 (trained " in nightly["state_message"]
    assert "which waits for its reviewer" in nightly["state_message"]
    assert "xray review 1" in nightly["state_message"]

    assert result["state"] == "Promoted" and result["champion_after"] == 1
    assert result["decision"]["review"]["reviewer"] == "carol"
    assert result.get("report_error") is None
    report = open(result["report"], encoding="utf-8").read()
    assert "Approved in review by carol: both sites send both diagnoses from next month" in report
    (row,) = history(load_settings())
    assert (row["decision"], row["actor"], row["trigger"]) == ("approved", "carol", "manual")
