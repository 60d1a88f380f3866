"""Parallel embedding on a local Dask cluster of 2 workers gives byte-identical cached features."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("prefect_dask", reason="the dask extra (prefect-dask) is not installed")


def features_for(folder: Path) -> dict[str, dict]:
    """Every cache file's tensors as raw bytes, and its metadata. (Not the file bytes themselves:
    safetensors writes the metadata's keys in a per-process hash order.)"""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as fh:
            out[str(path.relative_to(folder))] = {
                "tensors": {k: fh.get_tensor(k).tobytes() for k in sorted(fh.keys())},
                "metadata": fh.metadata()}
    return out


def test_dask_fan_out_matches_the_single_process_features(xray_env, prefect_server, tmp_path, monkeypatch):
    from xray_core.data import snapshot
    from xray_core.data.ingest import ingest_source
    from xray_core.data.synthetic import write_dataset
    from xray_core.pipeline import embed
    from xray_core.settings import load_settings, reset_settings

    monkeypatch.setenv("XRAY_EMBED_DASK_WORKERS", "2")
    reset_settings()
    settings = load_settings()
    write_dataset(tmp_path / "src", patients_per_label=9, images_per_patient=1, size=64, seed=4)
    ingest_source(tmp_path / "src", settings=settings)
    data = snapshot.load_split_data(settings)
    snapshot = str(snapshot.save_snapshot(tmp_path / "split.json", data))

    single = embed.embed_step(settings, data)
    assert single["computed"] > 0
    reference = features_for(settings.features_dir)
    shutil.rmtree(settings.features_dir)

    from flows.embed import run_parallel_embed

    parallel = run_parallel_embed(settings, snapshot)
    assert parallel["shards"] == 2
    assert (parallel["computed"] == single["computed"]
            and parallel["backbone_fingerprint"] == single["backbone_fingerprint"])
    assert features_for(settings.features_dir) == reference  # same images, views and feature bytes

    again = embed.embed_step(settings, data)  # the single-process path finds everything cached
    assert again["computed"] == 0


def test_retrain_flow_embeds_through_dask_when_asked(xray_env, prefect_server, tmp_path, monkeypatch):
    from flows.retrain import retrain
    from xray_core.data.synthetic import write_dataset
    from xray_core.settings import reset_settings

    for key, value in {"XRAY_EMBED_DASK_WORKERS": "2", "XRAY_MIN_TEST_PER_CLASS": "1",
                       "XRAY_FLOOR_MACRO_AUROC": "0", "XRAY_FLOOR_SENSITIVITY": "0"}.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    write_dataset(tmp_path / "src", patients_per_label=8, images_per_patient=1, size=64, seed=5)
    result = retrain(sources=[str(tmp_path / "src")], use_incoming=False, trigger="test")
    assert result["status"] == "completed"
    assert result["embed"]["shards"] == 2 and result["embed"]["computed"] > 0
