"""Views (preprocessing) and the feature cache: embed once, verify on read, stream, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xray_core.io.fsutil import sha256_file
from xray_core.model.backbone import FEATURE_DIM, effective_batch_size, load_backbone
from xray_core.model.features import (
    EmbedItem,
    FeatureCache,
    FeatureCacheError,
    cache_summary,
)
from xray_core.model.preprocess import EvalTransform, TrainTransform, make_view, spec_dict, view_generator

SHA = "ab" * 32


def _gray(seed: int = 0, shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _write_pngs(folder: Path, n: int) -> list[EmbedItem]:
    """Plain 8-bit grayscale 64x64 PNGs with some structure (a gradient plus noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(n):
        noise = np.random.default_rng(i).integers(0, 60, (64, 64))
        pixels = ((xx * (2 + i) + yy * 2 + noise) % 256).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels, mode="L").save(path)
        items.append(EmbedItem(sha256=sha256_file(path), path=path.resolve()))
    return items


@pytest.fixture
def items(tmp_path: Path) -> list[EmbedItem]:
    return _write_pngs(tmp_path / "store", 6)


@pytest.fixture
def cache(settings) -> FeatureCache:
    return FeatureCache(load_backbone(settings), settings)


# -- views ------------------------------------------------------------------------------------------


def test_eval_view_is_deterministic_and_normalised(settings) -> None:
    gray = _gray()
    a = make_view(gray, 0, SHA, settings)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, make_view(gray, 0, "cd" * 32, settings))  # view 0 ignores the sha
    assert torch.equal(a[0] * 0.229 + 0.485, a[1] * 0.224 + 0.456)  # same gray in every channel
    torch.testing.assert_close(a, EvalTransform(size=32)(gray))


def test_augmented_views_are_seeded_per_image_and_view(settings) -> None:
    gray = _gray()
    rng_state = torch.random.get_rng_state()
    views = [make_view(gray, v, SHA, settings) for v in range(4)]
    assert torch.equal(rng_state, torch.random.get_rng_state())  # global RNG untouched
    for v in range(1, 4):
        assert torch.equal(views[v], make_view(gray, v, SHA, settings))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(views[i], views[j])
    assert not torch.equal(views[1], make_view(gray, 1, "cd" * 32, settings))


def test_train_transform_is_a_function_of_the_generator() -> None:
    t = TrainTransform(size=32, rotation=10.0, crop_scale=(0.8, 1.0), hflip=True)
    gray = _gray(shape=(100, 70))
    a = t(gray, generator=view_generator(SHA, 1))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, t(gray, generator=view_generator(SHA, 1)))
    assert not torch.equal(a, t(gray, generator=view_generator(SHA, 2)))


@pytest.mark.parametrize("bad", [np.full((8, 8), 1.5, np.float32), np.zeros((2, 8, 8), np.float32),
                                 np.zeros((8, 8), np.uint8)])
def test_transforms_reject_out_of_range_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        EvalTransform(size=32)(bad)


def test_spec_dict_is_json_and_excludes_view_count(settings) -> None:
    spec = spec_dict(settings)
    json.dumps(spec)
    assert spec == spec_dict(settings.with_overrides(views=9))
    assert spec != spec_dict(settings.with_overrides(aug_hflip=False))


# -- cache ------------------------------------------------------------------------------------------


def test_second_ensure_runs_no_backbone_and_features_round_trip(cache: FeatureCache, items) -> None:
    from safetensors import safe_open

    bb = cache.backbone
    calls = bb.calls
    first = cache.ensure(items, [0, 1, 2])
    assert (first.requested, first.cached, first.computed, first.images) == (18, 0, 18, 6)
    assert first.recomputed_corrupt == 0 and first.seconds > 0
    assert bb.calls > calls
    calls = bb.calls
    again = cache.ensure(items, [0, 2, 1])
    assert bb.calls == calls  # nothing embedded twice
    assert (again.cached, again.computed, again.images) == (18, 0, 0)

    path = cache.path_for(items[0].sha256)
    assert path == cache.root / items[0].sha256[:2] / f"{items[0].sha256}.safetensors"
    with safe_open(str(path), framework="np") as fh:
        assert sorted(fh.keys()) == ["v0", "v1", "v2"]
        assert fh.get_tensor("v1").dtype == np.float16 and fh.get_tensor("v1").shape == (FEATURE_DIM,)
        meta = fh.metadata()
    assert meta["fingerprint"] == bb.fingerprint and meta["feature_dim"] == str(FEATURE_DIM)
    assert {"sha256_0", "sha256_1", "sha256_2"} <= set(meta)

    shas = [it.sha256 for it in items]
    feats = cache.load_views(shas, [0, 1, 2])
    assert feats.shape == (6, 3, FEATURE_DIM) and feats.dtype == np.float32
    assert np.array_equal(feats, cache.load_views(shas, [0, 1, 2]))
    assert np.array_equal(cache.load(shas, 1), feats[:, 1])
    half = cache.load_views(shas, [0, 1, 2], dtype=np.float16)  # the stored values, as the train step holds
    assert half.dtype == np.float16 and np.array_equal(half.astype(np.float32), feats)
    assert np.array_equal(cache.load(shas, 1, dtype=np.float16), half[:, 1])
    # The cached view equals a fresh embedding of the same view, to float16 precision.
    from xray_core.data.images import load_grayscale

    fresh = bb.embed(make_view(load_grayscale(items[2].path), 1, shas[2], cache.settings)[None])[0]
    np.testing.assert_allclose(feats[2, 1], fresh.numpy(), rtol=1e-2, atol=1e-3)

    with pytest.raises(FeatureCacheError, match="not cached"):
        cache.load(shas, 3)


def test_only_new_images_and_new_views_are_embedded(cache: FeatureCache, items) -> None:
    cache.ensure(items[:4], [0])
    v0 = cache.load([it.sha256 for it in items[:4]], 0)
    stats = cache.ensure(items, [0])
    assert (stats.cached, stats.computed, stats.images) == (4, 2, 2)
    stats = cache.ensure(items + items[:2], [0, 1])  # duplicates are embedded once
    assert (stats.requested, stats.cached, stats.computed) == (12, 6, 6)
    assert np.array_equal(cache.load([it.sha256 for it in items[:4]], 0), v0)  # rewrite kept view 0


def test_corrupt_and_truncated_files_are_recomputed_never_used(cache: FeatureCache, items) -> None:
    shas = [it.sha256 for it in items]
    cache.ensure(items, [0, 1, 2])
    good = cache.load_views(shas, [0, 1, 2])

    flipped = cache.path_for(shas[0])  # one byte inside view 1's tensor
    data = bytearray(flipped.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + n])["v1"]["data_offsets"][0]
    data[8 + n + start + 100] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = cache.path_for(shas[1])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    with pytest.raises(FeatureCacheError):
        cache.load(shas, 1)
    assert cache.load_views(shas[:1], [0, 2]).shape == (1, 2, FEATURE_DIM)  # intact views still verify
    cov = cache.coverage(shas, [0, 1, 2])
    assert (cov["complete"], cov["pairs_cached"], cov["pairs_needed"]) == (4, 14, 4)

    stats = cache.ensure(items, [0, 1, 2])
    assert stats.recomputed_corrupt == 1 + 3
    assert (stats.computed, stats.images) == (4, 2)
    np.testing.assert_allclose(cache.load_views(shas, [0, 1, 2]), good, rtol=1e-2, atol=1e-3)
    assert cache.ensure(items, [0, 1, 2]).computed == 0


def test_progress_and_coverage(cache: FeatureCache, items) -> None:
    shas = [it.sha256 for it in items]
    cache.ensure(items[:2], [0, 1])
    calls: list[tuple[int, int]] = []
    cache.ensure(items[:4], [0, 1], progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (2, 4) and calls[-1] == (4, 4)
    assert all(total == 4 for _, total in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    cov = cache.coverage(shas, [0, 1, 2])
    assert cov == {"images": 6, "complete": 0, "pairs_total": 18, "pairs_cached": 8, "pairs_needed": 10}
    assert cache.coverage(shas[:4], [0, 1])["complete"] == 4

    rows = cache_summary(cache.settings.features_dir)
    assert [r["fingerprint"] for r in rows] == [cache.backbone.fingerprint]
    assert rows[0]["images"] == 4 and rows[0]["files"] == 4 and rows[0]["bytes"] > 4 * 2 * FEATURE_DIM * 2
    assert cache_summary(cache.settings.features_dir / "absent") == []


def test_decode_workers_and_small_memory_budget(settings, items) -> None:
    s = settings.with_overrides(embed_workers=1, embed_memory_mb=1, embed_batch_size=8)
    assert effective_batch_size(s) == 1
    assert effective_batch_size(settings) == settings.embed_batch_size
    cache = FeatureCache(load_backbone(s), s)
    calls = cache.backbone.calls
    stats = cache.ensure(items[:3], [0, 1])
    assert stats.computed == 6 and cache.backbone.calls - calls == 6  # one view per backbone call


def test_unreadable_image_is_reported_and_finished_images_are_kept(cache: FeatureCache,
                                                                   items, tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(FeatureCacheError, match="cannot embed 1 image"):
        cache.ensure([*items[:2], EmbedItem(sha256="ee" * 32, path=bad)], [0])
    assert cache.coverage([it.sha256 for it in items[:2]], [0])["complete"] == 2


def test_cache_refuses_settings_other_than_the_backbone_s(settings) -> None:
    bb = load_backbone(settings)
    with pytest.raises(FeatureCacheError, match="preprocessing"):
        FeatureCache(bb, settings.with_overrides(input_size=64))
    with pytest.raises(ValueError):
        FeatureCache(bb, settings).ensure([], [])
