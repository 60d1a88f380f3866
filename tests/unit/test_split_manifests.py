"""Compact lineage: a version's training and validation images as one shared split manifest
(db.split_manifest, xray_core.registry.manifests, migration 0003s).

The lineage ``xray models show N`` prints is the same whether it was stored the old way (one
``model_images`` row per image per version, revision 0002) or as a manifest after the upgrade.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, text

from db import dispose_engines, session_scope
from db.schema import Model, SplitManifest
from db.split_manifest import decode, encode
from xray_cli import main as cli
from xray_core.data.catalogue import open_catalogue
from xray_core.model.train import build_head
from xray_core.registry.listing import model_lineage
from xray_core.registry.versions import save_model
from xray_core.settings import Settings


def test_a_manifest_round_trips_and_its_name_ignores_input_order() -> None:
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1, 5001))
    train, val = ids[:4000], ids[4000:]
    sha, body, n_train, n_val = encode(train.tolist(), val.tolist())
    assert (n_train, n_val) == (4000, 1000)
    assert decode(body) == {"train": sorted(train.tolist()), "val": sorted(val.tolist())}
    assert encode(sorted(train.tolist()), val[::-1].tolist())[0] == sha
    assert encode(train.tolist()[1:], val.tolist())[0] != sha
    assert encode(val.tolist(), train.tolist())[0] != sha  # roles count, not only ids


def test_an_image_in_both_roles_is_refused() -> None:
    with pytest.raises(ValueError, match="both train and val"):
        encode([1, 2, 3], [3, 4])


def test_a_dense_100k_set_takes_kilobytes_not_rows() -> None:
    """Bytes per version, before: one (model, image, role) row per image; after: one body."""
    ids = np.arange(1, 100_001)
    val = ids % 7 == 0  # val interleaved with train, as patient-hashed splits are
    _, body, _, _ = encode(ids[~val].tolist(), ids[val].tolist())
    assert len(body) < 100_000 // 10  # under a tenth of a byte per image, against a row per image


def _state() -> dict[str, torch.Tensor]:
    return build_head(8, 2, hidden=(4,), dropout=0.0).state_dict()


def _card() -> dict:
    return {"labels": ["normal", "pneumonia"], "threshold": 0.4, "input_size": 32,
            "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "backbone_fingerprint": "b" * 64, "backbone_weights": "random",
            "head": {"in_dim": 8, "hidden": [4], "dropout": 0.0}, "training_set_fingerprint": "t" * 64}


IMAGES = [(i, f"{i:02x}" * 32, "normal" if i % 2 else "pneumonia", f"p{i // 2}") for i in range(1, 13)]
OLD_LINEAGE = {1: ([1, 2, 3, 5, 8], [4, 9]), 2: ([1, 2, 3, 5, 8], [4, 9]),
               3: ([1, 2, 3, 5, 8, 10, 11], [4, 9, 12]), 4: ([], [])}


def _insert_images(conn) -> None:  # conn: a SQLAlchemy connection
    conn.execute(text("INSERT INTO sources (id, kind, path, status, started_at, counts) "
                      "VALUES (1, 'folder', '/x', 'done', '2026-01-01 00:00:00', '{}')"))
    for i, sha, label, pid in IMAGES:
        conn.execute(text("INSERT OR IGNORE INTO patients (patient_id, id_source, split) VALUES (:p, "
                          "'filename', 'train')"),
                     {"p": pid})
        conn.execute(text("INSERT INTO images (id, sha256, stored_path, label, patient_id, view, width, "
                          "height, bit_depth, format, phash, original_name, source_id, added_at) VALUES "
                          "(:id, :sha, 'store/x.png', :label, :pid, 'PA', 64, 64, 8, 'png', 1, :name, 1, "
                          "'2026-01-01 00:00:00')"),
                     {"id": i, "sha": sha, "label": label, "pid": pid, "name": f"{i}.png"})


@pytest.mark.sqlite_only
def test_an_old_catalogue_upgrades_and_models_show_gives_the_same_answers(settings: Settings, capsys) -> None:
    """Built at revision 0002 with model_images rows; the lineage read the old way (the query
    model_lineage used before 0003s) equals ``xray models show N`` after the upgrade."""
    from db.engine import make_engine, migrate

    settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    migrate(engine, "0002")
    with engine.begin() as conn:
        _insert_images(conn)
        for version, (train, val) in OLD_LINEAGE.items():
            conn.execute(text("INSERT INTO models (id, created_at, status, checkpoint_dir, "
                              "checkpoint_sha256, card_sha256, backbone_fingerprint, backbone_weights, "
                              "training_set_fingerprint, labels, config, metrics) VALUES (:v, '2026-01-01 "
                              "00:00:00', 'retired', 'models/x', :z, :z, 'b', 'random', :t, '[\"normal\", "
                              "\"pneumonia\"]', '{}', '{}')"),
                         {"v": version, "z": "0" * 64, "t": f"t{version}"})
            for role, ids in (("train", train), ("val", val)):
                for image_id in ids:
                    conn.execute(text("INSERT INTO model_images (model_id, image_id, role) "
                                      "VALUES (:m, :i, :r)"),
                                 {"m": version, "i": image_id, "r": role})
        before = {}
        for version in OLD_LINEAGE:  # what `xray models show` listed at 0002
            rows = conn.execute(text("SELECT mi.role, i.id, i.sha256, i.label, i.patient_id FROM "
                                     "model_images mi JOIN images i ON i.id = mi.image_id WHERE mi.model_id "
                                     "= :v ORDER BY i.id"),
                                {"v": version}).all()
            before[version] = {role: [{"id": r[1], "sha256": r[2], "label": r[3], "patient_id": r[4]}
                                      for r in rows if r[0] == role] for role in ("train", "val")}
    engine.dispose()
    dispose_engines()

    for version in OLD_LINEAGE:  # the first open upgrades to head
        assert cli.main(["models", "show", str(version), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["images"] == before[version]
        assert [s["id"] for s in shown["sources"]] == ([1] if OLD_LINEAGE[version][0] else [])
    with session_scope(open_catalogue(settings)) as s:
        revision = s.execute(text("SELECT version_num FROM alembic_version")).scalar()
        manifests = {m.id: m.split_manifest for m in s.scalars(select(Model))}
        n_manifests = s.scalar(select(func.count()).select_from(SplitManifest))
        tables = {r[0] for r in s.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    assert revision == "0008" and "model_images" not in tables
    assert manifests[1] == manifests[2] != manifests[3]  # identical sets share one manifest
    assert manifests[4] is None and n_manifests == 2  # a version without rows keeps no lineage


@pytest.mark.sqlite_only
def test_versions_with_identical_sets_share_one_manifest(settings: Settings) -> None:
    with open_catalogue(settings).begin() as conn:
        _insert_images(conn)
    v1 = save_model(settings, state_dict=_state(), card=_card(),
                    train_image_ids=[5, 1, 3], val_image_ids=[9, 4])
    v2 = save_model(settings, state_dict=_state(), card=_card(),
                    train_image_ids=[1, 3, 5], val_image_ids=[4, 9])
    v3 = save_model(settings, state_dict=_state(), card=_card(),
                    train_image_ids=[1, 3, 5, 11], val_image_ids=[4, 9])
    with session_scope(open_catalogue(settings)) as s:
        assert (s.get(Model, v1).split_manifest == s.get(Model, v2).split_manifest
                != s.get(Model, v3).split_manifest)
        assert s.scalar(select(func.count()).select_from(SplitManifest)) == 2
    images = model_lineage(settings, v1)["images"]
    assert [i["id"] for i in images["train"]] == [1, 3, 5] and [i["id"] for i in images["val"]] == [4, 9]
    assert images["train"][0] == {"id": 1, "sha256": IMAGES[0][1], "label": IMAGES[0][2],
                                  "patient_id": IMAGES[0][3]}


@pytest.mark.sqlite_only
def test_a_downgrade_to_0002_gives_back_the_rows_and_upgrading_again_the_manifest(tmp_path) -> None:
    from db.engine import make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(engine, "0002")
    rows = [(1, 1, "train"), (1, 2, "train"), (1, 4, "val")]
    with engine.begin() as conn:
        _insert_images(conn)
        conn.execute(text("INSERT INTO models (id, created_at, status, checkpoint_dir, checkpoint_sha256, "
                          "card_sha256, backbone_fingerprint, backbone_weights, training_set_fingerprint, "
                          "labels, config, metrics) VALUES (1, '2026-01-01', 'champion', 'm', '0', '0', 'b', "
                          "'r', 't', '[]', '{}', '{}')"))
        conn.execute(text("INSERT INTO model_images VALUES (:m, :i, :r)"),
                     [{"m": m, "i": i, "r": r} for m, i, r in rows])
    migrate(engine, "head")
    with engine.connect() as conn:
        manifest = conn.execute(text("SELECT split_manifest FROM models")).scalar()
    migrate(engine, downgrade=True, revision="0002")
    with engine.connect() as conn:
        assert (conn.execute(text(
            "SELECT model_id, image_id, role FROM model_images ORDER BY image_id")).all() == rows)
    migrate(engine, "head")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT split_manifest FROM models")).scalar() == manifest is not None
    engine.dispose()


@pytest.mark.sqlite_only  # _insert_images writes SQLite's INSERT OR IGNORE
def test_manifest_images_read_by_range_or_by_id_list_alike(settings: Settings) -> None:
    """Dense ids are read as one id range (others dropped), sparse ones by IN (...) lists: same rows."""
    from xray_core.registry.manifests import put_split_manifest, split_manifest_images

    with session_scope(open_catalogue(settings)) as s:
        _insert_images(s.connection())
        facts = {i: (sha, label, pid, 1) for i, sha, label, pid in IMAGES}
        for train, val in (([1, 2, 3, 5, 6], [4, 7]), ([1, 12], [6]), ([2], [])):  # dense, sparse, single
            sha = put_split_manifest(s, train, val)
            want = sorted([("train", i, *facts[i]) for i in train] + [("val", i, *facts[i]) for i in val],
                          key=lambda r: r[1])
            assert split_manifest_images(s, sha) == want
    dispose_engines()
