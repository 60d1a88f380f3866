"""Where films come from, end to end on synthetic sites.

- A confounded collection (COVID-19 only from one site, made bigger, 16-bit, with a border and a text
  marker; normal films only from another) is flagged by the shortcut audit, and with
  ``XRAY_SHORTCUT_POLICY=block`` nothing is promoted.
- Two sites, both labels each: a challenger that collapses on one site while the pooled numbers look
  fine is kept out by the per-site guardrail, with the numbers in the rationale.
"""

from __future__ import annotations

import numpy as np
import pytest

from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
from xray_core.pipeline.cycle import run_retrain
from xray_core.pipeline.recipe import RetrainRequest
from xray_core.settings import load_settings, reset_settings

POLICY = {"XRAY_MIN_TEST_PER_CLASS": "2", "XRAY_FLOOR_MACRO_AUROC": "0.5", "XRAY_FLOOR_SENSITIVITY": "0.3",
          "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0", "XRAY_PATIENT_REGEX": ""}
PAEDS = SiteStyle("paeds", size=64)
ADULT = SiteStyle("adult", size=96, bit_depth=16, gamma=0.7, border=6, marker="PORTABLE")


@pytest.fixture
def env(xray_env, monkeypatch):
    for key, value in POLICY.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    return monkeypatch


def _confounded(tmp_path):
    write_site_dataset(tmp_path / "paeds", PAEDS, labels=("normal",), patients_per_label=16, seed=1)
    write_site_dataset(tmp_path / "adult", ADULT, labels=("covid19",), patients_per_label=16, seed=2)
    return [str(tmp_path / s / "manifest.csv") for s in ("paeds", "adult")]


def test_a_confounded_collection_is_flagged_and_blocked(env, tmp_path):
    env.setenv("XRAY_SHORTCUT_POLICY", "block")
    result = run_retrain(load_settings(),
                         RetrainRequest(manifests=tuple(_confounded(tmp_path)), trigger="test")).as_dict()
    audit = result["audit"]
    assert audit["flagged"] and audit["sites"] == ["adult", "paeds"]
    assert audit["label_site"]["single_site_labels"] == {"covid19": "adult", "normal": "paeds"}
    assert audit["site_only_auroc"] == 1.0
    assert audit["metadata_probe"]["auroc"] > 0.8
    assert any("covid19 films come only from site adult" in w for w in audit["warnings"])
    assert result["state"] == "Blocked" and result["decision"]["decision"] == "blocked"
    assert result["champion_after"] is None  # nothing promoted
    assert "XRAY_SHORTCUT_POLICY=block" in result["state_message"]


def test_the_same_collection_under_warn_is_promoted_with_the_warning_recorded(env, tmp_path):
    result = run_retrain(load_settings(),
                         RetrainRequest(manifests=tuple(_confounded(tmp_path)), trigger="test")).as_dict()
    assert result["audit"]["flagged"]
    check = next(c for c in result["decision"]["checks"] if c["name"] == "shortcut_audit")
    assert not check["passed"] and "XRAY_SHORTCUT_POLICY=warn" in check["detail"]
    assert result["state"] == "Promoted"


def _evaluation(settings, data, version, probs):
    """An evaluation of hand-made test probabilities, through the project's own metrics and slices."""
    from xray_core.data.snapshot import fingerprint_test_set, label_indices
    from xray_core.evaluate.intervals import bootstrap_intervals
    from xray_core.evaluate.metrics import compute_metrics
    from xray_core.pipeline.guards import evaluation_slices

    labels = ["normal", "pneumonia"]
    rows = data.test
    y = label_indices(rows, labels)
    metrics = compute_metrics(y, probs, labels, threshold=0.5, negative_label="normal")
    patients = np.array([r.patient_id for r in rows])
    metrics["intervals"] = bootstrap_intervals(y, probs, labels, patients,
                                               threshold=0.5, n_samples=200, seed=0)
    metrics["slices"], sites, _ = evaluation_slices(settings, rows, y, probs, labels, 0.5)
    return {"version": version, "test_set_fingerprint": fingerprint_test_set(rows), "n_images": len(rows),
            "metrics": metrics, "labels": labels, "probabilities": probs.tolist(), "sites": sites,
            "shas": [r.sha256 for r in rows]}


def test_pooled_numbers_hide_a_site_collapse_that_the_guardrail_keeps_out(env, tmp_path):
    from xray_core.data.ingest import ingest_source
    from xray_core.data.snapshot import label_indices, load_split_data
    from xray_core.pipeline.steps import decide_step

    env.setenv("XRAY_SPLIT_RATIOS", "0.5,0.1,0.4")
    reset_settings()
    settings = load_settings()
    for style, seed in ((PAEDS, 3), (ADULT, 4)):
        write_site_dataset(tmp_path / style.name, style, patients_per_label=10, seed=seed)
        ingest_source(tmp_path / style.name,
                      manifest=tmp_path / style.name / "manifest.csv", settings=settings)
    data = load_split_data(settings)
    y = label_indices(data.test, ["normal", "pneumonia"])
    from xray_core.data.facts import image_facts

    facts = image_facts(settings, [r.id for r in data.test])
    site = np.array([facts.at[r.id, "site"] for r in data.test])
    assert set(site) == {"paeds", "adult"} and all(((site == s) & (y == c)).sum() >= 2
                                                   for s in ("paeds", "adult") for c in (0, 1))
    rng = np.random.default_rng(0)
    right = np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.02, y.size)
    lean_wrong = np.where(y == 1, 0.45, 0.55) + rng.normal(0, 0.1, y.size)
    # As in the issue: opposite failures. The champion is good on one site and wrong on the other; the
    # challenger the other way round; pooled, the two look alike (and the challenger slightly better).
    champion_p = np.where(site == "paeds", right, lean_wrong)
    challenger_p = np.where(site == "paeds", lean_wrong, right)
    as_probs = lambda p1: np.stack([1 - np.clip(p1, 0.01, 0.99), np.clip(p1, 0.01, 0.99)], axis=1)
    champion = _evaluation(settings, data, 1, as_probs(champion_p))
    challenger = _evaluation(settings, data, 2, as_probs(challenger_p))

    env.setenv("XRAY_PROMOTION_MARGIN", "0.9")  # pooled, the challenger passes the policy easily
    reset_settings()
    decision = decide_step(load_settings(), challenger, champion, data)
    assert decision["decision"] == "keep" and not decision["promote"]
    assert decision["rationale"].startswith("Keep, because site paeds collapsed")
    assert "Pooled, the policy would have promoted" in decision["rationale"]
    drop = next(d for d in decision["site_drops"] if d["site"] == "paeds" and d["metric"] == "macro AUROC")
    assert drop["champion"] > 0.9 and drop["challenger"] < 0.5
    pooled = [ev["metrics"]["macro_auroc"] for ev in (champion, challenger)]
    assert abs(pooled[0] - pooled[1]) < 0.1, pooled
    # negative flips (issue 26) fall where the challenger collapsed: paeds films the champion read right
    flips = decision["negative_flips"]
    paeds, adult = flips["by_site"]["paeds"], flips["by_site"]["adult"]
    assert flips["n"] == len(data.test) and adult["counts"]["negative_flips"] == 0
    assert paeds["counts"]["negative_flips"] > paeds["n"] / 2
    assert "negative_flips" not in [c["name"] for c in decision["checks"]]  # XRAY_MAX_NEGATIVE_FLIP unset
    env.setenv("XRAY_MAX_NEGATIVE_FLIP", "0.05")
    reset_settings()
    vetoed = decide_step(load_settings(), challenger, champion, data)
    check = next(c for c in vetoed["checks"] if c["name"] == "negative_flips")
    assert not check["passed"] and "exceeds the allowed 0.05" in check["detail"]
