"""Issue 23, item 1: a full disk never becomes catalogue loss, and ``xray doctor`` finds and repairs.

The catalogue check used to read only the main file's header: after a checkpoint ran out of space the
main file is shorter than its header claims while every committed row sits in ``catalogue.db-wal``,
and every command refused it as "truncated", advising a ``mv`` of the main file alone (which drops
the WAL and every row). These tests build that state exactly (tests/catalogue_faults.py), let a real
small file system produce it, and check ``xray doctor`` on healthy, orphaned, missing, WAL-only and
damaged homes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from catalogue_faults import catalogue_with_wal_only, fill, small_filesystem, write_films

from db import dispose_engines
from db.engine import check_sqlite_file, header_problem
from xray_cli.main import main
from xray_core.data.ingest import ingest_source
from xray_core.settings import load_settings, reset_settings

pytestmark = pytest.mark.sqlite_only


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``xray argv`` as a new command would (settings and engines fresh); (exit code, stdout, stderr)."""
    reset_settings()
    dispose_engines()
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    dispose_engines()
    return code, out, err


def images_seen(capsys) -> int:
    """How many images the next command (``xray status --json``) sees."""
    code, out, err = cli(capsys, "status", "--json")
    assert code == 0, err
    return json.loads(out)["catalogue"]["images"]


def doctor(capsys, *flags: str) -> tuple[int, dict]:
    code, out, err = cli(capsys, "doctor", "--json", *flags)
    assert "Traceback" not in err and code in (0, 1), err
    return code, json.loads(out)


def codes(report: dict, *, open_only: bool = True) -> set[str]:
    return {f["code"] for f in report["findings"] if f["open"] or not open_only}


def files_of(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` that holds data, by relative path. Left out: ``-shm`` (the
    WAL index, which SQLite rebuilds from the WAL on every open, read-only ones included) and an empty
    ``-wal`` (a read-only open may create one; it holds nothing)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith("-shm")
            and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


# --------------------------------------------------------------------------- the catalogue check


def test_the_reported_state_opens_with_every_row(xray_env, tmp_path, capsys) -> None:
    """Main file cut to 4,096 bytes with a header claiming more, intact WAL beside it: all rows."""
    settings = load_settings()
    n = catalogue_with_wal_only(settings, tmp_path / "src")
    db_file = settings.home / "catalogue.db"
    assert db_file.stat().st_size == 4096 and header_problem(db_file).startswith("truncated")
    check_sqlite_file(db_file)  # raised "truncated" before issue 23
    assert images_seen(capsys) == n
    assert header_problem(db_file) is None, "space allowed it: the WAL was checkpointed into the main file"


def test_full_disk_during_ingest_loses_no_committed_row(xray_env, tmp_path, capsys, monkeypatch) -> None:
    """A real 4 MB file system fills up during an ingest; every committed row survives, and is seen
    both while the disk is still full (read through the WAL) and after space is freed."""
    with small_filesystem(tmp_path / "small", "4m") as mount:
        monkeypatch.setenv("XRAY_HOME", str(mount / "home"))
        first = write_films(tmp_path / "one", range(8))
        write_films(tmp_path / "two", range(8, 40))
        reset_settings()
        # Committed, and still only in the WAL: this process's engine stays open (no checkpoint yet).
        assert ingest_source(tmp_path / "one", settings=load_settings()).added == first
        ballast = fill(mount)
        code = main(["ingest", str(tmp_path / "two")])
        assert code in (1, 2), "the ingest must stop on the full disk"
        assert "Traceback" not in capsys.readouterr().err
        dispose_engines()  # the process ends: SQLite's close-time checkpoint has no space
        db_file = mount / "home" / "catalogue.db"
        assert header_problem(db_file) is not None and Path(f"{db_file}-wal").stat().st_size > 0, \
            "precondition: the full disk left a main file shorter than its header, rows in the WAL"

        assert images_seen(capsys) >= first  # still full: read through the WAL, checkpoint skipped
        ballast.unlink()
        seen = images_seen(capsys)
        assert seen >= first and header_problem(db_file) is None
        code, _, err = cli(capsys, "ingest", str(tmp_path / "two"))
        assert code == 0, err
        assert images_seen(capsys) == 40


def test_damaged_catalogue_advice_moves_all_three_files(xray_env, tmp_path, capsys) -> None:
    """A main file cut in half beside a WAL that cannot help (not a WAL): refused as damaged, and the
    advice names xray doctor and moves the -wal and -shm with the main file, never the main file alone."""
    settings = load_settings()
    write_films(tmp_path / "src", range(4))
    ingest_source(tmp_path / "src", settings=settings)
    dispose_engines()
    db_file = settings.home / "catalogue.db"
    data = db_file.read_bytes()
    db_file.write_bytes(data[: len(data) // 2 + 100])
    Path(f"{db_file}-wal").write_bytes(b"not a wal" * 100)
    Path(f"{db_file}-shm").write_bytes(b"\0" * 32768)
    before = files_of(settings.home)
    code, _, err = cli(capsys, "status")
    assert code == 2 and "truncated" in err and "Traceback" not in err
    assert "xray doctor" in err and f"{db_file}-wal" in err and f"{db_file}-shm" in err
    assert f"mv {db_file} {db_file}.damaged" not in err
    assert files_of(settings.home) == before


# --------------------------------------------------------------------------- xray doctor


def test_doctor_on_a_healthy_home(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    write_films(tmp_path / "src", range(4))
    ingest_source(tmp_path / "src", settings=settings)
    before = files_of(settings.home / "store")
    code, report = doctor(capsys)
    assert code == 0 and report["healthy"] and report["findings"] == []
    assert report["catalogue"]["check"] == "quick_check ok" and report["counts"]["images"] == 4
    code, out, _ = cli(capsys, "doctor", "--verify")
    assert code == 0 and "integrity_check ok" in out and out.rstrip().endswith("healthy")
    assert files_of(settings.home / "store") == before


def test_doctor_finds_orphans_and_missing_files(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    write_films(tmp_path / "src", range(4))
    ingest_source(tmp_path / "src", settings=settings)
    stored = sorted((settings.home / "store").rglob("*.png"))
    stored[0].unlink()
    orphan = settings.home / "store" / "zz" / "orphan.png"
    orphan.parent.mkdir()
    orphan.write_bytes(b"no row names me")
    (settings.home / "quarantine").mkdir(exist_ok=True)
    (settings.home / "quarantine" / "stray.png").write_bytes(b"stray")
    (settings.home / "models" / "99").mkdir(parents=True)
    stored[1].write_bytes(b"altered")
    code, report = doctor(capsys)
    assert code == 1 and not report["healthy"]
    assert codes(report) == {"store_orphan", "store_missing", "quarantine_orphan", "model_folder_orphan"}
    by = {f["code"]: f for f in report["findings"]}
    assert by["store_orphan"]["examples"] == ["store/zz/orphan.png"]
    assert by["store_missing"]["examples"] == [str(stored[0].relative_to(settings.home))]
    assert by["model_folder_orphan"]["examples"] == ["models/99"]
    code, report = doctor(capsys, "--verify")
    assert code == 1 and "store_altered" in codes(report)  # only --verify hashes the bytes


def test_doctor_finds_a_wal_only_catalogue_and_changes_nothing(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    catalogue_with_wal_only(settings, tmp_path / "src")
    db_file = settings.home / "catalogue.db"
    main_before, wal_before = db_file.read_bytes(), Path(f"{db_file}-wal").read_bytes()
    code, report = doctor(capsys)
    assert code == 1 and codes(report) == {"catalogue_wal_only"}
    assert report["counts"]["images"] == 6  # read through the WAL
    assert db_file.read_bytes() == main_before and Path(f"{db_file}-wal").read_bytes() == wal_before


def test_doctor_finds_a_damaged_catalogue(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    write_films(tmp_path / "src", range(4))
    ingest_source(tmp_path / "src", settings=settings)
    dispose_engines()
    db_file = settings.home / "catalogue.db"
    data = bytearray(db_file.read_bytes())
    data[4096 * 2:4096 * 6] = b"\xa5" * (4096 * 4)  # pages overwritten: the header is fine, the b-trees not
    db_file.write_bytes(bytes(data))
    before = files_of(settings.home)
    code, report = doctor(capsys)
    assert code == 1 and codes(report) == {"catalogue_damaged"}
    code, report = doctor(capsys, "--repair")
    assert code == 1 and codes(report) == {"catalogue_damaged"}, "a damaged catalogue is reported, not moved"
    assert files_of(settings.home) == before


def test_repair_keeps_a_backup_and_deletes_nothing(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    n = catalogue_with_wal_only(settings, tmp_path / "src")
    home = settings.home
    orphan = home / "store" / "zz" / "orphan.png"
    orphan.parent.mkdir()
    orphan.write_bytes(b"no row names me")
    missing = sorted(p for p in (home / "store").rglob("*.png") if p != orphan)[0]
    missing.unlink()
    before = files_of(home)
    code, report = doctor(capsys, "--repair")
    assert code == 1 and codes(report) == {"store_missing"}, "a missing file is reported, never repaired"
    assert codes(report, open_only=False) == {"catalogue_wal_only", "store_orphan", "store_missing"}
    backup = Path(report["backup"])
    assert backup.parent == home / "doctor"
    originals = {p.name: p.read_bytes() for p in (backup / "original").iterdir()}
    assert {"catalogue.db", "catalogue.db-wal"} <= set(originals)
    assert len(originals["catalogue.db"]) == 4096  # the files as they were, before the checkpoint
    with sqlite3.connect(backup / "catalogue.db") as conn:  # the consistent copy: every row
        assert conn.execute("select count(*) from images").fetchone()[0] == n
    assert (backup / "orphans" / "store" / "zz" / "orphan.png").read_bytes() == b"no row names me"
    after = files_of(home)
    for rel, digest in before.items():  # every file is where it was, or inside the backup folder
        moved = f"{backup.relative_to(home)}/orphans/{rel}"
        kept = f"{backup.relative_to(home)}/original/{Path(rel).name}"
        assert after.get(rel) == digest or after.get(moved) == digest or after.get(kept) == digest, rel
    assert header_problem(home / "catalogue.db") is None
    assert images_seen(capsys) == n  # the missing file's row is still there
    code, report = doctor(capsys)
    assert codes(report) == {"store_missing"}


def test_doctor_reconciles_through_the_storage_url(xray_env, tmp_path, capsys, monkeypatch) -> None:
    """memory:// storage: the orphan is found in the storage and moved out of it into XRAY_HOME."""
    from xray_core.io.storage import open_storage

    url = f"memory://doctor-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("XRAY_STORAGE_URL", url)
    reset_settings()
    settings = load_settings()
    write_films(tmp_path / "src", range(4))
    ingest_source(tmp_path / "src", settings=settings)
    storage = open_storage(url)
    storage.write_bytes("store/zz/orphan.png", b"no row names me")
    code, report = doctor(capsys)
    assert code == 1 and codes(report) == {"store_orphan"} and report["counts"]["store_files"] == 5
    code, report = doctor(capsys, "--repair")
    assert code == 0 and report["healthy"]
    assert not storage.exists("store/zz/orphan.png")
    moved = Path(report["backup"]) / "orphans" / "store" / "zz" / "orphan.png"
    assert moved.read_bytes() == b"no row names me"


def test_doctor_bad_usage_exits_2(xray_env, capsys) -> None:
    code, _, err = cli(capsys, "doctor", "--repiar")
    assert code == 2 and "unrecognized arguments" in err


def test_doctor_names_a_schema_revision_it_does_not_know(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    write_films(tmp_path / "src", range(2))
    ingest_source(tmp_path / "src", settings=settings)
    dispose_engines()
    with sqlite3.connect(settings.home / "catalogue.db") as conn:
        conn.execute("update alembic_version set version_num = '0999'")
    code, report = doctor(capsys)
    assert code == 1 and codes(report) == {"schema_unknown"} and report["catalogue"]["revision"] == "0999"


def _blank_film() -> bytes:
    """A PNG that ingest accepted before round three and refuses now: 99.5% of its pixels one value."""
    import io

    import numpy as np
    from PIL import Image as PILImage

    arr = np.full((64, 64), 40, dtype=np.uint8)
    arr[:4, :5] = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10  # 20 of 4096 pixels differ
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_a_film_an_older_ingest_stored_still_decodes_and_verify_lists_it(xray_env, tmp_path, capsys,
                                                                         monkeypatch) -> None:
    """A check added after a film was stored must not make it undecodable (every retrain would fail to
    embed it, with no command to take it out); ``doctor --verify`` names it instead."""
    from xray_core.data import images
    from xray_core.errors import ImageRejected
    from xray_core.io.storage import get_storage

    settings = load_settings()
    write_films(tmp_path / "src", range(4))
    film = _blank_film()
    with pytest.raises(ImageRejected, match="blank_image"):
        images.decode_image(film, min_side=32, max_pixels=settings.max_pixels)
    (tmp_path / "src" / "normal" / "person9_old.png").write_bytes(film)
    with monkeypatch.context() as m:  # the ingest of an older version: no plausibility checks
        m.setattr(images, "check_blank", lambda pixels: None)
        assert ingest_source(tmp_path / "src", settings=settings).added == 5
    stored = [k for k in get_storage(settings).list("store")
              if get_storage(settings).read_bytes(k) == film]
    assert len(stored) == 1
    assert images.decode_stored(get_storage(settings).read_bytes(stored[0])).shape == (64, 64)
    code, report = doctor(capsys)
    assert code == 0 and report["healthy"]  # only --verify decodes every film
    code, report = doctor(capsys, "--verify")
    assert code == 1 and codes(report) == {"store_implausible"}
    found = next(f for f in report["findings"] if f["code"] == "store_implausible")
    assert found["examples"] == [f"{stored[0]} (blank_image)"]


def test_repair_moves_no_orphan_when_an_ingest_starts_during_the_backup(xray_env, tmp_path, capsys,
                                                                        monkeypatch) -> None:
    """The backup may take minutes; an ingest started meanwhile writes store files before their rows."""
    from db import session_scope
    from db.schema import Source
    from xray_core.data import doctor_repair
    from xray_core.data.catalogue import open_catalogue
    from xray_core.data.sources import ingest_owner

    settings = load_settings()
    write_films(tmp_path / "src", range(4))
    ingest_source(tmp_path / "src", settings=settings)
    old = settings.home / "store" / "zz" / "old-orphan.png"
    old.parent.mkdir()
    old.write_bytes(b"left by a killed ingest")
    fresh = settings.home / "store" / "zz" / "being-ingested.png"
    backup = doctor_repair._backup_sqlite

    def slow_backup(*args, **kwargs):  # the backup's own signature
        result = backup(*args, **kwargs)
        with session_scope(open_catalogue(settings)) as s:
            s.add(Source(kind="folder", path=str(tmp_path / "new"), status="running",
                         counts={"owner": ingest_owner()}))
        fresh.write_bytes(b"a film whose row is not committed yet")
        return result

    monkeypatch.setattr(doctor_repair, "_backup_sqlite", slow_backup)
    code, report = doctor(capsys, "--repair")
    assert old.exists() and fresh.exists()
    assert code == 1 and "store_orphan" in codes(report)
    assert any("an ingest started meanwhile" in note for note in report["notes"])


def test_doctor_output_has_no_lone_surrogate_under_a_non_utf8_home(xray_env, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    import os

    home = os.fsdecode(os.fsencode(str(tmp_path)) + b"/h\xff")
    monkeypatch.setenv("XRAY_HOME", home)
    monkeypatch.setenv("XRAY_ALLOWED_ROOTS", str(tmp_path))
    write_films(tmp_path / "src", range(2))
    ingest_source(tmp_path / "src", settings=load_settings())
    code, out, err = cli(capsys, "doctor", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert "\\xff" in report["catalogue"]["where"] and "\udcff" not in out
    out.encode("utf-8")  # strict: a lone surrogate would raise here
    code, out, err = cli(capsys, "doctor")
    assert code == 0 and "\\xff" in out and "\udcff" not in out
