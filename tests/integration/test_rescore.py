"""Registry numbers that compare: models re-scored on the current test split from cached features.

One module-scoped scenario (tiny synthetic catalogue, 32 px random-init backbone): v1 is trained and
evaluated, more patients arrive (the test split grows), v2 is trained and evaluated on the larger
test set, v1 stays champion and v2 is rejected: the situation where ``xray models`` used to show v1's
numbers from its smaller, first test set. A third model on another backbone cannot be re-scored from
the cache. Finally a third batch arrives and is not embedded, so nothing can be re-scored.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from tinymodel import tiny_home

from db import session_scope
from db.schema import Evaluation
from xray_cli import main as cli
from xray_core.data.catalogue import open_catalogue
from xray_core.data.ingest import ingest_source
from xray_core.data.snapshot import fingerprint_test_set, load_split_data
from xray_core.data.synthetic import write_dataset
from xray_core.model.train import build_head
from xray_core.pipeline.embed import embed_step
from xray_core.pipeline.rescore import default_versions, rescore_models
from xray_core.pipeline.steps import evaluate_step, train_step
from xray_core.registry.listing import list_models
from xray_core.registry.versions import promote_manually, record_decision, save_model


def evaluation_count(settings) -> int:
    with session_scope(open_catalogue(settings)) as s:
        return s.scalar(select(func.count()).select_from(Evaluation))


def foreign_model(settings) -> int:
    """A registered head trained on another backbone (fingerprint 'f' * 64): no cached features fit it."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        state = build_head(8, 2, hidden=(4,), dropout=0.0).state_dict()
    card = {"labels": ["normal", "pneumonia"], "threshold": 0.5, "input_size": 32,
            "normalisation": {"mean": [0.5], "std": [0.25]}, "backbone_fingerprint": "f" * 64,
            "backbone_weights": "/old/weights.pt", "head": {"in_dim": 8, "hidden": [4], "dropout": 0.0},
            "training_set_fingerprint": "t" * 64}
    return save_model(settings, state_dict=state, card=card, train_image_ids=[], val_image_ids=[])


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rescore")
    with tiny_home(tmp, models=1, patients_per_label=8) as home:
        r = SimpleNamespace(home=home, settings=home.settings, data1=home.data, v1=home.versions[0])
        settings = home.settings
        promote_manually(settings, r.v1, reason="first model")

        write_dataset(tmp / "batch2", patients_per_label=8, images_per_patient=1, size=64,
                      patient_offset=100, seed=1)
        ingest_source(tmp / "batch2", settings=settings)
        r.data2 = load_split_data(settings)
        embed_step(settings, r.data2)
        r.v2 = train_step(settings.with_overrides(train_seed=1), r.data2)["version"]
        r.eval2 = evaluate_step(settings, r.v2, r.data2)
        record_decision(settings, challenger=r.v2, decision="keep", rationale="not better",
                        metrics={}, trigger="test")
        r.v3 = foreign_model(settings)
        r.fp2 = fingerprint_test_set(r.data2.test)

        r.before = {m["version"]: m for m in list_models(settings, current_test_set=r.fp2)}
        r.evaluations_before = evaluation_count(settings)
        r.rescored = {x["version"]: x for x in rescore_models(settings, r.data2, flow_run_id="rescore-test")}
        r.evaluations_after = evaluation_count(settings)
        r.after = {m["version"]: m for m in list_models(settings, current_test_set=r.fp2)}
        r.again = {x["version"]: x for x in rescore_models(settings, r.data2)}
        r.evaluations_again = evaluation_count(settings)
        r.direct_v1 = evaluate_step(settings, r.v1, r.data2)  # what an explicit evaluation gives

        # A third batch arrives and is not embedded: the cache cannot score the new test set.
        write_dataset(tmp / "batch3", patients_per_label=8, images_per_patient=1, size=64,
                      patient_offset=200, seed=2)
        ingest_source(tmp / "batch3", settings=settings)
        r.data3 = load_split_data(settings)
        r.fp3 = fingerprint_test_set(r.data3.test)
        r.evaluations_before3 = evaluation_count(settings)
        r.rescored3 = {x["version"]: x for x in rescore_models(settings, r.data3)}
        r.evaluations_after3 = evaluation_count(settings)
        r.after3 = {m["version"]: m for m in list_models(settings, current_test_set=r.fp3)}
        yield r


def test_the_test_split_grew_between_the_two_models(scenario):
    r = scenario
    assert len(r.data2.test) > len(r.data1.test)
    assert len(r.data3.test) > len(r.data2.test)
    assert r.before[r.v1]["n_images"] == len(r.data1.test) and not r.before[r.v1]["on_current_test_set"]
    assert r.before[r.v2]["n_images"] == len(r.data2.test) and r.before[r.v2]["on_current_test_set"]


def test_the_default_selection_is_every_registered_model_here(scenario):
    assert default_versions(scenario.settings) == [scenario.v1, scenario.v2, scenario.v3]
    assert default_versions(scenario.settings, limit=1) == [scenario.v1]  # the champion comes first


def test_after_rescoring_both_models_are_on_the_same_current_test_set(scenario):
    r = scenario
    assert r.rescored[r.v1]["status"] == "scored"
    assert r.rescored[r.v2]["status"] == "reused"  # already evaluated on this exact test set
    assert r.evaluations_after == r.evaluations_before + 1  # only v1 was scored again
    for v in (r.v1, r.v2):
        row = r.after[v]
        assert row["n_images"] == len(r.data2.test)
        assert row["test_set_fingerprint"] == r.fp2 and row["on_current_test_set"] and row["note"] is None
    assert r.rescored[r.v2]["evaluation"]["metrics"] == r.eval2["metrics"]


def test_rescored_numbers_equal_a_direct_evaluation_on_that_test_set(scenario):
    r = scenario
    stored = r.rescored[r.v1]["evaluation"]["metrics"]
    direct = r.direct_v1["metrics"]
    for key in ("macro_auroc", "balanced_accuracy", "accuracy"):
        assert stored[key] == direct[key]
        assert stored["intervals"][key] == direct["intervals"][key]
        assert r.after[r.v1]["metrics"][key] == {"point": direct[key], "low": direct["intervals"][key]["low"],
                                                 "high": direct["intervals"][key]["high"]}
    assert np.isfinite(direct["macro_auroc"])


def test_a_second_rescore_reuses_every_evaluation(scenario):
    r = scenario
    assert r.again[r.v1]["status"] == r.again[r.v2]["status"] == "reused"
    assert r.evaluations_again == r.evaluations_after


def test_a_model_on_another_backbone_is_skipped_with_the_reason(scenario):
    r = scenario
    skipped = r.rescored[r.v3]
    assert skipped["status"] == "skipped" and skipped["evaluation"] is None
    assert "backbone ffffffffffff" in skipped["reason"] and "not cached" in skipped["reason"]
    assert r.after[r.v3]["n_images"] is None and r.after[r.v3]["note"] == "not scored on a test set yet"


def test_missing_features_skip_rescoring_and_label_the_older_numbers(scenario):
    r = scenario
    assert r.evaluations_after3 == r.evaluations_before3  # nothing embedded, nothing scored
    for v in (r.v1, r.v2):
        assert r.rescored3[v]["status"] == "skipped" and "no cached features" in r.rescored3[v]["reason"]
        row = r.after3[v]
        assert not row["on_current_test_set"] and row["test_set_fingerprint"] == r.fp2
        assert row["n_images"] == len(r.data2.test)
        assert row["note"] == f"n={len(r.data2.test)} on older test set {r.fp2[:8]}, {row['scored_at'][:10]}"


def test_cli_models_rescores_and_labels_rows(scenario, capsys: pytest.CaptureFixture):
    r = scenario
    assert cli.main(["models", "--json"]) == 0
    rows = {m["version"]: m for m in json.loads(capsys.readouterr().out)}
    assert rows[r.v1]["status"] == "champion" and rows[r.v2]["status"] == "rejected"
    for v in (r.v1, r.v2):  # the batch-3 test images are still not embedded
        assert rows[v]["rescore"]["status"] == "skipped" and not rows[v]["on_current_test_set"]
        assert rows[v]["n_images"] == len(r.data2.test) and rows[v]["test_set_fingerprint"] == r.fp2
        assert rows[v]["scored_at"] and rows[v]["note"].startswith(f"n={len(r.data2.test)} on older test set")

    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    for column in ("version", "status", "macro AUROC [95% CI]", "n", "test set", "scored", "note"):
        assert column in header
    assert f"on older test set {r.fp2[:8]}" in text and r.fp2[:8] in text
    assert f"note: v{r.v1}, v{r.v2} not re-scored:" in text and "no cached features" in text
    assert f"note: v{r.v3} not re-scored: trained on backbone ffffffffffff" in text


def test_with_auto_precision_an_fp32_model_stays_scorable_where_auto_means_bf16(scenario, monkeypatch):
    """A model trained in fp32 on a machine where auto now picks bf16: its cached fp32 test features
    count as current (it is scored with the precision it was trained with); an explicit bf16 does not."""
    from xray_core.model import device as device_mod
    from xray_core.pipeline.rescore import _current_backbone, _why_not

    r = scenario
    trained_on = r.before[r.v1]["backbone_fingerprint"]
    monkeypatch.setattr(device_mod, "native_bf16", lambda device: True)
    auto = r.settings.with_overrides(embed_precision="auto")
    current = _current_backbone(auto, r.data2, trained_on, {})
    assert current["fingerprint"] == trained_on and current["missing"] == 0
    assert _why_not(trained_on, current) is None
    forced = _current_backbone(r.settings.with_overrides(embed_precision="bf16"), r.data2, trained_on, {})
    assert forced["fingerprint"] != trained_on and "not the current" in _why_not(trained_on, forced)


def test_gc_slims_v1s_superseded_evaluation_and_a_slimmed_row_is_scored_again_not_reused(scenario):
    """Last in this module: it changes the catalogue. v1's first evaluation (on the first, smaller test set)
    is superseded by its evaluations on the second; gc drops its slices, keeps its numbers, and the
    re-score scores v1 on the first test set again rather than reuse the slimmed row."""
    from xray_core.pipeline.evaluation_retention import is_slimmed
    from xray_core.pipeline.retention import run_gc
    from xray_core.registry.listing import model_lineage

    r = scenario
    before = list_models(r.settings, current_test_set=r.fp2)
    done = run_gc(r.settings, backbone=r.before[r.v1]["backbone_fingerprint"])
    slimmed = [x for x in done["removals"] if x["kind"] == "evaluations"]
    assert [(x["target"], x["keys"]) for x in slimmed] == [(f"v{r.v1}", 1)] and slimmed[0]["bytes"] > 0
    assert list_models(r.settings, current_test_set=r.fp2) == before
    lineage = model_lineage(r.settings, r.v1)
    assert [bool(e["detail_pruned"]) for e in lineage["evaluations"]] == [True, False, False]
    assert lineage["slices"]["site"]
    assert lineage["evaluations"][0]["metrics"]["macro_auroc"]["low"] is not None
    with session_scope(open_catalogue(r.settings)) as s:
        first = s.scalars(select(Evaluation).where(Evaluation.model_id == r.v1)
                          .order_by(Evaluation.id)).first()
        assert first.test_set_fingerprint == fingerprint_test_set(r.data1.test) and is_slimmed(first.metrics)
        assert "slices" not in first.metrics and first.metrics["intervals"]["macro_auroc"]["high"] is not None
    count = evaluation_count(r.settings)
    again = rescore_models(r.settings, r.data1, versions=[r.v1, r.v2])
    assert [x["status"] for x in again] == ["scored", "scored"]  # v1's row there is slimmed; v2 never was
    assert again[0]["evaluation"]["metrics"]["slices"]["site"]
    assert evaluation_count(r.settings) == count + 2
