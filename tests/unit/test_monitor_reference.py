"""The model reference and the per-film OOD score: built from features, saved beside the head,
verified on load, and calibrated so about 1 - XRAY_OOD_QUANTILE of in-distribution films are flagged."""

from __future__ import annotations

import numpy as np
import pytest
from registry_heads import make_card, make_state

from xray_core.errors import CheckpointError
from xray_core.monitor.ood import conformal_threshold, crossfit_scores, fit_basis, ood_line
from xray_core.monitor.reference import REFERENCE_FILE, Reference, build_reference, model_reference
from xray_core.registry.versions import load_model, save_model

DIM = 24


def features(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Rows that vary mostly in 3 directions (like a frozen backbone's features), plus small noise."""
    basis = np.random.default_rng(99).normal(size=(3, DIM))
    return (rng.normal(size=(n, 3)) @ basis + 0.05 * rng.normal(size=(n, DIM)) + 5.0
            + shift).astype(np.float32)


def make_reference(quantile: float = 0.99) -> tuple[Reference, np.random.Generator]:
    rng = np.random.default_rng(0)
    x_train, x_val = features(rng, 300), features(rng, 300)
    probs = rng.dirichlet([1, 1], size=300)
    return build_reference(x_train, x_val, np.array([f"p{i // 2}" for i in range(300)]), probs,
                           rng.integers(0, 2, 300), mean=x_train.mean(0), std=x_train.std(0),
                           quantile=quantile), rng


def test_threshold_flags_about_the_quantile_of_validation_films_and_far_films_all():
    ref, rng = make_reference(0.95)
    assert np.mean(ref.val_scores > ref.threshold) <= 0.05
    fresh = ref.scores(features(rng, 400))
    assert np.mean(fresh > ref.threshold) < 0.12  # new films from the same distribution: rarely flagged
    off_axis = features(rng, 50)
    off_axis[:, :DIM // 2] += 1.0  # a shift outside the directions training varied in (border, scanner)
    assert np.all(ref.scores(off_axis) > ref.threshold)


def test_reference_round_trips_through_bytes():
    ref, rng = make_reference()
    back = Reference.from_bytes(ref.to_bytes())
    x = features(rng, 10)
    np.testing.assert_allclose(back.scores(x), ref.scores(x), rtol=1e-4)
    assert back.threshold == ref.threshold and back.quantile == 0.99 and len(back.sample) == 256
    assert len(set(back.sample_groups.tolist())) > 100  # patients, not rows
    assert ref.describe()["components"] == len(ref.variance)


def test_the_same_reference_gives_the_same_bytes_every_time():
    """safetensors writes its metadata keys in a random order per call: the card's sha256 of the reference
    changed from one save to the next (and a float16-vs-float32 identity test failed at random)."""
    ref, _ = make_reference()
    first = ref.to_bytes()
    assert all(ref.to_bytes() == first for _ in range(20))
    assert int.from_bytes(first[:8], "little") % 8 == 0  # the header stays padded as safetensors pads it
    back = Reference.from_bytes(first)
    assert back.to_bytes() == first  # read back and written again: the same bytes


def test_unreadable_reference_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match=REFERENCE_FILE):
        Reference.from_bytes(b"not a safetensors file")


def test_summary_line_names_the_counts():
    from xray_core.monitor.ood import FlagRule

    assert ood_line(37, 93) == "37 of 93 films look unlike this model's training data"
    assert ood_line(22, 42, 2.06, FlagRule()) == ("22 of 42 films look unlike this model's training data "
                                                  "(conformal p <= 0.05; 2.1 expected by chance)")


def test_p_values_are_the_conformal_rank_among_the_calibration_scores():
    """(1 + calibration scores >= s) / (n + 1), by hand for n = 4; ties count as at least."""
    ref, _ = make_reference()
    ref = Reference(**{**ref.__dict__, "cal_scores": np.array([1.0, 2.0, 3.0, 4.0])})
    got = ref.p_values(np.array([0.5, 1.0, 2.5, 4.0, 9.0]))
    np.testing.assert_allclose(got, [5 / 5, 5 / 5, 3 / 5, 2 / 5, 1 / 5])
    assert ref.p_value_rate(0.05) == 0.0  # with 4 films no p-value is at most 0.05: 1/5 is the smallest
    assert ref.p_value_rate(0.4) == 2 / 5


def test_p_values_are_about_uniform_in_distribution_and_small_for_shifted_films():
    ref, rng = make_reference()
    fresh = ref.p_values(ref.scores(features(rng, 600)))
    assert 0.02 <= np.mean(fresh <= 0.05) <= 0.09  # valid at the 5% level (within sampling noise)
    shifted = ref.p_values(ref.scores(features(rng, 50, shift=0.3)))
    assert np.mean(shifted <= 0.05) > 0.5


def test_reference_is_saved_verified_and_optional(settings):
    ref, _ = make_reference()
    v = save_model(settings, state_dict=make_state(), card=make_card(), train_image_ids=[], val_image_ids=[],
                   extra_files={REFERENCE_FILE: ref.to_bytes()})
    model = load_model(settings, v)
    assert len(model.card["files"][REFERENCE_FILE]) == 64
    assert model_reference(model).threshold == ref.threshold
    old = save_model(settings, state_dict=make_state(), card=make_card(),
                     train_image_ids=[], val_image_ids=[])
    assert model_reference(load_model(settings, old)) is None  # older models: OOD "unknown"
    path = settings.models_dir / str(v) / REFERENCE_FILE
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="reference.safetensors sha256"):
        load_model(settings, v)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(settings, v)


def test_card_files_must_name_safetensors_with_hashes(settings):
    with pytest.raises(CheckpointError, match="files must map"):
        save_model(settings, state_dict=make_state(), card=make_card(files={"../x": "0" * 64}),
                   train_image_ids=[], val_image_ids=[])


def films(rng: np.random.Generator, n: int, views: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(training views (n, views, d), eval view (n, d)): the views are the eval view slightly jittered."""
    x_eval = features(rng, n)
    return x_eval[:, None, :] + 0.02 * rng.normal(size=(n, views, DIM)).astype(np.float32), x_eval


def test_conformal_threshold_is_the_finite_sample_rank():
    scores = np.arange(1.0, 200.0)  # 199 scores
    assert conformal_threshold(scores, 0.99) == (198.0, 198)  # ceil(200 * 0.99)
    assert conformal_threshold(scores[:9], 0.9) == (9.0, 9)  # ceil(10 * 0.9): the largest
    assert conformal_threshold(scores[:50], 0.99) == (50.0, 50)  # rank past n: the largest, never inf
    assert conformal_threshold(np.zeros(0), 0.99)[0] == float("inf")


def test_training_films_are_scored_by_a_basis_fitted_without_their_own_fold():
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(1)
    views, x_eval = films(rng, 60)
    groups = np.array([f"p{i // 2}" for i in range(60)])
    views[:2] += 3.0  # one patient (both films) far from everyone else
    x_eval[:2] += 3.0
    got = crossfit_scores(views, x_eval, groups, folds=5, max_components=8)
    for fit, held in GroupKFold(n_splits=5).split(x_eval, groups=groups):
        assert not set(groups[held]) & set(groups[fit])
        expected = fit_basis(views[fit].reshape(-1, DIM), max_components=8).scores(x_eval[held])
        np.testing.assert_allclose(got[held], expected)
    in_sample = fit_basis(views.reshape(-1, DIM), max_components=8).scores(x_eval[:2])
    assert np.all(got[:2] > 10 * in_sample)  # held out, the odd patient looks odd; seen, it would not


def test_in_distribution_films_are_flagged_at_about_the_nominal_rate_and_shifted_ones_all():
    rng = np.random.default_rng(2)
    views, x_eval = films(rng, 400)
    x_val = features(rng, 100)
    ref = build_reference(views, x_val, np.arange(100).astype(str), rng.dirichlet([1, 1], size=100),
                          rng.integers(0, 2, 100), mean=views.reshape(-1, DIM).mean(0),
                          std=views.reshape(-1, DIM).std(0), quantile=0.95, train_eval=x_eval,
                          train_groups=np.arange(400).astype(str))
    assert ref.calibration["n"] == 500 and ref.calibration["n_train_crossfit"] == 400
    assert ref.calibration["n_val"] == 100 and ref.describe()["ood_calibration"]["folds"] == 5
    fresh = ref.scores(features(rng, 2000))
    assert 0.02 <= np.mean(fresh > ref.threshold) <= 0.09  # nominal 5%
    shifted = features(rng, 200)
    shifted[:, :DIM // 2] += 1.0
    assert np.mean(ref.scores(shifted) > ref.threshold) >= 0.99
    back = Reference.from_bytes(ref.to_bytes())
    np.testing.assert_allclose(back.scores(shifted[:10]), ref.scores(shifted[:10]))
    assert back.calibration == ref.calibration and len(back.calibration_scores) == 500


def test_a_format_1_reference_still_loads_and_scores_as_before():
    """Bytes laid out as models saved before the cross-fitted scorer wrote them (format 1)."""
    from safetensors.numpy import save

    rng = np.random.default_rng(3)
    x_train = features(rng, 200).astype(np.float64)
    mean, std = x_train.mean(0), x_train.std(0)
    z = (x_train - mean) / std
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    components, variance = vt[:3], (((z - z.mean(0)) @ vt[:3].T) ** 2).mean(0)
    old = {"mean": mean, "std": std, "pca_mean": z.mean(0), "components": components, "variance": variance,
           "residual_scale": np.array([0.5]), "sample": z[:20].astype(np.float16),
           "sample_groups": np.arange(20, dtype=np.int64), "val_probs": np.full((20, 2), 0.5, np.float32),
           "val_labels": np.zeros(20, np.int64), "val_scores": np.linspace(0.5, 2.0, 20),
           "threshold": np.array([1.9]), "quantile": np.array([0.95])}
    ref = Reference.from_bytes(save(old, metadata={"format": "xray-reference/1"}))
    x = features(rng, 5)
    zx = (x - mean) / std
    t = (zx - z.mean(0)) @ components.T
    expected = (t**2 / variance).sum(1) / 3 + ((zx - z.mean(0) - t @ components) ** 2).sum(1) / 0.5
    np.testing.assert_allclose(ref.scores(x), expected)
    assert ref.basis is None and ref.threshold == 1.9 and ref.quantile == 0.95
    np.testing.assert_array_equal(ref.calibration_scores, old["val_scores"])
    assert ref.describe()["ood_calibration"] == {"method": "quantile of the validation scores", "n": 20}
    assert Reference.from_bytes(ref.to_bytes()).basis is None  # rewritten, it stays format 1
