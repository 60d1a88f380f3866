"""Per-site slices, the per-site guardrail and the shortcut audit on hand-built data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from xray_core.evaluate.audit import (
    label_site_table,
    metadata_probe,
    shortcut_audit,
    site_only_auroc,
    site_probe,
)
from xray_core.evaluate.slices import site_guardrail, slice_metrics

LABELS = ["normal", "pneumonia"]
KW = dict(threshold=0.5, negative_label="normal", min_per_class=4, n_samples=100,
          seed=0, target_specificity=0.9)


def _site_data(rng, n_per_class, good):
    """Two-class films of one site; ``good`` models rank them right, others randomly."""
    y = np.repeat([0, 1], n_per_class)
    p1 = np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.05, y.size) if good else rng.uniform(0, 1, y.size)
    p1 = np.clip(p1, 0.01, 0.99)
    return y, np.stack([1 - p1, p1], axis=1)


def _two_sites(champion_good_on, seed=0):
    rng = np.random.default_rng(seed)
    ya, pa = _site_data(rng, 6, champion_good_on == "paediatric")
    yb, pb = _site_data(rng, 7, champion_good_on == "adult")
    y, p = np.concatenate([ya, yb]), np.concatenate([pa, pb])
    sites = ["paediatric"] * ya.size + ["adult"] * yb.size
    patients = [f"p{i}" for i in range(y.size)]
    return y, p, sites, patients


def test_slices_match_the_pooled_metric_on_each_site_and_mark_small_ones():
    y, p, sites, patients = _two_sites("paediatric")
    views = ["PA"] * 20 + [None] * 6
    out = slice_metrics(y, p, LABELS, patients, {"site": sites, "view": views}, **KW)
    for site in ("paediatric", "adult"):
        mask = np.array(sites) == site
        assert out["site"][site]["macro_auroc"] == pytest.approx(roc_auc_score(y[mask], p[mask, 1]))
        assert out["site"][site]["n"] == mask.sum() and out["site"][site]["judged"]
    assert set(out["view"]) == {"PA", "(unknown)"}
    few = [0, 1, 2, 6, 7]  # 3 normal, 2 pneumonia of the paediatric site
    small = slice_metrics(y[few], p[few], LABELS, [patients[i] for i in few],
                          {"site": [sites[i] for i in few]}, **KW)["site"]["paediatric"]
    assert not small["judged"] and "< 4 per class" in small["reason"]


def test_pooled_numbers_can_hide_a_collapse_that_the_site_guardrail_catches():
    y, p_champ, sites, patients = _two_sites("paediatric", seed=1)
    _, p_chal, _, _ = _two_sites("adult", seed=1)
    pooled = [roc_auc_score(y, p[:, 1]) for p in (p_champ, p_chal)]
    champ = slice_metrics(y, p_champ, LABELS, patients, {"site": sites}, **KW)
    chal = slice_metrics(y, p_chal, LABELS, patients, {"site": sites}, **KW)
    check = site_guardrail(chal, champ, max_drop=0.10)
    assert not check["passed"]
    assert "site paediatric collapsed" in check["detail"] and "XRAY_GUARDRAIL_SITE_DROP" in check["detail"]
    assert abs(pooled[0] - pooled[1]) < 0.35  # pooled, the two look alike far more than per site
    assert site_guardrail(champ, champ, max_drop=0.10)["passed"]


def _small_site(missed: int):
    """One site, 4 normal and 4 pneumonia films (one per patient); the model misses ``missed`` positives."""
    y = np.repeat([0, 1], 4)
    p1 = np.where(y == 1, 0.9, 0.1)
    p1[4:4 + missed] = 0.2
    return slice_metrics(y, np.stack([1 - p1, p1], axis=1), LABELS, [f"p{i}" for i in range(8)],
                         {"site": ["small"] * 8}, **KW)


def test_a_drop_within_a_small_sites_noise_is_reported_but_does_not_veto():
    champion, one_missed = _small_site(0), _small_site(1)  # sensitivity 1.00 -> 0.75: one film of four
    check = site_guardrail(one_missed, champion, max_drop=0.10)
    assert check["passed"] and not check["drops"]
    [noise] = check["within_noise"]
    assert noise["metric"] == "sensitivity[pneumonia]" and noise["drop"] == pytest.approx(0.25)
    assert noise["challenger_high"] >= 1.0 and "within the site's noise" in check["detail"]
    # the guardrail as it was (XRAY_GUARDRAIL_SITE_EVIDENCE=point) vetoes the same one film
    assert not site_guardrail(one_missed, champion, max_drop=0.10, evidence="point")["passed"]


def test_a_collapse_a_small_site_can_tell_from_noise_still_vetoes():
    champion, collapsed = _small_site(0), _small_site(4)  # every positive of the site missed
    check = site_guardrail(collapsed, champion, max_drop=0.10)
    assert not check["passed"] and "site small collapsed" in check["detail"]
    drop = next(d for d in check["drops"] if d["metric"] == "sensitivity[pneumonia]")
    assert drop["challenger"] == 0.0 and drop["challenger_high"] < 1.0


def test_single_label_site_has_no_auroc_but_is_judged_on_sensitivity():
    y = np.array([1] * 6)
    p = np.tile([0.3, 0.7], (6, 1))
    out = slice_metrics(y, p, LABELS, [f"p{i}" for i in range(6)], {"site": ["covid-site"] * 6}, **KW)
    s = out["site"]["covid-site"]
    assert s["judged"] and not s["auroc_judged"] and s["macro_auroc"] is None
    assert s["per_class"]["pneumonia"]["sensitivity"] == 1.0 and "normal" not in s["per_class"]


def _confounded_frame(n=24):
    """Label 1 only from site B with bigger 16-bit films; label 0 only from site A."""
    rows = []
    for i in range(n):
        disease = i % 2
        rows.append({"label": "covid19" if disease else "normal", "site": "B" if disease else "A",
                     "patient": f"pt{i}", "width": 2000 + i if disease else 512 + i,
                     "height": 2000 if disease else 512, "bit_depth": 16 if disease else 8,
                     "format": "dicom" if disease else "png", "file_bytes": 4e6 if disease else 2e5,
                     "view": "AP" if disease else "PA"})
    frame = pd.DataFrame(rows)
    frame["aspect"] = frame["width"] / frame["height"]
    return frame


def test_the_audit_flags_a_confounded_collection():
    frame = _confounded_frame()
    table = label_site_table(frame)
    assert table["single_site_labels"] == {"covid19": "B", "normal": "A"}
    assert site_only_auroc(frame, "normal") == 1.0
    assert metadata_probe(frame, "normal")["auroc"] > 0.9
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(frame), 8)) + (frame["site"] == "B").to_numpy()[:, None] * 2.0
    assert site_probe(emb, frame["site"], frame["patient"])["auroc"] > 0.9
    audit = shortcut_audit(frame, emb, negative_label="normal", auroc_threshold=0.8)
    assert audit["flagged"]
    assert any("covid19 films come only from site B" in w for w in audit["warnings"])
    assert any("how the films were made" in w for w in audit["warnings"])


def test_the_audit_stays_quiet_when_labels_and_metadata_are_independent():
    rng = np.random.default_rng(3)
    n = 40
    frame = pd.DataFrame({"label": ["normal", "pneumonia"] * (n // 2), "site": rng.choice(["A", "B"], n),
                          "patient": [f"pt{i}" for i in range(n)], "width": rng.integers(500, 600, n),
                          "height": rng.integers(500, 600, n), "bit_depth": 8, "format": "png",
                          "file_bytes": rng.normal(2e5, 1e4, n), "view": "PA"})
    frame["aspect"] = frame["width"] / frame["height"]
    audit = shortcut_audit(frame, rng.normal(size=(n, 8)), negative_label="normal", auroc_threshold=0.8)
    assert not audit["flagged"], audit["warnings"]
    assert audit["metadata_probe"]["auroc"] < 0.8
