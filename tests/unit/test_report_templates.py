"""The run report from its templates: the decision first, only sections with content, escaping by
autoescape, the artifact description, small embedded heatmaps, heatmap captions with the threshold,
and the file mode of files people open (XRAY_FILE_MODE)."""

from __future__ import annotations

import io
import os
import stat

import pytest
from PIL import Image

from xray_core.errors import SettingsError
from xray_core.io.fsutil import atomic_write_bytes
from xray_core.model.heatmap import heatmap_caption
from xray_core.report.html import HEATMAP_EMBED_PX, embeddable_heatmap, render_html
from xray_core.report.markdown import (
    DESCRIPTION_MAX_CHARS,
    artifact_description,
    retrain_markdown,
    run_state,
    template_environment,
)
from xray_core.results import RunResult
from xray_core.settings import load_settings

R = RunResult.from_dict  # the hand-built result.json dicts below, typed


def evaluation(version: int) -> dict:
    """An evaluate_step-shaped dict with what the report reads."""
    metrics = {"macro_auroc": 0.91, "balanced_accuracy": 0.84, "accuracy": 0.85, "brier": 0.1, "ece": 0.05,
               "labels": ["normal", "pneumonia"], "confusion_matrix": [[18, 2], [4, 16]], "threshold": 0.5,
               "intervals": {"macro_auroc": {"low": 0.85, "high": 0.96}},
               "bootstrap": {"samples": 200, "patients": 30},
               "per_class": {lab: {"sensitivity": 0.8, "specificity": 0.9, "support": 20}
                             for lab in ("normal", "pneumonia")}}
    return {"version": version, "n_images": 40, "test_set_fingerprint": "ab" * 32, "metrics": metrics}


BASE = {"run_name": "nightly-7", "trigger": "schedule", "backbone_weights": "imagenet", "ingests": []}


def decided(decision: str, *, champion: int | None = 2, after: int | None = 2, **extra) -> dict:
    return {**BASE, "status": "completed", "backbone_fingerprint": "c" * 64,
            "embed": {"backbone_fingerprint": "c" * 64},
            "challenger_eval": evaluation(3), "champion_eval": evaluation(champion) if champion else None,
            "decision": {"decision": decision, "promote": decision == "promote",
                         "rationale": f"Because: {decision}.",
                         "checks": [{"name": "comparison", "passed": decision == "promote", "detail": "d"}]},
            "champion_after": after, **extra}


FAILED = {**BASE, "status": "failed", "error": "OSError: injected: disk unplugged", "split_counts": {}}
SKIPPED = {**BASE, "status": "skipped", "summary": "nothing new since champion v2", "champion_after": 2}

CASES = {
    "promoted": (decided("promote", after=3), "Promoted: v3 replaces v2", "Promoted v3 (was v2)"),
    "first champion": (decided("promote", champion=None, after=3), "Promoted: v3 becomes the first champion",
                       "Promoted v3 (first champion)"),
    "kept": (decided("keep"), "Kept: champion v2 stays (v3 not promoted)", "Kept v2; challenger v3 rejected"),
    "insufficient": (decided("insufficient_evidence"),
                     "Insufficient evidence: champion v2 stays; too few test images to judge v3",
                     "Insufficient evidence: kept v2; challenger v3 not judged"),
    "skipped": (SKIPPED, "Skipped: champion v2 stays; nothing new to train on",
                "Skipped: nothing new since champion v2"),
    "failed": (FAILED, "Failed: the champion was not changed", "Failed: OSError: injected: disk unplugged"),
}


def first_line(text: str) -> str:
    return text.splitlines()[0]


def h1(html: str) -> str:
    return html.split("<h1>", 1)[1].split("</h1>", 1)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_the_decision_comes_first_without_a_state_key(case):
    result, title, description = CASES[case]
    assert first_line(retrain_markdown(R(result))) == f"# {title}"
    assert h1(render_html(R(result), None)) == title
    assert artifact_description(R(result)) == description


def test_state_and_state_message_from_the_cycle_win():
    result = decided("keep", state="Kept", state_message="not shown non-inferior: 0.042 lower")
    md = retrain_markdown(R(result))
    assert md.splitlines()[:3] == ["# Kept: champion v2 stays (v3 not promoted)", "",
                                   "not shown non-inferior: 0.042 lower"]
    assert artifact_description(R(result)) == ("Kept v2; challenger v3 rejected — not shown non-inferior: "
                                                "0.042 lower")
    skipped = {**SKIPPED, "state": "Skipped", "state_message": "nothing new in /data/incoming"}
    assert artifact_description(R(skipped)) == "Skipped: nothing new in /data/incoming"
    assert run_state(R({"decision": None})) is None


def test_description_is_at_most_200_characters():
    result = {**FAILED, "error": "RuntimeError: " + "x" * 500}
    text = artifact_description(R(result))
    assert len(text) == DESCRIPTION_MAX_CHARS
    assert text.startswith("Failed: RuntimeError: xxx") and text.endswith("…")


@pytest.mark.parametrize("case", ["failed", "skipped"])
def test_failed_and_skipped_reports_show_only_sections_with_content(case):
    result = CASES[case][0]
    md = retrain_markdown(R(result))
    for absent in ("fingerprint", "Champion vs challenger", "ROC curves", "heatmap", "## Decision",
                   "random-init"):
        assert absent not in md, absent
    html = render_html(R(result), None)
    assert "<h2>Data</h2>" in html and "No new sources this run." in html
    for absent in ('id="decision"', 'id="metrics"', 'id="roc"', 'id="heatmaps"', "fingerprint", "<img"):
        assert absent not in html, absent


def test_an_error_is_shown_once_and_gets_its_own_section_when_the_message_is_another():
    md = retrain_markdown(R(FAILED))
    assert md.count("injected: disk unplugged") == 1 and "## Failure" not in md
    own = retrain_markdown(R({**FAILED, "state": "Failed", "state_message": "embedding failed"}))
    assert "## Failure" in own and "`OSError: injected: disk unplugged`" in own


@pytest.mark.parametrize("case", ["failed", "skipped", "kept"])
@pytest.mark.parametrize("flag", [{"backbone_weights": "random"}, {"backbone_random_init": True}])
def test_random_init_warning_on_every_kind_of_run(case, flag):
    result = {**CASES[case][0], **flag}
    assert "random-init" in retrain_markdown(R(result))
    assert '<p class="warning"><strong>Warning: the backbone is random-init' in render_html(R(result), None)


def test_html_escaping_comes_from_autoescape_and_markdown_cells_stay_cells():
    hostile = "<script>alert('x')</script> & | co"
    result = {**FAILED, "run_name": hostile, "error": hostile,
              "ingests": [{"source": "/in/a|b", "added": 1, "duplicates": 0, "skipped_unchanged": 0,
                           "rejected": 0, "rejected_by_reason": {}}]}
    html = render_html(R(result), None)
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; | co" in html
    md = retrain_markdown(R(result))
    assert "| /in/a\\|b | 1 | 0 | 0 | 0 | - |" in md


def test_templates_fail_loudly_on_a_missing_value():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        template_environment().from_string("{{ nothing_here }}").render({})


def test_the_markdown_link_promises_only_what_the_html_has():
    result = decided("keep", report_html="/r/report.html")
    md = retrain_markdown(R(result))
    assert "ROC curves" not in md and "confusion matrices" in md
    shown = retrain_markdown(R({**result, "report_html_contents": ["ROC curves", "Grad-CAM heatmaps"]}))
    assert ("`/r/report.html` (self-contained HTML; open it in a browser). "
            "It shows ROC curves, Grad-CAM heatmaps.") in shown


def test_a_decided_report_has_the_comparison_and_the_rationale():
    md = retrain_markdown(R(decided("keep")))
    assert "## Champion vs challenger (same test set)" in md
    assert "| metric | challenger (v3) | champion (v2) |" in md
    assert "Because: keep." in md and "fingerprint `cccccccccccccccc`" in md
    html = render_html(R(decided("keep")), None)
    assert 'id="metrics"' in html and 'id="confusion"' in html and "Because: keep." in html


# --------------------------------------------------------------------------- heatmaps


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((width, height)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size, expected", [((1200, 600), (HEATMAP_EMBED_PX, HEATMAP_EMBED_PX // 2)),
                                            ((64, 48), (64, 48))])
def test_embedded_heatmaps_are_display_sized_jpegs_never_enlarged(size, expected):
    with Image.open(io.BytesIO(embeddable_heatmap(_png(*size)))) as img:
        assert img.format == "JPEG" and img.size == expected


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        (("pneumonia", 0.503, 3), {"threshold": 0.498}, "pneumonia p=0.503 >= threshold 0.498 · v3"),
        (("pneumonia", 0.503, 3), {"threshold": 0.498, "positive_label": "pneumonia"},
         "pneumonia p=0.503 >= threshold 0.498 · v3"),
        (("normal", 0.4997, 3), {"threshold": 0.51, "positive_label": "pneumonia"},
         "normal · pneumonia p=0.500 < threshold 0.510 · v3"),
        (("covid", 0.87, None), {}, "covid p=0.870"),
    ],
)
def test_heatmap_caption_names_the_threshold(args, kwargs, expected):
    text = heatmap_caption(*args, **kwargs)
    assert text == expected
    text.encode("latin-1")  # Pillow's bitmap fallback font can draw it


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("raw, mode", [(None, 0o640), ("0640", 0o640), ("644", 0o644), ("0o600", 0o600),
                                       ("0", 0o000)])
def test_file_mode_setting(raw, mode):
    env = {} if raw is None else {"XRAY_FILE_MODE": raw}
    settings = load_settings(env)
    assert settings.file_mode == mode and settings.public_dict()["file_mode"] == f"{mode:04o}"


@pytest.mark.parametrize("raw", ["0666", "0777", "0002", "1000", "888", "rw-r-----", "-1"])
def test_file_mode_setting_rejects_others_write_and_non_modes(raw):
    with pytest.raises(SettingsError, match=r"XRAY_FILE_MODE=.*000 to 777 without write access for others"):
        load_settings({"XRAY_FILE_MODE": raw})


def test_atomic_write_sets_the_mode_and_stays_private_by_default(tmp_path):
    old = os.umask(0o077)  # the explicit mode is not narrowed by a strict umask
    try:
        atomic_write_bytes(tmp_path / "report.md", b"# hi\n", mode=0o640)
        atomic_write_bytes(tmp_path / "head.safetensors", b"weights")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "head.safetensors").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_run_report_files_are_written_with_the_file_mode(tmp_path):
    import json

    from xray_core.report.files import write_run_reports

    settings = load_settings({"XRAY_HOME": str(tmp_path / "home"), "XRAY_FILE_MODE": "0644"})
    skipped = RunResult(flow_run_id=None, run_name="nightly-7", trigger="schedule",
                        backbone_weights="imagenet",
                        backbone_random_init=False, run_dir=str(tmp_path / "run"), status="skipped",
                        state="Skipped", state_message="nothing new since champion v2", champion_after=2)
    out = write_run_reports(settings, skipped, tmp_path / "run")
    for path in (out.markdown_path, out.html_path, out.result_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert out.markdown_path.read_text() == out.markdown and out.markdown.startswith("# Skipped: ")
    assert f"`{out.html_path}`" in out.markdown  # the markdown links the HTML written just before it
    assert json.loads(out.result_path.read_text())["report_path"] == str(out.markdown_path)
    assert out.description == "Skipped: nothing new since champion v2"
