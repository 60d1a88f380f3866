"""Model behaviour of the head trained on cached features: learns, early-stops, is seeded and local.

No backbone here: features are synthetic (n, views, D) arrays, so every test runs in well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xray_core.errors import NotEnoughDataError
from xray_core.model.recipes import candidate_recipes, fit_linear, fit_recipe, select_recipe
from xray_core.model.train import (
    HEAD_BUFFERS,
    HeadConfig,
    TrainingDivergedError,
    build_head,
    class_weights,
    evaluate_loss,
    fit_normaliser,
    load_head,
    predict_proba,
    train_head,
)

D = 16  # feature width: small stands in for densenet161's 2208


def features(n: int, *, n_classes: int = 2, views: int = 2, separation: float = 3.0, seed: int = 0,
             counts: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, views, D) float32 features whose class means are ``separation`` apart on one axis each."""
    rng = np.random.default_rng(seed)
    if counts is None:
        y = np.arange(n) % n_classes
    else:
        y = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(y)
    means = np.eye(n_classes, D) * separation
    x = means[y][:, None, :] + rng.normal(0.0, 1.0, (len(y), views, D))
    return x.astype(np.float32), y.astype(np.int64)


def config(**changes) -> HeadConfig:
    # schedule="none": what HeadConfig's own default was before it took XRAY_LR_SCHEDULE's (cosine)
    base = dict(hidden=(32,), dropout=0.1, epochs=15, batch_size=8, learning_rate=3e-3, patience=50, seed=0,
                schedule="none")
    base.update(changes)
    return HeadConfig(**base)


def weighted_val_loss(result, train_y, val_x, val_y, n_classes, cfg) -> float:
    head = load_head(result.state_dict, val_x.shape[-1], n_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_y, n_classes))
    return evaluate_loss(head, torch.as_tensor(val_x), torch.as_tensor(val_y), loss_fn=loss_fn)


def test_loss_goes_down_on_separable_features():
    xt, yt = features(64)
    xv, yv = features(32, seed=1)
    result = train_head(xt, yt, xv[:, 0], yv, 2, config())
    train_losses = [h["train_loss"] for h in result.history]
    val_losses = [h["val_loss"] for h in result.history]
    assert result.epochs_run == 15 and len(result.history) == 15
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert val_losses[-1] < 0.5 * val_losses[0]
    assert min(train_losses[-3:]) < 0.1
    # and it actually separates the classes
    head = load_head(result.state_dict, D, 2, hidden=(32,), dropout=0.1)
    assert (predict_proba(head, xv[:, 0]).argmax(1) == yv).mean() >= 0.9


def test_early_stopping_keeps_the_best_epochs_weights():
    # Weak signal, imbalanced classes, a wide head: val loss falls, then rises as the head overfits.
    xt, yt = features(0, separation=1.0, counts=[28, 12])
    xv, yv = features(0, separation=1.0, counts=[20, 20], seed=1)
    cfg = config(hidden=(64,), dropout=0.0, epochs=80, patience=3)
    result = train_head(xt, yt, xv[:, 0], yv, 2, cfg)
    val_losses = [h["val_loss"] for h in result.history]
    assert result.epochs_run < cfg.epochs, "early stopping never triggered; the test data no longer overfit"
    assert result.epochs_run == result.best_epoch + cfg.patience
    assert val_losses[-1] > min(val_losses)  # the last epoch's weights are not the best ones
    assert val_losses[result.best_epoch - 1] == min(val_losses)
    # The returned weights, re-scored with the class-weighted loss, give exactly the best val loss.
    assert (weighted_val_loss(result, yt, xv[:, 0], yv, 2, cfg)
            == pytest.approx(min(val_losses), rel=1e-6, abs=1e-7))


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not():
    xt, yt = features(48)
    xv, yv = features(16, seed=1)
    a = train_head(xt, yt, xv[:, 0], yv, 2, config(epochs=6))
    torch.rand(100)  # moving the global RNG in between must not matter
    b = train_head(xt, yt, xv[:, 0], yv, 2, config(epochs=6))
    c = train_head(xt, yt, xv[:, 0], yv, 2, config(epochs=6, seed=1))
    assert a.state_dict.keys() == b.state_dict.keys() == c.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    assert a.history == b.history
    assert any(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)


def test_global_rng_state_is_unchanged(monkeypatch: pytest.MonkeyPatch):
    xt, yt = features(32)
    xv, yv = features(8, seed=1)
    # torch.manual_seed would also reseed every CUDA device's global generator (lazily on a
    # machine without CUDA), which fork_rng(devices=[]) does not restore: it must not be used.
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    torch.manual_seed(1234)
    reseeded.clear()
    np_state = np.random.get_state()[1].copy()
    before = torch.get_rng_state()
    expected_next = torch.rand(5)
    torch.set_rng_state(before)
    train_head(xt, yt, xv[:, 0], yv, 2, config(epochs=3, dropout=0.5))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(5), expected_next)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert reseeded == [], "train_head reseeded the global CUDA generators"


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_two_three_and_four_classes(n_classes: int):
    xt, yt = features(16 * n_classes, n_classes=n_classes, separation=5.0)
    xv, yv = features(6 * n_classes, n_classes=n_classes, separation=5.0, seed=1)
    cfg = config(epochs=10)
    result = train_head(xt, yt, xv[:, 0], yv, n_classes, cfg)
    assert result.state_dict["3.weight"].shape == (n_classes, 32)
    assert result.state_dict["3.bias"].shape == (n_classes,)
    head = load_head(result.state_dict, D, n_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    probs = predict_proba(head, xv[:, 0])
    assert probs.shape == (len(yv), n_classes)
    assert np.allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == yv).mean() >= 0.8


def test_build_head_is_the_tutorials_head_and_a_linear_head_on_request():
    head = build_head(2208, 2, hidden=(512,), dropout=0.2)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (2208, 512, 2)
    assert head[2].p == 0.2
    linear = build_head(8, 3, hidden=(), dropout=0.5)
    assert len(linear) == 1 and linear(torch.zeros(4, 8)).shape == (4, 3)


def test_class_weights_are_inverse_frequency():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights(y, 3)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)]))
    # balanced classes weigh 1; a class absent from training weighs 0 (and does not divide by 0)
    assert torch.equal(class_weights(np.array([0, 1, 0, 1]), 2), torch.tensor([1.0, 1.0]))
    assert torch.allclose(class_weights(np.array([0, 0, 2, 2]), 3), torch.tensor([4 / 6, 0.0, 4 / 6]))


def test_refuses_empty_splits_one_class_and_divergence():
    xt, yt = features(16)
    xv, yv = features(8, seed=1)
    with pytest.raises(NotEnoughDataError, match="no training images"):
        train_head(xt[:0], yt[:0], xv[:, 0], yv, 2, config())
    with pytest.raises(NotEnoughDataError, match="val split is empty"):
        train_head(xt, yt, xv[:0, 0], yv[:0], 2, config())
    with pytest.raises(NotEnoughDataError, match="at least 2 classes"):
        train_head(xt, np.zeros_like(yt), xv[:, 0], np.zeros_like(yv), 1, config())
    bad = xt.copy()
    bad[0, :, 0] = np.inf  # one non-finite feature poisons every weight after the first step
    with pytest.raises(TrainingDivergedError, match="not finite"):
        train_head(bad, yt, xv[:, 0], yv, 2, config(epochs=3, patience=2))


# --------------------------------------------------------------------------------------------------
# the standardisation travels with the head


def test_normaliser_is_fitted_on_training_rows_only():
    """The stored mean/std are those of the training features (every view), whatever validation holds:
    shifting the validation features by 100 changes nothing in the normaliser."""
    xt, yt = features(40, views=3)
    xt = xt * 0.07 + 0.43  # the narrow band random-init densenet161 features live in
    xv, yv = features(20, seed=1)
    a = train_head(xt, yt, xv[:, 0], yv, 2, config(epochs=2))
    b = train_head(xt, yt, xv[:, 0] + 100.0, yv, 2, config(epochs=2))
    rows = xt.reshape(-1, D).astype(np.float64)
    assert torch.allclose(a.state_dict["feature_mean"], torch.tensor(rows.mean(0), dtype=torch.float32))
    assert torch.allclose(a.state_dict["feature_std"], torch.tensor(rows.std(0), dtype=torch.float32))
    assert torch.equal(a.state_dict["feature_mean"], b.state_dict["feature_mean"])
    assert torch.equal(a.state_dict["feature_std"], b.state_dict["feature_std"])


def test_constant_dimension_is_left_unscaled():
    x = np.ones((5, 2, 3), dtype=np.float32)
    x[:, :, 0] = np.arange(10, dtype=np.float32).reshape(5, 2)
    mean, std = fit_normaliser(x)
    assert std[1] == std[2] == 1.0 and mean[1] == 1.0
    assert std[0] == pytest.approx(np.arange(10).std())


def test_standardised_head_learns_narrow_band_features():
    """Features squeezed into a band 0.07 wide (as random-init densenet161 gives) are still learned."""
    xt, yt = features(64, separation=3.0)
    xv, yv = features(32, seed=1, separation=3.0)
    squeeze = lambda x: x * 0.01 + 0.43
    cfg = config(epochs=20)
    result = train_head(squeeze(xt), yt, squeeze(xv[:, 0]), yv, 2, cfg)
    head = load_head(result.state_dict, D, 2, hidden=cfg.hidden, dropout=cfg.dropout)
    assert (predict_proba(head, squeeze(xv[:, 0])).argmax(1) == yv).mean() >= 0.9


def test_old_checkpoint_without_normaliser_or_temperature_predicts_as_before():
    """A state dict from the plain nn.Sequential head of earlier versions loads with the identity
    transform and reproduces that head's probabilities bit for bit."""
    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)).eval()
    state = {k: v.clone() for k, v in old.state_dict().items()}
    assert not set(state) & set(HEAD_BUFFERS)
    loaded = load_head(state, D, 2, hidden=(8,), dropout=0.1)
    x = np.random.default_rng(0).normal(size=(10, D)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(old(torch.as_tensor(x)).double(), dim=1).numpy()
    assert np.array_equal(predict_proba(loaded, x), expected)
    assert float(loaded.temperature) == 1.0


def test_unknown_checkpoint_keys_still_fail():
    head = build_head(D, 2, hidden=(), dropout=0.0)
    state = {**head.state_dict(), "stray": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="stray"):
        load_head(state, D, 2, hidden=(), dropout=0.0)


def test_cosine_schedule_anneals_and_unknown_schedule_lists_allowed():
    xt, yt = features(32)
    xv, yv = features(16, seed=1)
    result = train_head(xt, yt, xv[:, 0], yv, 2, config(epochs=4, schedule="cosine"))
    assert result.epochs_run == 4
    with pytest.raises(ValueError, match="none, cosine"):
        train_head(xt, yt, xv[:, 0], yv, 2, config(schedule="step"))


# --------------------------------------------------------------------------------------------------
# recipe selection


def _grouped(n: int, seed: int, **kw):
    x, y = features(n, seed=seed, **kw)
    return x, y, np.array([f"p{seed}-{i // 2}" for i in range(n)], dtype=object)  # 2 images per patient


@pytest.mark.parametrize("min_val", [0, 1000])  # choose on validation / by grouped k-fold
def test_recipe_selection_is_deterministic(min_val):
    xt, yt, gt = _grouped(48, 0, views=2)
    xv, yv, gv = _grouped(24, 1, views=1)
    cands = candidate_recipes(config(epochs=4, schedule="cosine"), l2_grid=(0.01, 1.0))
    assert [r.name for r in cands] == ["linear-l2-C=0.01", "linear-l2-C=1", "mlp-32-cosine"]
    runs = [select_recipe(cands, xt, yt, gt, xt[:, 0], xv[:, 0], yv, gv, 2, folds=3,
                          min_val_per_class=min_val, seed=0) for _ in range(2)]
    assert runs[0].recipe == runs[1].recipe and runs[0].scores == runs[1].scores
    assert runs[0].method == ("validation" if min_val == 0 else "grouped k-fold")
    assert runs[0].recipe.name in runs[0].reason and len(runs[0].scores) == 3
    heads = [fit_recipe(runs[0].recipe, xt, yt, xv[:, 0], yv, 2)[0] for _ in range(2)]
    for key, value in heads[0].state_dict().items():
        assert torch.equal(value, heads[1].state_dict()[key]), key


def test_linear_recipe_equals_logistic_regression_probabilities():
    from sklearn.linear_model import LogisticRegression

    xt, yt = features(40, views=1)
    head = fit_linear(xt, yt, 2, c=0.1)
    mean, std = fit_normaliser(xt)
    lr = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit((xt[:, 0] - mean) / std, yt)
    xv, _ = features(10, seed=2)
    expected = lr.predict_proba((xv[:, 0] - mean) / std)
    assert np.allclose(predict_proba(head, xv[:, 0]), expected, atol=1e-5)


def test_unknown_recipe_lists_allowed():
    with pytest.raises(ValueError, match="auto, linear, mlp"):
        candidate_recipes(config(), choice="forest")


def test_kfold_choice_refits_on_train_and_val_with_the_temperature_from_out_of_fold_predictions():
    from xray_core.model.calibrate import fit_temperature, softmax
    from xray_core.model.recipes import fit_calibrated, score

    xt, yt, gt = _grouped(48, 0, views=2)
    xv, yv, gv = _grouped(12, 1, views=1)
    cands = candidate_recipes(config(), choice="linear", l2_grid=(0.01, 1.0))
    sel = select_recipe(cands, xt, yt, gt, xt[:, 0], xv[:, 0], yv, gv, 2, folds=3,
                        min_val_per_class=1000, seed=0)
    assert sel.method == "grouped k-fold"
    # the winner's out-of-fold logits cover train then val, and are what its score was computed from
    assert sel.oof_logits.shape == (60, 2) and np.array_equal(sel.oof_y, np.r_[yt, yv])
    winner = next(s for s in sel.scores if s["name"] == sel.recipe.name)
    assert score(sel.oof_y, softmax(sel.oof_logits), 2) == {k: winner[k] for k in ("auroc", "log_loss")}

    fitted = fit_calibrated(sel, xt, yt, xv[:, 0], yv, 2)
    assert (fitted.fitted_on, fitted.calibrated_on) == ("train+val", "out-of-fold")
    assert fitted.temperature == fit_temperature(sel.oof_logits, sel.oof_y)
    assert float(fitted.head.temperature) == pytest.approx(fitted.temperature)
    # validation rows were fitted on: the normaliser is train+val's (val's eval view repeated per view)
    # (a linear winner trains on column 0, the eval view)
    pooled = np.concatenate([xt, np.repeat(xv[:, :1], 2, axis=1)])
    assert np.array_equal(fitted.head.feature_mean.numpy(), fit_normaliser(pooled[:, :1])[0])
    assert not np.array_equal(fitted.head.feature_mean.numpy(), fit_normaliser(xt[:, :1])[0])
    again = fit_calibrated(sel, xt, yt, xv[:, 0], yv, 2)
    for key, value in fitted.head.state_dict().items():
        assert torch.equal(value, again.head.state_dict()[key]), key


def test_validation_choice_refits_on_train_and_calibrates_on_validation():
    from xray_core.model.calibrate import fit_temperature
    from xray_core.model.recipes import fit_calibrated
    from xray_core.model.train import predict_logits

    xt, yt, gt = _grouped(48, 0, views=2)
    xv, yv, gv = _grouped(24, 1, views=1)
    cands = candidate_recipes(config(), choice="linear", l2_grid=(0.01, 1.0))
    sel = select_recipe(cands, xt, yt, gt, xt[:, 0], xv[:, 0], yv, gv, 2, folds=3,
                        min_val_per_class=0, seed=0)
    assert sel.method == "validation" and sel.oof_logits is None
    fitted = fit_calibrated(sel, xt, yt, xv[:, 0], yv, 2)
    assert (fitted.fitted_on, fitted.calibrated_on) == ("train", "validation")
    assert np.array_equal(fitted.head.feature_mean.numpy(), fit_normaliser(xt[:, :1])[0])
    uncalibrated = fit_linear(xt[:, :1], yt, 2, sel.recipe.c)
    logits = predict_logits(uncalibrated, xv[:, 0])
    assert np.array_equal(fitted.held_logits, logits) and np.array_equal(fitted.held_y, yv)
    assert fitted.temperature == fit_temperature(logits, yv)


def test_an_early_stopping_mlp_is_not_refitted_on_the_validation_it_stops_on():
    from xray_core.model.recipes import Selection, fit_calibrated

    xt, yt, _ = _grouped(48, 0, views=2)
    xv, yv, _ = _grouped(12, 1, views=1)
    (mlp,) = candidate_recipes(config(epochs=3, schedule="none"), choice="mlp")
    assert mlp.config.keep_best
    chosen = Selection(mlp, "grouped k-fold", "k-fold", [], oof_logits=np.zeros((60, 2)), oof_y=np.r_[yt, yv])
    fitted = fit_calibrated(chosen, xt, yt, xv[:, 0], yv, 2)
    assert (fitted.fitted_on, fitted.calibrated_on) == ("train", "validation")
    assert np.array_equal(fitted.held_y, yv)


def test_linear_recipes_train_on_the_eval_view_and_the_mlp_on_every_view():
    xt, yt = features(40, views=3)
    xt[:, 1:] += 5.0  # augmented views shifted away from the eval view (column 0)
    linear, mlp = candidate_recipes(config(epochs=2, schedule="cosine"), l2_grid=(0.1,))
    assert (linear.views, mlp.views) == ("eval", "all")
    head, _ = fit_recipe(linear, xt, yt, xt[:5, 0], yt[:5], 2)
    expected = fit_linear(xt[:, :1], yt, 2, 0.1)
    for key, value in head.state_dict().items():
        assert torch.equal(value, expected.state_dict()[key]), key
    assert np.array_equal(head.feature_mean.numpy(), fit_normaliser(xt[:, :1])[0])
    head, _ = fit_recipe(mlp, xt, yt, xt[:5, 0], yt[:5], 2)
    assert np.array_equal(head.feature_mean.numpy(), fit_normaliser(xt)[0])


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_fit_threads_sets_torch_and_blas_counts_inside_and_restores_them():
    """XRAY_TRAIN_THREADS: the train step runs on its torch and BLAS counts (each may be its own, as a card
    records them; 0 leaves one alone); both come back after, an exception included."""
    import scipy.linalg  # noqa: F401 - both BLAS libraries loaded, as fit_threads loads them
    from threadpoolctl import threadpool_limits

    from xray_core.model.train import fit_threads, training_environment

    with threadpool_limits(limits=2, user_api="blas"):  # this process's own counts: 3 torch, 2 BLAS
        torch_before = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            with fit_threads(1):
                assert torch.get_num_threads() == 1 and set(_blas_threads()) == {1}
                environment = training_environment()
                assert environment["torch_threads"] == 1 and environment["blas_threads"] == 1
            assert torch.get_num_threads() == 3 and set(_blas_threads()) == {2}
            with fit_threads(2, 1):
                assert torch.get_num_threads() == 2 and set(_blas_threads()) == {1}
            with fit_threads(0, 0):  # a card without counts: this machine's own
                assert torch.get_num_threads() == 3 and set(_blas_threads()) == {2}
            with pytest.raises(RuntimeError, match="in the fit"), fit_threads(1):
                raise RuntimeError("in the fit")
            assert torch.get_num_threads() == 3 and set(_blas_threads()) == {2}
        finally:
            torch.set_num_threads(torch_before)
