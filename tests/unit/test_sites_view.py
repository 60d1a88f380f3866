"""Where films come from, as people see it: the shortcut audit (flagged and clean), tables by site and
by view (a judged and a not-judged slice), per-site ROC panels, label history, the Blocked state, the
per-site artifact rows, ``xray status`` and ``xray models show``, all from hand-built result dicts
(``result.json``'s shape) loaded as the typed run they describe."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from xray_core.evaluate.slices import slice_metrics
from xray_core.report.data import ReportData, site_curves
from xray_core.report.html import html_contents, html_context, render_html
from xray_core.report.markdown import artifact_description, metrics_rows, retrain_markdown, run_state
from xray_core.report.terminal import render_lineage, render_status
from xray_core.results import Evaluation, RunResult

R, E = RunResult.from_dict, Evaluation.from_dict  # the hand-built result.json dicts below, typed

LABELS = ["normal", "pneumonia"]
# paeds: 6 + 6 films (judged); adult: 5 normal + 1 pneumonia (too few pneumonia to judge, min 2 per class).
SITES = ["paeds"] * 12 + ["adult"] * 6
VIEWS = ["PA"] * 9 + [None] * 9
Y = np.array([0] * 6 + [1] * 6 + [0] * 5 + [1])


def _probs(good: bool) -> np.ndarray:
    """Paediatric scores that separate the classes (``good``) or invert them; adult ones at chance."""
    rng = np.random.default_rng(0 if good else 1)
    p1 = np.where(Y == 1, 0.8, 0.2) if good else np.where(Y == 1, 0.3, 0.7)
    p1 = np.clip(p1 + rng.normal(0, 0.05, Y.size), 0.01, 0.99)
    return np.stack([1 - p1, p1], axis=1)


def evaluation(version: int, good: bool) -> dict:
    """An evaluate_step-shaped dict: pooled numbers, slices from the project's own slice engine, and
    the per-row probabilities and sites the report draws per-site curves from."""
    probs = _probs(good)
    slices = slice_metrics(Y, probs, LABELS, [f"p{i}" for i in range(Y.size)], {"site": SITES, "view": VIEWS},
                           threshold=0.5, negative_label="normal", min_per_class=2, n_samples=50, seed=0,
                           target_specificity=0.9)
    metrics = {"macro_auroc": 0.74, "balanced_accuracy": 0.7, "accuracy": 0.7, "brier": 0.2, "ece": 0.1,
               "labels": LABELS, "confusion_matrix": [[8, 3], [2, 5]], "threshold": 0.5,
               "intervals": {"macro_auroc": {"low": 0.5, "high": 0.9}},
               "bootstrap": {"samples": 50, "patients": 18},
               "per_class": {lab: {"sensitivity": 0.7, "specificity": 0.7, "support": 9} for lab in LABELS},
               "slices": slices}
    return {"version": version, "n_images": int(Y.size),
            "test_set_fingerprint": "ab" * 32, "metrics": metrics, "labels": LABELS,
            "probabilities": probs.tolist(), "sites": SITES, "views": VIEWS}


FLAGGED = {"flagged": True, "warnings": ["covid19 films come only from site adult: the label is "
                                         "predictable from the site (AUROC 1.00 from the site alone, "
                                         "covid19 against the rest)",
                                         "site paeds holds only normal films"],
           "label_site": {"table": {"adult": {"covid19": 16, "normal": 0},
                                    "paeds": {"covid19": 0, "normal": 16}},
                          "single_label_sites": {"adult": "covid19", "paeds": "normal"},
                          "single_site_labels": {"covid19": "adult", "normal": "paeds"}},
           "site_only_auroc": 1.0,
           "metadata_probe": {"auroc": 0.97, "target": "any disease vs normal",
                              "features": ["width", "bit_depth"], "n": 32, "note": None},
           "site_probe": {"auroc": 0.99, "task": "other sites vs adult", "note": None},
           "threshold": 0.8, "policy": "block", "sites": ["adult", "paeds"]}
CLEAN = {"flagged": False, "warnings": [],
         "label_site": {"table": {"adult": {"normal": 8, "pneumonia": 8},
                                  "paeds": {"normal": 8, "pneumonia": 8}},
                        "single_label_sites": {}, "single_site_labels": {}},
         "site_only_auroc": 0.5,
         "metadata_probe": {"auroc": None, "target": "any disease vs normal", "features": [], "n": 32,
                            "note": "not run: too few patients for grouped cross-validation"},
         "site_probe": {"auroc": 0.6, "task": "other sites vs adult", "note": None},
         "threshold": 0.8, "policy": "warn", "sites": ["adult", "paeds"]}
HISTORY = {"patients": 1, "in_test": 1, "examples": [
    {"patient_id": "P7", "split": "test", "labels": ["No Finding", "covid19"],
     "films": [{"label": "covid19", "file": "a.png", "added_at": "2026-11-01T10:00:00+00:00"},
               {"label": "No Finding", "file": "c.png", "added_at": "2026-11-20T10:00:00+00:00"}]}]}


def result(decision: str = "keep", *, audit: dict | None = CLEAN, **extra) -> dict:
    return {"run_name": "sites-1", "trigger": "test", "backbone_weights": "imagenet", "ingests": [],
            "status": "completed", "challenger_eval": evaluation(3, good=False),
            "champion_eval": evaluation(2, True),
            "decision": {"decision": decision, "promote": decision == "promote",
                         "rationale": f"Because: {decision}.",
                         "checks": [{"name": "shortcut_audit", "passed": not (audit or {}).get("flagged"),
                                     "detail": "d"}]},
            "champion_after": 2, "audit": audit, "label_history": HISTORY, **extra}


def section(md: str, heading: str) -> str:
    return md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_a_flagged_audit_leads_with_its_warnings_then_the_table_and_probes():
    md = retrain_markdown(R(result(audit=FLAGGED)))
    audit = section(md, "Shortcut audit")
    assert audit.index("**Flagged.**") < audit.index(FLAGGED["warnings"][0]) < audit.index("| site |")
    assert "| adult | 16 | 0 | 16 | only covid19; every covid19 film is from here |" in audit
    assert "AUROC from the site alone (any disease vs normal): 1.000" in audit
    assert "Metadata probe (any disease vs normal; from width, bit_depth): AUROC 0.970" in audit
    assert "Site probe from the embeddings (other sites vs adult): AUROC 0.990" in audit
    assert "XRAY_SHORTCUT_POLICY=block: a flagged audit stops automatic promotion" in audit
    html = render_html(R(result(audit=FLAGGED)), None)
    assert '<div class="flagged">' in html and f"<li>{FLAGGED['warnings'][1]}</li>" in html


def test_a_clean_audit_says_so_and_a_probe_not_run_says_why():
    audit = section(retrain_markdown(R(result(audit=CLEAN))), "Shortcut audit")
    assert "No shortcut found" in audit and "Flagged" not in audit
    assert "AUROC - (not run: too few patients for grouped cross-validation)" in audit
    assert "XRAY_SHORTCUT_POLICY=warn: a flagged audit is reported here and does not stop promotion" in audit
    assert 'class="clean"' in render_html(R(result(audit=CLEAN)), None)
    assert "Shortcut audit" not in retrain_markdown(R(result(audit=None)))  # only sections with content


def test_by_site_table_shows_a_judged_slice_with_intervals_and_a_small_one_with_its_reason():
    md = retrain_markdown(R(result()))
    by_site = section(md, "By site")
    assert "### challenger v3" in by_site and "### champion v2" in by_site
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in by_site.splitlines()
             if line.startswith("| ")]
    rows = {row[0]: row for row in cells}  # both models' tables have these shapes
    paeds, adult = rows["paeds"], rows["adult"]
    assert paeds[1:4] == ["12", "12", "normal 6, pneumonia 6"]
    assert paeds[4].count("[") == 1 and paeds[-1] == ""  # macro AUROC with its interval, no note
    assert adult[4:7] == ["not judged"] * 3
    assert adult[-1] == "not judged: 1 pneumonia (< 2 per class)"
    by_view = section(md, "By view")
    assert "| PA | 9 |" in by_view and "| (unknown) | 9 |" in by_view


def test_views_all_unknown_are_not_a_section():
    r = result()
    for key in ("challenger_eval", "champion_eval"):
        r[key]["metrics"]["slices"]["view"] = {"(unknown)": r[key]["metrics"]["slices"]["site"]["paeds"]}
    md = retrain_markdown(R(r))
    assert "## By site" in md and "## By view" not in md


def test_html_has_by_site_tables_a_per_site_roc_panel_and_label_history():
    r = result(audit=FLAGGED)
    curves = []
    for role, ev in (("challenger", r["challenger_eval"]), ("champion", r["champion_eval"])):
        curves += site_curves(ev["version"], role, LABELS, Y, np.asarray(ev["probabilities"]), ev["sites"])
    assert [(c.site, c.role) for c in curves] == [("adult", "challenger"), ("paeds", "challenger"),
                                                  ("adult", "champion"), ("paeds", "champion")]
    champion_paeds = next(c for c in curves if c.site == "paeds" and c.role == "champion")
    assert champion_paeds.roc["pneumonia"]["auroc"] == pytest.approx(
        r["champion_eval"]["metrics"]["slices"]["site"]["paeds"]["per_class"]["pneumonia"]["auroc"])
    data = ReportData(curves=[], site_curves=curves)
    html = render_html(R(r), data)
    for sid in ('id="audit"', 'id="by-site"', 'id="by-view"', 'id="site-roc"', 'id="label-history"'):
        assert sid in html, sid
    src = html.split('alt="ROC curves by site" src="', 1)[1].split('"', 1)[0]
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
        assert img.width > 400 and img.height > 200  # two panels side by side
    assert "not judged: 1 pneumonia (&lt; 2 per class)" in html
    assert "<strong>1</strong> of them in the test split, where the test set disagrees with itself" in html
    assert "2026-11-01 a.png: covid19; 2026-11-20 c.png: No Finding" in html
    contents = html_contents(html_context(R(r), data))
    assert {"the shortcut audit", "tables by site", "tables by view", "label history",
            "per-site ROC curves"} <= set(contents)


def test_one_site_draws_no_per_site_panel():
    ev = evaluation(3, good=True)
    curves = site_curves(3, "challenger", LABELS, Y, np.asarray(ev["probabilities"]), ["only"] * Y.size)
    html = render_html(R(result()), ReportData(curves=[], site_curves=curves))
    assert 'id="site-roc"' not in html and 'id="by-site"' in html


def test_label_history_in_markdown_and_absent_without_changed_labels():
    md = retrain_markdown(R(result()))
    history = section(md, "Label history")
    assert "1 patient(s) have films with different labels; **1** of them in the test split" in history
    assert "| P7 | test | No Finding, covid19 |" in history
    assert "## Label history" not in retrain_markdown(R(result(label_history={"patients": 0, "in_test": 0,
                                                                           "examples": []})))


def test_a_blocked_run_is_named_blocked_everywhere():
    r = result("blocked", audit=FLAGGED, champion_after=2)
    assert run_state(R(r)) == "Blocked"
    assert retrain_markdown(R(r)).startswith(
        "# Blocked: champion v2 stays (v3 blocked by the shortcut audit)\n")
    assert artifact_description(R(r)) == "Blocked v3 (shortcut audit); kept v2"
    first = result("blocked", audit=FLAGGED, champion_eval=None, champion_after=None,
                   state="Blocked", state_message="v3 not promoted: blocked by the shortcut audit.")
    assert retrain_markdown(R(first)).startswith(
        "# Blocked: no champion yet (v3 blocked by the shortcut audit)")
    assert 'class="decision failure">v3 not promoted: blocked' in render_html(R(first), None)


def test_retrain_metrics_artifact_has_per_site_rows_and_the_report_table_does_not():
    r = result()
    rows = {row["metric"]: row for row in metrics_rows(E(r["challenger_eval"]), E(r["champion_eval"]))}
    paeds = rows["macro_auroc @ site paeds"]
    assert paeds["champion"].startswith("1.000") and float(paeds["challenger"].split()[0]) < 0.2
    assert rows["sensitivity[pneumonia] @ site paeds"]["challenger"] != "-"
    assert rows["macro_auroc @ site adult"] == {"metric": "macro_auroc @ site adult",
                                                "challenger": "not judged: 1 pneumonia (< 2 per class)",
                                                "champion": "not judged: 1 pneumonia (< 2 per class)"}
    only = {row["metric"]: row for row in metrics_rows(E(r["challenger_eval"]), None)}
    assert only["macro_auroc @ site paeds"]["champion"] == "-"
    comparison = section(retrain_markdown(R(r)), "Champion vs challenger (same test set)")
    assert "@ site" not in comparison


def _status(audit: dict | None) -> dict:
    nothing = {"train": 0, "val": 0, "test": 0, "unassigned": 0}
    return {"home": "/h", "database_url": "sqlite:///h/c.db",
            "catalogue": {"images": 34, "sources": 2,
                          "patients": {"total": 34, "by_id_source": {"manifest": 34}},
                          "by_label_and_split": {}, "rejections": {"total": 0, "by_reason": {}},
                          "near_duplicates": {"max_distance": 6, "pairs_across_splits": 0}, "notes": [],
                          "label_history": HISTORY},
            "sites": {"sites": ["adult", "paeds"], "by_site_label_split": {
                "adult": {"covid19": {**nothing, "train": 10, "test": 6}},
                "paeds": {"normal": {**nothing, "train": 12, "val": 2, "test": 4}}}},
            "audit": audit, "settings": {}}


def test_status_shows_counts_per_site_label_and_split_the_label_history_and_the_audit():
    flags = {"promotion_id": 4, "time": "2026-11-30T10:00:00+00:00", "decision": "blocked", "challenger": 3,
             **{k: FLAGGED[k] for k in ("flagged", "warnings", "policy", "sites")}}
    text = render_status(_status(flags))
    lines = text.splitlines()
    assert any(line.split() == ["adult", "covid19", "10", "0", "6", "0", "16"] for line in lines)
    assert any(line.split() == ["paeds", "normal", "12", "2", "4", "0", "18"] for line in lines)
    assert "patients with films of different labels: 1 (1 in the test split)" in text
    assert "  P7 (test): 2026-11-01 a.png: covid19; 2026-11-20 c.png: No Finding" in lines
    assert ("shortcut audit (decision #4 blocked of v3, 2026-11-30T10:00:00; "
            "XRAY_SHORTCUT_POLICY=block): FLAGGED"
            in lines)
    assert f"  warning: {FLAGGED['warnings'][0]}" in lines
    assert "shortcut audit: none yet (runs at every retrain)" in render_status(_status(None))


def test_models_show_renders_the_latest_evaluations_slices():
    ev = evaluation(3, good=True)
    lineage = {"version": 3, "status": "champion",
               "created_at": "2026-11-30T10:00:00", "checkpoint_dir": "m/3", "checkpoint_sha256": "e" * 64,
               "backbone_weights": "imagenet", "backbone_fingerprint": "f" * 16,
               "training_set_fingerprint": "t" * 16, "labels": LABELS, "threshold": 0.5,
               "images": {"train": [], "val": []}, "sources": [], "evaluations": [],
               "slices": {"test_set_fingerprint": "ab" * 32, "n_images": 18,
                          "scored_at": "2026-11-30T11:00:00", **ev["metrics"]["slices"]}}
    text = render_lineage(lineage)
    assert "latest evaluation (test set abababababab, 18 images, 2026-11-30T11:00:00), sliced:" in text
    assert "by site:" in text and "by view:" in text
    adult = next(line for line in text.splitlines() if line.startswith("adult "))
    assert "not judged: 1 pneumonia (< 2 per class)" in adult
    assert "sliced" not in render_lineage({**lineage, "slices": None})
