"""The locked reference, the bio-creep guard (issue 26): the check (pass, fail by the margin, the
reference that is the champion, no reference yet), a challenger that beats the champion but falls below
the reference is kept, ``xray lock`` (audited, refusals), the reference of a catalogue made before locks
existed, and the test set's reuse count in the reports."""

from __future__ import annotations

import numpy as np
import pytest
from registry_heads import save

from db import session_scope
from db.schema import Evaluation, Promotion
from xray_cli import main as cli
from xray_core.data.catalogue import Row, open_catalogue
from xray_core.data.snapshot import SplitData
from xray_core.evaluate.metrics import compute_metrics
from xray_core.evaluate.promotion import reference_check
from xray_core.pipeline.guards import apply_guards, reference_summary
from xray_core.pipeline.steps import decide_step
from xray_core.registry.listing import list_models
from xray_core.registry.reference import count_test_set_reuse, lock_reference, reference_version
from xray_core.registry.versions import record_decision, rollback
from xray_core.report.html import render_html
from xray_core.report.markdown import retrain_markdown
from xray_core.results import RunResult
from xray_core.settings import Settings

FP = "ab" * 32
LABELS = ["normal", "pneumonia"]


def _comparison(diff: float, low: float, high: float) -> dict:
    return {"metric": "macro_auroc", "challenger": 0.80 + diff, "champion": 0.80, "difference": diff,
            "low": low, "high": high, "level": 0.95}


def test_the_check_passes_above_the_margin_and_fails_at_or_below_it():
    ok = reference_check(_comparison(-0.005, -0.015, 0.01), 1, 0.02, "macro_auroc", 0.9)
    assert ok["name"] == "reference" and ok["passed"]
    assert "locked reference v1" in ok["detail"] and "XRAY_REFERENCE_MARGIN" in ok["detail"]
    bad = reference_check(_comparison(-0.005, -0.025, 0.01), 1, 0.02, "macro_auroc", 0.9)
    assert not bad["passed"] and "at or below the allowed -0.020" in bad["detail"]
    assert reference_check(_comparison(-0.005, -0.025, 0.01), 1, 0.03, "macro_auroc", 0.9)["passed"]
    undefined = reference_check({**_comparison(0, 0, 0), "low": None}, 1, 0.02, "macro_auroc", 0.9)
    assert not undefined["passed"] and "could not be estimated" in undefined["detail"]


def _evaluation(version: int, p_pneumonia: np.ndarray, y: np.ndarray) -> dict:
    probs = np.stack([1 - p_pneumonia, p_pneumonia], axis=1)
    metrics = compute_metrics(y, probs, LABELS, threshold=0.5, negative_label="normal")
    metrics.update(intervals={}, slices=None)
    return {"version": version, "test_set_fingerprint": FP, "n_images": len(y), "metrics": metrics,
            "labels": LABELS, "probabilities": probs.tolist(), "shas": [f"s{i}" for i in range(len(y))],
            "sites": ["A"] * len(y), "views": [None] * len(y)}


@pytest.fixture(scope="module")
def three_models():
    """40 films of 40 patients: the reference separates them perfectly, the challenger well (AUROC about
    0.85), the champion poorly (about 0.6); every pneumonia film scores above 0.5 for the challenger."""
    rng = np.random.default_rng(7)
    y = np.array([0] * 20 + [1] * 20)
    rows = [Row(i, f"s{i}", f"store/s{i}.png", LABELS[k], f"p{i}") for i, k in enumerate(y)]
    reference = np.where(y == 1, rng.uniform(0.7, 0.9, 40), rng.uniform(0.1, 0.3, 40))
    challenger = np.where(y == 1, rng.uniform(0.55, 0.95, 40), rng.uniform(0.05, 0.75, 40))
    champion = np.where(y == 1, rng.uniform(0.05, 0.95, 40), rng.uniform(0.05, 0.75, 40))
    evals = {name: _evaluation(v, p, y) for name, v, p in
             (("reference", 1, reference), ("champion", 2, champion), ("challenger", 3, challenger))}
    assert (evals["reference"]["metrics"]["macro_auroc"] == 1.0
            > evals["challenger"]["metrics"]["macro_auroc"] > 0.8
            > evals["champion"]["metrics"]["macro_auroc"])
    return SplitData(labels=LABELS, train=[], val=[], test=rows), evals


@pytest.fixture
def policy(settings: Settings) -> Settings:
    return settings.with_overrides(min_test_per_class=10, bootstrap_samples=200)


def test_a_challenger_that_beats_the_champion_but_not_the_reference_is_kept(policy, three_models):
    data, ev = three_models
    without = decide_step(policy, ev["challenger"], ev["champion"], data)
    assert without["decision"] == "promote"  # the champion gate alone promotes it
    assert without["reference"]["version"] is None
    assert "reference" not in [c["name"] for c in without["checks"]]

    out = decide_step(policy, ev["challenger"], ev["champion"], data, reference=ev["reference"])
    assert out["decision"] == "keep" and not out["promote"]
    assert out["rationale"].startswith("Keep, because the challenger is not shown non-inferior to the locked "
                                       "reference: locked reference v1")
    assert "Without this guard the policy would have promoted" in out["rationale"]
    check = next(c for c in out["checks"] if c["name"] == "reference")
    assert not check["passed"]
    ref = out["reference"]
    assert (ref["version"], ref["metric"], ref["margin"], ref["passed"]) == (1, "macro_auroc", 0.02, False)
    assert ref["reference"] == 1.0 and ref["low"] < -0.02 and not ref["same_as_champion"]

    loose = decide_step(policy.with_overrides(reference_margin=1.0), ev["challenger"], ev["champion"], data,
                        reference=ev["reference"])
    assert loose["decision"] == "promote" and loose["reference"]["passed"]


def test_the_reference_that_is_the_champion_reuses_the_champion_comparison(policy, three_models):
    data, ev = three_models
    champion = ev["champion"]
    given = _comparison(0.1, 0.05, 0.2)
    summary = reference_summary(policy, ev["challenger"], champion, champion, given, data)
    assert summary["same_as_champion"] and summary["passed"]
    assert (summary["difference"], summary["low"], summary["reference"]) == (0.1, 0.05, 0.80)  # not re-run
    out = decide_step(policy, ev["challenger"], champion, data, reference=champion)
    assert out["reference"]["low"] == out["comparison"]["low"]  # the same paired bootstrap


def test_no_reference_yet_adds_no_check_and_a_failing_one_does_not_unblock(policy, three_models):
    data, ev = three_models
    none = reference_summary(policy, ev["challenger"], None, None, None, data)
    assert none["version"] is None and none["check"] is None
    promote = {"decision": "promote", "promote": True, "rationale": "Promote.", "checks": []}
    out = apply_guards(policy, promote, ev["challenger"], None, None, None, none)
    assert out["promote"] and out["checks"] == [] and out["reference"]["version"] is None
    other = {**ev["reference"], "metrics": {**ev["reference"]["metrics"], "labels": ["a", "b", "c"]}}
    mismatch = reference_summary(policy, ev["challenger"], None, other, None, data)
    assert not mismatch["passed"] and "cannot be compared" in mismatch["detail"]


# --------------------------------------------------------------------------- the lock and the catalogue


def _evaluated(settings: Settings, *versions: int) -> None:
    with session_scope(open_catalogue(settings)) as s:
        for v in versions:
            s.add(Evaluation(model_id=v, test_set_fingerprint=FP, backbone_fingerprint="b" * 64, n_images=10,
                             metrics={}))


def _decide(settings: Settings, version: int, decision: str, fingerprint: str = FP) -> None:
    record_decision(settings, challenger=version, decision=decision, rationale=decision, trigger="test",
                    metrics={"challenger": {"test_set_fingerprint": fingerprint}},
                    promote=decision == "promote")


def test_an_older_catalogue_without_a_lock_takes_its_first_champion(settings: Settings):
    v1, v2, v3 = save(settings, 1), save(settings, 2), save(settings, 3)
    assert reference_version(settings) is None
    _decide(settings, v1, "keep")  # no champion yet: not the reference
    assert reference_version(settings) is None
    _decide(settings, v2, "promote")
    _decide(settings, v3, "promote")
    assert reference_version(settings) == v2  # the first champion, not the current one
    rollback(settings, reason="v3 regressed")
    assert reference_version(settings) == v2
    marked = {m["version"]: m["locked_reference"] for m in list_models(settings)}
    assert marked == {v1: False, v2: True, v3: False}


def test_xray_lock_is_audited_and_refuses_what_it_cannot_trust(settings: Settings, capsys):
    v1, v2, v3 = save(settings, 1), save(settings, 2), save(settings, 3)
    _decide(settings, v1, "promote")
    _decide(settings, v2, "promote")
    assert cli.main(["lock", "99", "--reason", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["lock", str(v3), "--reason", "x"]) == 2
    assert "never scored on a test set" in capsys.readouterr().err
    assert cli.main(["lock", str(v1), "--reason", "x"]) == 2  # already the reference
    assert "already the locked reference" in capsys.readouterr().err
    _evaluated(settings, v2, v3)
    assert cli.main(["lock", str(v2), "--reason", "validated at site B"]) == 0
    assert "v2 is now the locked reference" in capsys.readouterr().out
    assert reference_version(settings) == v2
    with session_scope(open_catalogue(settings)) as s:
        row = s.query(Promotion).filter(Promotion.decision == "lock").one()
        assert (row.from_version, row.to_version, row.champion_after) == (v1, v2, v2)
        assert row.actor and row.trigger == "cli" and "validated at site B" in row.rationale
    promoted = [m["last_promoted"]["decision"] for m in list_models(settings) if m["version"] == v2]
    assert promoted == ["promote"]  # the lock row is not v2's promotion
    assert rollback(settings, reason="back")["champion_after"] == v1  # the lock row is not a promotion
    with pytest.raises(Exception, match="needs --reason"):
        lock_reference(settings, v3, reason=" ")


def test_the_reuse_count_is_the_challengers_decided_on_a_test_set(settings: Settings):
    v1, v2, v3 = save(settings, 1), save(settings, 2), save(settings, 3)
    _decide(settings, v1, "promote")
    _decide(settings, v2, "blocked")
    record_decision(settings, challenger=v2, decision="approved", rationale="ok", trigger="test",
                    metrics={"challenger": {"test_set_fingerprint": FP}})  # the same challenger: one use
    _decide(settings, v3, "keep", fingerprint="cd" * 32)  # another test set
    reuse = count_test_set_reuse(settings, FP)
    assert (reuse["decisions"], reuse["budget"], reuse["over_budget"]) == (2, 20, False)
    assert "has informed 2 decisions" in reuse["line"]
    assert count_test_set_reuse(settings, "cd" * 32)["decisions"] == 1
    over = count_test_set_reuse(settings.with_overrides(test_reuse_budget=1), FP)
    assert over["over_budget"] and "more than XRAY_TEST_REUSE_BUDGET=1" in over["line"]


def test_both_reports_and_result_json_show_the_reference_and_the_reuse(three_models):
    _, ev = three_models
    reference = {"version": 1, "metric": "macro_auroc", "margin": 0.02, "same_as_champion": False,
                 "reference": 1.0, "challenger": 0.85, "difference": -0.15, "low": -0.25, "high": -0.07,
                 "level": 0.95, "passed": False, "detail": "..."}
    reuse = {"fingerprint": FP, "decisions": 21, "budget": 20, "over_budget": True,
             "line": "This test set (abababab) has informed 21 decisions: more than "
                     "XRAY_TEST_REUSE_BUDGET=20."}
    run = RunResult.from_dict({
        "run_name": "nightly-9", "trigger": "test", "backbone_weights": "random", "ingests": [],
        "status": "completed", "challenger_eval": ev["challenger"], "champion_eval": ev["champion"],
        "decision": {"decision": "keep", "promote": False, "rationale": "Keep.", "checks": []},
        "champion_after": 2, "reference": reference, "test_set_reuse": reuse})
    out = run.as_dict()
    assert out["reference"] == reference and out["test_set_reuse"] == reuse  # the new keys survive a reload
    md = retrain_markdown(run)
    assert ("Locked reference v1: macro_auroc 1.000, challenger minus reference -0.150 [-0.250, -0.070], "
            "margin 0.02 (XRAY_REFERENCE_MARGIN): **failed**.") in md
    assert "> **Warning:** This test set (abababab) has informed 21 decisions" in md
    html = render_html(run, None)
    assert 'id="reference"' in html and "<strong>failed</strong>" in html and 'id="test-set-reuse"' in html
