"""Reports that say only what is true, on runs built in-test as typed :class:`RunResult` values:

- a champion scored on a subset of the test split (the labels it knows) is not called "the same test
  set": each model's images are named, and each ROC curve states its own n;
- the retrain's drift check is a section of report.md and report.html, and the ``drift-report`` text;
- every JSON the project writes is strict (no ``NaN`` token), and films without a view keep their
  ``(unknown)`` slice instead of vanishing as NaN;
- the shortcut audit's sentence about one label quotes that label's number, not the pooled one;
- descriptions are cut at a word, with an ellipsis;
- ``features/`` and ``models/`` are created owner-only;
- ``RunResult.from_dict`` reads real ``result.json`` files back to the same format.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xray_core.data.ingest import IngestSummary
from xray_core.evaluate.audit import label_site_auroc, shortcut_audit, site_only_auroc
from xray_core.evaluate.slices import UNKNOWN, slice_metrics
from xray_core.io.fsutil import json_text
from xray_core.report import html as report_html
from xray_core.report.data import ModelCurves
from xray_core.report.drift import drift_description
from xray_core.report.format import cut_words
from xray_core.report.html import render_html
from xray_core.report.markdown import (
    artifact_description,
    comparison_words,
    drift_markdown,
    metrics_rows,
    retrain_markdown,
)
from xray_core.results import EmbedResult, Evaluation, RunResult, Verdict
from xray_core.settings import load_settings

GOLDEN = Path(__file__).parents[1] / "integration" / "result_json"


def strict_json(text: str) -> object:
    """``json.loads`` that refuses the ``NaN``/``Infinity`` tokens Python's own writer would accept."""
    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def evaluation(version: int, labels: list[str], n: int, *,
               views: list[str | None] | None = None) -> Evaluation:
    metrics = {"macro_auroc": 0.9, "balanced_accuracy": 0.8, "accuracy": 0.8, "brier": 0.1, "ece": 0.05,
               "labels": labels, "confusion_matrix": [[1] * len(labels) for _ in labels], "threshold": None,
               "intervals": {}, "bootstrap": {"samples": 200, "patients": n},
               "per_class": {lab: {"sensitivity": 0.8, "specificity": 0.9, "support": 1} for lab in labels}}
    return Evaluation(version=version, test_set_fingerprint="ab" * 32, n_images=n, metrics=metrics,
                      labels=labels, probabilities=[], shas=[], sites=[], views=views or [])


DRIFTED = {"flagged": True,
           "summary": "drift detected in all new films: drift: inputs differ from the reference "
                      "(MMD p=0.001; 15 of 42 films look unlike this model's training data)",
           "warnings": ["all new films: drift: inputs differ from the reference"],
           "checks": [{"subject": "all new films", "n": 42, "ood_flagged": 15, "mmd_p": 0.001, "ks_p": 0.2,
                       "verdict": "drift: inputs differ from the reference", "drift": True}],
           "report": "/home/reports/retrain-check-1/report.md"}


def kept_run(*, drift: dict | None = None) -> RunResult:
    """A Kept run in which champion v1 (normal, pneumonia) is scored on 20 of the 26 test films, since
    6 are covid19, a label only challenger v2 knows."""
    return RunResult(
        flow_run_id="run-1", run_name="nightly-3", trigger="schedule", backbone_weights="imagenet",
        backbone_random_init=False, run_dir="/home/reports/run-1",
        ingests=[IngestSummary(source_id=1, source="/in/adult", manifest=None, added=42)], drift=drift,
        split_counts={"train": {"normal": 30, "pneumonia": 30, "covid19": 20},
                      "test": {"normal": 10, "pneumonia": 10, "covid19": 6}},
        embed=EmbedResult(requested=1, cached=0, computed=1, recomputed_corrupt=0, images=1, seconds=1.0,
                          backbone_fingerprint="c" * 64, backbone_random_init=False, backbone_calls=1),
        challenger_eval=evaluation(2, ["covid19", "normal", "pneumonia"], 26),
        champion_eval=evaluation(1, ["normal", "pneumonia"], 20),
        decision=Verdict(decision="keep", promote=False, rationale="Because.", checks=[]),
        champion_after=1, status="completed", state="Kept",
        state_message="champion v1 stays (v2 not promoted)")


# --------------------------------------------------------------------------- same test set, or not


def test_a_champion_scored_on_a_subset_is_not_called_the_same_test_set():
    run = kept_run()
    md = retrain_markdown(run)
    assert "(same test set)" not in md
    assert "## Champion vs challenger (same test split, not the same images)" in md
    assert "- challenger v2: all 26 test images" in md
    assert ("- champion v1: 20 of 26 test images: those labelled normal or pneumonia, the labels v1 knows "
            "(it has no covid19 output)") in md
    html = render_html(run, None)
    assert "both models scored on the same images" not in html
    assert "on the same test split (not the same images)" in html
    assert "champion v1 (n=20)" in html and "challenger v2 (n=26)" in html  # the metric table's columns
    assert comparison_words(run) == "same test split, not the same images"
    same = kept_run()
    same.champion_eval = evaluation(1, ["covid19", "normal", "pneumonia"], 26)
    assert "## Champion vs challenger (same test set)" in retrain_markdown(same)
    assert "both models scored on the same images" in render_html(same, None)


def test_each_roc_curve_states_its_own_n(monkeypatch):
    drawn = []
    monkeypatch.setattr(report_html, "_png", lambda fig: drawn.append(fig) or b"")
    chance = {"fpr": [0, 1], "tpr": [0, 1], "auroc": 0.5}
    roc = {"covid19": chance, "pneumonia": chance}
    curves = [ModelCurves(2, "challenger", ["covid19", "normal", "pneumonia"], 26, roc, []),
              ModelCurves(1, "champion", ["normal", "pneumonia"], 20, {"pneumonia": roc["pneumonia"]}, [])]
    report_html.roc_png(curves)
    axes = drawn[0].axes
    legends = [t.get_text() for ax in axes for t in ax.get_legend().get_texts()]
    assert "challenger v2 (AUROC 0.500, n=26)" in legends and "champion v1 (AUROC 0.500, n=20)" in legends
    assert all("n=" not in ax.get_title() for ax in axes)  # no one n in a title for two curves


# --------------------------------------------------------------------------- drift


def test_the_drift_check_is_a_section_of_both_reports_and_its_own_artifact_text():
    run = kept_run(drift=DRIFTED)
    md = retrain_markdown(run)
    section = md.split("## Drift of the new films\n", 1)[1].split("\n## ", 1)[0]
    assert "**Flagged: the new films do not look like the champion's training data.**" in section
    assert DRIFTED["summary"] in section
    assert "- all new films: MMD p=0.001; 15 of 42 films look unlike the champion's training data" in section
    row = "| all new films | 42 | 15 | 0.001 | 0.2 | yes | drift: inputs differ from the reference |"
    assert row in section
    html = render_html(run, None)
    drift_html = html.split('<section id="drift">', 1)[1].split("</section>", 1)[0]
    assert "Flagged" in drift_html and "MMD p=0.001; 15 of 42 films look unlike" in drift_html
    artifact = drift_markdown(run)
    assert artifact.startswith("# Drift of the new films: flagged (retrain run nightly-3)\n")
    assert section.strip() in artifact
    assert drift_description(DRIFTED).startswith("Drift flagged: drift detected in all new films")


def test_no_drift_check_no_section_and_a_clean_or_failed_check_says_which():
    assert "Drift" not in retrain_markdown(kept_run()) and drift_markdown(kept_run()) is None
    assert 'id="drift"' not in render_html(kept_run(), None)
    clean = {**DRIFTED, "flagged": False, "warnings": [], "summary": "no drift detected in 42 films",
             "checks": [{**DRIFTED["checks"][0], "drift": False, "mmd_p": 0.6, "ood_flagged": 1}]}
    md = retrain_markdown(kept_run(drift=clean))
    assert "No drift flagged." in md and "**Flagged" not in md
    assert "MMD p=0.6; 1 of 42 films look unlike" in md
    broken = {"flagged": False, "summary": "not checked: OSError: disk", "warnings": []}
    md = retrain_markdown(kept_run(drift=broken))
    assert "Not checked." in md and "not checked: OSError: disk" in md and "MMD" not in md


# --------------------------------------------------------------------------- strict JSON and unknown views


def test_json_text_writes_null_for_nan_and_infinity():
    value = {"auroc": float("nan"), "views": ["PA", np.float64("nan")], "inf": [float("inf"), -math.inf],
             "ok": 0.5}
    parsed = strict_json(json_text(value, indent=2))
    assert parsed == {"auroc": None, "views": ["PA", None], "inf": [None, None], "ok": 0.5}
    assert json_text({"a": 1}) == '{"a": 1}'  # the common case is plain json.dumps


def test_result_json_of_a_run_with_nan_in_it_is_strict(tmp_path):
    from xray_core.report.files import write_run_reports

    run = kept_run()
    run.challenger_eval = evaluation(2, ["covid19", "normal", "pneumonia"], 26, views=["PA", float("nan")])
    run.challenger_eval.metrics["per_class"]["covid19"]["specificity"] = float("nan")
    settings = load_settings({"XRAY_HOME": str(tmp_path / "home")})
    out = write_run_reports(settings, run, tmp_path / "run")
    result = strict_json(out.result_path.read_text())
    assert result["challenger_eval"]["views"] == ["PA", None]


def test_a_view_pandas_reads_as_nan_is_the_unknown_slice():
    y = np.array([0, 1] * 6)
    probs = np.stack([1 - (y * 0.6 + 0.2), y * 0.6 + 0.2], axis=1)
    views = ["PA"] * 6 + [float("nan"), None, "", np.float64("nan"), "  ", float("nan")]
    out = slice_metrics(y, probs, ["normal", "pneumonia"], [f"p{i}" for i in range(12)], {"view": views},
                        threshold=0.5, negative_label="normal", min_per_class=1, n_samples=20, seed=0,
                        target_specificity=0.9)
    assert set(out["view"]) == {"PA", UNKNOWN} and out["view"][UNKNOWN]["n"] == 6


# --------------------------------------------------------------------------- the audit's sentence


def test_the_audit_sentence_about_a_label_quotes_that_labels_number():
    # covid19 comes only from site adult, which also sends many normal films; pneumonia and normal from paeds.
    labels = ["covid19"] * 10 + ["normal"] * 30 + ["pneumonia"] * 20 + ["normal"] * 20
    sites = ["adult"] * 40 + ["paeds"] * 40
    frame = pd.DataFrame({"label": labels, "site": sites, "patient": [f"p{i}" for i in range(80)]})
    pooled, own = site_only_auroc(frame, "normal"), label_site_auroc(frame, "covid19")
    # by hand: covid19 scores 10/40 (adult), every paeds film 0; ties with adult's 30 normal films
    assert own == pytest.approx((40 + 0.5 * 30) / 70)
    assert round(pooled, 2) != round(own, 2)
    audit = shortcut_audit(frame, None, negative_label="normal", auroc_threshold=0.8)
    (sentence,) = [w for w in audit["warnings"] if w.startswith("covid19 films come only from site adult")]
    assert sentence.endswith(f"(AUROC {own:.2f} from the site alone, covid19 against the rest)")
    assert f"{pooled:.2f}" not in sentence


# --------------------------------------------------------------------------- descriptions


@pytest.mark.parametrize("text, limit, expected", [
    ("Kept v2; challenger v3 rejected — not shown non-inferior: 0.042 lower", 30, "Kept v2; challenger v3…"),
    ("short enough", 12, "short enough"),
    ("Failed: RuntimeError: " + "x" * 40, 30, "Failed: RuntimeError…"),
    ("Failed: " + "x" * 40, 30, "Failed: " + "x" * 21 + "…"),  # a word longer than half the room: cut inside
    ("a b", 1, "…"),
])
def test_descriptions_are_cut_at_a_word_with_an_ellipsis(text, limit, expected):
    assert cut_words(text, limit) == expected and len(cut_words(text, limit)) <= limit


def test_the_artifact_description_ends_on_a_whole_word():
    run = kept_run()
    run.state_message = "not shown non-inferior: " + " ".join(["macro AUROC lower by 0.042"] * 12)
    text = artifact_description(run)
    assert len(text) <= 200 and text.endswith("…")
    assert text[:-1].split()[-1] in run.state_message.split()  # the last word is whole


def test_metrics_rows_take_the_typed_evaluations():
    run = kept_run()
    rows = {r["metric"]: r for r in metrics_rows(run.challenger_eval, run.champion_eval)}
    assert rows["macro_auroc"] == {"metric": "macro_auroc", "challenger": "0.900", "champion": "0.900"}
    assert rows["sensitivity[covid19] (challenger)"]["challenger"] == "0.800"


# --------------------------------------------------------------------------- private folders


def test_features_and_models_are_created_owner_only_and_an_existing_folder_keeps_its_mode(tmp_path):
    from xray_core.io.storage import get_storage

    settings = load_settings({"XRAY_HOME": str(tmp_path / "home")})
    old = os.umask(0o022)
    try:
        get_storage(settings, "features").write_bytes("fp/ab/x.safetensors", b"x")
        get_storage(settings, "models").child(".staging").write_bytes("u/card.json", b"{}")
        (tmp_path / "shared").mkdir(mode=0o750)
        shared = load_settings({"XRAY_HOME": str(tmp_path / "home"),
                                "XRAY_FEATURES_DIR": str(tmp_path / "shared")})
        get_storage(shared, "features").write_bytes("fp/x", b"x")
    finally:
        os.umask(old)
    for name in ("features", "models"):
        assert stat.S_IMODE((settings.home / name).stat().st_mode) == 0o700, name
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o750


# --------------------------------------------------------------------------- result.json read back


@pytest.mark.parametrize("name", ["promoted", "skipped", "second"])
def test_a_result_json_reads_back_into_a_run_with_the_same_format(name):
    written = json.loads((GOLDEN / f"{name}.json").read_text())
    run = RunResult.from_dict(written)
    assert run.report is not None and run.report.html == written["report_html"]
    added = ("report_path", "report_html_contents", "report_html")  # the writer's, beside as_dict()
    same = {k: v for k, v in written.items() if k not in added}
    again = json.loads(json.dumps(run.as_dict(with_report=False)))
    for ingest in again["ingests"]:  # added after these files were written (issue 25: manifest attributes)
        assert ingest.pop("attributes") == {}
    assert again == same
    assert list(run.as_dict(with_report=False)) == list(same)
    assert retrain_markdown(run).startswith(f"# {written['state']}: ")
