"""Training the classifier head on cached backbone features.

The backbone is frozen, so the head never sees images: it learns from cached (image, view) feature
vectors, which makes an epoch cost milliseconds instead of a full densenet161 pass. Split in two as
in torchvision's reference script: :func:`train_one_epoch` and :func:`evaluate_loss`, with the
collaborators passed in.

Determinism: everything random (head init, dropout, shuffling, view sampling) draws from RNG state
seeded by ``seed`` inside ``torch.random.fork_rng``, so the caller's global RNG is untouched and, on
the CPU, the same inputs and settings give bit-identical weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from xray_core.faults import crash_point
from xray_core.errors import NotEnoughDataError, XrayError


class TrainingDivergedError(XrayError):
    """Training produced no usable weights: the validation loss was never finite."""


@dataclass(frozen=True)
class HeadConfig:
    hidden: tuple[int, ...] = (512,)  # hidden widths; () gives a linear head
    dropout: float = 0.2
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # epochs without a val-loss improvement before stopping
    seed: int = 0

    @classmethod
    def from_settings(cls, s) -> "HeadConfig":  # noqa: ANN001 - Settings
        return cls(hidden=tuple(s.head_hidden), dropout=s.head_dropout, epochs=s.epochs,
                   batch_size=s.batch_size, learning_rate=s.learning_rate,
                   weight_decay=s.weight_decay, patience=s.patience, seed=s.train_seed)


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    best_epoch: int  # 1-based epoch whose weights were kept
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def build_head(in_dim: int, n_classes: int, *, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    """The tutorial's head by default: Linear(2208→512), ReLU, Dropout, Linear(512→classes)."""
    if n_classes < 2:
        raise NotEnoughDataError(f"a classifier needs at least 2 classes, got {n_classes}")
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (n / (C * count)); a class absent from training gets weight 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def train_one_epoch(head: nn.Module, x_views: torch.Tensor, y: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, batch_size: int, generator: torch.Generator) -> float:
    """One pass over the training images, each seen through one randomly drawn view. Returns mean loss."""
    head.train()
    n, n_views = x_views.shape[0], x_views.shape[1]
    order = torch.randperm(n, generator=generator)
    view_pick = torch.randint(0, n_views, (n,), generator=generator)
    total = 0.0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        xb = x_views[idx, view_pick[idx]]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(head(xb), y[idx])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / n


@torch.no_grad()
def evaluate_loss(head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: nn.Module) -> float:
    head.eval()
    return float(loss_fn(head(x), y))


@torch.no_grad()
def predict_proba(head: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Softmax probabilities (n, classes) as float64 numpy."""
    head.eval()
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return torch.softmax(head(xt), dim=1).double().numpy()


def train_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
               n_classes: int, config: HeadConfig,
               progress: Callable[[int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train on (n, views, D) features, early-stop on validation loss, return the best epoch's weights.

    ``train_x`` holds the sampled views of each training image; ``val_x`` (m, D) the eval view.
    """
    if len(train_x) == 0:
        raise NotEnoughDataError("no training images: ingest data first (xray ingest PATH)")
    if len(val_x) == 0:
        raise NotEnoughDataError("no validation images: the val split is empty; ingest more patients")
    torch_threads_before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also reseed every CUDA device's global
        # generator (lazily, even before CUDA is initialised), which fork_rng(devices=[]) does not
        # restore. The head trains on the CPU, so the CPU generator is all it draws from.
        torch.default_generator.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        head = build_head(train_x.shape[-1], n_classes, hidden=config.hidden, dropout=config.dropout)
        weights = class_weights(train_y, n_classes)
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        xt = torch.as_tensor(train_x, dtype=torch.float32)
        yt = torch.as_tensor(train_y, dtype=torch.long)
        xv = torch.as_tensor(val_x, dtype=torch.float32)
        yv = torch.as_tensor(val_y, dtype=torch.long)
        best_loss, best_epoch, best_state, stale = float("inf"), 0, None, 0
        history: list[dict[str, float]] = []
        epoch = 0
        for epoch in range(1, config.epochs + 1):
            train_loss = train_one_epoch(head, xt, yt, optimizer=optimizer, loss_fn=loss_fn,
                                         batch_size=config.batch_size, generator=generator)
            val_loss = evaluate_loss(head, xv, yv, loss_fn=loss_fn)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
            crash_point("train.epoch")
            if progress:
                progress(epoch, config.epochs, history[-1])
            if val_loss < best_loss - 1e-7:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = copy.deepcopy(head.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    torch.set_num_threads(torch_threads_before)
    if best_state is None:  # every epoch's val loss was NaN/inf: nothing worth keeping
        raise TrainingDivergedError(
            f"training diverged: the validation loss was not finite in any of {epoch} epoch(s) "
            f"(last {history[-1]['val_loss']}); check the features for NaN/inf or lower "
            f"XRAY_LEARNING_RATE (now {config.learning_rate})")
    return TrainResult(state_dict=best_state, best_epoch=best_epoch, epochs_run=epoch, history=history)


def load_head(state_dict: dict[str, torch.Tensor], in_dim: int, n_classes: int, *,
              hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    head = build_head(in_dim, n_classes, hidden=hidden, dropout=dropout)
    head.load_state_dict(state_dict)
    head.eval()
    return head
