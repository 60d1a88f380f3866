"""A film rejected inside its write group's transaction (a near copy of another patient's film, a label
conflict) leaves no store file behind, and a store file another ingest removed before a row names it
is written again (xray_core.data.store_guard).

Integration lane: real ingests into a temp home, checked with ``xray doctor``'s own reconciliation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from db import session_scope
from db.schema import Image, Rejection, SeenFile
from xray_core.data import doctor, ingest, prepare
from xray_core.data.catalogue import open_catalogue
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import write_dataset
from xray_core.faults import ENV as FAULT_ENV
from xray_core.faults import InjectedFault
from xray_core.io.storage import get_storage
from xray_core.settings import Settings, load_settings


def _near_copies(root: Path, originals: Path, n: int = 2) -> list[str]:
    """``n`` films of ``originals`` saved again under other patients (person90N) with one pixel changed:
    new bytes, the same pHash."""
    found = sorted((originals / "pneumonia").glob("*.png"))[:n]
    (root / "pneumonia").mkdir(parents=True)
    for i, path in enumerate(found):
        pixels = np.asarray(PILImage.open(path)).copy()
        pixels[0, 0] ^= 1
        PILImage.fromarray(pixels).save(root / "pneumonia" / f"person90{i}_pneumonia_0.png")
    return [p.name for p in found]


def _findings(settings: Settings) -> set[str]:
    return {f.code for f in doctor.examine(settings).findings}


def _rows(settings: Settings) -> tuple[dict[str, str], list[tuple[str, str | None]]]:
    """{stored_path: sha256} of every image, and (reason, quarantine_path) of every rejection."""
    with session_scope(open_catalogue(settings)) as s:
        images = {path: sha for path, sha in s.execute(select(Image.stored_path, Image.sha256))}
        rejections = [(r, q) for r, q in s.execute(select(Rejection.reason, Rejection.quarantine_path))]
    return images, rejections


def _check_store(settings: Settings) -> None:
    """Every store file is named by a row and holds its bytes; doctor finds nothing."""
    images, _ = _rows(settings)
    store = get_storage(settings)
    assert set(store.list("store")) == set(images)
    for path, sha in images.items():
        assert hashlib.sha256(store.read_bytes(path)).hexdigest() == sha, path
    assert doctor.examine(settings).healthy, _findings(settings)


def test_a_quarantined_near_copy_leaves_no_store_file(xray_env, tmp_path) -> None:
    settings = load_settings()
    write_dataset(tmp_path / "first", patients_per_label=2, images_per_patient=1, seed=1)
    ingest_source(tmp_path / "first", settings=settings)
    _near_copies(tmp_path / "copies", tmp_path / "first")
    summary = ingest_source(tmp_path / "copies", settings=settings)
    assert summary.rejected_by_reason == {"near_duplicate_other_patient": 2}, summary.rejected_by_reason
    images, rejections = _rows(settings)
    assert len(images) == 4 and all(copy is not None for _, copy in rejections)
    store = get_storage(settings)
    assert all(store.exists(copy) for _, copy in rejections if copy)  # kept in quarantine, not the store
    assert "store_orphan" not in _findings(settings)
    _check_store(settings)


def test_a_store_that_refuses_deletes_keeps_an_orphan_and_the_ingest_goes_on(xray_env, tmp_path,
                                                                           monkeypatch) -> None:
    """An object lock or a read-only folder: the rejected film's store file stays (an orphan doctor lists,
    as before the removal existed); the group is not failed on every ingest for it."""
    from xray_core.io.storage import LocalStorage

    settings = load_settings()
    write_dataset(tmp_path / "first", patients_per_label=2, images_per_patient=1, seed=1)
    ingest_source(tmp_path / "first", settings=settings)
    _near_copies(tmp_path / "copies", tmp_path / "first")

    def refuse(self, key: str) -> None:
        raise PermissionError(f"deletes are not allowed here: {key}")

    monkeypatch.setattr(LocalStorage, "delete", refuse)
    summary = ingest_source(tmp_path / "copies", settings=settings)
    assert summary.rejected_by_reason == {"near_duplicate_other_patient": 2}, summary.rejected_by_reason
    images, _ = _rows(settings)
    assert len(images) == 4 and len(set(get_storage(settings).list("store")) - set(images)) == 2
    assert "store_orphan" in _findings(settings)


def test_a_label_conflict_in_one_group_keeps_the_file_its_first_row_names(xray_env, tmp_path) -> None:
    """The same bytes twice in one write group under two labels: the first row is added, the second is
    a label conflict whose store file is the first row's, which must stay."""
    settings = load_settings()
    write_dataset(tmp_path / "src", patients_per_label=1, images_per_patient=1, seed=2)
    film = next((tmp_path / "src" / "normal").glob("*.png"))
    (tmp_path / "src" / "pneumonia" / film.name).write_bytes(film.read_bytes())
    summary = ingest_source(tmp_path / "src", settings=settings)
    assert summary.added == 2 and summary.rejected_by_reason == {"label_conflict": 1}
    _check_store(settings)


def _remove_after_settle(monkeypatch, *, drop_payload: bool = False) -> list[str]:
    """Between a group's store writes and its transaction, remove the files it wrote, as another ingest
    that rejected the same bytes would (with ``drop_payload``, also as if their bytes were let go)."""
    removed: list[str] = []
    real = ingest.settle_group

    def settle_then_remove(group, settings, *args, **kwargs):
        settled, written = real(group, settings, *args, **kwargs)
        for key in sorted(written):
            get_storage(settings).delete(key)
            removed.append(key)
        if drop_payload:
            for prep in settled:
                prep.payload = None
        return settled, written

    monkeypatch.setattr(ingest, "settle_group", settle_then_remove)
    return removed


def test_a_store_file_removed_before_its_row_is_written_again(xray_env, tmp_path, monkeypatch) -> None:
    settings = load_settings()
    write_dataset(tmp_path / "first", patients_per_label=2, images_per_patient=1, seed=3)
    _near_copies(tmp_path / "copies", tmp_path / "first")
    removed = _remove_after_settle(monkeypatch)
    assert ingest_source(tmp_path / "first", settings=settings).added == 4
    assert len(removed) == 4
    _check_store(settings)  # every row's file written again before its row
    # A near copy's quarantine copy is taken from its store file: written again first, then removed.
    summary = ingest_source(tmp_path / "copies", settings=settings)
    assert summary.rejected_by_reason == {"near_duplicate_other_patient": 2}, summary.rejected_by_reason
    _, rejections = _rows(settings)
    assert all(copy is not None and get_storage(settings).exists(copy) for _, copy in rejections)
    _check_store(settings)


def test_a_removed_store_file_whose_bytes_are_gone_is_retried(xray_env, tmp_path, monkeypatch) -> None:
    settings = load_settings()
    write_dataset(tmp_path / "src", patients_per_label=1, images_per_patient=1, seed=4)
    _remove_after_settle(monkeypatch, drop_payload=True)
    summary = ingest_source(tmp_path / "src", settings=settings)
    assert summary.added == 0 and summary.rejected_by_reason == {"store_file_gone": 2}
    with session_scope(open_catalogue(settings)) as s:
        assert s.scalar(select(SeenFile.path)) is None  # transient: not remembered as seen
    monkeypatch.setattr(ingest, "settle_group", prepare.settle_group)
    assert ingest_source(tmp_path / "src", settings=settings).added == 2  # the next ingest stores them
    _check_store(settings)


def test_a_failure_after_the_removal_rolls_back_and_loses_nothing(xray_env, tmp_path, monkeypatch) -> None:
    """The removal happens before the commit: a failure in between rolls the group back (no row ever
    named the file); the quarantine copy is already written; the next ingest ends clean."""
    settings = load_settings()
    write_dataset(tmp_path / "first", patients_per_label=2, images_per_patient=1, seed=5)
    ingest_source(tmp_path / "first", settings=settings)
    _near_copies(tmp_path / "copies", tmp_path / "first")
    monkeypatch.setenv(FAULT_ENV, "ingest.group_before_commit:1:RAISE")
    with pytest.raises(InjectedFault):
        ingest_source(tmp_path / "copies", settings=settings)
    monkeypatch.delenv(FAULT_ENV)
    images, rejections = _rows(settings)
    assert len(images) == 4 and rejections == []  # the group rolled back
    store = get_storage(settings)
    assert set(store.list("store")) == set(images)  # removed before the failure
    assert len(store.list("quarantine")) == 2  # the copies were made first (no row names them yet)
    summary = ingest_source(tmp_path / "copies", settings=settings)
    assert summary.rejected_by_reason == {"near_duplicate_other_patient": 2}
    assert summary.quarantine["rows_sharing_a_copy"] == 2  # the copies made before the failure
    _check_store(settings)
