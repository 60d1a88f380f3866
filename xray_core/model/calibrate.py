"""Temperature scaling: one positive number T that divides the head's logits so that its
probabilities mean what they say (Guo et al. 2017).

Why a single temperature: with tens of validation images, anything richer (Platt per class, isotonic)
overfits; one parameter cannot. Dividing every logit by the same T > 0 keeps each image's argmax and,
with two classes, the order of images by the positive class's probability, so the binary AUROC and
ranking are unchanged: only the confidence moves. (With three or more classes a one-vs-rest
probability can reorder slightly, since it depends on all logits; the argmax never changes.) T is fitted on
validation (never training, where the head is over-confident by construction) by minimising the negative
log-likelihood with ``scipy.optimize``, and stored in the head (:class:`xray_core.model.train.Head`) so
prediction, Grad-CAM and evaluation all apply it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# log T is searched in [log 0.25, log 20]. A validation set the head separates perfectly asks for
# T -> 0 (certainty); with tens of images that is overfitting, not evidence, and sharpening further
# pushes probabilities to exactly 0 or 1, where confident images tie and the ranking is lost. At the
# other end T -> inf means the validation set carries no signal.
LOG_T_BOUNDS = (math.log(0.25), math.log(20.0))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood (nats per image) of ``y`` under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(-log_softmax(z, axis=1)[np.arange(len(y)), np.asarray(y)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation NLL; 1.0 (no change) when there is nothing to fit.

    ``logits`` (n, classes) are the head's outputs at temperature 1 on the validation images,
    ``y`` their class indices. Bounded scalar search on log T: deterministic, no random start.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if logits.ndim != 2 or y.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (n, classes) and y (n,): got {logits.shape} and {y.shape}")
    if len(y) == 0 or not np.all(np.isfinite(logits)):
        return 1.0
    result = minimize_scalar(lambda log_t: nll(logits, y, math.exp(log_t)), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-6})
    t = math.exp(float(result.x))
    # never worse than leaving the head as it is
    return t if nll(logits, y, t) <= nll(logits, y, 1.0) else 1.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (n, classes), float64, of logits divided by ``temperature``."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


__all__ = ["LOG_T_BOUNDS", "fit_temperature", "nll", "softmax"]
