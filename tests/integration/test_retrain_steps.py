"""The retraining recipe end to end without Prefect: ingest → split → embed → train → evaluate → decide →
promote.

One module-scoped scenario (the expensive part: densenet161 at 32 px on 36 small synthetic images)
runs two cycles and records what every step returned; the tests then check the records and the
catalogue. Cycle 1: 24 images, the first model is judged against (lowered) floors and promoted.
Cycle 2: 12 new images of new patients arrive; a challenger is trained and compared with the
champion on the identical, grown test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TEST_ENV
from sqlalchemy import select

from db import dispose_engines, session_scope
from db.schema import Evaluation, Model, Promotion
from xray_cli import main as cli
from xray_core.data.catalogue import open_catalogue
from xray_core.data.ingest import ingest_source
from xray_core.data.snapshot import fingerprint_test_set, load_split_data
from xray_core.data.synthetic import write_dataset
from xray_core.model.backbone import load_backbone
from xray_core.pipeline.embed import embed_step
from xray_core.pipeline.steps import decide_step, evaluate_step, promote_step, train_step
from xray_core.pipeline.unchanged import current_champion
from xray_core.settings import load_settings, reset_settings

# Tiny test splits: lower the minimum test size per class and the first-model floors so that the
# policy may promote (the decision table itself is tested in test_promotion.py).
POLICY_ENV = {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0.0",
              "XRAY_FLOOR_SENSITIVITY": "0.0"}


def pairs_needed(rows_by_split: dict[str, list], views: int) -> int:
    """(image, view) pairs embed_step needs: train images get views 0..K (0 calibrates the OOD
    threshold), val and test view 0."""
    return (views + 1) * len(rows_by_split["train"]) + len(rows_by_split["val"]) + len(rows_by_split["test"])


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("retrain-steps")
    env = {"XRAY_HOME": str(tmp / "home"), **TEST_ENV, **POLICY_ENV}
    from conftest import POSTGRES_URL, fresh_database_url

    if POSTGRES_URL:  # the PostgreSQL lane: this module's catalogue in its own fresh database
        env["XRAY_DATABASE_URL"] = fresh_database_url(tmp)[0]
    settings = load_settings(env)  # explicit settings: os.environ is left alone at module scope
    dispose_engines()
    r = SimpleNamespace(env=env, settings=settings, batch1=tmp / "batch1", batch2=tmp / "batch2")
    backbone = load_backbone(settings)

    # ---- cycle 1
    write_dataset(r.batch1, patients_per_label=12, images_per_patient=1, size=64)
    r.ingest1 = ingest_source(r.batch1, settings=settings)
    r.data1 = load_split_data(settings)
    r.calls_before = backbone.calls
    r.embed1 = embed_step(settings, r.data1)
    r.calls_after_embed1 = backbone.calls
    r.train1 = train_step(settings, r.data1, flow_run_id="cycle-1")
    r.eval1 = evaluate_step(settings, r.train1["version"], r.data1, flow_run_id="cycle-1")
    r.champion_before1 = current_champion(settings)
    r.decision1 = decide_step(settings, r.eval1, None, r.data1)
    r.promotion1 = promote_step(settings, challenger=r.train1["version"],
                                decision=r.decision1, trigger="test", champion_eval=None,
                                challenger_eval=r.eval1, flow_run_id="cycle-1")

    # ---- the same catalogue again: nothing new to embed
    r.embed_again = embed_step(settings, load_split_data(settings))
    r.calls_after_embed_again = backbone.calls

    # ---- cycle 2: new patients arrive
    write_dataset(r.batch2, patients_per_label=6, images_per_patient=1, size=64, patient_offset=24, seed=1)
    r.ingest2 = ingest_source(r.batch2, settings=settings)
    r.data2 = load_split_data(settings)
    r.embed2 = embed_step(settings, r.data2)
    r.calls_after_embed2 = backbone.calls
    r.train2 = train_step(settings, r.data2, flow_run_id="cycle-2")
    r.eval2 = evaluate_step(settings, r.train2["version"], r.data2, flow_run_id="cycle-2")
    r.champion_before2 = current_champion(settings)
    r.eval_champion2 = evaluate_step(settings, r.champion_before2, r.data2, flow_run_id="cycle-2")
    r.decision2 = decide_step(settings, r.eval2, r.eval_champion2, r.data2)
    r.promotion2 = promote_step(settings, challenger=r.train2["version"],
                                decision=r.decision2, trigger="test", champion_eval=r.eval_champion2,
                                challenger_eval=r.eval2, flow_run_id="cycle-2")
    yield r
    dispose_engines()
    reset_settings()


@pytest.fixture
def cli_env(scenario, monkeypatch: pytest.MonkeyPatch):
    """The scenario's settings as environment variables, for cli.main (which reads get_settings())."""
    for key, value in scenario.env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    yield scenario
    reset_settings()


def rows_of(settings, model, *where):
    with session_scope(open_catalogue(settings)) as s:
        return list(s.scalars(select(model).where(*where).order_by(model.id)))


def split_rows(data) -> dict[str, list]:
    return {"train": data.train, "val": data.val, "test": data.test}


# --------------------------------------------------------------------------- cycle 1


def test_first_model_is_promoted_when_the_floors_hold(scenario):
    r = scenario
    assert r.ingest1.added == 24 and r.data1.labels == ["normal", "pneumonia"]
    assert all(r.data1.counts()[split][label] >= 1 for split in ("train", "val", "test")
               for label in r.data1.labels)
    v1 = r.train1["version"]
    assert r.champion_before1 is None
    assert r.decision1["decision"] == "promote" and r.decision1["promote"] is True
    assert {c["name"] for c in r.decision1["checks"]} >= {"test_size", "floor_macro_auroc",
                                                          "floor_sensitivity"}
    assert all(c["passed"] for c in r.decision1["checks"])
    assert "floor" in r.decision1["rationale"].lower()
    assert (r.promotion1["from_version"], r.promotion1["to_version"],
            r.promotion1["champion_after"]) == (None, v1, v1)
    assert r.promotion1["trigger"] == "test" and r.promotion1["flow_run_id"] == "cycle-1"
    [model] = rows_of(r.settings, Model, Model.id == v1)
    assert model.training_set_fingerprint == r.train1["training_set_fingerprint"]
    assert model.backbone_fingerprint == load_backbone(r.settings).fingerprint
    assert r.train1["smoke_test"].startswith("passed")


def test_the_policy_gates_the_first_model(scenario):
    """With the default minimum test size (20 per class) the same evaluation is not promoted."""
    r = scenario
    strict = load_settings({k: v for k, v in r.env.items() if k not in POLICY_ENV})
    decision = decide_step(strict, r.eval1, None, r.data1)
    assert decision["decision"] == "insufficient_evidence" and decision["promote"] is False
    assert "XRAY_MIN_TEST_PER_CLASS=20" in decision["rationale"]


def test_the_evaluation_row_stores_the_test_set_fingerprint(scenario):
    r = scenario
    v1 = r.train1["version"]
    expected = fingerprint_test_set(r.data1.test)
    assert r.eval1["test_set_fingerprint"] == expected and len(expected) == 64
    first = rows_of(r.settings, Evaluation, Evaluation.model_id == v1)[0]
    assert first.test_set_fingerprint == expected
    assert first.n_images == len(r.data1.test)
    assert first.flow_run_id == "cycle-1"
    assert first.backbone_fingerprint == load_backbone(r.settings).fingerprint
    assert first.metrics["macro_auroc"] == r.eval1["metrics"]["macro_auroc"]
    assert first.metrics["bootstrap"]["samples"] == 200 and "macro_auroc" in first.metrics["intervals"]


def test_embedding_computes_each_pair_once(scenario):
    r = scenario
    needed = pairs_needed(split_rows(r.data1), r.settings.views)
    assert r.embed1["computed"] == r.embed1["requested"] == needed and r.embed1["cached"] == 0
    assert r.calls_after_embed1 > r.calls_before
    # Nothing new: zero backbone calls, everything from the cache.
    assert r.embed_again["computed"] == 0 and r.embed_again["images"] == 0
    assert r.embed_again["cached"] == r.embed_again["requested"] == needed
    assert r.calls_after_embed_again == r.calls_after_embed1


# --------------------------------------------------------------------------- cycle 2


def test_second_cycle_embeds_only_the_new_images(scenario):
    r = scenario
    old = {row.sha256 for row in r.data1.train + r.data1.val + r.data1.test}
    new = {name: [row for row in rows if row.sha256 not in old] for name, rows in split_rows(r.data2).items()}
    assert r.ingest2.added == 12 and sum(len(v) for v in new.values()) == 12
    assert r.embed2["computed"] == pairs_needed(new, r.settings.views) > 0
    assert r.embed2["cached"] == pairs_needed(split_rows(r.data1), r.settings.views)
    assert r.embed2["images"] == 12
    # This run's forwards only (the backbone object is cached per process and counts them all).
    assert r.embed2["backbone_calls"] == r.calls_after_embed2 - r.calls_after_embed_again > 0
    assert r.embed_again["backbone_calls"] == 0


def test_champion_and_challenger_are_scored_on_the_identical_grown_test_set(scenario):
    r = scenario
    v1, v2 = r.train1["version"], r.train2["version"]
    assert r.champion_before2 == v1 and v2 == v1 + 1
    # the test split only grows, so the fingerprint of cycle 2 differs from cycle 1's
    assert {row.sha256 for row in r.data1.test} < {row.sha256 for row in r.data2.test}
    fingerprint2 = fingerprint_test_set(r.data2.test)
    assert fingerprint2 != r.eval1["test_set_fingerprint"]
    assert r.eval2["test_set_fingerprint"] == r.eval_champion2["test_set_fingerprint"] == fingerprint2
    stored = {(e.model_id, e.test_set_fingerprint, e.n_images, e.flow_run_id)
              for e in rows_of(r.settings, Evaluation)}
    assert stored == {(v1, r.eval1["test_set_fingerprint"], len(r.data1.test), "cycle-1"),
                      (v1, fingerprint2, len(r.data2.test), "cycle-2"),
                      (v2, fingerprint2, len(r.data2.test), "cycle-2")}
    # the paired comparison was made on that set
    assert r.decision2["comparison"] is not None
    assert r.decision2["comparison"]["metric"] == r.settings.promotion_metric


def test_second_cycle_records_a_decision_with_a_rationale(scenario):
    r = scenario
    v1, v2 = r.train1["version"], r.train2["version"]
    # The decision follows from its checks: with enough test images of each class
    # (XRAY_MIN_TEST_PER_CLASS=1 here), promote exactly when the paired comparison, the sensitivity
    # guardrail and the per-site guardrail all pass; otherwise keep the champion.
    checks = {c["name"]: c["passed"] for c in r.decision2["checks"]}
    assert set(checks) == {"test_size", "comparison", "guardrail", "per_site_guardrail"}
    assert checks["test_size"]
    promoted = r.decision2["promote"]
    assert promoted == all(checks.values())
    assert r.decision2["decision"] == ("promote" if promoted else "keep")
    # The comparison is made on the two evaluations' own numbers, and the rationale quotes them.
    comparison, metric = r.decision2["comparison"], r.settings.promotion_metric
    assert comparison["challenger"] == pytest.approx(r.eval2["metrics"][metric])
    assert comparison["champion"] == pytest.approx(r.eval_champion2["metrics"][metric])
    rows = rows_of(r.settings, Promotion)
    assert len(rows) == 2
    row = rows[1]
    assert (row.from_version, row.to_version, row.decision) == (v1, v2, r.decision2["decision"])
    assert row.rationale == r.decision2["rationale"]
    assert (f"{comparison['challenger']:.3f} vs champion {comparison['champion']:.3f}: "
            f"difference {comparison['difference']:+.3f}, 95% CI [{comparison['low']:+.3f}, "
            f"{comparison['high']:+.3f}]") in row.rationale
    # ... and ends with the reason of the first check that failed (promotion.py's and guards.py's order).
    if promoted:
        assert row.rationale.endswith("Promote.") and not row.rationale.startswith("Keep")
    elif not checks["comparison"]:
        assert row.rationale.endswith("Keep the champion.")
    elif not checks["guardrail"]:
        assert row.rationale.endswith("comparison passes but the guardrail vetoes it.")
    else:
        assert row.rationale.startswith("Keep, because")
    assert row.trigger == "test" and row.flow_run_id == "cycle-2"
    assert (row.metrics["challenger"]["test_set_fingerprint"]
            == row.metrics["champion"]["test_set_fingerprint"])
    assert row.metrics["checks"] == r.decision2["checks"]
    assert row.champion_after == (v2 if promoted else v1) == current_champion(r.settings)
    [model2] = rows_of(r.settings, Model, Model.id == v2)
    assert model2.status == ("champion" if promoted else "rejected")
    assert model2.training_set_fingerprint != r.train1["training_set_fingerprint"]


# --------------------------------------------------------------------------- CLI


def test_models_show_lists_the_lineage(cli_env, capsys: pytest.CaptureFixture):
    r = cli_env
    v1, v2 = r.train1["version"], r.train2["version"]
    assert cli.main(["models", "show", str(v1), "--json"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    assert lineage["version"] == v1
    assert [img["id"] for img in lineage["images"]["train"]] == [row.id for row in r.data1.train]
    assert [img["id"] for img in lineage["images"]["val"]] == [row.id for row in r.data1.val]
    assert {img["sha256"] for img in lineage["images"]["train"]} == {row.sha256 for row in r.data1.train}
    assert [Path(s["path"]) for s in lineage["sources"]] == [r.batch1.absolute()]
    assert lineage["backbone_fingerprint"] == load_backbone(r.settings).fingerprint
    assert lineage["training_set_fingerprint"] == r.train1["training_set_fingerprint"]
    assert [e["test_set_fingerprint"] for e in lineage["evaluations"]] == [
        r.eval1["test_set_fingerprint"], r.eval2["test_set_fingerprint"]]

    assert cli.main(["models", "show", str(v2), "--json"]) == 0
    lineage2 = json.loads(capsys.readouterr().out)
    assert len(lineage2["images"]["train"]) == len(r.data2.train)
    sources = sorted(Path(s["path"]) for s in lineage2["sources"])
    assert sources == sorted([r.batch1.absolute(), r.batch2.absolute()])

    assert cli.main(["models", "show", str(v1)]) == 0
    text = capsys.readouterr().out
    assert f"images: train {len(r.data1.train)}, val {len(r.data1.val)}" in text and str(r.batch1) in text
    assert cli.main(["models", "show", "999", "--json"]) == 2


def test_xray_train_json_is_parseable_and_reproducible(cli_env, capsys: pytest.CaptureFixture):
    r = cli_env
    calls = load_backbone(r.settings).calls
    assert cli.main(["train", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    version = out["train"]["version"]
    assert isinstance(version, int) and version == r.train2["version"] + 1
    assert out["embed"]["computed"] == 0 and load_backbone(r.settings).calls == calls  # all cached
    assert out["test"]["test_set_fingerprint"] == fingerprint_test_set(r.data2.test)
    assert out["train"]["training_set_fingerprint"] == r.train2["training_set_fingerprint"]
    assert out["data"] == r.data2.counts()
    # Same catalogue, same settings and seed as cycle 2: bit-identical weights, so identical file bytes.
    [again, cycle2] = [rows_of(r.settings, Model, Model.id == v)[0] for v in (version, r.train2["version"])]
    assert again.checkpoint_sha256 == cycle2.checkpoint_sha256
    assert again.status == "candidate"  # xray train trains and evaluates; it never promotes


def test_recipes_are_compared_on_a_subsample_above_the_cap_and_the_winner_fits_every_film(scenario):
    """XRAY_SUBSAMPLE_FILMS (a hospital-scale split): the card says what the comparison saw."""
    from xray_core.pipeline.steps import fit_challenger

    data, n = scenario.data2, len(scenario.data2.train)
    whole = fit_challenger(scenario.settings, data)
    assert "subsample" not in whole.card["training"]["recipe"]  # below the cap: as before
    sub = fit_challenger(scenario.settings.with_overrides(subsample_films=n // 2), data)
    recipe = sub.card["training"]["recipe"]
    films = recipe["subsample"]["films"]
    assert recipe["subsample"] == {"films": films, "of": n, "stratified_by": "label", "seed": 0} and films < n
    assert f"compared on {films} of {n} training films" in recipe["reason"]
    assert sub.card["training"]["n_train"] == n and len(sub.x_train) == n
