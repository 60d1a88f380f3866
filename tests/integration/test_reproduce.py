"""``xray reproduce``: three versions rebuilt bit for bit from their record, and the refusals.

One module-scoped tiny home (32 px input, random-init backbone): v1 and v2 trained on the same 16
images with train seeds 0 and 1, v3 after 8 more patients arrived, with its own training settings
(an MLP without a schedule, chosen on validation). Every rebuild runs under the home's default settings,
so a version reproduces only if its recorded settings, not the current ones, are used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select, update
from tinymodel import tiny_home

from db import session_scope
from db.schema import Image, Model, Promotion
from xray_cli.main import main
from xray_core.data.catalogue import open_catalogue
from xray_core.io.storage import get_storage
from xray_core.pipeline.reproduce import ReproduceRefused, reproduce

V3_SETTINGS = {"train_seed": 5, "head_recipe": "mlp", "lr_schedule": "none", "epochs": 4,
               "recipe_min_val_per_class": 0, "train_threads": 2}  # 2 torch threads, not the default 1


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    from xray_core.data.ingest import ingest_source
    from xray_core.data.snapshot import load_split_data
    from xray_core.data.synthetic import write_dataset
    from xray_core.pipeline.embed import embed_step
    from xray_core.pipeline.steps import train_step
    from xray_core.registry.versions import promote_manually

    root = tmp_path_factory.mktemp("reproduce")
    with tiny_home(root, models=2, patients_per_label=8) as h:
        write_dataset(root / "batch2", patients_per_label=4, images_per_patient=1, size=64, patient_offset=8,
                      seed=1)
        ingest_source(root / "batch2", settings=h.settings)
        data = load_split_data(h.settings)
        embed_step(h.settings, data)
        h.versions.append(train_step(h.settings.with_overrides(**V3_SETTINGS), data)["version"])
        promote_manually(h.settings, h.versions[0], reason="a champion the rebuilds must leave alone")
        yield h


def _registry(settings) -> tuple:
    with session_scope(open_catalogue(settings)) as s:
        return (s.scalar(select(func.count()).select_from(Model)),
                s.scalar(select(func.count()).select_from(Promotion)),
                s.scalar(select(Model.id).where(Model.status == "champion")))


def test_three_versions_rebuild_bit_identically_and_register_nothing(home, monkeypatch) -> None:
    import xray_core.model.train as train

    threads_now, real, counts = torch.get_num_threads(), train.fit_threads, []
    monkeypatch.setattr(train, "fit_threads", lambda *args: counts.append(args) or real(*args))
    before, models_before = _registry(home.settings), get_storage(home.settings, "models").list()
    manifests = set()
    for version in home.versions:
        result = reproduce(home.settings, version)
        assert result["identical"], (version, result["reasons"], result["tensors"])
        assert result["rebuilt_sha256"] == result["stored_sha256"]
        assert result["embedded"] == 0 and result["notes"] == []
        manifests.add(result["split_manifest"])
    assert len(manifests) == 2  # v3 was trained on a grown training set
    assert reproduce(home.settings, home.versions[2])["train_seed"] == V3_SETTINGS["train_seed"]
    # XRAY_TRAIN_THREADS: each card records the torch threads its head was fitted on; the rebuilds above
    # used the recorded count (v3's 2) under the home's default 1, and left torch's own count as it was
    cards = [json.loads((home.settings.home / "models" / str(v) / "card.json").read_text())
             for v in home.versions]
    assert [(c["environment"]["torch_threads"], c["environment"]["blas_threads"]) for c in cards] == [
        (1, 1), (1, 1), (2, 2)]
    assert counts[:3] == [(1, 1), (1, 1), (2, 2)]  # each rebuild fitted on its card's counts
    assert home.settings.train_threads == 1
    assert torch.get_num_threads() == threads_now
    assert _registry(home.settings) == before  # no version, no audit row, the same champion
    assert get_storage(home.settings, "models").list() == models_before


def test_cli_exit_codes_and_one_line_refusals(home, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", str(home.versions[1]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical"] and out["version"] == home.versions[1]
    assert main(["reproduce", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model version 99 does not exist" in err


def test_missing_features_are_embedded_again_with_the_recorded_backbone(home, tmp_path: Path) -> None:
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import FeatureCache

    version = home.versions[0]
    first = home.data.train[0]
    cache = FeatureCache(load_backbone(home.settings), home.settings)
    get_storage(home.settings, "features").delete(cache.key_for(first.sha256))
    result = reproduce(home.settings, version, out=tmp_path / "rebuilt")
    assert result["identical"] and result["embedded"] == home.settings.views + 1
    assert (tmp_path / "rebuilt" / "head.safetensors").exists()


def test_a_changed_label_is_named_and_the_model_is_not_rebuilt(home, capsys) -> None:
    version = home.versions[0]
    image_id = home.data.train[0].id
    with session_scope(open_catalogue(home.settings)) as s:
        label = s.get(Image, image_id).label
        other = "pneumonia" if label == "normal" else "normal"
        s.execute(update(Image).where(Image.id == image_id).values(label=other))
    try:
        assert main(["reproduce", str(version)]) == 1
        out = capsys.readouterr().out
        assert "DIFFERS" in out and "training set fingerprint differs" in out and "not rebuilt" in out
    finally:
        with session_scope(open_catalogue(home.settings)) as s:
            s.execute(update(Image).where(Image.id == image_id).values(label=label))


def test_a_pruned_model_rebuilds_from_its_catalogue_row_and_missing_inputs_are_refused(home, capsys) -> None:
    version = home.versions[1]
    models = get_storage(home.settings, "models")
    for key in models.list(str(version)):
        models.delete(key)  # as retention prunes: the files go, the catalogue row and lineage stay
    result = reproduce(home.settings, version)
    assert result["identical"] and result["card"].startswith("none")

    with session_scope(open_catalogue(home.settings)) as s:
        config = dict(s.get(Model, version).config)
        s.execute(update(Model).where(Model.id == version).values(config={**config, "backbone_seed": 7}))
    with pytest.raises(ReproduceRefused, match=r"backbone [0-9a-f]{12}… \(random\) cannot be rebuilt"):
        reproduce(home.settings, version)

    with session_scope(open_catalogue(home.settings)) as s:
        s.execute(update(Model).where(Model.id == version).values(split_manifest=None))
    assert main(["reproduce", str(version)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"model {version} has no recorded split manifest" in err
