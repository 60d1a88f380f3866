"""Temperature scaling: fitted on validation logits, never changes the ranking, stored with the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xray_core.model.calibrate import LOG_T_BOUNDS, fit_temperature, nll, softmax
from xray_core.model.train import build_head, load_head, predict_proba


def overconfident_logits(n: int = 200, seed: int = 0, scale: float = 4.0):
    """Logits of a model that is right ~75% of the time but speaks as if it were always right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    margin = np.where(rng.random(n) < 0.75, 1.0, -1.0) * rng.uniform(0.5, 1.5, n)
    z = np.where(y == 1, margin, -margin) * scale
    return np.c_[-z / 2, z / 2], y


def test_overconfident_logits_get_a_temperature_above_one_and_a_lower_nll():
    logits, y = overconfident_logits()
    t = fit_temperature(logits, y)
    assert t > 1.5
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    # the optimum: a small step either way does not improve the NLL
    assert nll(logits, y, t) <= min(nll(logits, y, t * 1.01), nll(logits, y, t / 1.01)) + 1e-12


def test_temperature_leaves_the_ranking_unchanged():
    logits, y = overconfident_logits(seed=3)
    t = fit_temperature(logits, y)
    before, after = softmax(logits), softmax(logits, t)
    assert np.array_equal(np.argsort(before[:, 1], kind="stable"), np.argsort(after[:, 1], kind="stable"))
    assert np.array_equal(before.argmax(1), after.argmax(1))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_temperature_in_the_head_keeps_ranking_and_argmax(n_classes):
    head = build_head(8, n_classes, hidden=(), dropout=0.0)
    x = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    before = predict_proba(head, x)
    head.set_temperature(3.0)
    after = predict_proba(head, x)
    assert np.array_equal(before.argmax(1), after.argmax(1))
    if n_classes == 2:  # the positive class's ranking, hence the AUROC, is unchanged
        assert np.array_equal(np.argsort(before[:, 1], kind="stable"), np.argsort(after[:, 1], kind="stable"))
    assert after.max(1).mean() < before.max(1).mean()  # less confident
    reloaded = load_head(head.state_dict(), 8, n_classes, hidden=(), dropout=0.0)
    assert float(reloaded.temperature) == 3.0
    assert np.array_equal(predict_proba(reloaded, x), after)


def test_temperature_is_bounded_and_never_worse_than_one():
    y = np.array([0, 1, 0, 1])
    separable = np.c_[np.zeros(4), np.array([-1.0, 1.0, -1.0, 1.0])]
    t = fit_temperature(separable, y)
    assert t == pytest.approx(np.exp(LOG_T_BOUNDS[0]), rel=1e-3)  # sharpen as far as allowed
    assert fit_temperature(np.zeros((0, 2)), np.zeros(0, int)) == 1.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_refused(bad):
    head = build_head(4, 2, hidden=(), dropout=0.0)
    with pytest.raises(ValueError, match="positive finite"):
        head.set_temperature(bad)
    assert torch.equal(head.temperature, torch.ones(()))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"\(n, classes\)"):
        fit_temperature(np.zeros((3, 2)), np.zeros(4, int))


def test_confident_images_keep_their_order():
    """Logit gaps of 20, 25 and 30 round to exactly 1.0 in a float32 softmax; the float64 one keeps
    them ordered, so a sharp temperature cannot turn a ranking into ties."""
    head = build_head(1, 2, hidden=(), dropout=0.0)
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[-0.5], [0.5]]))
        head[0].bias.zero_()
    p = predict_proba(head, np.array([[20.0], [25.0], [30.0]], dtype=np.float32))[:, 1]
    assert p[0] < p[1] < p[2] < 1.0
