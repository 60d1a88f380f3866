"""The per-film flag (``ood_p <= XRAY_OOD_ALPHA``) and the scores bench/ood.py compares: valid on
exchangeable films, each score separating a hand-made second cluster, honest about a calibration set
too small to resolve alpha, XRAY_OOD_SCORE choosing format 2 (T² + Q, the default) or 3 (kNN), and format-1
and hand-laid format-2 references loading, scoring and flagging."""

from __future__ import annotations

import numpy as np
import pytest

from xray_core.monitor.ood import FlagRule, coarse_note, fit_basis, flag_cut, ood_line
from xray_core.monitor.reference import Reference, build_reference
from xray_core.monitor.scores import (
    bonferroni_min,
    conformal_p,
    crossfit,
    energy,
    fit_class_mahalanobis,
    fit_knn,
)
from xray_core.settings import load_settings

DIM = 16


def cluster(rng: np.random.Generator, n: int, centre: float) -> np.ndarray:
    """Rows around ``centre`` in the first half of the dimensions (a second cluster: another centre)."""
    x = rng.normal(scale=0.5, size=(n, DIM))
    x[:, : DIM // 2] += centre
    x[:, DIM // 2:] += 3.0
    return x


def test_the_flag_rate_on_exchangeable_films_is_at_most_alpha_within_binomial_noise():
    """200 calibration sets of 119 films, 50 new films each, all from one distribution: the flag rate
    pooled over 10,000 films is at most alpha = 0.05 plus 3 binomial standard errors; and the flag is
    exactly ``conformal p <= alpha``."""
    rng = np.random.default_rng(0)
    rule, flagged, total = FlagRule(alpha=0.05), 0, 0
    for _ in range(200):
        cal, new = rng.normal(size=119), rng.normal(size=50)
        cut, _ = flag_cut(cal, rule)
        np.testing.assert_array_equal(new > cut, conformal_p(cal, new) <= 0.05)
        flagged, total = flagged + int((new > cut).sum()), total + 50
    assert flagged / total <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / total)
    assert flagged / total >= 0.03  # and not vacuous: 6 / 120 of them, 0.05 exactly, is the target


def test_flag_cut_is_the_conformal_rank_and_nothing_when_alpha_is_unreachable():
    cal = np.arange(1.0, 100.0)  # 99 films: floor(0.05 * 100) = 5 beyond the cut
    assert flag_cut(cal, FlagRule(alpha=0.05)) == (95.0, 95)  # 95.5: p = (1 + 4) / 100 = 0.05
    assert flag_cut(cal[:10], FlagRule(alpha=0.05)) == (float("inf"), 11)  # smallest p is 1/11 > 0.05
    assert flag_cut(cal, FlagRule(alpha=0.05, quantile=0.99)) == (99.0, 99)  # the stricter alternative


@pytest.mark.parametrize("name", ["t2q", "knn1", "knn5", "mahalanobis"])
def test_each_feature_score_ranks_a_second_cluster_above_held_out_films_of_the_first(name):
    rng = np.random.default_rng(1)
    train, held, far = cluster(rng, 120, 0.0), cluster(rng, 40, 0.0), cluster(rng, 40, 4.0)
    labels = (train[:, 0] > 0).astype(int)  # two classes inside the first cluster
    scorer = {"t2q": lambda: fit_basis(train, max_components=4).scores,
              "knn1": lambda: fit_knn(train, k=1).scores, "knn5": lambda: fit_knn(train, k=5).scores,
              "mahalanobis": lambda: fit_class_mahalanobis(train, labels).scores}[name]()
    s_held, s_far = scorer(held), scorer(far)
    assert s_far.min() > np.quantile(s_held, 0.95)
    assert np.mean(conformal_p(s_held, s_far) <= 0.05) == 1.0


def test_energy_is_high_where_the_logits_are_small():
    sure = np.array([[8.0, -2.0], [-1.0, 7.5]])  # a head's logits on films like its training films
    lost = np.array([[0.1, -0.2], [0.0, 0.05]])  # ... and on a second cluster it was never shown
    assert energy(lost).min() > energy(sure).max()
    np.testing.assert_allclose(energy(np.array([[0.0, 0.0]])), [-np.log(2)])


def test_class_mahalanobis_matches_sklearn_ledoit_wolf_in_full():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(2)
    x, y, new = rng.normal(size=(30, 50)), np.repeat([0, 1], 15), rng.normal(size=(5, 50))
    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    lw = LedoitWolf(assume_centered=True).fit(x - means[y])
    expected = np.min([lw.mahalanobis(new - m) for m in means], axis=0)
    np.testing.assert_allclose(fit_class_mahalanobis(x, y).scores(new), expected, rtol=1e-6)


def test_knn_is_the_kth_neighbour_distance_on_the_unit_sphere_and_crossfit_holds_out_the_patient():
    train = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    knn = fit_knn(train, k=2)
    d = np.linalg.norm(np.array([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]]) - [0.6, 0.8], axis=1)
    np.testing.assert_allclose(knn.scores(np.array([[3.0, 4.0]])), [np.sort(d)[1]], atol=2e-3)
    x = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    same = crossfit(x, np.array(["a", "a", "b", "b"]), lambda r: fit_knn(r, k=1).scores, folds=2)
    assert np.all(same > 1.0)  # each film's twin is its own patient's: held out, so never a neighbour


def test_bonferroni_min_is_twice_the_smaller_p_value_capped_at_one():
    np.testing.assert_allclose(bonferroni_min(np.array([0.01, 0.6]), np.array([0.2, 0.9])), [0.02, 1.0])


def test_a_reference_with_too_few_calibration_films_says_the_flag_is_coarse():
    rule = FlagRule(alpha=0.05)
    assert coarse_note(120, rule) is None
    note = coarse_note(60, rule)
    assert note is not None and "coarse" in note and "1/61" in note and "3 calibration films" in note
    assert "99 or more" in note
    assert "no film can be flagged" in str(coarse_note(15, rule))
    # the quantile rule's cut is capped at the largest calibration score: films above it are flagged
    assert "the cut is the largest calibration score" in str(coarse_note(98, FlagRule(quantile=0.99)))
    rng = np.random.default_rng(3)
    train, val = cluster(rng, 30, 0.0), cluster(rng, 10, 0.0)
    ref = build_reference(train[:, None], val, np.arange(10).astype(str), np.full((10, 2), 0.5),
                          np.zeros(10, int), mean=train.mean(0), std=train.std(0), quantile=0.99,
                          train_eval=train, train_groups=np.arange(30).astype(str))  # one view per film
    assert len(ref.calibration_scores) == 40 and ref.coarse(rule) == coarse_note(40, rule)
    flagged, expected = ref.ood_counts(ref.scores(cluster(rng, 10, 4.0)), rule)
    line = ood_line(flagged, 10, expected, rule, ref.coarse(rule))
    assert line.startswith("10 of 10 films look unlike this model's training data (conformal p <= 0.05; ")
    assert line.endswith(str(coarse_note(40, rule)))


def test_the_rule_is_alpha_unless_xray_ood_quantile_is_set():
    assert FlagRule.from_settings(load_settings({})) == FlagRule(alpha=0.05, quantile=None)
    assert FlagRule.from_settings(load_settings({"XRAY_OOD_ALPHA": "0.1"})).alpha == 0.1
    strict = FlagRule.from_settings(load_settings({"XRAY_OOD_QUANTILE": "0.99"}))
    assert strict.quantile == 0.99 and "0.99 conformal quantile" in strict.describe()


def old_reference(fmt: int) -> Reference:
    """A reference as format 1 or 2 models store it, laid out by hand: T² + Q scorers, no kNN rows."""
    rng = np.random.default_rng(4)
    x = cluster(rng, 150, 0.0)
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    variance = (((z - z.mean(0)) @ vt[:4].T) ** 2).mean(0)
    common = dict(mean=mean, std=std, pca_mean=z.mean(0), components=vt[:4], variance=variance,
                  residual_scale=1.0, sample=z[:20], sample_groups=np.arange(20),
                  val_probs=np.full((20, 2), 0.5), val_labels=np.zeros(20, dtype=np.int64), quantile=0.95)
    if fmt == 1:
        ref = Reference(val_scores=np.zeros(20), threshold=0.0, **common)
        val = ref.scores(cluster(rng, 119, 0.0))  # format 1: its validation scores calibrate
        return Reference(val_scores=val, threshold=float(np.quantile(val, 0.95)), **common)
    basis = fit_basis(x, max_components=4)
    cal = basis.scores(cluster(rng, 119, 0.0))
    return Reference(val_scores=cal[:20], threshold=float(np.sort(cal)[113]), basis=basis, cal_scores=cal,
                     calibration={"method": "split-conformal quantile", "n": 119}, **common)


@pytest.mark.parametrize("fmt", [1, 2])
def test_old_format_references_still_load_score_and_flag(fmt):
    ref = old_reference(fmt)
    data = ref.to_bytes()
    assert f'"format":"xray-reference/{fmt}"' in data[:4096].decode("latin-1").replace(" ", "")
    back = Reference.from_bytes(data)
    assert back.format == fmt and back.knn is None
    rng = np.random.default_rng(5)
    new = np.vstack([cluster(rng, 20, 0.0), cluster(rng, 20, 4.0)])
    np.testing.assert_allclose(back.scores(new), ref.scores(new), rtol=1e-6)
    scores = back.scores(new)
    rule = FlagRule(alpha=0.05)
    np.testing.assert_array_equal(back.flags(scores, rule), back.p_values(scores) <= 0.05)
    assert back.flags(scores, rule)[20:].all() and back.flags(scores, rule)[:20].mean() <= 0.15
    strict = FlagRule(alpha=0.05, quantile=0.95)  # the quantile it was built with: its stored threshold
    np.testing.assert_array_equal(back.flags(scores, strict), scores > back.threshold)
    assert back.coarse(rule) is None  # 119 calibration films resolve 0.05


def two_cluster_reference(score: str) -> tuple[Reference, np.ndarray]:
    """A reference built from one cluster, and 10 new films of it followed by 10 of a second cluster."""
    rng = np.random.default_rng(6)
    train, val = cluster(rng, 100, 0.0), cluster(rng, 30, 0.0)
    ref = build_reference(train[:, None], val, np.arange(30).astype(str), np.full((30, 2), 0.5),
                          np.zeros(30, int), mean=train.mean(0), std=train.std(0), quantile=0.99,
                          train_eval=train, train_groups=np.arange(100).astype(str), score=score)
    return ref, np.vstack([cluster(rng, 10, 0.0), cluster(rng, 10, 4.0)])


@pytest.mark.parametrize(("env", "fmt"), [({}, 2), ({"XRAY_OOD_SCORE": "knn"}, 3)])
def test_xray_ood_score_picks_the_format_and_either_flags_a_second_cluster(env, fmt):
    """By default (t2q) a new reference is format 2, T² + Q, no training films stored; XRAY_OOD_SCORE=knn
    builds format 3. Either round-trips, is calibrated on 130 films and flags the second cluster."""
    ref, new = two_cluster_reference(load_settings(env).ood_score)
    back = Reference.from_bytes(ref.to_bytes())
    assert back.format == fmt and (back.knn is None) == (fmt == 2) and (back.basis is None) == (fmt == 3)
    np.testing.assert_allclose(back.scores(new), ref.scores(new), rtol=1e-12)
    flags = back.flags(back.scores(new), FlagRule())
    assert flags[10:].all() and flags[:10].sum() <= 2
    described = back.describe()
    assert described["format"] == fmt and back.calibration["n"] == 130 and ref.coarse(FlagRule()) is None
    assert f"XRAY_OOD_SCORE={'knn' if fmt == 3 else 't2q'}" in described["ood_score"]
    assert back.calibration["score"] == ("knn" if fmt == 3 else "t2q")
    if fmt == 3:
        assert back.knn is not None and back.knn.k == 1 and "nearest" in described["ood_score"]


def test_an_unknown_ood_score_is_refused():
    with pytest.raises(ValueError, match="unknown OOD score 'lof'"):
        two_cluster_reference("lof")


def test_the_predict_artifact_leads_with_the_count_and_its_coarse_note():
    from xray_core.report.terminal import predict_markdown

    rule = FlagRule()
    line = ood_line(3, 7, 0.3, rule, coarse_note(40, rule))
    result = {"ood": {"line": line}, "model_version": 2, "predicted": 7, "files": 8, "rejected": 1,
              "backbone_random_init": True}
    text = predict_markdown(result, "/p/out.csv", "/p/maps")
    assert text.splitlines()[0] == f"**{line}**" and "the flag is coarse" in text.splitlines()[0]
    assert "`ood_p`" in text and "`in_distribution`" in text and "/p/maps" in text
