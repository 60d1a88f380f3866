"""The paths a hospital-scale retrain takes (bench/retrain_scale.py) give the in-memory numbers at small N:
the chunked normaliser bit for bit, the bootstrap under a small XRAY_MEMORY_MB to 1e-9, the cross-fitted
OOD scores with their rows picked before copying bit for bit; and the subsampled steps (the audit's
probes, the MMD test) change nothing below their caps and say what they subsampled above them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
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
