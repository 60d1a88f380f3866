"""A retrain cycle with every stored file on ``memory://`` (fsspec's memory filesystem).

ingest → split → embed → train → evaluate → load → predict with ``XRAY_STORAGE_URL=memory://...``,
checking that nothing of the store, features or models reached XRAY_HOME on local disk. Moved from
tests/unit/test_storage.py (unchanged): it runs the backbone, which the unit lane refuses.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from xray_core.io.storage import get_storage
from xray_core.settings import load_settings, reset_settings


def test_retrain_cycle_on_memory_storage(xray_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingest, embed, train, evaluate, report heatmaps, load and predict with everything in memory://."""
    from xray_core.data.ingest import ingest_source
    from xray_core.data.snapshot import load_split_data
    from xray_core.data.synthetic import write_dataset
    from xray_core.model.features import cache_summary
    from xray_core.pipeline.embed import embed_step
    from xray_core.pipeline.predict import predict_folder
    from xray_core.pipeline.steps import evaluate_step, train_step
    from xray_core.registry.versions import load_model
    from xray_core.report.data import collect_report_data
    from xray_core.report.status import status_report
    from xray_core.results import Evaluation

    url = f"memory://xray-e2e-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("XRAY_STORAGE_URL", url)
    monkeypatch.setenv("XRAY_MIN_TEST_PER_CLASS", "1")
    reset_settings()
    settings = load_settings()
    fs, root = fsspec.core.url_to_fs(url)
    try:
        records = write_dataset(tmp_path / "batch", patients_per_label=10, images_per_patient=1, size=64)
        (tmp_path / "batch" / "normal" / "broken.png").write_bytes(b"not an image")
        normal = next(r.path for r in records if r.label == "normal")
        (tmp_path / "batch" / "pneumonia" / "same-bytes.png").write_bytes(normal.read_bytes())
        summary = ingest_source(tmp_path / "batch", settings=settings)
        assert summary.added == 20 and summary.rejected == 2
        assert summary.rejected_by_reason.get("label_conflict") == 1  # quarantined by copying the store file
        store = get_storage(settings)
        assert len(store.list("store")) == 20
        assert len(store.list("quarantine")) == 2

        data = load_split_data(settings)
        embedded = embed_step(settings, data)
        assert embedded["computed"] > 0
        assert embed_step(settings, data)["computed"] == 0  # the cache on memory:// is reused
        trained = train_step(settings, data)
        version = trained["version"]
        assert store.list(f"models/{version}") == [f"models/{version}/card.json",
                                                   f"models/{version}/head.safetensors",
                                                   f"models/{version}/reference.safetensors"]
        assert store.list("models/.staging") == []
        evaluated = evaluate_step(settings, version, data)
        assert evaluated["n_images"] == len(data.test)
        report = collect_report_data(settings, data, challenger=Evaluation.from_dict(evaluated),
                                     champion=None, n_examples=2)
        assert report.examples, report.notes  # heatmaps decoded the originals from memory://

        model = load_model(settings, version)
        assert model.version == version and model.labels == ["normal", "pneumonia"]
        result = predict_folder(settings, tmp_path / "batch", version=version, out=tmp_path / "pred.csv")
        assert result["files"] == 22 and result["predicted"] == 21  # all but the broken file

        features = cache_summary(get_storage(settings, "features"))
        assert len(features) == 1 and features[0]["images"] == 20
        status = status_report(settings)["feature_cache"]
        assert status[0]["coverage"] == "20/20"

        home = Path(xray_env["XRAY_HOME"])
        for area in ("store", "quarantine", "features", "models"):
            local = home / area
            assert (not local.exists()
                    or not any(p.is_file() for p in local.rglob("*"))), f"{area} written locally"
        assert (home / "catalogue.db").exists() or settings.database_url.startswith("postgresql")
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)
        reset_settings()
