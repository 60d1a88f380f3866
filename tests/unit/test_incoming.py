"""The incoming drop folder (:mod:`xray_core.data.incoming`): a batch is taken when it has a READY file or
has not changed for XRAY_INCOMING_SETTLE_S (mtimes faked with os.utime), once per name and digest; a
folder that does not fit is refused in one line and nothing of it is read; side files are left alone."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import fetch, snapshot
from sqlalchemy import select

from db.schema import Image, IncomingBatch, Rejection
from xray_core.data.incoming import (
    Batch,
    batch_line,
    pending_phrase,
    run_record,
    scan,
    scan_incoming,
    take_batch,
)
from xray_core.data.synthetic import write_dataset
from xray_core.report.format import outcome_sentence
from xray_core.settings import Settings, load_settings

HOUR_AGO = time.time() - 3600


def _batch(root: Path, *, seed: int = 0, offset: int = 0, manifest: bool = False,
           settled: bool = False) -> Path:
    write_dataset(root, patients_per_label=2, images_per_patient=1, size=48, seed=seed, patient_offset=offset,
                  manifest=manifest)
    if settled:
        _age(root)
    return root


def _age(root: Path, when: float = HOUR_AGO) -> None:
    """Every file and folder of ``root`` (itself included) last modified at ``when``."""
    for path in [*root.rglob("*"), root]:
        os.utime(path, (when, when))


def _one(found, name: str) -> Batch:
    (batch,) = [b for b in found.batches if b.name == name]
    return batch


def test_a_batch_is_taken_with_a_ready_file_or_once_it_has_settled(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    batch = _batch(incoming / "2026-11-20")
    waiting = _one(scan_incoming(incoming, settle_s=900), "2026-11-20")
    assert waiting.state == "waiting" and "no READY file" in waiting.detail
    assert "XRAY_INCOMING_SETTLE_S=900" in waiting.detail

    (batch / "READY").touch()
    ready = _one(scan_incoming(incoming, settle_s=900), "2026-11-20")
    assert (ready.state, ready.detail, ready.layout) == ("ready", "READY file", "folders")

    (batch / "READY").unlink()
    _age(batch)  # unchanged for an hour: settled
    settled = _one(scan_incoming(incoming, settle_s=900), "2026-11-20")
    assert settled.state == "ready" and settled.detail.startswith("unchanged for 3")
    assert _one(scan_incoming(incoming, settle_s=7200), "2026-11-20").state == "waiting"
    (batch / "READY").touch()
    with_ready = _one(scan_incoming(incoming, settle_s=7200), "2026-11-20")
    assert with_ready.digest == settled.digest  # READY is not part of the digest
    (batch / "READY").unlink()
    _age(batch)
    assert _one(scan_incoming(incoming, settle_s=900), "2026-11-20").state == "ready"
    os.utime(batch / "normal", None)  # a film being copied into a label folder: the folder changes now
    assert _one(scan_incoming(incoming, settle_s=900), "2026-11-20").state == "waiting"


def test_a_taken_batch_is_left_alone_until_it_changes(settings: Settings, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    batch = _batch(incoming / "2026-11-20", settled=True)
    (batch / "batch.toml").write_text('site = "hospital-a"\n')
    _age(batch)
    found = scan(settings, incoming)
    summary = take_batch(settings, _one(found, "2026-11-20"), flow_run_id="run-1")
    assert summary.added == 4 and {i.site for i in fetch(settings, Image)} == {"hospital-a"}
    (row,) = fetch(settings, IncomingBatch)
    assert (row.name, row.added, row.layout, row.site, row.flow_run_id) == ("2026-11-20", 4, "folders",
                                                                           "hospital-a", "run-1")
    again = _one(scan(settings, incoming), "2026-11-20")
    assert again.state == "taken" and re.fullmatch(r"taken 20\S+ \S+ UTC \(4 films added\)", again.detail)

    (batch / "READY").touch()  # a READY dropped on a batch taken by the settle time: the same arrival
    assert _one(scan(settings, incoming), "2026-11-20").state == "taken"

    write_dataset(batch, labels=("pneumonia",), patients_per_label=1, images_per_patient=1, size=48, seed=7,
                  patient_offset=40)  # a film added later: another digest, a new arrival
    changed = _one(scan(settings, incoming), "2026-11-20")
    assert changed.state == "ready" and changed.digest != row.digest
    assert take_batch(settings, changed).added == 1  # the films already stored are skipped unread
    assert len(fetch(settings, IncomingBatch)) == 2


def test_a_manifest_batch_maps_an_exports_own_column_names_in_batch_toml(settings: Settings,
                                                                        tmp_path: Path) -> None:
    """An export whose columns have other names (``filename``, ``finding``, ``patientid``) is taken as
    dropped, its batch.toml mapping them as ``xray ingest --columns`` would; without the mapping it is
    refused in one line naming the near miss, and nothing is read."""
    incoming = tmp_path / "incoming"
    batch = _batch(incoming / "2026-11-23", manifest=True)
    rows = (batch / "manifest.csv").read_text().splitlines()
    (batch / "manifest.csv").write_text("\n".join(["filename,finding,patientid,licence", *[
        f"{row},CC BY 4.0" for row in rows[1:]]]) + "\n")
    _age(batch)
    refused = _one(scan(settings, incoming), "2026-11-23")
    assert refused.state == "refused" and "manifest.csv cannot be read" in refused.detail
    assert not fetch(settings, Image)
    (batch / "batch.toml").write_text('site = "hospital-b"\n[columns]\nfile = "filename"\nlabel = "finding"\n'
                                      'patient_id = "patientid"\n')
    _age(batch)
    ready = _one(scan(settings, incoming), "2026-11-23")
    assert ready.state == "ready" and dict(ready.columns) == {"file": "filename", "label": "finding",
                                                              "patient_id": "patientid"}
    assert take_batch(settings, ready).added == 4
    images = fetch(settings, Image)
    assert {(i.label, i.patient_id, i.site) for i in images} == {
        ("normal", "person0", "hospital-b"), ("normal", "person1", "hospital-b"),
        ("pneumonia", "person2", "hospital-b"), ("pneumonia", "person3", "hospital-b")}
    assert {(i.attributes or {}).get("licence") for i in images} == {"CC BY 4.0"}


def _old_layout(batch: Path) -> None:
    """Films directly in the batch folder, as the old INCOMING/<label>/<image> layout had them."""
    for film in sorted((batch / "normal").iterdir()):
        film.rename(batch / film.name)
    (batch / "normal").rmdir()


def _no_layout(batch: Path) -> None:
    """Only a side file left: neither label folders nor a manifest."""
    for label in ("normal", "pneumonia"):
        for film in (batch / label).iterdir():
            film.unlink()
        (batch / label).rmdir()
    (batch / "ATTRIBUTION.md").write_text("CC BY 4.0\n")


def _write(name: str, text: str):
    return lambda batch: (batch / name).write_text(text)


@pytest.mark.parametrize("make, words", [
    (_old_layout, ("2 film(s) directly in the batch folder (e.g. person0_normal_0.png), as in the old "
                   "INCOMING/<label>/<image> layout; expected INCOMING/<batch>/<label>/**/<image>")),
    (_no_layout, "neither label folders nor manifest.csv; expected INCOMING/<batch>/<label>/**/<image>"),
    (_write("manifest.csv", "file,label\nnormal/person0_normal_0.png,normal\n"),
     "manifest.csv does not name 3 film(s) of the batch (e.g. normal/person1_normal_0.png)"),
    (_write("batch.toml", 'sitee = "a"\n'), "batch.toml has unknown key(s) 'sitee'; allowed: site, columns"),
    (_write("batch.toml", '[columns]\npatient_id = "patientid"\n'),
     "batch.toml maps [columns], but the batch has no manifest.csv"),
    (_write("batch.toml", '[columns]\npatient = "patientid"\n'),
     "batch.toml [columns]: --columns patient=patientid: 'patient' is not a manifest column name"),
    (_write("batch.toml", 'site = "a\n'), "batch.toml is not valid TOML"),
    (_write("manifest.csv", "film,label\n"), "manifest.csv cannot be read: manifest"),
])
def test_a_batch_that_does_not_fit_is_refused_in_one_line_and_never_read(settings: Settings, tmp_path: Path,
                                                                           make, words: str) -> None:
    incoming = tmp_path / "incoming"
    batch = _batch(incoming / "2026-11-20")
    make(batch)
    (batch / "READY").touch()
    before = snapshot(settings)
    found = scan(settings, incoming)
    refused = _one(found, "2026-11-20")
    assert refused.state == "refused" and words in refused.detail and "\n" not in refused.detail
    assert found.of("ready") == [] and snapshot(settings) == before  # nothing read, nothing stored
    line = batch_line(run_record(found, {})["batches"][0])
    assert line.startswith("incoming 2026-11-20: refused: ") and "\n" not in line
    with pytest.raises(ValueError, match="is refused, not ready"):
        take_batch(settings, refused)


def test_films_or_links_beside_the_batches_are_refused_and_other_files_left_alone(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    _batch(incoming / "2026-11-20", settled=True)
    (incoming / "README.md").write_text("drop batches here")
    (incoming / "film.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (incoming / "linked").symlink_to(incoming / "2026-11-20")
    found = scan_incoming(incoming, settle_s=900)
    assert [(b.name, b.state) for b in found.batches] == [
        ("2026-11-20", "ready"), ("film.dcm", "refused"), ("linked", "refused")]
    assert "a film directly in the incoming folder" in _one(found, "film.dcm").detail
    assert "symbolic link" in _one(found, "linked").detail


def test_side_files_at_the_top_are_left_alone_and_listed(settings: Settings, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    batch = _batch(incoming / "2026-11-21", seed=2, manifest=True)
    for name in ("ATTRIBUTION.md", "README", "LICENSE.txt", "READY"):
        (batch / name).write_text("text, not a film\n")
    folders = _batch(incoming / "2026-11-22", seed=3, offset=20)
    for name in ("ATTRIBUTION.md", "README", "notes.txt", "batch.toml", "READY"):
        (folders / name).write_text("" if name == "batch.toml" else "text\n")
    found = scan(settings, incoming)
    assert [(b.name, b.state, b.layout) for b in found.batches] == [
        ("2026-11-21", "ready", "manifest"), ("2026-11-22", "ready", "folders")]
    assert _one(found, "2026-11-21").side_files == ("ATTRIBUTION.md", "LICENSE.txt", "README")
    assert _one(found, "2026-11-22").side_files == ("ATTRIBUTION.md", "README", "notes.txt")
    taken = {b.name: take_batch(settings, b) for b in found.of("ready")}
    assert [s.added for s in taken.values()] == [4, 4] and fetch(settings, Rejection) == []
    assert {i.label for i in fetch(settings, Image)} == {"normal", "pneumonia"}
    line = batch_line(run_record(found, taken)["batches"][1])
    assert line == ("incoming 2026-11-22: taken (4 films added, 0 duplicates, 0 quarantined; side files left "
                    "alone: ATTRIBUTION.md, README, notes.txt)")


def test_a_skip_says_what_is_waiting_not_nothing_new(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    _batch(incoming / "2026-11-22")
    record = run_record(scan_incoming(incoming, settle_s=900), {})
    line = batch_line(record["batches"][0])
    assert line.startswith("incoming 2026-11-22: waiting (no READY file; last change")
    pending = pending_phrase(record)
    assert pending == f"1 batch waiting (2026-11-22) in {incoming}"
    assert outcome_sentence("Skipped", None, None, 1, pending=pending) == f"champion v1 stays; {pending}"
    assert outcome_sentence("Skipped", None, None, 1) == "champion v1 stays; nothing new to train on"
    assert pending_phrase(run_record(scan_incoming(tmp_path / "none", settle_s=900), {})) is None


@pytest.mark.sqlite_only
def test_a_catalogue_at_0005_upgrades_in_place_with_the_batches_table(tmp_path: Path) -> None:
    from sqlalchemy import inspect, text

    from db.engine import make_engine, migrate, upgrade_to_head

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    migrate(engine, "0005")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                          "VALUES (1, 'folder', '/x', 'done', '2026-01-01 00:00:00', '{}')"))
    upgrade_to_head(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sources")).scalar() == 1
        assert conn.execute(select(IncomingBatch)).all() == []
    migrate(engine, downgrade=True, revision="0005")
    assert "incoming_batches" not in inspect(engine).get_table_names()
    engine.dispose()


def test_xray_incoming_lists_the_batches_without_taking_any(xray_env, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    import json

    from xray_cli.main import main
    from xray_core.settings import reset_settings

    incoming = tmp_path / "incoming"
    _batch(incoming / "2026-11-20", settled=True)
    _batch(incoming / "2026-11-22", seed=1, offset=20)
    monkeypatch.delenv("XRAY_INCOMING", raising=False)
    reset_settings()
    assert main(["incoming"]) == 2  # XRAY_INCOMING unset and no folder named
    assert "XRAY_INCOMING is not set; name the folder: xray incoming" in capsys.readouterr().err
    monkeypatch.setenv("XRAY_INCOMING", str(incoming))
    reset_settings()
    assert main(["incoming", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["counts"] == {"taken": 0, "ready": 1, "waiting": 1, "refused": 0}
    assert main(["incoming"]) == 0
    text = capsys.readouterr().out
    assert "2026-11-20  ready    unchanged for 3" in text and "(the next retrain takes it)" in text
    assert fetch(load_settings(), Image) == []  # a listing reads nothing
