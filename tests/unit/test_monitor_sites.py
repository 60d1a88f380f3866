"""Per-site drift checks: a site's new films are compared with the reference's films of that site, not
with the pooled mix of sites (which one site differs from by construction); a site the reference never
saw is drift; a reference saved before sites were recorded gives pooled checks that do not count."""

from __future__ import annotations

import numpy as np
from test_monitor_ood_flag import old_reference

from xray_core.monitor.drift import NEW_SITE, POOLED, check_batch, check_site
from xray_core.monitor.reference import Reference, build_reference
from xray_core.pipeline.monitor import drifted_checks, single_site

DIM = 24
LABELS = ["normal", "pneumonia"]
CENTRE = {"A": (-2.0, 0.0), "B": (2.0, 0.0), "C": (0.0, 4.0)}  # C: never in the reference
COMMON = dict(labels=LABELS, threshold=0.5, positive=1, alpha=0.05, permutations=199)


def site_films(rng: np.random.Generator, site: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(features, probabilities) of ``n`` films of ``site``: sites differ along the main directions the
    features vary in (in distribution for the per-film score), and so do their predicted probabilities."""
    basis = np.random.default_rng(99).normal(size=(3, DIM))
    latent = rng.normal(size=(n, 3))
    latent[:, :2] += CENTRE[site]
    x = latent @ basis + 0.05 * rng.normal(size=(n, DIM)) + 5.0
    p = 1 / (1 + np.exp(-(latent[:, 0] + 0.5 * rng.normal(size=n))))
    return x.astype(np.float32), np.column_stack([1 - p, p])


def two_site_reference() -> Reference:
    rng = np.random.default_rng(0)
    parts = [site_films(rng, s, 150) for s in ("A", "B", "A", "B")]
    x_train, x_val = np.vstack([parts[0][0], parts[1][0]]), np.vstack([parts[2][0], parts[3][0]])
    probs = np.vstack([parts[2][1], parts[3][1]])
    return build_reference(x_train, x_val, np.array([f"p{i // 2}" for i in range(300)]), probs,
                           (probs[:, 1] > rng.random(300)).astype(int), mean=x_train.mean(0),
                           std=x_train.std(0), quantile=0.99, val_sites=["A"] * 150 + ["B"] * 150)


def test_sites_round_trip_and_restrict_the_sample_and_validation_films():
    ref = two_site_reference()
    back = Reference.from_bytes(ref.to_bytes())
    assert back.sites == ("A", "B") and back.format == ref.format
    np.testing.assert_array_equal(back.val_sites, np.repeat([0, 1], 150))
    assert back.site_rows("A") + back.site_rows("B") == len(back.sample) and back.site_rows("C") == 0
    a = back.for_site("A")
    assert len(a.sample) == back.site_rows("A") and len(a.val_probs) == 150 and a.site == "A"
    np.testing.assert_array_equal(a.val_probs, back.val_probs[:150])
    np.testing.assert_array_equal(a.calibration_scores, back.calibration_scores)  # the pooled flag


def test_in_distribution_site_batches_are_quiet_against_their_own_site_but_not_the_pooled_mix():
    ref = two_site_reference()
    alarms = 0
    for seed in range(3):
        rng = np.random.default_rng(10 + seed)
        for site in ("A", "B"):
            x, p = site_films(rng, site, 40)
            groups = np.arange(40) // 2
            out = check_site(ref, site, x, p, groups=groups, seed=seed, **COMMON)
            assert out["reference"] == "site" and out["counts"]
            alarms += out["drift"]
    assert alarms <= 1  # 6 batches at alpha 0.05
    rng = np.random.default_rng(20)
    x, p = site_films(rng, "A", 40)
    pooled = check_batch(ref, x, p, groups=np.arange(40) // 2, **COMMON)
    assert pooled["drift"] and pooled["output_shift"]  # the false alarm per-site checks avoid


def test_a_shifted_site_batch_flags_and_a_new_site_is_judged_by_its_tests():
    ref = two_site_reference()
    rng = np.random.default_rng(30)
    x, p = site_films(rng, "A", 40)
    x[:, :8] += 0.6  # a restyled scanner: off the directions the features vary in
    shifted = check_site(ref, "A", x, p, **COMMON)
    assert shifted["drift"] and shifted["input_shift"] and shifted["reference"] == "site"
    x, p = site_films(rng, "C", 40)
    new = check_site(ref, "C", x, p, **COMMON)
    assert new["drift"] and new["new_site"] and new["verdict"].startswith(f"{NEW_SITE}; against the pooled")
    assert "drift: inputs differ" in new["verdict"]  # flagged by its tests, not by its name
    assert new["reference"] == "pooled: new site" and drifted_checks([new]) == [new]
    assert not new["performance"]["reliable"]


def test_a_reference_without_sites_loads_and_its_per_site_checks_do_not_flag_the_run():
    for fmt in (1, 2):
        back = Reference.from_bytes(old_reference(fmt).to_bytes())
        assert back.sites == () and back.site_rows("A") is None
    ref = two_site_reference()
    old = Reference.from_bytes(Reference(**{**ref.__dict__, "sites": (), "val_sites": None,
                                            "sample_sites": None}).to_bytes())
    assert old.sites == () and old.sample_sites is None
    x, p = site_films(np.random.default_rng(40), "A", 40)
    out = check_site(old, "A", x, p, **COMMON)
    assert out["pooled_drift"] and not out["drift"] and not out["counts"] and POOLED in out["verdict"]
    overall = {"subject": "all new films", "drift": False}
    assert drifted_checks([overall, {"subject": "site A", **out}, {**out, "drift": True}]) == []


def test_a_batch_from_one_known_site_is_compared_with_that_sites_films_not_the_mix():
    ref = two_site_reference()
    assert single_site(["A"] * 20, ref) == "A"  # check_site against site A's reference films
    assert single_site(["A"] * 10 + ["B"] * 10, ref) is None  # a mix: the pooled comparison
    assert single_site(["C"] * 20, ref) is None  # a site the reference never saw: the pooled check decides
    assert single_site(["A"] * 20, old_reference(2)) is None  # no sites recorded: the pooled, counted check
    new = check_site(ref, "C", *site_films(np.random.default_rng(4), "C", 20), groups=np.arange(20), **COMMON)
    assert new["drift"] and new.get("new_site")
    alone, pooled = [], []
    for seed in range(3):
        x, p = site_films(np.random.default_rng(10 + seed), "A", 40)
        alone.append(check_site(ref, "A", x, p, groups=np.arange(40) // 2, **COMMON))
        pooled.append(check_batch(ref, x, p, groups=np.arange(40) // 2, **COMMON))
    assert all(c["reference"] == "site" for c in alone)
    assert sum(c["drift"] for c in alone) <= 1 and all(c["drift"] for c in pooled)


def test_a_site_too_thin_in_the_reference_is_not_new_and_does_not_count():
    rng = np.random.default_rng(0)
    parts = [site_films(rng, s, n) for s, n in (("A", 150), ("B", 150), ("A", 3), ("B", 150))]
    x_train, x_val = np.vstack([parts[0][0], parts[1][0]]), np.vstack([parts[2][0], parts[3][0]])
    probs = np.vstack([parts[2][1], parts[3][1]])
    ref = build_reference(x_train, x_val, np.array([f"p{i}" for i in range(153)]), probs,
                          (probs[:, 1] > 0.5).astype(int), mean=x_train.mean(0), std=x_train.std(0),
                          quantile=0.99, val_sites=["A"] * 3 + ["B"] * 150)
    assert ref.site_rows("A") == 3
    x, p = site_films(rng, "A", 30)
    out = check_site(ref, "A", x, p, groups=np.arange(30), **COMMON)
    assert out["reference"] == "pooled" and not out["counts"] and not out["drift"]
    assert "only 3 of this site's films" in out["verdict"] and not out.get("new_site")
    assert drifted_checks([out]) == []


def test_a_new_site_name_on_films_like_the_reference_raises_no_alarm():
    ref = two_site_reference()
    rng = np.random.default_rng(8)
    (xa, pa), (xb, pb) = site_films(rng, "A", 20), site_films(rng, "B", 20)
    # the reference's own mix of films, under a folder's name it never saw (a plain `xray ingest DIR`)
    x, p = np.vstack([xa, xb]), np.vstack([pa, pb])
    out = check_site(ref, "deliveries-2026-12", x, p, groups=np.arange(40) // 2, **COMMON)
    assert out["new_site"] and out["verdict"].startswith(NEW_SITE) and out["counts"]
    assert not out["drift"], out["verdict"]
