"""Batch prediction and Grad-CAM heatmaps: the CSV contract for a known model, bad files in the
folder, heatmaps at the input's size, and the CLI's ``--json`` output with a terminal progress bar.

One tiny catalogue and model per module (``tinymodel.tiny_home``: 20 images, 32 px input).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tinymodel import tiny_home

from xray_cli.main import main
from xray_core.data.synthetic import make_xray


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from xray_core.registry.versions import promote_manually

    with tiny_home(tmp_path_factory.mktemp("predict")) as h:
        promote_manually(h.settings, h.versions[0], reason="test champion")
        yield h


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def films(home, tmp_path_factory) -> Path:
    """Six ingested images in two label folders, one new non-square image at the top, a text file
    named .png and an empty file: what arrives in practice."""
    root = tmp_path_factory.mktemp("films")
    for label in ("normal", "pneumonia"):
        for src in sorted((home.source / label).iterdir())[:3]:
            (root / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / label / src.name)
    wide = make_xray("pneumonia", size=96, rng=np.random.default_rng(7))[:72]  # 72 x 96, never ingested
    _png(root / "wide.png", wide)
    (root / "pneumonia" / "broken.png").write_text("not an image at all")
    (root / "normal" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def predicted(home, films, tmp_path_factory):
    from xray_core.pipeline.predict import predict_folder

    out_dir = tmp_path_factory.mktemp("out")
    result = predict_folder(home.settings, films, out=out_dir / "predictions.csv",
                            heatmaps=out_dir / "heatmaps")
    with open(out_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return result, rows, out_dir


def _card(home) -> dict:
    from xray_core.registry.versions import load_model

    return load_model(home.settings, home.versions[0]).card


def test_csv_columns_and_values_for_a_known_model(home, films, predicted):
    from xray_core.pipeline.steps import model_test_probs

    result, rows, out_dir = predicted
    card = _card(home)
    labels = card["labels"]
    with open(out_dir / "predictions.csv", newline="") as fh:
        header = next(csv.reader(fh))
    # For people first (file, prediction, probabilities, threshold), provenance last.
    assert header == ["file", "predicted_label", *[f"p_{lab}" for lab in labels], "threshold", "ood_score",
                      "ood_p", "in_distribution", "sha256", "status", "error", "true_label", "model_version",
                      "backbone_fingerprint", "heatmap"]
    assert result["model_version"] == home.versions[0]  # the champion by default
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 7
    pos = labels.index("pneumonia")
    for r in ok:
        probs = np.array([float(r[f"p_{lab}"]) for lab in labels])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert float(r["threshold"]) == card["threshold"]
        assert int(r["model_version"]) == home.versions[0]
        assert r["backbone_fingerprint"] == card["backbone_fingerprint"]
        assert r["sha256"] == hashlib.sha256((films / r["file"]).read_bytes()).hexdigest()
        expected = "pneumonia" if probs[pos] >= card["threshold"] else "normal"
        assert r["predicted_label"] == expected
        assert r["true_label"] == (r["file"].split("/")[0] if "/" in r["file"] else "")

    # The same numbers the evaluation uses for the same images (cached features, same head).
    rows_by_sha = {r["sha256"]: r for r in ok}
    known = [row for row in home.data.train + home.data.val + home.data.test if row.sha256 in rows_by_sha]
    assert known
    probs, _ = model_test_probs(home.settings, home.versions[0], known)
    for row, p in zip(known, probs):
        got = [float(rows_by_sha[row.sha256][f"p_{lab}"]) for lab in labels]
        assert got == pytest.approx(p.tolist(), abs=1e-5)


def test_ood_columns_summary_and_drift_check_for_a_model_with_a_reference(home, predicted):
    from conftest import fetch

    from db.schema import DriftCheck
    from xray_core.monitor.ood import FlagRule
    from xray_core.monitor.reference import model_reference
    from xray_core.registry.versions import load_model

    result, rows, _ = predicted
    reference = model_reference(load_model(home.settings, home.versions[0]))
    ok = [r for r in rows if r["status"] == "ok"]
    step = 1 / (len(reference.calibration_scores) + 1)  # p-values move in steps of 1 / (n + 1)
    for r in ok:
        # the flag is the conformal p-value at most XRAY_OOD_ALPHA (0.05); the CSV rounds p to 4 places
        if abs(float(r["ood_p"]) - 0.05) > 1e-4:
            assert r["in_distribution"] == ("false" if float(r["ood_p"]) <= 0.05 else "true")
        # the CSV's score is rounded to 4 places: a film tied with a calibration film (a validation film
        # predicted again) may land one step either side when recomputed from it
        again = float(reference.p_values(np.array([float(r["ood_score"])]))[0])
        assert abs(float(r["ood_p"]) - again) <= step + 1e-4
    by_score = sorted(ok, key=lambda r: float(r["ood_score"]))
    # stranger, smaller
    assert all(float(a["ood_p"]) >= float(b["ood_p"]) for a, b in zip(by_score, by_score[1:]))
    for r in rows:
        if r["status"] != "ok":
            assert r["ood_score"] == "" and r["ood_p"] == "" and r["in_distribution"] == ""
    flagged = sum(r["in_distribution"] == "false" for r in ok)
    n_cal = len(reference.calibration_scores)
    expected = np.floor(0.05 * (n_cal + 1)) / (n_cal + 1) * 7  # p-values take the values k / (n + 1)
    assert result["ood"]["flagged"] == flagged and result["ood"]["expected"] == round(expected, 2)
    coarse = reference.coarse(FlagRule())
    assert result["ood"]["coarse"] == coarse and result["ood"]["calibration_films"] == n_cal
    assert result["ood"]["line"] == (f"{flagged} of 7 films look unlike this model's training data "
                                     f"(conformal p <= 0.05; {expected:.1f} expected by chance)"
                                     + (f"; {coarse}" if coarse else ""))
    assert result["drift"]["n"] == 7 and "mmd_p" in result["drift"]
    stored = [c for c in fetch(home.settings, DriftCheck) if c.id == result["drift"]["id"]]
    assert stored[0].kind == "predict" and stored[0].n_images == 7 and stored[0].model_id == home.versions[0]
    # performance before labels: the drift check's CBPE estimate, stored with it and shown in the summary
    from xray_core.monitor.performance import estimate_line
    from xray_core.report.terminal import render_predict

    assert result["performance"] == result["drift"]["performance"] == stored[0].result["performance"]
    assert result["performance"]["n"] == 7 and 0.5 <= result["performance"]["accuracy"] <= 1
    assert estimate_line(result["performance"]) in render_predict(result)


def test_bad_files_are_listed_with_reasons_and_the_rest_predicted(predicted):
    result, rows, _ = predicted
    by_file = {r["file"]: r for r in rows}
    assert by_file["pneumonia/broken.png"]["status"] == "rejected"
    assert by_file["pneumonia/broken.png"]["error"].startswith("not_an_image")
    assert by_file["normal/empty.png"]["error"].startswith("empty_file")
    for bad in ("pneumonia/broken.png", "normal/empty.png"):
        assert by_file[bad]["predicted_label"] == "" and by_file[bad]["p_normal"] == ""
        assert by_file[bad]["heatmap"] == ""
    assert (result["files"], result["predicted"], result["rejected"]) == (9, 7, 2)


def test_heatmap_png_per_predicted_image_at_the_inputs_size(films, predicted):
    _, rows, out_dir = predicted
    ok = [r for r in rows if r["status"] == "ok"]
    written = sorted(p.name for p in (out_dir / "heatmaps").iterdir())
    assert written == sorted(Path(r["heatmap"]).name for r in ok)
    assert "normal__" + Path(ok[0]["file"]).name in written or any(n.startswith("normal__") for n in written)
    for r in ok:
        with Image.open(r["heatmap"]) as overlay, Image.open(films / r["file"]) as original:
            assert overlay.format == "PNG" and overlay.mode == "RGB"
            assert overlay.size == original.size  # registers pixel for pixel with the original
    wide = next(r for r in ok if r["file"] == "wide.png")
    assert Image.open(wide["heatmap"]).size == (96, 72)


def _gray(label: str, seed: int, shape=(80, 100)) -> np.ndarray:
    big = make_xray(label, size=max(shape), rng=np.random.default_rng(seed), patient_seed=seed)
    return (big[: shape[0], : shape[1]].astype(np.float32) / 255.0)


def test_gradcam_has_the_inputs_size_and_differs_between_inputs(home):
    from xray_core.model.backbone import load_backbone
    from xray_core.model.heatmap import gradcam_batch
    from xray_core.registry.versions import load_model

    settings = home.settings.with_overrides(input_size=64)  # a 2 x 2 feature map (32 px gives 1 x 1)
    backbone = load_backbone(settings)
    head = load_model(home.settings, home.versions[0]).head
    a, b = _gray("normal", 1), _gray("pneumonia", 2)
    cam_a, cam_b = gradcam_batch(backbone, head, [a, b], class_indices=[1, 1], settings=settings)
    for cam in (cam_a, cam_b):
        assert cam.shape == (80, 100) and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert not np.allclose(cam_a, cam_b, atol=1e-3)
    assert all(p.grad is None for p in head.parameters())  # no gradients left behind in the head


def test_gradcam_equals_the_class_activation_map_for_a_linear_head(home):
    """For a linear head, Grad-CAM is exactly CAM: relu(sum_k w_ck A_k), normalised, upsampled."""
    import torch.nn.functional as F

    from xray_core.model.backbone import load_backbone
    from xray_core.model.heatmap import gradcam
    from xray_core.model.preprocess import make_view
    from xray_core.model.train import build_head

    settings = home.settings.with_overrides(input_size=64)
    backbone = load_backbone(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = build_head(2208, 2, hidden=(), dropout=0.0).eval()
    gray = _gray("pneumonia", 3)
    with torch.no_grad():
        act = F.relu(backbone.features.features(make_view(gray, 0, "", settings)[None]))[0]
        cams = F.relu(torch.einsum("ck,khw->chw", head[0].weight, act))
        c = int(cams.amax(dim=(1, 2)).argmax())  # a class with some positive evidence (else the map is 0)
        cam = cams[c] / cams[c].max()
        want = F.interpolate(cam[None, None], size=gray.shape, mode="bilinear", align_corners=False)[0, 0]
    got = gradcam(backbone, head, gray, class_index=c, settings=settings)
    assert got.max() == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(got, want.numpy(), atol=1e-5)


def test_overlay_png_keeps_the_size_and_draws_the_label():
    from xray_core.model.heatmap import overlay_png

    gray = _gray("normal", 4, shape=(120, 160))
    cam = np.zeros_like(gray)
    cam[60:, 80:] = 1.0
    img = np.asarray(Image.open(__import__("io").BytesIO(overlay_png(gray, cam, text="pneumonia 0.87 (v3)"))))
    assert img.shape == (120, 160, 3)
    plain = np.round(gray * 255)
    assert np.abs(img[100, 150].astype(int) - plain[100, 150]).max() > 20  # tinted where the map is hot
    assert np.abs(img[60, 20].astype(int) - plain[60, 20]).max() <= 1  # untouched where it is 0
    assert (img[:5, :40] == 0).any() and (img[:12, :80] > 200).any()  # the label box and its text
    with pytest.raises(ValueError, match="differ in size"):
        overlay_png(gray, cam[:10], text="x")


# --------------------------------------------------------------------------- the CLI


def _run(capsys, monkeypatch, *argv):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as on a terminal: the progress bar draws
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_progress_bar_on_a_terminal_does_not_break_json(home, films, capsys, monkeypatch, tmp_path):
    from xray_core.report.terminal import render_predict

    code, out, err = _run(capsys, monkeypatch, "predict", films, "--out", tmp_path / "p.csv",
                          "--heatmaps", tmp_path / "maps", "--json")
    assert code == 0, err
    assert "predict [" in err and "9/9" in err  # the bar went to stderr ...
    result = json.loads(out)  # ... and stdout is exactly one JSON document
    assert result["predicted"] == 7 and result["rejected"] == 2 and "rows" not in result
    assert result["heatmaps"] == str((tmp_path / "maps").absolute())
    assert len(list((tmp_path / "maps").glob("*.png"))) == 7

    code, out, err = _run(capsys, monkeypatch, "predict", films, "--json")  # rows inline without --out
    assert code == 0, err
    assert len(json.loads(out)["rows"]) == 9

    text = render_predict({**result, "rows": []})  # what the terminal shows instead of --json
    assert ("7 predicted, 2 unreadable of 9 files" in text
            and f"Grad-CAM overlays: {result['heatmaps']}" in text)


def test_status_and_models_print_tables_and_exact_json(home, capsys, monkeypatch):
    code, out, _ = _run(capsys, monkeypatch, "models", "--json")
    assert code == 0
    models = json.loads(out)
    assert [m["version"] for m in models if m["status"] == "champion"] == [home.versions[0]]
    code, text, _ = _run(capsys, monkeypatch, "models")
    assert code == 0 and text.splitlines()[0].split()[:2] == ["version", "status"]
    assert set(text.splitlines()[1].replace(" ", "")) == {"-"}  # the header rule of a table

    code, out, _ = _run(capsys, monkeypatch, "status", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["catalogue"]["images"] == 20
    code, text, _ = _run(capsys, monkeypatch, "status")
    assert code == 0 and "images 20" in text and "label" in text


def test_prediction_files_view_0_of_new_films_so_a_later_ingest_reuses_it(home, films, predicted):
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import EmbedItem, FeatureCache
    from xray_core.pipeline.predict import predict_folder

    result, rows, out_dir = predicted
    # The six ingested films have view 0 cached by the embed step: reused. wide.png (never ingested) is
    # embedded now and filed.
    assert result["feature_cache"] == {"reused": 6, "filled": 1, "note": None}
    wide = next(r for r in rows if r["file"] == "wide.png")
    cache = FeatureCache(load_backbone(home.settings), home.settings)
    stats = cache.ensure([EmbedItem(wide["sha256"], films / "wide.png")], [0])
    assert (stats.cached, stats.computed) == (1, 0)  # the later ingest's embed finds it
    # The filed features are the ones the prediction used: the same probabilities from the cache.
    again = predict_folder(home.settings, films, out=out_dir / "again.csv")
    assert again["feature_cache"] == {"reused": 7, "filled": 0, "note": None}
    wide_again = next(r for r in again["rows"] if r["file"] == "wide.png")
    assert [float(wide_again[k]) for k in wide_again if k.startswith("p_")] == [
        float(wide[k]) for k in wide if k.startswith("p_")]


def test_a_features_area_that_cannot_be_written_only_costs_the_cache(home, tmp_path, monkeypatch):
    from xray_core.model.features import FeatureCache
    from xray_core.pipeline.predict import predict_folder

    new = _png(tmp_path / "films" / "new.png", make_xray("normal", size=80, rng=np.random.default_rng(11)))

    def refuse(self, sha256, features):  # a read-only share
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(FeatureCache, "put", refuse)
    result = predict_folder(home.settings, new.parent, out=tmp_path / "p.csv")
    assert result["predicted"] == 1 and result["rows"][0]["status"] == "ok"
    assert result["feature_cache"]["filled"] == 0
    assert "Permission denied" in result["feature_cache"]["note"]


def test_auto_precision_serves_an_existing_model_with_the_precision_it_was_trained_with(
        home, films, predicted, monkeypatch, tmp_path):
    """Where auto now means bf16 (new models embed in bf16), a champion trained in fp32 keeps
    predicting on fp32 features, with the same probabilities; an explicit bf16 refuses it as a model
    of another backbone, naming the setting."""
    from xray_core.errors import CheckpointError
    from xray_core.model import device as device_mod
    from xray_core.pipeline.predict import predict_folder

    assert _card(home)["backbone_precision"] == "fp32"
    monkeypatch.setattr(device_mod, "native_bf16", lambda device: True)
    auto = predict_folder(home.settings.with_overrides(embed_precision="auto"), films,
                          out=tmp_path / "auto.csv")
    _, rows, _ = predicted
    before = {r["sha256"]: r for r in rows if r["status"] == "ok"}
    after = [r for r in auto["rows"] if r["status"] == "ok"]
    assert len(after) == len(before) == 7
    labels = _card(home)["labels"]
    for r in after:
        assert r["backbone_fingerprint"] == _card(home)["backbone_fingerprint"]
        assert [float(r[f"p_{lab}"]) for lab in labels] == pytest.approx(
            [float(before[r["sha256"]][f"p_{lab}"]) for lab in labels], abs=1e-6)
    with pytest.raises(CheckpointError, match="XRAY_EMBED_PRECISION"):
        predict_folder(home.settings.with_overrides(embed_precision="bf16"), films, out=tmp_path / "bf16.csv")


def test_a_card_without_a_precision_is_served_as_before_the_setting(settings):
    """Cards from before the precision was recorded get ``legacy``: fp32 on the CPU (autocast on CUDA, as
    the backbone did then) under the very fingerprint those models and caches were filed under."""
    import torch

    from xray_core.model.backbone import autocast_dtype, load_backbone
    from xray_core.pipeline.model_settings import settings_for_card, settings_for_model

    auto = settings.with_overrides(embed_precision="auto")
    assert settings_for_model(auto, {}).embed_precision == "legacy"
    assert settings_for_model(auto, {"backbone_precision": "bf16"}).embed_precision == "bf16"
    assert settings_for_model(settings.with_overrides(embed_precision="bf16"), {}).embed_precision == "bf16"
    legacy = settings_for_card(auto, {"settings": {}})
    assert legacy.embed_precision == "legacy"
    assert (load_backbone(legacy).fingerprint
            == load_backbone(settings.with_overrides(embed_precision="fp32")).fingerprint)
    assert autocast_dtype("legacy", torch.device("cpu")) is None  # fp32 on the CPU, as before
    # autocast, as before
    assert autocast_dtype("legacy", torch.device("cuda")) in (torch.bfloat16, torch.float16)
