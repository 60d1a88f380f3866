"""report.html of a retrain run: valid, self-contained HTML with every section and its images; a failed
run still renders; large heatmaps keep the file under 2 MB, full size beside it; files get
XRAY_FILE_MODE; the curve helpers agree with the metrics; the markdown artifact points at it."""

from __future__ import annotations

import base64
import io
import stat
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from tinymodel import tiny_home

from xray_core.evaluate.metrics import auroc, compute_metrics
from xray_core.report.data import reliability_bins, roc_curve
from xray_core.results import Evaluation, RunResult

R, E = RunResult.from_dict, Evaluation.from_dict  # the result dicts below (result.json's shape), typed

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SECTIONS = {"summary", "decision", "data", "metrics", "per-class", "roc", "confusion",
            "calibration", "heatmaps"}


class StrictParser(HTMLParser):
    """Collects sections, headings and images, and fails on mis-nested or unclosed elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.h2: list[str] = []
        self.links: list[str] = []
        self.doctype = False
        self._in_h2 = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a)
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])
        self._in_h2 = tag == "h2"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, \
            f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)


def parse(text: str) -> StrictParser:
    p = StrictParser()
    p.feed(text)
    p.close()
    assert p.doctype and p.stack == [], p.stack
    return p


def _png_size(src: str, kind: str = "png") -> tuple[int, int]:
    assert src.startswith(f"data:image/{kind};base64,")
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
        return img.size


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny home with two versions, and the result dict of a run that compared them (as the flow builds
    it)."""
    from xray_core.data.snapshot import save_snapshot
    from xray_core.pipeline.steps import decide_step

    with tiny_home(tmp_path_factory.mktemp("report"), models=2, patients_per_label=14) as h:
        champion, challenger = (h.evaluations[v] for v in h.versions)
        decision = decide_step(h.settings, challenger, champion, h.data)
        run_dir = tmp_path_factory.mktemp("run")
        save_snapshot(run_dir / "split.json", h.data)
        result = {"run_name": "tiny-run", "flow_run_id": "0000-test",
                  "trigger": "test", "status": "completed", "backbone_weights": "random",
                  "backbone_random_init": True, "backbone_fingerprint": "f" * 64,
                  "ingests": [{"source": str(h.source), "manifest": None, "added": 28, "duplicates": 0,
                               "skipped_unchanged": 0, "rejected": 1,
                               "rejected_by_reason": {"not_an_image": 1}}],
                  "split_counts": h.data.counts(),
                  "near_duplicates": {"max_distance": 6, "pairs_across_splits": 0},
                  "embed": {"computed": 48, "cached": 0, "recomputed_corrupt": 0, "seconds": 1.0},
                  "challenger_eval": challenger, "champion_eval": champion,
                  "decision": {k: decision[k] for k in ("decision", "promote", "rationale", "checks")},
                  "champion_after": h.versions[0], "report_path": str(run_dir / "report.md")}
        yield h, result, run_dir


def test_report_html_is_valid_with_every_section_and_embedded_images(run):
    from xray_core.report.html import write_run_html

    h, result, run_dir = run
    path, contents = write_run_html(h.settings, R(result), run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    p = parse(text)
    assert SECTIONS <= set(p.sections), p.sections
    assert len(p.sections) == len(set(p.sections))
    # Self-contained: every image is embedded; the only other links are the full-size heatmaps beside it.
    assert all(i["src"].startswith("data:") for i in p.images)
    outside = [link for link in p.links if not link.startswith("data:")]
    assert outside and all(link.startswith("heatmaps/") and (run_dir / link).is_file() for link in outside)
    plots = [i for i in p.images if i.get("class") == "plot"]
    heatmaps = [i for i in p.images if i.get("class") == "heatmap"]
    assert len(plots) == 3  # ROC, confusion matrices, reliability
    for img in plots:
        w, hgt = _png_size(img["src"])
        assert w > 200 and hgt > 200
    n_test = len(h.data.test)
    assert len(heatmaps) == min(4, n_test) and n_test >= 2
    test_sizes = {Image.open(h.settings.home / r.stored_path).size for r in h.data.test}
    assert {_png_size(i["src"], "jpeg") for i in heatmaps} <= test_sizes  # small films are not enlarged
    full = sorted((run_dir / "heatmaps").iterdir())
    assert len(full) == len(heatmaps) and {Image.open(f).size for f in full} <= test_sizes
    assert {_mode(f) for f in [path, *full]} == {h.settings.file_mode}
    assert contents[-1] == "Grad-CAM heatmaps"
    # The key content, readable as text.
    assert result["decision"]["rationale"][:40] in text.replace("&#x27;", "'").replace("&quot;", '"')
    assert "random-init" in text
    v_champ, v_chal = h.versions
    assert f"challenger v{v_chal}" in text and f"champion v{v_champ}" in text
    for metric in ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc"):
        assert f"<th>{metric}</th>" in text
    per_class = text.split('id="per-class"')[1].split("</section>")[0]
    assert per_class.count("[") >= 2 * 2 * 6  # intervals for both models, both classes, six metrics


def test_curves_cover_both_models_on_the_same_test_set(run):
    from xray_core.report.data import collect_report_data

    h, result, _ = run
    data = collect_report_data(h.settings, h.data, challenger=E(result["challenger_eval"]),
                               champion=E(result["champion_eval"]))
    assert [(c.role, c.version) for c in data.curves] == [("challenger", h.versions[1]),
                                                          ("champion", h.versions[0])]
    for curve, ev in zip(data.curves, (result["challenger_eval"], result["champion_eval"])):
        assert curve.n == ev["n_images"]
        for label, r in curve.roc.items():  # the plotted area is the reported AUROC
            assert r["auroc"] == pytest.approx(ev["metrics"]["per_class"][label]["auroc"], abs=1e-9)
        assert sum(b["count"] for b in curve.reliability) == ev["n_images"]
    assert len(data.examples) == min(4, len(h.data.test))
    assert all(x.version == h.versions[1] and x.png.startswith(b"\x89PNG") for x in data.examples)
    # each example carries the challenger reference's OOD p-value and flag (ood_p <= XRAY_OOD_ALPHA)
    assert all(x.ood_p is not None and x.out_of_distribution == (x.ood_p <= h.settings.ood_alpha)
               for x in data.examples)


def test_a_failed_run_still_renders_without_curves(run, tmp_path):
    from xray_core.report.html import write_run_html

    h, _, _ = run
    result = {"run_name": "broken-run", "status": "failed", "error": "OSError: injected: disk unplugged",
              "backbone_weights": "random", "ingests": [], "split_counts": h.data.counts()}
    text = write_run_html(h.settings, R(result), tmp_path)[0].read_text()
    p = parse(text)
    assert set(p.sections) == {"summary", "data"}  # no empty decision, comparison or figure sections
    assert p.images == []
    assert "<h1>Failed: the champion was not changed</h1>" in text
    assert text.count("injected: disk unplugged") == 1 and "no curves" in text
    assert "random-init" in text  # the warning also on a failed run


def test_large_heatmaps_are_embedded_small_and_written_full_size_beside_the_report(
        run, tmp_path, monkeypatch):
    """Four 2000 x 2000 films: full-resolution overlays would be megabytes each; report.html stays <= 2 MB."""
    from xray_core.data.snapshot import save_snapshot
    from xray_core.data.synthetic import make_xray
    from xray_core.model.heatmap import overlay_png
    from xray_core.report import data as report_data
    from xray_core.report.data import ExampleHeatmap, ReportData
    from xray_core.report.html import HEATMAP_EMBED_PX, write_run_html

    h, result, _ = run
    real = report_data.collect_report_data(h.settings, h.data, challenger=E(result["challenger_eval"]),
                                           champion=E(result["champion_eval"]))
    side = 2000
    yy, xx = np.mgrid[0:side, 0:side] / side
    examples = []
    for k, label in enumerate(("normal", "pneumonia", "normal", "pneumonia")):
        gray = make_xray(label, size=side, rng=np.random.default_rng(k), patient_seed=k) / 255.0
        cam = np.exp(-((xx - 0.3 - 0.1 * k) ** 2 + (yy - 0.5) ** 2) / 0.02)
        examples.append(ExampleHeatmap(sha256=f"{k:x}" * 64, true_label=label,
                                       predicted_label=label, probability=0.9, version=h.versions[1],
                                       png=overlay_png(gray, cam, text=f"{label} p=0.900 · v3"),
                                       ood_p=0.01 if k == 0 else 0.5, out_of_distribution=k == 0))
    assert sum(len(x.png) for x in examples) > 2_000_000  # embedded as they are, the report would be too big
    monkeypatch.setattr(report_data, "collect_report_data",
                        lambda *a, **k: ReportData(curves=real.curves, examples=examples))
    save_snapshot(tmp_path / "split.json", h.data)
    path, _ = write_run_html(h.settings, R(result), tmp_path)
    assert path.stat().st_size <= 2_000_000
    p = parse(path.read_text())
    heatmaps = [i for i in p.images if i.get("class") == "heatmap"]
    assert [_png_size(i["src"], "jpeg") for i in heatmaps] == [(HEATMAP_EMBED_PX, HEATMAP_EMBED_PX)] * 4
    for x in examples:
        full = tmp_path / "heatmaps" / f"{x.sha256[:12]}.png"
        assert full.read_bytes() == x.png and _mode(full) == h.settings.file_mode
        assert f'href="heatmaps/{full.name}"' in path.read_text()
    gallery = path.read_text().split('id="heatmaps"')[1]  # the gallery marks the one flagged film
    assert gallery.count('<figure class="ood">') == 1 and gallery.count("OOD p=0.500") == 3
    assert '<span class="ood-mark">out of distribution</span> (OOD p=0.010)' in gallery


def test_report_renders_with_a_note_when_curves_cannot_be_computed(run, tmp_path, monkeypatch):
    from xray_core.data.snapshot import save_snapshot
    from xray_core.errors import CheckpointError
    from xray_core.report import data as report_data
    from xray_core.report.html import write_run_html

    h, result, _ = run

    def broken(*args, **kwargs):
        raise CheckpointError("model 1: head.safetensors sha256 does not match")

    monkeypatch.setattr(report_data, "collect_report_data", broken)
    save_snapshot(tmp_path / "split.json", h.data)
    text = write_run_html(h.settings, R(result), tmp_path)[0].read_text()
    p = parse(text)
    assert "confusion" in p.sections and "roc" not in p.sections  # from the evaluations alone
    assert "Curves and heatmaps unavailable: CheckpointError" in text


def test_markdown_links_the_html_report_and_repeats_key_numbers(run):
    from xray_core.report.markdown import retrain_markdown

    h, result, run_dir = run
    md = retrain_markdown(R({**result, "report_html": str(run_dir / "report.html")}))
    assert f"`{run_dir / 'report.html'}`" in md
    state = {"promote": "Promoted", "keep": "Kept", "insufficient_evidence": "Insufficient evidence"}
    assert md.startswith(f"# {state[result['decision']['decision']]}: ")
    assert f"**{result['decision']['decision']}**" in md and result["decision"]["rationale"] in md
    assert f"challenger v{h.versions[1]}: macro AUROC" in md
    assert f"champion v{h.versions[0]}: macro AUROC" in md
    assert "report.html" not in retrain_markdown(R({k: v for k, v in result.items() if k != "report_html"}))


def test_a_two_site_run_reports_by_site_with_per_site_roc_and_status_and_lineage_show_the_sites(
        xray_env, tmp_path, monkeypatch):
    """A real retrain on two synthetic sites (both labels each): report.html has the shortcut audit,
    the by-site table and one ROC panel per site; report.md, ``xray status`` and ``xray models show``
    carry the same sites."""
    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
    from xray_core.pipeline.cycle import run_retrain
    from xray_core.pipeline.recipe import RetrainRequest
    from xray_core.registry.listing import model_lineage
    from xray_core.report.status import status_report
    from xray_core.report.terminal import render_lineage, render_status
    from xray_core.settings import load_settings, reset_settings

    for key, value in {"XRAY_MIN_TEST_PER_CLASS": "2", "XRAY_FLOOR_MACRO_AUROC": "0.5",
                       "XRAY_FLOOR_SENSITIVITY": "0.3", "XRAY_PATIENT_REGEX": "",
                       "XRAY_SPLIT_RATIOS": "0.5,0.1,0.4"}.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    manifests = []
    for style, seed in ((SiteStyle("paeds", size=48), 3), (SiteStyle("adult", size=64, border=4), 4)):
        write_site_dataset(tmp_path / style.name, style, patients_per_label=8, seed=seed)
        manifests.append(str(tmp_path / style.name / "manifest.csv"))
    settings = load_settings()
    result = run_retrain(settings, RetrainRequest(manifests=tuple(manifests), trigger="test")).as_dict()
    test_sites = set(result["challenger_eval"]["sites"])
    assert test_sites == {"adult", "paeds"}, test_sites  # both sites in the test split, or nothing to show

    html_path = result["report_html"]
    text = open(html_path, encoding="utf-8").read()
    p = parse(text)
    assert {"audit", "by-site", "site-roc"} <= set(p.sections) and len(p.sections) == len(set(p.sections))
    site_roc = next(i for i in p.images if i.get("alt") == "ROC curves by site")
    w, hgt = _png_size(site_roc["src"])
    assert w > 400 and hgt > 200  # two panels side by side
    by_site = text.split('id="by-site"')[1].split("</section>")[0]
    assert "<td>adult</td>" in by_site and "<td>paeds</td>" in by_site
    assert len(text.encode()) <= 2_000_000
    md = open(result["report"], encoding="utf-8").read()
    assert "## Shortcut audit" in md and "## By site" in md and "| adult |" in md

    status = status_report(settings)
    assert status["sites"]["sites"] == ["adult", "paeds"]
    counts = status["sites"]["by_site_label_split"]
    assert sum(sum(v.values()) for labels in counts.values()
               for v in labels.values()) == status["catalogue"]["images"]
    assert all(counts[site]["normal"]["test"] >= 2 for site in ("adult", "paeds"))
    assert status["audit"]["challenger"] == result["version"]
    assert status["audit"]["flagged"] == result["audit"]["flagged"]
    assert "shortcut audit (decision #" in render_status(status)

    lineage = model_lineage(settings, result["version"])
    assert set(lineage["slices"]["site"]) == {"adult", "paeds"}
    assert lineage["slices"]["test_set_fingerprint"] == result["challenger_eval"]["test_set_fingerprint"]
    assert "by site:" in render_lineage(lineage)


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_area_is_the_auroc_even_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60).astype(bool)
    score = np.round(rng.random(60) * 5) / 5  # many ties
    fpr, tpr = roc_curve(y, score)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, score), abs=1e-12)
    assert roc_curve(np.ones(5, bool), np.arange(5.0)) is None


def test_reliability_bins_reproduce_the_ece():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(80, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 3, 80)
    bins = reliability_bins(probs, y)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 80
    ece = sum(b["count"] / 80 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(compute_metrics(y, probs, ["a", "b", "c"], threshold=None)["ece"], abs=1e-12)
