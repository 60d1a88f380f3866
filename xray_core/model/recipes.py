"""Which head to train: a few recipes compared on held-out patients, the best one refitted.

Why compare at all: on random-init densenet161 features (the only backbone offline) a plain
L2-regularised logistic regression on standardised features beat the tutorial's MLP, while on
ImageNet features the MLP may win; the data should decide, not a default. The candidates are

* ``linear-l2-C=<c>``: a linear head fitted as scikit-learn's ``LogisticRegression`` (L-BFGS, L2,
  balanced class weights) on the standardised *eval view* of the training images, one per inverse
  strength ``c``. Why not the augmented views: the backbone is frozen, so an augmented view is only a
  shifted input distribution the head is never scored on, and a linear model on fixed features cannot
  learn an invariance from it. This is the usual linear-probe protocol (features of the un-augmented
  image). Measured on the 224 px sample (bench/head_quality.py's outer folds, linear grid, the same
  fitting otherwise): mean per-fold AUROC 0.969 trained on views 1..4, 0.978 on views 0..4, 0.981 on
  the eval view alone (within noise of 0.978, and 5x fewer rows to fit);
* ``mlp-<widths>-<schedule>``: the tutorial's MLP (2208→512→classes, dropout) trained by
  :func:`xray_core.model.train.train_head` on the eval view and the augmented views (as the tutorial
  trains on augmented images), by default with a cosine learning-rate schedule run to the end (no
  early stopping, so validation is not used twice).

Training features arrive as (n, views, D) with the eval view (view 0) in column 0 and the augmented
views after it; each recipe takes the columns its ``views`` names.

Selection is by macro one-vs-rest AUROC on held-out patients (ties: lower log loss, then the earlier,
simpler candidate). When validation has fewer than ``min_val_per_class`` images of some class its
AUROC cannot tell recipes apart, so the candidates are scored by patient-grouped stratified k-fold
inside train+val instead (``StratifiedGroupKFold``).

What happens after the choice (:func:`fit_calibrated`) depends on how it was made:

* chosen on validation (or the only candidate): the winner is refitted on the training split, and
  the temperature and threshold are fitted on validation, which stayed held out;
* chosen by grouped k-fold: every image of train+val already has a held-out prediction from the
  k-fold fits (out-of-fold, OOF). The temperature and threshold are fitted on those OOF predictions
  of the winner, and the winner is refitted on train+val. Why: validation is small by definition
  here (that is why k-fold ran). A temperature fitted on ~20 validation films is noisy: on the 64 px
  sample it ranged 0.25-4.8 between folds, so models of different runs put the same evidence at
  different probabilities, and a threshold chosen on ~20 films is noisier still. The OOF predictions
  cover all of train+val (5x the films) at no extra fitting cost. Once validation is not needed to
  fit the temperature, holding it out of the final fit only throws away a fifth of the labelled
  patients. This is scikit-learn's ``CalibratedClassifierCV(ensemble=False)`` scheme: the OOF
  logits come from models fitted on (k-1)/k of train+val rather than from the refit itself, a
  mismatch that is small next to the noise of a 20-film temperature. A recipe that early-stops on
  validation (the MLP with ``keep_best``) cannot be refitted on it, so it keeps the first route.

Everything is seeded: the fold assignment, each MLP fit, and L-BFGS (deterministic) give the same
choice and the same weights on every CPU run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from xray_core.errors import NotEnoughDataError
from xray_core.model.calibrate import fit_temperature, softmax
from xray_core.model.train import (
    Head,
    HeadConfig,
    build_head,
    fit_normaliser,
    load_head,
    predict_logits,
    predict_proba,
    train_head,
)

HEAD_RECIPES = ("auto", "linear", "mlp")


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # "linear" | "mlp"
    c: float | None = None  # linear: inverse L2 strength (scikit-learn's C; larger = weaker penalty)
    config: HeadConfig | None = None  # mlp: how train_head trains it
    views: str = "all"  # training columns: "eval" (column 0, the eval view) | "all" (eval + augmented views)

    @property
    def mlp(self) -> HeadConfig:
        """``config``, which an MLP recipe always has."""
        if self.config is None:
            raise ValueError(f"recipe {self.name!r} ({self.kind}) has no MLP config")
        return self.config

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "views": self.views}
        if self.c is not None:
            out["c"] = self.c
        if self.config is not None:
            out["config"] = {k: list(v) if isinstance(v, tuple) else v
                             for k, v in asdict(self.config).items()}
        return out


@dataclass
class Selection:
    recipe: Recipe
    method: str  # "only candidate" | "validation" | "grouped k-fold"
    reason: str  # one sentence for the card and the report
    scores: list[dict[str, Any]] = field(default_factory=list)  # per candidate: name, auroc, log_loss
    # grouped k-fold only: the winner's out-of-fold logits (temperature 1) for every train+val image,
    # train images first, and their labels; what fit_calibrated fits the temperature on
    oof_logits: np.ndarray | None = None
    oof_y: np.ndarray | None = None


def candidate_recipes(config: HeadConfig, *, choice: str = "auto",
                      l2_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)) -> list[Recipe]:
    """The recipes to compare: ``choice`` "linear" (the L2 grid), "mlp" (one MLP) or "auto" (both)."""
    if choice not in HEAD_RECIPES:
        raise ValueError(f"Invalid head recipe {choice!r}. Only {', '.join(HEAD_RECIPES)} are supported.")
    if not l2_grid or any(not c > 0 for c in l2_grid):
        raise ValueError(f"the L2 grid must hold positive inverse strengths (C), got {list(l2_grid)}")
    linear = [Recipe(f"linear-l2-C={c:g}", "linear", c=float(c), views="eval") for c in l2_grid]
    hidden = config.hidden or (512,)
    mlp_config = replace(config, hidden=hidden, keep_best=config.schedule != "cosine")
    mlp = [Recipe(f"mlp-{'-'.join(map(str, hidden))}-{config.schedule}", "mlp", config=mlp_config)]
    return {"auto": linear + mlp, "linear": linear, "mlp": mlp}[choice]


def fit_linear(train_x: np.ndarray, train_y: np.ndarray, n_classes: int, c: float) -> Head:
    """Logistic regression (L-BFGS, L2 with inverse strength ``c``, balanced class weights) on the
    standardised training views, copied into a linear :class:`Head` with the normaliser."""
    present = np.unique(train_y)
    if present.size != n_classes:
        raise NotEnoughDataError(f"a linear head needs training images of all {n_classes} classes, "
                                 f"got {present.size}")
    mean, std = fit_normaliser(train_x)
    views = train_x.shape[1] if train_x.ndim == 3 else 1
    # one float64 copy of the rows, standardised in place (not three: 70,000 films are 1.2 GB each). It
    # stays: L-BFGS here fits float64 rows (scikit-learn would copy float32 ones to float64 itself), and
    # these values, converted straight from float16 or float32 features, are the ones it always fitted
    rows = np.array(train_x, dtype=np.float64).reshape(-1, train_x.shape[-1])
    rows -= mean
    rows /= std
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit(rows, np.repeat(train_y, views))
    coef, bias = model.coef_, model.intercept_
    if n_classes == 2:  # one logit z for class 1: softmax([-z/2, z/2]) = sigmoid(z)
        coef, bias = np.r_[-coef / 2, coef / 2], np.r_[-bias / 2, bias / 2]
    head = build_head(train_x.shape[-1], n_classes, hidden=(), dropout=0.0)
    linear = cast(nn.Linear, head[0])
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        head.set_normaliser(mean, std)
    return head.eval()


def fit_recipe(recipe: Recipe, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
               n_classes: int, progress=None) -> tuple[Head, dict[str, Any]]:
    """Fit one recipe on (n, views, D) training features (column 0: the eval view); returns the head
    and its training record."""
    if recipe.views == "eval":
        train_x = np.asarray(train_x)[:, :1]
    if recipe.kind == "linear":
        assert recipe.c is not None  # a linear recipe has its C
        return fit_linear(train_x, train_y, n_classes, recipe.c), {"best_epoch": None, "epochs_run": None,
                                                                   "history": []}
    cfg = recipe.mlp
    result = train_head(train_x, train_y, val_x, val_y, n_classes, cfg, progress=progress)
    head = load_head(result.state_dict, train_x.shape[-1], n_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    return head, {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "history": result.history}


def score(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float | None]:
    """Macro one-vs-rest AUROC (None when a class is absent) and log loss of held-out predictions."""
    present = np.unique(y)
    auc = None
    if present.size == n_classes:
        auc = float(roc_auc_score(y, probs[:, 1]) if n_classes == 2
                    else roc_auc_score(y, probs, multi_class="ovr", average="macro",
                                       labels=list(range(n_classes))))
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    p /= p.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only within ~1e-7
    return {"auroc": auc, "log_loss": float(log_loss(y, p, labels=list(range(n_classes))))}


def _best(scores: list[dict[str, Any]]) -> int:
    def key(i: int) -> tuple[float, float, int]:
        s = scores[i]
        return (-(s["auroc"] if s["auroc"] is not None else -1.0), s["log_loss"], i)
    return min(range(len(scores)), key=key)


def pooled_dtype(*features: np.ndarray) -> type[np.floating]:
    """float16 when every input is (the train step's cached values: pooling them keeps half the memory,
    and each fit upcasts them exactly), else float32 as train+val were always pooled."""
    return np.float16 if all(np.asarray(x).dtype == np.float16 for x in features) else np.float32


def select_recipe(candidates: list[Recipe], train_x: np.ndarray, train_y: np.ndarray,
                  train_groups: np.ndarray, train_eval_x: np.ndarray, val_x: np.ndarray,
                  val_y: np.ndarray, val_groups: np.ndarray, n_classes: int, *, folds: int = 5,
                  min_val_per_class: int = 20, seed: int = 0) -> Selection:
    """Choose among ``candidates``; see the module docstring for how. ``train_x`` (n, views, D) are the
    training images' eval view (column 0) and augmented views, ``train_eval_x`` (n, D) how a training
    image is scored when it is held out in k-fold (its eval view), ``val_x`` (m, D) the validation
    images' eval view."""
    if not candidates:
        raise ValueError("no head recipes to choose from")
    if len(candidates) == 1:
        return Selection(candidates[0], "only candidate",
                         f"{candidates[0].name} is the only recipe configured "
                         "(XRAY_HEAD_RECIPE)")
    val_counts = np.bincount(val_y, minlength=n_classes)
    if val_counts.min() >= min_val_per_class:
        scores = []
        for r in candidates:
            head, _ = fit_recipe(r, train_x, train_y, val_x, val_y, n_classes)
            scores.append({"name": r.name, **score(val_y, predict_proba(head, val_x), n_classes)})
        best = _best(scores)
        return Selection(candidates[best], "validation", _reason(scores[best], "on the validation split "
                         f"({len(val_y)} images)"), scores)
    pooled_groups = np.r_[np.asarray(train_groups, dtype=object),
                          np.asarray(val_groups, dtype=object)].astype(str)
    pooled_y = np.r_[train_y, val_y]
    patients_per_class = [len(set(pooled_groups[pooled_y == c])) for c in range(n_classes)]
    k = min(folds, min(patients_per_class))
    if k < 2:
        return Selection(candidates[0], "only candidate",
                         "too few patients to compare recipes (fewest of one class: "
                         f"{min(patients_per_class)}); kept the first candidate {candidates[0].name}")
    views, dtype = train_x.shape[1], pooled_dtype(train_x, val_x)
    pooled_views = np.concatenate([train_x, np.repeat(val_x[:, None, :], views, axis=1)]
                                  ).astype(dtype, copy=False)
    pooled_eval = np.concatenate([train_eval_x, val_x]).astype(dtype, copy=False)
    splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                  .split(pooled_eval, pooled_y, pooled_groups))
    scores, oofs = [], []
    for r in candidates:
        oof = np.zeros((len(pooled_y), n_classes))
        for fit_idx, held_idx in splits:
            head, _ = fit_recipe(r, pooled_views[fit_idx], pooled_y[fit_idx], pooled_eval[held_idx],
                                 pooled_y[held_idx], n_classes)
            oof[held_idx] = predict_logits(head, pooled_eval[held_idx])  # a fresh head: temperature 1
        oofs.append(oof)
        scores.append({"name": r.name, **score(pooled_y, softmax(oof), n_classes)})
    best = _best(scores)
    why = (f"by patient-grouped {k}-fold cross-validation inside train+val ({len(pooled_y)} images), because "
           f"validation has fewer than {min_val_per_class} images of some class ({val_counts.tolist()})")
    return Selection(candidates[best], "grouped k-fold", _reason(scores[best], why), scores,
                     oof_logits=oofs[best], oof_y=pooled_y)


@dataclass
class Calibrated:
    """A head refitted, with its temperature set, and the held-out evidence its calibration used."""

    head: Head
    record: dict[str, Any]  # fit_recipe's training record
    selection: Selection
    temperature: float
    fitted_on: str  # "train" | "train+val": the rows of the final fit
    calibrated_on: str  # "validation" | "out-of-fold": where the temperature was fitted
    held_logits: np.ndarray  # (n, classes) held-out logits at temperature 1 the temperature was fitted on
    held_y: np.ndarray  # their labels: validation, or train+val (train images first) when out-of-fold


def fit_calibrated(selection: Selection, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                   val_y: np.ndarray, n_classes: int, progress=None) -> Calibrated:
    """Refit the chosen recipe and fit its temperature; see the module docstring for which rows each
    uses and why. ``train_x`` (n, views, D), ``val_x`` (m, D) the validation images' eval view. The
    caller chooses the operating threshold on ``softmax(held_logits / temperature)``."""
    recipe = selection.recipe
    early_stops = recipe.kind == "mlp" and recipe.mlp.keep_best
    if selection.oof_logits is not None and not early_stops:
        views, dtype = train_x.shape[1], pooled_dtype(train_x, val_x)
        pooled_x = np.concatenate([train_x, np.repeat(val_x[:, None, :], views, axis=1)]
                                  ).astype(dtype, copy=False)
        pooled_y = np.r_[train_y, val_y]
        # val_x is passed as the "validation" of an MLP refit only for its loss history: a cosine
        # schedule runs every epoch and keeps the last, so nothing is chosen on it
        head, record = fit_recipe(recipe, pooled_x, pooled_y, val_x, val_y, n_classes, progress=progress)
        held_logits, held_y = selection.oof_logits, selection.oof_y
        assert held_y is not None  # set with oof_logits
        fitted_on, calibrated_on = "train+val", "out-of-fold"
    else:
        head, record = fit_recipe(recipe, train_x, train_y, val_x, val_y, n_classes, progress=progress)
        held_logits, held_y, fitted_on, calibrated_on = (predict_logits(head, val_x),
                                                         val_y, "train", "validation")
    temperature = fit_temperature(held_logits, held_y)
    head.set_temperature(temperature)
    return Calibrated(head, record, selection, temperature, fitted_on, calibrated_on,
                      np.asarray(held_logits, dtype=np.float64), np.asarray(held_y, dtype=np.int64))


def _reason(s: dict[str, Any], how: str) -> str:
    auc = "n/a" if s["auroc"] is None else f"{s['auroc']:.3f}"
    return f"{s['name']} had the best held-out macro AUROC ({auc}, log loss {s['log_loss']:.3f}) {how}"


__all__ = ["HEAD_RECIPES", "Calibrated", "Recipe", "Selection", "candidate_recipes",
           "fit_calibrated", "fit_linear", "fit_recipe", "score", "select_recipe"]
