"""Model registry: verified checkpoints, atomic saves, the champion pointer, rollback and the audit trail.

Heads here are tiny (8 -> 4 -> 2) and saved straight from a state dict, so no backbone is involved.
"""

from __future__ import annotations

import json
from datetime import UTC

import numpy as np
import pytest
import torch
from registry_heads import (
    BACKBONE,
    HIDDEN,
    IN_DIM,
    REQUIRED,
    champions,
    db_count,
    make_card,
    make_state,
    save,
    status_of,
)

from db import session_scope
from db.schema import Model, Promotion
from xray_cli import main as cli
from xray_core import faults
from xray_core.data.catalogue import open_catalogue
from xray_core.errors import CheckpointError, UsageError
from xray_core.model.train import build_head, predict_proba
from xray_core.registry import listing
from xray_core.registry import versions as registry
from xray_core.registry.listing import history
from xray_core.registry.versions import (
    load_model,
    promote_manually,
    record_decision,
    rollback,
    save_model,
    validate_card,
)
from xray_core.settings import Settings

# --------------------------------------------------------------------------- checkpoints


def test_save_then_load_gives_identical_predictions(settings: Settings):
    state = make_state(3)
    version = save_model(settings, state_dict=state, card=make_card(), train_image_ids=[], val_image_ids=[])
    loaded = load_model(settings, version, backbone_fingerprint=BACKBONE)
    original = build_head(IN_DIM, 2, hidden=HIDDEN, dropout=0.0)
    original.load_state_dict(state)
    x = np.random.default_rng(0).normal(size=(20, IN_DIM)).astype(np.float32)
    assert np.array_equal(predict_proba(original, x), predict_proba(loaded.head, x))
    for key, tensor in state.items():
        assert torch.equal(loaded.head.state_dict()[key], tensor)
    assert loaded.labels == ["normal", "pneumonia"] and loaded.threshold == 0.4
    assert loaded.card["schema"] == registry.CARD_SCHEMA_VERSION
    folder = settings.models_dir / str(version)
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "head.safetensors"]
    assert status_of(settings, version) == "candidate"


@pytest.mark.parametrize("name", ["head.safetensors", "card.json"])
def test_a_flipped_byte_is_refused_with_sha256(settings: Settings, name: str):
    version = save(settings)
    path = settings.models_dir / str(version) / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # inside the tensor bytes / inside the JSON text: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(settings, version)
    with pytest.raises(CheckpointError, match="sha256"):
        promote_manually(settings, version, reason="should be refused")
    assert champions(settings) == []


def test_a_missing_checkpoint_file_is_refused(settings: Settings):
    version = save(settings)
    (settings.models_dir / str(version) / "head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(settings, version)


def test_backbone_fingerprint_mismatch_is_refused(settings: Settings):
    version = save(settings)
    load_model(settings, version, backbone_fingerprint=BACKBONE)  # the matching one loads
    with pytest.raises(CheckpointError, match="backbone"):
        load_model(settings, version, backbone_fingerprint="c" * 64)


@pytest.mark.parametrize("field", REQUIRED)
def test_card_validation_rejects_a_card_missing_a_field(field: str):
    card = {"schema": registry.CARD_SCHEMA_VERSION, **make_card()}
    validate_card(dict(card))
    del card[field]
    with pytest.raises(CheckpointError, match=field):
        validate_card(card)


@pytest.mark.parametrize("changes, match", [
    ({"labels": ["normal"]}, "at least two"),
    ({"labels": "normal,pneumonia"}, "labels"),
    ({"threshold": 1.5}, "threshold"),
    ({"schema": 99}, "schema 99"),
])
def test_card_validation_rejects_bad_values(changes: dict, match: str):
    with pytest.raises(CheckpointError, match=match):
        validate_card({"schema": registry.CARD_SCHEMA_VERSION, **make_card(), **changes})
    with pytest.raises(CheckpointError):
        validate_card(["not", "a", "dict"])


def test_save_refuses_an_invalid_card_and_writes_nothing(settings: Settings):
    card = make_card()
    del card["backbone_fingerprint"]
    with pytest.raises(CheckpointError, match="backbone_fingerprint"):
        save_model(settings, state_dict=make_state(), card=card, train_image_ids=[], val_image_ids=[])
    assert db_count(settings, Model) == 0
    assert (not (settings.models_dir / ".staging").exists()
            or not any((settings.models_dir / ".staging").iterdir()))


def test_a_crash_before_commit_leaves_no_row_and_the_next_save_works(settings: Settings, monkeypatch):
    monkeypatch.setenv(faults.ENV, "registry.before_commit:1:RAISE")
    with pytest.raises(faults.InjectedFault, match="registry.before_commit"):
        save(settings, seed=1)
    monkeypatch.delenv(faults.ENV)
    assert db_count(settings, Model) == 0
    assert listing.list_models(settings) == []
    version = save(settings, seed=2)
    assert db_count(settings, Model) == 1
    loaded = load_model(settings, version)  # sha256-verified: the folder holds this save's files
    for key, tensor in make_state(2).items():
        assert torch.equal(loaded.head.state_dict()[key], tensor)
    # The rolled-back save's folder was moved aside (never trusted), on SQLite and PostgreSQL alike
    orphaned = settings.models_dir / ".orphaned"
    assert orphaned.is_dir() and len(list(orphaned.iterdir())) == 1
    staging = settings.models_dir / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    promote_manually(settings, version, reason="works after the crash")
    assert champions(settings) == [version]


@pytest.mark.parametrize("with_champion", [False, True])
def test_a_crash_between_switch_and_audit_changes_nothing(settings: Settings, with_champion: bool,
                                                           monkeypatch):
    old = save(settings, seed=1)
    new = save(settings, seed=2)
    if with_champion:
        promote_manually(settings, old, reason="first")
    rows_before = db_count(settings, Promotion)
    monkeypatch.setenv(faults.ENV, "registry.switched_before_audit:1:RAISE")
    with pytest.raises(faults.InjectedFault, match="registry.switched_before_audit"):
        record_decision(settings, challenger=new, decision="promote", rationale="r",
                        metrics={}, trigger="test", promote=True)
    monkeypatch.delenv(faults.ENV)
    assert champions(settings) == ([old] if with_champion else [])
    assert status_of(settings, old) == ("champion" if with_champion else "candidate")
    assert status_of(settings, new) == "candidate"
    assert db_count(settings, Promotion) == rows_before


# --------------------------------------------------------------------------- champion, rollback, audit


def test_manual_promotions_and_rollback_are_audited(settings: Settings):
    v1, v2, v3 = (save(settings, seed=i) for i in (1, 2, 3))
    with pytest.raises(UsageError, match="no champion"):
        rollback(settings, reason="nothing yet")
    with pytest.raises(UsageError, match="--reason"):
        promote_manually(settings, v1, reason="  ")
    r1 = promote_manually(settings, v1, reason="initial model", trigger="cli", actor="alice")
    with pytest.raises(UsageError, match="no earlier champion"):
        rollback(settings, reason="only one champion so far")
    with pytest.raises(UsageError, match="already the champion"):
        promote_manually(settings, v1, reason="again")
    r2 = promote_manually(settings, v2, reason="better on review", trigger="cli", actor="bob")
    r3 = promote_manually(settings, v3, reason="newest", trigger="flow", actor=None)
    assert champions(settings) == [v3]
    assert [status_of(settings, v) for v in (v1, v2)] == ["retired", "retired"]

    back = rollback(settings, reason="v3 misses cases", trigger="cli", actor="carol")
    assert champions(settings) == [v2] and status_of(settings, v3) == "retired"
    assert (back["decision"], back["from_version"], back["to_version"],
            back["champion_after"]) == ("rollback", v3, v2, v2)
    assert back["trigger"] == "cli" and back["actor"] == "carol"
    assert "v3 misses cases" in back["rationale"] and f"from {v3} to {v2}" in back["rationale"]

    # A second rollback goes further back (to v1), not back to the version just rolled back from.
    back2 = rollback(settings, reason="v2 too", trigger="cli", actor="carol")
    assert champions(settings) == [v1]
    assert (back2["from_version"], back2["to_version"]) == (v2, v1)
    with pytest.raises(UsageError, match="no earlier champion"):
        rollback(settings, reason="v1 was the first")

    rows = history(settings)
    assert [r["decision"] for r in rows] == ["manual_promote"] * 3 + ["rollback"] * 2
    assert [(r["from_version"], r["champion_after"]) for r in rows] == [(None, v1), (v1, v2),
                                                                        (v2, v3), (v3, v2), (v2, v1)]
    assert [r["id"] for r in rows[:3]] == [r1["id"], r2["id"], r3["id"]]
    assert [(r["trigger"], r["actor"]) for r in rows] == [("cli", "alice"), ("cli", "bob"), ("flow", None),
                                                         ("cli", "carol"), ("cli", "carol")]
    assert rows[0]["rationale"] == "initial model" and rows[1]["rationale"] == "better on review"
    assert all(r["time"] for r in rows)


def test_rollback_refuses_when_the_champion_changes_meanwhile(settings: Settings,
                                                              monkeypatch: pytest.MonkeyPatch):
    v1, v2, v3 = (save(settings, seed=i) for i in (1, 2, 3))
    promote_manually(settings, v1, reason="a")
    promote_manually(settings, v2, reason="b")
    real_load = registry.load_model
    raced = []

    def load_and_race(*args, **kwargs):  # another process promotes v3 between rollback's read and switch
        if not raced:
            raced.append(True)
            promote_manually(settings, v3, reason="concurrent")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(registry, "load_model", load_and_race)
    with pytest.raises(UsageError, match="changed meanwhile"):
        rollback(settings, reason="stale")
    assert champions(settings) == [v3]
    assert [r["decision"] for r in history(settings)] == ["manual_promote"] * 3


def test_keep_decision_rejects_the_candidate_and_keeps_the_champion(settings: Settings):
    v1, v2 = save(settings, seed=1), save(settings, seed=2)
    promote_manually(settings, v1, reason="a")
    row = record_decision(settings, challenger=v2, decision="keep", rationale="not better", metrics={"x": 1},
                          trigger="schedule", flow_run_id="run-1")
    assert (row["from_version"], row["to_version"], row["champion_after"]) == (v1, v2, v1)
    assert row["flow_run_id"] == "run-1" and row["metrics"] == {"x": 1}
    assert champions(settings) == [v1] and status_of(settings, v2) == "rejected"


def test_cli_models_history_and_json(settings: Settings, capsys: pytest.CaptureFixture):
    v1, v2 = save(settings, seed=1), save(settings, seed=2)
    promote_manually(settings, v1, reason="first reviewed model", trigger="cli", actor="alice")
    assert cli.main(["promote", str(v2), "--reason", "second model, reviewed", "--json"]) == 0
    promoted = json.loads(capsys.readouterr().out)
    assert promoted["decision"] == "manual_promote" and promoted["champion_after"] == v2
    assert cli.main(["rollback", "--reason", "second one regressed"]) == 0
    capsys.readouterr()

    assert cli.main(["models", "--history"]) == 0
    text = capsys.readouterr().out
    for needle in ("manual_promote", "rollback", "first reviewed model", "second one regressed",
                   "trigger cli", "by alice", f"{v2} -> champion {v1}"):
        assert needle in text

    assert cli.main(["models", "--history", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["decision"] for r in rows] == ["manual_promote", "manual_promote", "rollback"]
    assert [r["champion_after"] for r in rows] == [v1, v2, v1]
    assert rows[0]["actor"] == "alice" and rows[2]["trigger"] == "cli"
    assert "second one regressed" in rows[2]["rationale"]

    assert cli.main(["models", "--json"]) == 0
    models = {m["version"]: m for m in json.loads(capsys.readouterr().out)}
    assert models[v1]["status"] == "champion" and models[v2]["status"] == "retired"
    assert models[v1]["last_promoted"]["decision"] == "rollback"

    assert cli.main(["rollback", "--reason", "nothing earlier"]) == 2  # bad usage: exit code 2
    assert "no earlier champion" in capsys.readouterr().err
    assert cli.main(["promote", "99", "--reason", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- numbers that compare


def add_evaluation(settings: Settings, version: int, fingerprint: str, n: int,
                   auroc: float, when: str) -> None:
    from datetime import datetime

    from db.schema import Evaluation

    metrics = {"macro_auroc": auroc, "balanced_accuracy": 0.5, "accuracy": 0.5,
               "intervals": {"macro_auroc": {"low": auroc - 0.1, "high": auroc + 0.05}}}
    with session_scope(open_catalogue(settings)) as s:
        s.add(Evaluation(model_id=version, test_set_fingerprint=fingerprint, backbone_fingerprint=BACKBONE,
                         n_images=n, metrics=metrics,
                         created_at=datetime.fromisoformat(when).replace(tzinfo=UTC)))


def test_list_models_labels_numbers_with_their_test_set(settings: Settings):
    from xray_core.report.markdown import registry_rows
    from xray_core.report.terminal import render_models

    old, new = "a1b2c3d4" + "0" * 56, "e5f6a7b8" + "0" * 56
    v1, v2, v3 = save(settings, seed=1), save(settings, seed=2), save(settings, seed=3)
    add_evaluation(settings, v1, old, 8, 0.912, "2026-11-20T10:00:00")
    add_evaluation(settings, v1, new, 17, 0.847, "2026-11-21T10:00:00")
    add_evaluation(settings, v2, new, 17, 0.806, "2026-11-21T10:05:00")
    add_evaluation(settings, v2, old, 8, 0.700, "2026-11-22T10:00:00")  # later, but on the older set
    add_evaluation(settings, v3, old, 8, 0.650, "2026-11-20T11:00:00")

    rows = {m["version"]: m for m in listing.list_models(settings, current_test_set=new)}
    assert (rows[v1]["n_images"], rows[v1]["metrics"]["macro_auroc"]["point"]) == (17, 0.847)
    # current preferred
    assert (rows[v2]["n_images"], rows[v2]["metrics"]["macro_auroc"]["point"]) == (17, 0.806)
    assert rows[v1]["on_current_test_set"] and rows[v1]["note"] is None
    assert rows[v3]["test_set_fingerprint"] == old and not rows[v3]["on_current_test_set"]
    assert rows[v3]["scored_at"].startswith("2026-11-20T11:00")
    assert rows[v3]["note"] == "n=8 on older test set a1b2c3d4, 2026-11-20"
    v4 = save(settings, seed=4)
    assert listing.list_models(settings, current_test_set=new)[-1]["note"] == "not scored on a test set yet"

    # Without the current fingerprint, the test set of the newest evaluation row stands in for it
    # (here v2's re-run on the old set, so every model shows its numbers on that set).
    implicit = {m["version"]: m for m in listing.list_models(settings)}
    assert all(implicit[v]["test_set_fingerprint"] == old
               and implicit[v]["on_current_test_set"] for v in (v1, v2, v3))
    assert (implicit[v1]["n_images"], implicit[v1]["metrics"]["macro_auroc"]["point"]) == (8, 0.912)

    text = render_models(list(rows.values()), ["v3 not re-scored: a reason"])
    header, *lines = text.splitlines()
    assert header.split()[:2] == ["version", "status"] and "test set" in header and "scored" in header
    v3_line = next(line for line in lines if line.startswith(str(v3)))
    assert "0.650 [0.550, 0.700]" in v3_line and "n=8 on older test set a1b2c3d4, 2026-11-20" in v3_line
    assert lines[-1] == "note: v3 not re-scored: a reason"
    table_rows = {r["version"]: r for r in registry_rows(list(rows.values()))}
    assert table_rows[v1] | {"promoted": ""} == {
        "version": v1, "status": "candidate", "macro_auroc": "0.847 [0.747, 0.897]",
        "balanced_accuracy": "0.500", "n_images": 17, "test_set": "e5f6a7b8", "scored": "2026-11-21",
        "note": "", "promoted": ""}
    assert table_rows[v3]["note"] == "n=8 on older test set a1b2c3d4, 2026-11-20"
    assert v4 not in table_rows


def test_cli_models_without_a_test_split_lists_stored_numbers_with_a_note(settings: Settings,
                                                                       capsys: pytest.CaptureFixture):
    v1 = save(settings, seed=1)
    add_evaluation(settings, v1, "c" * 64, 8, 0.9, "2026-11-20T10:00:00")
    assert cli.main(["models", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["n_images"] == 8 and row["test_set_fingerprint"] == "c" * 64 and row["scored_at"]
    assert row["rescore"]["status"] == "skipped" and "ingest" in row["rescore"]["reason"].lower()
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert "0.900 [0.800, 0.950]" in text and "cccccccc" in text
    assert "note: not re-scored on a current test set:" in text
