"""The paths a hospital-scale retrain takes (bench/retrain_scale.py) give the in-memory numbers at small N:
the chunked normaliser bit for bit, the bootstrap under a small XRAY_MEMORY_MB to 1e-9, the cross-fitted
OOD scores with their rows picked before copying bit for bit; the features held as float16 (the cached
values, at half float32's memory) train the very heads, references and hashes that float32 ones do; and
the subsampled steps (the audit's probes, the MMD test) change nothing below their caps and say what they
subsampled above them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_monitor_drift import LABELS, probs_for
from test_monitor_reference import films, make_reference

from xray_core.data.subsample import stratified_subsample
from xray_core.evaluate import intervals
from xray_core.evaluate.audit import shortcut_audit
from xray_core.model import train
from xray_core.monitor import drift
from xray_core.monitor.ood import crossfit_scores, fit_basis


def numpy_normaliser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fit_normaliser as it was: one float64 copy of every row, numpy's mean and std."""
    rows = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    std = rows.std(axis=0)
    return rows.mean(axis=0).astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_normaliser_is_numpys_bit_for_bit(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((301, 3, 40)) * rng.uniform(0.1, 50, 40)).astype(np.float16).astype(np.float32)
    x[:, :, 5] = 2.0  # a constant dimension: std 1
    monkeypatch.setattr(train, "NORMALISER_CHUNK", chunk)
    for view in (x, x[:, :1]):  # all views, and the eval view (a strided view of them)
        mean, std = train.fit_normaliser(view)
        want_mean, want_std = numpy_normaliser(view)
        assert np.array_equal(mean, want_mean) and np.array_equal(std, want_std)
    assert train.fit_normaliser(x)[1][5] == 1.0


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def assert_close(a: dict, b: dict) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k, v in fa.items():
        if isinstance(v, float):
            assert fb[k] == pytest.approx(v, abs=1e-9), k
        else:
            assert fb[k] == v, k


def test_bootstrap_under_a_small_memory_budget_gives_the_same_intervals() -> None:
    rng = np.random.default_rng(1)
    n, labels = 400, ["covid", "normal", "pneumonia"]
    y = rng.integers(0, 3, n)
    p_new, p_old = rng.dirichlet([2, 2, 2], n), rng.dirichlet([2, 2, 2], n)
    patients = rng.integers(0, 150, n).astype(str)
    # 1 MiB: blocks of 2,048 elements, i.e. 5 resamples of 400 films each; the default is one block
    assert intervals.block_elements(1) // n < 300 <= intervals.block_elements(None) // n
    kw = dict(negative_label="normal", n_samples=300, seed=4)
    whole = intervals.bootstrap_intervals(y, p_new, labels, patients, threshold=None, **kw)
    chunked = intervals.bootstrap_intervals(y, p_new, labels, patients, threshold=None, memory_mb=1, **kw)
    assert_close(whole, chunked)
    pair = dict(metric="macro_auroc", thresholds=(None, None), **kw)
    paired = intervals.paired_bootstrap_difference
    assert_close(paired(y, p_new, p_old, labels, patients, **pair),
                 paired(y, p_new, p_old, labels, patients, memory_mb=1, **pair))
    assert intervals.block_elements(2048) == intervals.block_elements(None)  # the default budget: as before


def test_crossfit_picks_fit_basis_rows_before_copying_them() -> None:
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(5)
    views, x_eval = films(rng, 120, views=3)
    groups = np.array([f"p{i // 2}" for i in range(120)])
    got = crossfit_scores(views, x_eval, groups, folds=4, max_components=4, max_rows=50, seed=2)
    want = np.empty(120)  # the old way: every fold's rows copied, then fit_basis subsamples them
    for fit, held in GroupKFold(n_splits=4).split(x_eval, groups=groups):
        basis = fit_basis(views[fit].reshape(-1, views.shape[-1]), max_components=4, max_rows=50, seed=2)
        want[held] = basis.scores(x_eval[held])
    assert np.array_equal(got, want)


def test_stratified_subsample_keeps_each_stratum_share_and_is_none_below_the_cap() -> None:
    strata = ["a"] * 700 + ["b"] * 290 + ["c"] * 10
    assert stratified_subsample(strata, 1000, seed=0) is None
    pick = stratified_subsample(strata, 100, seed=0)
    assert pick is not None and np.array_equal(pick, np.sort(pick)) and len(set(pick)) == len(pick)
    taken = pd.Series(np.array(strata)[pick]).value_counts().to_dict()
    assert taken == {"a": 70, "b": 29, "c": 1}
    assert np.array_equal(pick, stratified_subsample(strata, 100, seed=0))  # seeded
    assert not np.array_equal(pick, stratified_subsample(strata, 100, seed=1))


def audit_frame(n: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(7)
    site = np.where(np.arange(n) % 3 == 0, "b", "a")
    label = np.where(rng.random(n) < np.where(site == "b", 0.8, 0.3), "pneumonia", "normal")
    frame = pd.DataFrame({"label": label, "site": site, "patient": [f"p{i // 2}" for i in range(n)],
                          "width": np.where(site == "b", 1024, 2048) + rng.integers(0, 5, n),
                          "height": 1000, "view": "PA"})
    return frame, rng.normal(size=(n, 6)) + (site == "b")[:, None]


def test_audit_probes_on_a_subsample_say_so_and_every_film_keeps_the_table() -> None:
    frame, emb = audit_frame(120)
    kw = dict(negative_label="normal", auroc_threshold=0.8, seed=0)
    full = shortcut_audit(frame, emb, **kw)
    assert "probe_subsample" not in full  # every film probed: the audit as before
    pick = stratified_subsample(list(zip(frame["label"], frame["site"])), 60, seed=0)
    assert pick is not None
    sub = shortcut_audit(frame, emb[pick], probe_rows=pick, **kw)
    assert sub["probe_subsample"] == {"films": len(pick), "of": 120, "stratified_by": "label x site",
                                      "seed": 0}
    assert sub["label_site"] == full["label_site"] and sub["site_only_auroc"] == full["site_only_auroc"]
    assert sub["metadata_probe"]["n"] == len(pick) and full["metadata_probe"]["n"] == 120
    alone = shortcut_audit(frame.iloc[pick].reset_index(drop=True), emb[pick], **kw)
    assert sub["site_probe"] == alone["site_probe"] and sub["metadata_probe"] == alone["metadata_probe"]


def test_mmd_runs_on_a_recorded_subsample_only_above_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_monitor_reference import features

    ref, rng = make_reference()
    x, probs = features(rng, 40), probs_for(rng, 40)
    common = dict(labels=LABELS, threshold=0.5, positive=1, alpha=0.01, permutations=99, seed=3)
    below = drift.check_batch(ref, x, probs, **common)
    assert "mmd_subsample" not in below
    assert (below["mmd"], below["mmd_p"]) == drift.mmd_permutation_test(
        ref.embed_for_drift(ref.sample), ref.embed_for_drift(ref.standardise(x)), ref.sample_groups,
        np.arange(40), permutations=99, seed=3)
    monkeypatch.setattr(drift, "MMD_MAX_FILMS", 16)
    above = drift.check_batch(ref, x, probs, **common)
    assert above["mmd_subsample"] == {"films": 16, "of": 40, "permutations": 99, "seed": 3}
    pick = np.sort(np.random.default_rng(3).choice(40, size=16, replace=False))
    assert (above["mmd"], above["mmd_p"]) == drift.mmd_permutation_test(
        ref.embed_for_drift(ref.sample), ref.embed_for_drift(ref.standardise(x[pick])), ref.sample_groups,
        pick, permutations=99, seed=3)
    assert above["ood_flagged"] == below["ood_flagged"] and above["ks_p"] == below["ks_p"]  # every film


def half_films(n: int, *, views: int = 3, d: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, views, d) float16 features of 3 classes (a mean apart on one axis each, as cached: rounded to
    float16), and their labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = np.eye(3, d)[y][:, None, :] * 1.5 + 0.4 + rng.normal(0, 0.3, (n, views, d))
    return x.astype(np.float16), y.astype(np.int64)


def same_head(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("min_val", [1, 1000])  # recipes chosen on validation, or by grouped k-fold
def test_float16_features_give_the_float32_choice_and_heads_bit_for_bit(min_val: int) -> None:
    from xray_core.model.recipes import candidate_recipes, fit_calibrated, select_recipe

    x16, y = half_films(90)
    v16, yv = half_films(30, views=1, seed=1)
    v16 = v16[:, 0]
    cfg = train.HeadConfig(hidden=(8,), epochs=3, batch_size=16, seed=0)
    recipes = candidate_recipes(cfg, l2_grid=(0.1, 1.0))
    groups, vgroups = np.array([f"p{i // 2}" for i in range(90)]), np.array([f"v{i}" for i in range(30)])
    out = {}
    for dtype in (np.float16, np.float32):
        x, v = x16.astype(dtype), v16.astype(dtype)
        sel = select_recipe(recipes, x, y, groups, x[:, 0], v, yv, vgroups, 3, folds=3,
                            min_val_per_class=min_val, seed=0)
        out[dtype] = sel, fit_calibrated(sel, x, y, v, yv, 3)
    (sel16, fit16), (sel32, fit32) = out[np.float16], out[np.float32]
    assert sel16.method == ("validation" if min_val == 1 else "grouped k-fold")
    assert sel16.scores == sel32.scores and sel16.recipe == sel32.recipe
    assert (sel16.oof_logits is None) == (sel32.oof_logits is None)
    if sel16.oof_logits is not None:
        assert np.array_equal(sel16.oof_logits, sel32.oof_logits)
    assert same_head(fit16.head, fit32.head) and fit16.temperature == fit32.temperature
    assert np.array_equal(fit16.held_logits, fit32.held_logits)


def test_every_recipe_fits_the_same_head_from_float16_features() -> None:
    from xray_core.model.recipes import candidate_recipes, fit_recipe

    x16, y = half_films(60)
    v16, yv = half_films(20, views=1, seed=1)
    for recipe in candidate_recipes(train.HeadConfig(hidden=(8,), epochs=2, batch_size=16), l2_grid=(1.0,)):
        h16, r16 = fit_recipe(recipe, x16, y, v16[:, 0], yv, 3)
        h32, r32 = fit_recipe(recipe, x16.astype(np.float32), y, v16[:, 0].astype(np.float32), yv, 3)
        assert same_head(h16, h32) and r16 == r32, recipe.name
        assert np.array_equal(train.predict_proba(h16, v16[:, 0]),
                              train.predict_proba(h32, v16[:, 0].astype(np.float32)))


def test_float16_training_features_are_not_copied_to_float32() -> None:
    x16, _ = half_films(10)
    held = train.training_tensor(x16)
    assert held.dtype == torch.float16 and held.data_ptr() == x16.ctypes.data  # shares the array
    assert train.training_tensor(x16.astype(np.float64)).dtype == torch.float32  # others: float32, as before


@pytest.mark.parametrize("score", ["t2q", "knn"])
def test_reference_and_features_hash_from_float16_features_are_the_float32_ones(score: str) -> None:
    from xray_core.monitor.reference import build_reference
    from xray_core.pipeline.steps import features_sha256

    rng = np.random.default_rng(8)
    views, _ = films(rng, 80, views=3)
    x16, v16 = views.astype(np.float16), films(rng, 40)[1].astype(np.float16)
    probs, d = rng.dirichlet([1, 1], 40), x16.shape[-1]
    built = [build_reference(x, v, np.array([f"v{i}" for i in range(40)]), probs, np.arange(40) % 2,
                             mean=np.full(d, 5.0), std=np.full(d, 0.5), quantile=0.95, train_eval=x[:, 0],
                             train_groups=np.array([f"p{i // 2}" for i in range(80)]), score=score)
             for x, v in ((x16, v16), (x16.astype(np.float32), v16.astype(np.float32)))]
    assert built[0].to_bytes() == built[1].to_bytes()
    assert features_sha256(x16, v16) == features_sha256(x16.astype(np.float32), v16.astype(np.float32))


def test_knn_rows_are_picked_before_the_float64_copy() -> None:
    from xray_core.monitor.scores import fit_knn, l2_normalise

    x16 = half_films(50, views=1)[0][:, 0]
    pick = np.sort(np.random.default_rng(3).choice(50, size=20, replace=False))  # the old way's rows
    want = l2_normalise(x16.astype(np.float64)[pick]).astype(np.float16).astype(np.float64)
    assert np.array_equal(fit_knn(x16, k=1, max_rows=20, seed=3).rows, want)


def test_the_drawn_roc_keeps_every_corner_and_at_most_its_cap_of_points() -> None:
    from xray_core.report.data import drawn_roc, roc_curve, site_curves

    rng = np.random.default_rng(4)
    y = rng.random(400) < 0.4
    score = np.round(rng.random(400) * 40) / 40 + 0.3 * y  # ties, and straight runs between them
    full, drawn = roc_curve(y, score), drawn_roc(y, score)
    assert full is not None and drawn is not None
    keep = [int(np.flatnonzero((full[0] == a) & (full[1] == b))[0]) for a, b in zip(*drawn)]
    assert keep[0] == 0 and keep[-1] == len(full[0]) - 1 and keep == sorted(keep)  # a subset, in order
    assert len(keep) < len(full[0])  # straight runs lost their inner points
    for a, b in zip(keep, keep[1:]):  # every dropped point lies on the segment between its kept neighbours
        fx, fy = full[0][a:b + 1] - full[0][a], full[1][a:b + 1] - full[1][a]
        assert np.allclose(fx * (full[1][b] - full[1][a]), fy * (full[0][b] - full[0][a]), atol=1e-12)
    assert np.trapezoid(drawn[1], drawn[0]) == pytest.approx(np.trapezoid(full[1], full[0]), abs=1e-12)

    big_y = rng.random(20_000) < 0.3
    big = rng.random(20_000) + 0.5 * big_y  # 20,000 distinct scores, thousands of corners
    full, corners = roc_curve(big_y, big), drawn_roc(big_y, big, max_points=10**6)
    drawn = drawn_roc(big_y, big, max_points=500)
    assert full is not None and corners is not None and drawn is not None
    assert len(drawn[0]) <= 500 < len(corners[0])
    assert (drawn[0][0], drawn[1][0], drawn[0][-1], drawn[1][-1]) == (0.0, 0.0, 1.0, 1.0)
    # every corner is within 2 / (500 - 2) (fpr + tpr: the length along a monotone curve) of the kept
    # point before it
    at = np.searchsorted(drawn[0] + drawn[1], corners[0] + corners[1], side="right") - 1
    assert np.all((corners[0] - drawn[0][at]) + (corners[1] - drawn[1][at]) < 2 / 498)
    # the report's curve: thinned points, the area (AUROC) of every point
    probs = np.column_stack([1 - big / 2, big / 2])
    (curve,) = site_curves(1, "challenger", ["normal", "pneumonia"], big_y.astype(int), probs,
                           [None] * len(big))
    assert len(curve.roc["pneumonia"]["fpr"]) <= 2000
    assert curve.roc["pneumonia"]["auroc"] == float(np.trapezoid(full[1], full[0]))
