"""The sequestered test set (issue 26): new patients set aside per (site, label) at XRAY_SEQUESTER_FRACTION,
never in a routine split; migration 0008 upgrading a catalogue in place; the audit's verdict on
hand-built evaluations; ``xray audit`` when there is nothing to audit yet."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from sqlalchemy import create_engine, exc, select, text
from sqlalchemy.orm import Session

from db.schema import SEQUESTERED, SPLITS, Base, Image, Patient, Source
from xray_core.data.catalogue import Row
from xray_core.data.snapshot import load_split_data
from xray_core.data.split import assign_splits, sequester_turn
from xray_core.pipeline.sequester import judge
from xray_core.results import Evaluation

RATIOS = (0.7, 0.15, 0.15)


def _add(session: Session, first: int, n: int, label: str, *, source: int, site: str | None) -> None:
    for k in range(first, first + n):
        session.add(Patient(patient_id=f"{source}-{label}-{k}", id_source="manifest"))
        session.flush()
        sha = hashlib.sha256(f"{source}-{label}-{k}".encode()).hexdigest()
        session.add(Image(sha256=sha, stored_path="s", label=label, patient_id=f"{source}-{label}-{k}",
                          width=64, height=64, bit_depth=8, format="png", phash=0, original_name="f",
                          source_id=source, site=site))
    session.flush()


def _catalogue() -> Session:
    session = Session(create_engine("sqlite://"))
    Base.metadata.create_all(session.get_bind())
    # site "north" from the images' own column; site "south" from its ingest folder's name
    session.add_all([Source(id=1, kind="test", path="/data/x"),
                     Source(id=2, kind="test", path="/data/south")])
    session.flush()
    return session


def _per_stratum(session: Session) -> dict[tuple[str, str, str | None], int]:
    rows = session.execute(select(Image.site, Image.source_id, Image.label, Patient.split)
                           .join(Patient, Patient.patient_id == Image.patient_id)).all()
    return Counter((site or f"source{src}", label, split) for site, src, label, split in rows)


@pytest.mark.parametrize(("fraction", "before", "turn"), [
    (0.05, 18, False), (0.05, 19, True), (0.05, 20, False), (0.05, 39, True), (0.25, 3, True),
    (0.25, 4, False), (0.0, 19, False), (0.5, 0, False), (0.5, 1, True)])
def test_every_nth_patient_of_a_stratum_is_sequestered(fraction, before, turn):
    assert sequester_turn(fraction, before) is turn


def test_new_patients_are_sequestered_per_site_and_label_and_never_in_a_routine_split():
    s = _catalogue()
    for source, site in ((1, "north"), (2, None)):
        _add(s, 0, 40, "normal", source=source, site=site)
        _add(s, 0, 20, "pneumonia", source=source, site=site)
    assigned = assign_splits(s, ratios=RATIOS, seed=0, sequester=0.1)
    assert assigned[SEQUESTERED] == 2 * (4 + 2) and sum(assigned.values()) == 120
    counts = _per_stratum(s)
    for site in ("north", "source2"):  # stratified: exactly a tenth of each (site, label)
        assert counts[(site, "normal", SEQUESTERED)] == 4 and counts[(site, "pneumonia", SEQUESTERED)] == 2
    # the routine splits keep their ratios among the patients that are not sequestered (within one)
    routine = Counter(p.split for p in s.scalars(select(Patient)) if p.split != SEQUESTERED)
    for name, ratio in zip(SPLITS, RATIOS):
        assert abs(routine[name] - ratio * 108) <= 2
    # a later ingest: the count goes on across ingests (every tenth new patient of a stratum)
    _add(s, 40, 10, "normal", source=1, site="north")
    again = assign_splits(s, ratios=RATIOS, seed=0, sequester=0.1)
    assert again[SEQUESTERED] == 1 and _per_stratum(s)[("north", "normal", SEQUESTERED)] == 5


def test_patients_assigned_before_keep_their_split_and_are_not_caught_up():
    s = _catalogue()
    _add(s, 0, 40, "normal", source=1, site="north")
    assign_splits(s, ratios=RATIOS, seed=0)  # before the sequestered set existed (or with fraction 0)
    before = dict(s.execute(select(Patient.patient_id, Patient.split)).tuples().all())
    assert SEQUESTERED not in before.values()
    _add(s, 40, 5, "normal", source=1, site="north")
    assert assign_splits(s, ratios=RATIOS, seed=0, sequester=0.1)[SEQUESTERED] == 0  # no back-fill
    _add(s, 45, 5, "normal", source=1, site="north")
    assert assign_splits(s, ratios=RATIOS, seed=0, sequester=0.1)[SEQUESTERED] == 1  # the 50th patient
    after = dict(s.execute(select(Patient.patient_id, Patient.split)).tuples().all())
    assert {pid: after[pid] for pid in before} == before


def test_the_routine_splits_never_read_sequestered_patients(xray_env, settings):
    from db import session_scope
    from xray_core.data.catalogue import catalogue_summary, open_catalogue

    with session_scope(open_catalogue(settings)) as s:
        s.add(Source(id=1, kind="test", path="/data/north"))
        s.flush()
        _add(s, 0, 20, "normal", source=1, site=None)
        _add(s, 0, 20, "pneumonia", source=1, site=None)
        assign_splits(s, ratios=RATIOS, seed=0, sequester=0.25)
        hidden = set(s.scalars(select(Image.sha256).join(Patient).where(Patient.split == SEQUESTERED)))
    assert len(hidden) == 10
    data = load_split_data(settings)
    routine = {r.sha256 for rows in (data.train, data.val, data.test) for r in rows}
    assert len(routine) == 30 and not routine & hidden
    summary = catalogue_summary(settings)  # xray status says where the other films are
    assert summary["patients"]["by_split"][SEQUESTERED] == 10
    assert any(n.startswith("10 patient(s) are sequestered") for n in summary["notes"])


def test_migration_0008_upgrades_a_catalogue_in_place(database_url):
    from db.engine import make_engine, migrate

    engine = make_engine(database_url)
    migrate(engine, "0007g")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                          "VALUES (1, 'folder', '/d', 'done', '2026-01-01 00:00:00', '{}')"))
        for k, split in enumerate(("train", "test", None)):
            conn.execute(text("INSERT INTO patients (patient_id, id_source, split) "
                              "VALUES (:p, 'manifest', :s)"), {"p": f"p{k}", "s": split})
            conn.execute(text(
                "INSERT INTO images (sha256, stored_path, label, patient_id, width, height, bit_depth, "
                "format, phash, original_name, source_id, added_at) VALUES (:h, 's', 'normal', :p, 64, 64, "
                "8, 'png', 0, 'f', 1, '2026-01-01 00:00:00')"), {"h": f"{k}" * 64, "p": f"p{k}"})
    migrate(engine, "head")
    with Session(engine) as s:
        assert s.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0008"
        assert dict(s.execute(select(Patient.patient_id, Patient.split)).tuples().all()) == {
            "p0": "train", "p1": "test", "p2": None}
        assert s.scalar(select(text("count(*)")).select_from(Image)) == 3
        s.get(Patient, "p2").split = SEQUESTERED  # the new value is allowed now ...
        s.commit()
        with pytest.raises(exc.IntegrityError):  # ... and the constraint still refuses any other
            s.execute(text("UPDATE patients SET split = 'other' WHERE patient_id = 'p0'"))
        s.rollback()
        assert s.execute(text("SELECT count(*) FROM sequester_audits")).scalar() == 0
    migrate(engine, "0007g", downgrade=True)  # the sequestered patient goes back to no split
    with Session(engine) as s:
        assert dict(s.execute(select(Patient.patient_id, Patient.split)).tuples().all())["p2"] is None
    migrate(engine, "head")
    engine.dispose()


def _rows(n_per_label: int = 20) -> list[Row]:
    return [Row(i, f"{i:064x}", "s", label, f"p{i}")
            for i, label in enumerate(["normal"] * n_per_label + ["pneumonia"] * n_per_label)]


def _evaluation(version: int, rows: list[Row], p_pneumonia: np.ndarray) -> Evaluation:
    probs = np.stack([1 - p_pneumonia, p_pneumonia], axis=1)
    return Evaluation(version=version, test_set_fingerprint="f", n_images=len(rows),
                      metrics={"labels": ["normal", "pneumonia"], "threshold": 0.5},
                      labels=["normal", "pneumonia"], probabilities=probs.tolist(),
                      shas=[r.sha256 for r in rows], sites=[], views=[])


def test_the_audit_flags_a_champion_below_the_reference_by_more_than_the_margin(settings):
    rows = _rows()
    truth = np.array([r.label == "pneumonia" for r in rows], dtype=float)
    rng = np.random.default_rng(0)
    good = np.clip(0.2 + 0.6 * truth + rng.normal(0, 0.1, len(rows)), 0, 1)  # AUROC about 1
    poor = rng.uniform(0, 1, len(rows))  # AUROC about 0.5
    reference = _evaluation(1, rows, good)

    worse = judge(settings, _evaluation(3, rows, poor), reference, rows)
    assert worse["status"] == "degraded" and worse["degraded"] is True
    assert worse["comparison"]["low"] <= -settings.reference_margin
    assert "champion v3" in worse["check"]["detail"] and "locked reference v1" in worse["check"]["detail"]

    same = judge(settings, _evaluation(3, rows, good), reference, rows)
    assert same["status"] == "ok" and same["degraded"] is False and same["comparison"]["difference"] == 0

    other = Evaluation(**{**_evaluation(3, rows, good).as_dict(), "labels": ["a", "b"]})
    unclear = judge(settings, other, reference, rows)
    assert unclear["status"] == "inconclusive" and unclear["degraded"] is None


@pytest.mark.parametrize(("difference", "low", "status"), [
    (-0.01, -0.15, "inconclusive"),  # inside the margin at the point; too few films to rule a drop out
    (-0.05, -0.15, "degraded"),  # measured below the reference by more than the margin
    (+0.01, -0.01, "ok"),  # non-inferior
    (-0.03, -0.01, "ok"),  # a percentile interval need not hold its point: the bound passes, no alarm
])
def test_the_audit_alarms_on_a_measured_drop_not_on_a_wide_interval(settings, monkeypatch, difference, low,
                                                                     status):
    import xray_core.evaluate.intervals as intervals

    monkeypatch.setattr(intervals, "paired_bootstrap_difference", lambda *a, **k: {
        "challenger": 0.9, "champion": 0.9 - difference, "difference": difference, "low": low, "high": 0.1,
        "level": 0.95})
    rows = _rows()
    p = np.linspace(0, 1, len(rows))
    out = judge(settings, _evaluation(3, rows, p), _evaluation(1, rows, p), rows)
    assert out["status"] == status and out["degraded"] is {"ok": False, "degraded": True}.get(status)
    assert ("not a measured drop" in out["check"]["detail"]) is (status == "inconclusive")


def test_xray_audit_with_nothing_to_audit_says_why_and_exits_0(xray_env, settings, capsys):
    from registry_heads import save

    from xray_cli.main import main
    from xray_core.registry.versions import record_decision

    assert main(["audit"]) == 0
    assert "nothing to audit: there is no champion yet" in capsys.readouterr().out
    record_decision(settings, challenger=save(settings), decision="promote", rationale="test", metrics={},
                    trigger="test", promote=True)
    assert main(["audit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "skipped" and out["champion"] == 1 and out["id"] is None
    assert "no patient is sequestered yet (XRAY_SEQUESTER_FRACTION is 0 (off))" in out["verdict"]
