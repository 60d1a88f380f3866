"""Near-identical films without all pairs: multi-index hashing over pHash bands (db.near_pairs), the
ingest near-copy index on top of it, the ``near_pairs`` table (migration 0005) and ``xray status``.

Every answer is compared with the brute force it replaced: all pairs, popcount of the XOR.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select, text

from db import dispose_engines, session_scope
from db.near_pairs import NEAR_PAIR_MAX_DISTANCE, BandIndex, backfill_near_pairs, pairs_within, popcount64
from db.schema import SPLITS, Image, NearPair, Patient, Source
from xray_core.data.admission import NearCopyIndex, record_near_pairs
from xray_core.data.catalogue import catalogue_summary, label_history, near_duplicate_pairs, open_catalogue
from xray_core.settings import Settings

U64 = (1 << 64) - 1
LABELS = ("normal", "normal", "normal", "pneumonia")  # a quarter of the films: some patients' labels differ


def clustered_hashes(n: int, seed: int, *, centres: int = 40, max_flips: int = 9) -> np.ndarray:
    """Hashes around a few centres (real pHashes of chest films look alike), 0..max_flips bits away."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, size=centres, dtype=np.uint64, endpoint=True)
    out = np.empty(n, dtype=np.uint64)
    for k in range(n):
        value = int(base[rng.integers(centres)])
        for bit in rng.choice(64, size=int(rng.integers(max_flips + 1)), replace=False):
            value ^= 1 << int(bit)
        out[k] = value
    return out


def flip(value: int, bits: int, seed: int) -> int:
    """``value`` with exactly ``bits`` distinct bits flipped."""
    for bit in np.random.default_rng(seed).choice(64, size=bits, replace=False):
        value ^= 1 << int(bit)
    return value


def brute_within(hashes: np.ndarray, value: int, distance: int) -> tuple[np.ndarray, np.ndarray]:
    dist = popcount64(hashes ^ np.uint64(value & U64)).astype(np.int64)
    hits = np.flatnonzero(dist <= distance)
    return hits, dist[hits]


@pytest.mark.parametrize("radius", range(0, 10))  # 8 and 9: bands too narrow, a linear scan
def test_band_search_equals_brute_force(radius: int) -> None:
    hashes = clustered_hashes(1500, seed=radius)
    index = BandIndex(hashes[:1000], radius)
    for value in hashes[1000:]:  # grown one by one: a tail, merged in (sorted) past 2,048
        index.add(int(value))
    assert len(index) == 1500 and index.banded == (radius <= 7)
    queries = [int(h) for h in hashes[:40]] + [int(h) for h in clustered_hashes(20, seed=99)]
    for value in queries:
        for distance in {max(radius - 1, 0), radius, radius + 1}:  # radius + 1: wider than the bands answer
            got = index.within(value, distance)
            want = brute_within(hashes, value, distance)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (radius, distance)


@pytest.mark.parametrize("distance", [0, 1, 3, 6, 7])
def test_a_hash_exactly_at_the_distance_is_found_and_one_bit_further_is_not(distance: int) -> None:
    rng = np.random.default_rng(distance)
    query = int(rng.integers(0, 2**64 - 1, dtype=np.uint64, endpoint=True))
    at, beyond = flip(query, distance, seed=1), flip(query, distance + 1, seed=2)
    others = rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64, endpoint=True)
    hashes = np.concatenate([others, np.array([at, beyond], dtype=np.uint64)])
    index = BandIndex(hashes, distance)
    positions, dists = index.within(query, distance)
    assert 3000 in positions.tolist() and 3001 not in positions.tolist()
    assert dists[positions.tolist().index(3000)] == distance
    assert np.array_equal(positions, brute_within(hashes, query, distance)[0])


def test_an_index_grown_past_its_tail_limit_still_finds_everything() -> None:
    hashes = clustered_hashes(6000, seed=7)
    index = BandIndex(np.zeros(0, dtype=np.uint64), 3)
    for value in hashes:
        index.add(int(value))
    for value in hashes[::300]:
        got, want = index.within(int(value), 3), brute_within(hashes, int(value), 3)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("distance", [0, 3, 4, 6, 8])
def test_all_pairs_equal_brute_force(distance: int) -> None:
    hashes = clustered_hashes(1200, seed=distance, centres=25)
    groups = np.arange(1200) // 3  # "patients" of three films
    dist = popcount64(hashes[:, None] ^ hashes[None, :]).astype(np.int64)
    for by_group in (None, groups):
        close = np.triu(dist <= distance, 1)
        if by_group is not None:
            close &= by_group[:, None] != by_group[None, :]
        i, j = np.nonzero(close)  # row-major: by (i, j)
        lo, hi, d = pairs_within(hashes, distance, groups=by_group)
        assert np.array_equal(lo, i) and np.array_equal(hi, j) and np.array_equal(d, dist[i, j])
        assert len(i) > 0


def old_linear_scan(hashes: list[int], patients: list[str], value: int, patient: str,
                    distance: int) -> list[tuple[int, int]]:
    """NearCopyIndex.other_patients_within before the bands."""
    dist = popcount64(np.array(hashes, dtype=np.uint64) ^ np.uint64(value & U64))
    hits = [i for i in range(len(hashes)) if patients[i] != patient and dist[i] <= distance]
    return sorted(((i, int(dist[i])) for i in hits), key=lambda t: (t[1], t[0]))


def test_the_ingest_index_answers_as_the_linear_scan_did() -> None:
    hashes = [int(h) for h in clustered_hashes(800, seed=3)]
    patients = [f"p{k // 2}" for k in range(800)]
    index = NearCopyIndex(radius=NEAR_PAIR_MAX_DISTANCE)
    for k, (value, patient) in enumerate(zip(hashes, patients)):
        signed = value - (1 << 64) if value >= 1 << 63 else value  # as stored: signed int64
        index.add(k + 1, signed, patient, f"f{k}.png")
    for k in range(0, 800, 7):
        for distance in (0, 3, 6, 10):  # 10: wider than the index, a linear scan
            assert index.other_patients_within(hashes[k], patients[k], distance) == old_linear_scan(
                hashes, patients, hashes[k], patients[k], distance)


# --------------------------------------------------------------------------- the catalogue


def fill(session, n: int, seed: int) -> None:  # session: a Session
    """n images of n/3 patients with clustered pHashes, mixed labels, views, sites, sources and DICOM body
    parts; a fifth of the patients without a split yet."""
    rng = np.random.default_rng(seed)
    session.add(Source(id=1, kind="folder", path="/data/synthetic", status="done", counts={}))
    session.add(Source(id=2, kind="folder", path="/data/second", status="done", counts={}))
    for p in range(n // 3 + 1):
        split = None if p % 5 == 4 else SPLITS[int(rng.integers(3))]
        session.add(Patient(patient_id=f"p{p}", id_source="manifest", split=split))
    for k, value in enumerate(clustered_hashes(n, seed, centres=30, max_flips=8)):
        signed = int(value) - (1 << 64) if int(value) >= 1 << 63 else int(value)
        dicom = k % 7 == 0
        session.add(Image(id=k + 1, sha256=f"{k:064x}", stored_path="store/x.png",
                          label=str(rng.choice(LABELS)), patient_id=f"p{k // 3}",
                          width=64, height=64, bit_depth=8, format="dicom" if dicom else "png",
                          body_part=("CHEST", "ABDOMEN", None)[k % 3] if dicom else None,
                          view=("PA", "AP", None)[k % 3], site="north" if k % 4 == 0 else None, phash=signed,
                          original_name=f"f{k}.png", source_id=1 + k % 2))
    session.flush()


def old_near_duplicate_pairs(session, *, max_distance: int, limit: int):
    """xray status's all-pairs scan before near_pairs (catalogue.near_duplicate_pairs, up to 0003s)."""
    rows = session.execute(
        select(Image.id, Image.sha256, Image.phash, Patient.split, Image.original_name, Image.patient_id)
        .join(Patient, Patient.patient_id == Image.patient_id)
        .where(Patient.split.is_not(None)).order_by(Image.id)).all()
    hashes = np.array([r[2] for r in rows], dtype=np.int64).view(np.uint64)
    dist = popcount64(hashes[:, None] ^ hashes[None, :])
    ii, jj = np.nonzero(np.triu(dist <= max_distance, 1))
    keep = [(i, j) for i, j in zip(ii, jj) if rows[i][3] != rows[j][3]]
    return len(keep), [{"image_a": rows[i][0], "sha256_a": rows[i][1],
                        "split_a": rows[i][3], "file_a": rows[i][4],
                        "patient_a": rows[i][5], "image_b": rows[j][0], "sha256_b": rows[j][1],
                        "split_b": rows[j][3], "file_b": rows[j][4], "patient_b": rows[j][5],
                        "distance": int(dist[i, j])}
                       for i, j in keep[:limit]]


def old_label_history(session, *, limit: int) -> dict:
    """catalogue.label_history before it counted in SQL (every changed patient's films read)."""
    changed = (select(Image.patient_id).group_by(Image.patient_id)
               .having(func.count(func.distinct(Image.label)) > 1))
    rows = session.execute(
        select(Image.patient_id, Patient.split, Image.label, Image.original_name, Image.added_at, Image.id)
        .join(Patient, Patient.patient_id == Image.patient_id).where(Image.patient_id.in_(changed))
        .order_by(Image.patient_id, Image.added_at, Image.id)).all()
    patients: dict = {}
    for pid, split, label, name, added, _ in rows:
        entry = patients.setdefault(pid, {"patient_id": pid, "split": split, "films": []})
        entry["films"].append({"label": label, "file": name,
                               "added_at": added.isoformat() if added else None})
    for entry in patients.values():
        entry["labels"] = sorted({f["label"] for f in entry["films"]})
    listed = list(patients.values())
    return {"patients": len(listed), "in_test": sum(1 for e in listed if e["split"] == "test"),
            "examples": listed[:limit]}


def old_counts(session) -> dict:
    """The group-bys status ran before the census (one per table)."""
    from xray_core.data.sites import source_site

    by_label: dict = {}
    for label, split, n in session.execute(select(Image.label, Patient.split, func.count())
                                           .join(Patient, Patient.patient_id == Image.patient_id)
                                           .group_by(Image.label, Patient.split)):
        by_label.setdefault(label, {**{s: 0 for s in SPLITS}, "unassigned": 0})[split or "unassigned"] += n
    by_site: dict = {}
    for site, path, label, split, n in session.execute(
            select(Image.site, Source.path, Image.label, Patient.split, func.count())
            .join(Patient, Patient.patient_id == Image.patient_id)
            .outerjoin(Source, Source.id == Image.source_id)
            .group_by(Image.site, Source.path, Image.label, Patient.split)):
        cell = by_site.setdefault(site or source_site(path), {}).setdefault(
            label, {**{s: 0 for s in SPLITS}, "unassigned": 0})
        cell[split or "unassigned"] += n
    views = {str(v or "unknown"): n
             for v, n in session.execute(select(Image.view, func.count()).group_by(Image.view))}
    not_chest = session.scalar(select(func.count()).select_from(Image).where(
        Image.format == "dicom", func.coalesce(Image.body_part, "") != "CHEST"))
    return {"by_label": dict(sorted(by_label.items())),
            "views": dict(sorted(views.items())), "not_chest": not_chest,
            "by_site": {site: dict(sorted(labels.items())) for site, labels in sorted(by_site.items())}}


def test_status_answers_as_the_all_pairs_scan_and_the_group_bys_did(settings: Settings) -> None:
    with session_scope(open_catalogue(settings)) as s:
        fill(s, 900, seed=5)
        assert backfill_near_pairs(s.connection()) > 0
    with session_scope(open_catalogue(settings)) as s:
        for distance, limit in ((NEAR_PAIR_MAX_DISTANCE, 20), (3, 1000), (0, 5)):
            want = old_near_duplicate_pairs(s, max_distance=distance, limit=limit)
            assert want[0] > 0 and near_duplicate_pairs(s, max_distance=distance, limit=limit) == want
        with pytest.raises(ValueError, match="widest"):
            near_duplicate_pairs(s, max_distance=NEAR_PAIR_MAX_DISTANCE + 1)
    summary = catalogue_summary(settings)
    near = summary["near_duplicates"]
    with session_scope(open_catalogue(settings)) as s:
        assert (near["pairs_across_splits"], near["examples"]) == old_near_duplicate_pairs(
            s, max_distance=NEAR_PAIR_MAX_DISTANCE, limit=20)
        assert summary["label_history"] == old_label_history(s, limit=20)
        assert summary["label_history"]["in_test"] > 0 and summary["label_history"]["patients"] > 20
        assert label_history(s, limit=10_000) == old_label_history(s, limit=10_000)
        old = old_counts(s)
    assert summary["by_label_and_split"] == old["by_label"] and summary["views"] == old["views"]
    assert summary["dicom_not_marked_chest"] == old["not_chest"] > 0
    from xray_core.report.status import status_report

    report = status_report(settings)
    assert report["sites"]["by_site_label_split"] == old["by_site"] and len(old["by_site"]) == 3
    assert report["catalogue"] == summary
    dispose_engines()


def test_pairs_recorded_one_film_at_a_time_equal_the_backfill(settings: Settings) -> None:
    """What ingest writes (record_near_pairs before each add) is what the migration computes at once;
    a second index loaded earlier sees the first one's films after ``refresh`` (two ingests at once)."""
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        fill(s, 600, seed=11)
        rows = s.execute(select(Image.id, Image.phash, Image.patient_id).order_by(Image.id)).all()
        expected = backfill_near_pairs(s.connection())
        backfilled = s.execute(select(NearPair.image_a, NearPair.image_b, NearPair.distance)
                               .order_by(NearPair.image_a, NearPair.image_b)).all()
        s.execute(text("DELETE FROM near_pairs"))
    index, recorded = NearCopyIndex(), 0
    with session_scope(engine) as s:
        for image_id, phash, patient in rows:
            recorded += record_near_pairs(s, index, image_id, phash, patient)
            index.add(image_id, phash, patient, f"{image_id}")
    with session_scope(engine) as s:
        again = s.execute(select(NearPair.image_a, NearPair.image_b, NearPair.distance)
                          .order_by(NearPair.image_a, NearPair.image_b)).all()
    assert recorded == expected and again == backfilled

    with session_scope(engine) as s:  # loaded from the catalogue: patients read for the films found
        loaded = NearCopyIndex.load(s)
        hashes = [int(h) & U64 for _, h, _ in rows]
        patients = [p for _, _, p in rows]
        for k in range(0, len(rows), 13):
            for distance in (3, 6, 9):
                assert loaded.other_patients_within(rows[k][1], patients[k], distance, s) == old_linear_scan(
                    hashes, patients, hashes[k], patients[k], distance)
        with pytest.raises(ValueError, match="session"):
            NearCopyIndex.load(s).other_patients_within(rows[0][1], "nobody", 64)

    late = NearCopyIndex()
    late.add(rows[0][0], rows[0][1], rows[0][2], "own")
    with session_scope(engine) as s:
        late.refresh(s)
    assert late.ids == [r[0] for r in rows]  # the others' films, its own not twice
    dispose_engines()


def test_a_0003s_catalogue_upgrades_and_its_pairs_are_backfilled(database_url: str) -> None:
    """SQLite, and PostgreSQL in its lane: an existing catalogue gains every pair on upgrade."""
    from sqlalchemy import inspect

    from db.engine import make_engine, migrate

    engine = make_engine(database_url)
    migrate(engine, "0003s")
    hashes = clustered_hashes(300, seed=21, centres=10, max_flips=7)
    signed = hashes.view(np.int64)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                          "VALUES (1, 'folder', '/x', 'done', '2026-01-01 00:00:00', '{}')"))
        for p in range(100):
            conn.execute(text("INSERT INTO patients (patient_id, id_source, split) VALUES (:p, "
                              "'manifest', :s)"),
                         {"p": f"p{p}", "s": SPLITS[p % 3]})
        conn.execute(text("INSERT INTO images (id, sha256, stored_path, label, patient_id, width, height, "
                          "bit_depth, format, phash, original_name, source_id, added_at) VALUES (:id, :sha, "
                          "'store/x.png', 'normal', :p, 64, 64, 8, 'png', :h, :n, 1, '2026-01-01 00:00:00')"),
                     [{"id": k + 1, "sha": f"{k:064x}", "p": f"p{k // 3}",
                       "h": int(signed[k]), "n": f"{k}.png"}
                      for k in range(300)])
    migrate(engine, "head")
    patients = np.arange(300) // 3
    dist = popcount64(hashes[:, None] ^ hashes[None, :]).astype(np.int64)
    i, j = np.nonzero(np.triu(dist <= NEAR_PAIR_MAX_DISTANCE, 1) & (patients[:, None] != patients[None, :]))
    with engine.connect() as conn:
        got = conn.execute(text(
            "SELECT image_a, image_b, distance FROM near_pairs ORDER BY image_a, image_b")).all()
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert revision == "0008" and len(got) > 0
    assert got == [(int(a) + 1, int(b) + 1, int(dist[a, b])) for a, b in zip(i, j)]
    migrate(engine, downgrade=True, revision="0003s")
    assert "near_pairs" not in inspect(engine).get_table_names()
    migrate(engine, "head")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM near_pairs")).scalar() == len(got)
    engine.dispose()


def test_a_film_near_many_others_records_only_its_closest_and_status_says_so(settings: Settings) -> None:
    """A collection of near-identical films must not grow near_pairs quadratically: each film records at
    most NEAR_PAIRS_PER_FILM pairs (its closest, ties by the earlier film), ingest and backfill alike."""
    from db.near_pairs import NEAR_PAIRS_PER_FILM

    n = NEAR_PAIRS_PER_FILM + 8
    rng = np.random.default_rng(3)
    base = int(rng.integers(0, 1 << 62))
    # all within 2 bits
    hashes = [base ^ (1 << int(b)) if k else base for k, b in enumerate(rng.integers(0, 64, n))]
    engine = open_catalogue(settings)
    with session_scope(engine) as s:
        s.add(Source(id=1, kind="folder", path="/data/same", status="done", counts={}))
        for k in range(n):
            s.add(Patient(patient_id=f"p{k}", id_source="manifest", split=SPLITS[k % 3]))
            s.add(Image(id=k + 1, sha256=f"{k:064x}", stored_path="store/x.png",
                        label="normal", patient_id=f"p{k}", width=64, height=64, bit_depth=8,
                        format="png", phash=hashes[k], original_name=f"f{k}.png", source_id=1))
    index = NearCopyIndex()
    with session_scope(engine) as s:
        counts = []
        for k in range(n):
            counts.append(record_near_pairs(s, index, k + 1, hashes[k], f"p{k}"))
            index.add(k + 1, hashes[k], f"p{k}", f"f{k}.png")
    assert counts == [min(k, NEAR_PAIRS_PER_FILM) for k in range(n)]
    with session_scope(engine) as s:
        recorded = s.execute(select(NearPair.image_a, NearPair.image_b, NearPair.distance)
                             .order_by(NearPair.image_a, NearPair.image_b)).all()
        s.execute(text("DELETE FROM near_pairs"))
        assert backfill_near_pairs(s.connection()) == len(recorded)
    with session_scope(engine) as s:
        assert s.execute(select(NearPair.image_a, NearPair.image_b, NearPair.distance)
                         .order_by(NearPair.image_a, NearPair.image_b)).all() == recorded
    near = catalogue_summary(settings)
    assert near["near_duplicates"]["films_at_record_cap"] == n - NEAR_PAIRS_PER_FILM
    assert any("lower bounds" in note for note in near["notes"])
    dispose_engines()
