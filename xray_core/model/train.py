"""Training the classifier head on cached backbone features.

The backbone is frozen, so the head never sees images: it learns from cached (image, view) feature
vectors, which makes an epoch cost milliseconds instead of a full densenet161 pass. Split in two as
in torchvision's reference script: :func:`train_one_epoch` and :func:`evaluate_loss`, with the
collaborators passed in.

The head carries its own input standardisation (per-dimension mean/std fitted on the training
features only) and its temperature as buffers of :class:`Head`, so every caller that runs
``head(features)`` (prediction, Grad-CAM, evaluation) applies exactly the transform it was trained
with. Random-init densenet161 features vary very little per dimension (std ~0.07 around ~0.43); without
standardisation the head stays near chance. Checkpoints saved before these buffers existed load with an
identity standardisation and temperature 1, which reproduces their predictions bit for bit.

Determinism: everything random (head init, dropout, shuffling, view sampling) draws from RNG state
seeded by ``seed`` inside ``torch.random.fork_rng``, so the caller's global RNG is untouched and, on
the CPU, the same inputs and settings give bit-identical weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from xray_core.errors import NotEnoughDataError, XrayError
from xray_core.faults import crash_point
from xray_core.settings import LR_SCHEDULES, Settings, setting_default


class TrainingDivergedError(XrayError):
    """Training produced no usable weights: the validation loss was never finite."""


@dataclass(frozen=True)
class HeadConfig:
    """How :func:`train_head` trains; build it with :meth:`from_settings`. Each default is the declared
    default of the setting named in the comment (:mod:`xray_core.settings`)."""

    hidden: tuple[int, ...] = setting_default("head_hidden")  # hidden widths; () gives a linear head
    dropout: float = setting_default("head_dropout")
    epochs: int = setting_default("epochs")
    batch_size: int = setting_default("batch_size")
    learning_rate: float = setting_default("learning_rate")
    weight_decay: float = setting_default("weight_decay")
    patience: int = setting_default("patience")  # epochs without a val-loss improvement before stopping
    seed: int = setting_default("train_seed")
    # lr_schedule: "cosine" anneals the learning rate to 0 over `epochs`; "none" keeps it constant
    schedule: str = setting_default("lr_schedule")
    # True: keep the epoch with the lowest val loss (early stopping). False: keep the last epoch's
    # weights and run every epoch (a cosine schedule is meant to be run to its end).
    keep_best: bool = True

    @classmethod
    def from_settings(cls, s: Settings) -> HeadConfig:
        return cls(hidden=tuple(s.head_hidden), dropout=s.head_dropout, epochs=s.epochs,
                   batch_size=s.batch_size, learning_rate=s.learning_rate,
                   weight_decay=s.weight_decay, patience=s.patience, seed=s.train_seed,
                   schedule=s.lr_schedule)


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    best_epoch: int  # 1-based epoch whose weights were kept
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


# Buffers that older checkpoints lack; load_head fills them with the identity transform.
HEAD_BUFFERS = ("feature_mean", "feature_std", "temperature")


class Head(nn.Sequential):
    """The classifier layers, with the input standardisation and the temperature as buffers.

    ``forward(x) = layers((x - feature_mean) / feature_std) / temperature``: logits in, softmax
    outside. A subclass of ``nn.Sequential`` so the layers keep their state-dict names ("0.weight",
    ...) and checkpoints from before the buffers existed still load.
    """

    feature_mean: torch.Tensor  # buffers, registered in __init__
    feature_std: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, layers: list[nn.Module], in_dim: int):
        super().__init__(*layers)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.feature_mean) / self.feature_std) / self.temperature

    def set_normaliser(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def set_temperature(self, temperature: float) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.temperature.fill_(float(temperature))


NORMALISER_CHUNK = 4096  # rows converted to float64 at a time (2208 dimensions: 72 MB)


def _row_sum(rows: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Sum over rows of ``rows`` (or of their squared deviations from ``mean``) in float64, a chunk of
    rows at a time, bit for bit what ``x.mean(axis=0) * n`` / ``x.var(axis=0) * n`` sum: numpy adds the
    rows of an axis-0 reduction one after another, and so does this, carrying the running sum into the
    next chunk as its first row. Memory: two float64 chunks, not two float64 copies of every row."""
    total: np.ndarray | None = None
    for start in range(0, len(rows), NORMALISER_CHUNK):
        chunk = np.asarray(rows[start:start + NORMALISER_CHUNK], dtype=np.float64)
        if mean is not None:
            chunk = np.abs(chunk - mean) ** 2  # as numpy's var: x - mean, squared
        total = chunk.sum(axis=0) if total is None else np.add.reduce(np.vstack([total[None], chunk]), axis=0)
    return total if total is not None else np.full(rows.shape[-1], np.nan)


def fit_normaliser(train_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the training features (all views), float32.

    Fitted on training rows only: validation and test must be transformed with statistics they did
    not contribute to. A dimension that is constant in training gets std 1 (left unscaled) instead
    of dividing by ~0.
    """
    flat = np.asarray(train_x).reshape(-1, np.asarray(train_x).shape[-1])
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN features: training reports divergence
        mean = _row_sum(flat, None) / len(flat)
        std = np.sqrt(_row_sum(flat, mean) / len(flat))
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def build_head(in_dim: int, n_classes: int, *, hidden: tuple[int, ...], dropout: float) -> Head:
    """The tutorial's head by default: Linear(2208→512), ReLU, Dropout, Linear(512→classes), with an
    identity standardisation and temperature 1 until they are fitted."""
    if n_classes < 2:
        raise NotEnoughDataError(f"a classifier needs at least 2 classes, got {n_classes}")
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return Head(layers, in_dim)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (n / (C * count)); a class absent from training gets weight 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def train_one_epoch(head: nn.Module, x_views: torch.Tensor, y: torch.Tensor, *,
                    optimizer: torch.optim.Optimizer, loss_fn: nn.Module, batch_size: int,
                    generator: torch.Generator) -> float:
    """One pass over the training images, each seen through one randomly drawn view. Returns mean loss.

    ``x_views`` may be float16 (the cached values, held so at scale): each batch is upcast to float32
    after it is gathered, which gives exactly the batch a float32 ``x_views`` would."""
    head.train()
    n, n_views = x_views.shape[0], x_views.shape[1]
    order = torch.randperm(n, generator=generator)
    view_pick = torch.randint(0, n_views, (n,), generator=generator)
    total = 0.0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        xb = x_views[idx, view_pick[idx]].to(torch.float32)
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
    """Softmax probabilities (n, classes) as float64 numpy.

    The softmax runs in float64: in float32 a logit gap above ~17 rounds the winning class to exactly
    1.0 (and above ~88 the loser to exactly 0), so confident images tie and the ranking (AUROC) is
    lost; float64 keeps them apart up to a gap of ~37.
    """
    head.eval()
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return torch.softmax(head(xt).double(), dim=1).numpy()


@torch.no_grad()
def predict_logits(head: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """The head's logits (n, classes) as float64 numpy (divided by its current temperature)."""
    head.eval()
    return head(torch.as_tensor(np.asarray(x), dtype=torch.float32)).double().numpy()


def training_tensor(train_x: np.ndarray) -> torch.Tensor:
    """The training features as a tensor without a float32 copy of float16 ones (which
    :func:`train_one_epoch` upcasts per batch); any other dtype as float32, as before."""
    if isinstance(train_x, np.ndarray) and train_x.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(train_x))
    return torch.as_tensor(train_x, dtype=torch.float32)


def train_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
               n_classes: int, config: HeadConfig,
               progress: Callable[[int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train on (n, views, D) features, early-stop on validation loss, return the best epoch's weights.

    ``train_x`` holds the sampled views of each training image (float16 stays float16 in memory, see
    :func:`training_tensor`); ``val_x`` (m, D) the eval view. The
    inputs are standardised with :func:`fit_normaliser` on ``train_x`` (stored in the weights).
    With ``config.schedule == "cosine"`` the learning rate anneals to 0 over ``config.epochs``.
    """
    if config.schedule not in LR_SCHEDULES:
        raise ValueError(f"Invalid learning-rate schedule {config.schedule!r}. Only "
                         f"{', '.join(LR_SCHEDULES)} are supported.")
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
        head.set_normaliser(*fit_normaliser(train_x))
        weights = class_weights(train_y, n_classes)
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate,
                                     weight_decay=config.weight_decay)
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                     if config.schedule == "cosine" else None)
        xt = training_tensor(train_x)
        yt = torch.as_tensor(train_y, dtype=torch.long)
        xv = torch.as_tensor(val_x, dtype=torch.float32)
        yv = torch.as_tensor(val_y, dtype=torch.long)
        best_loss, best_epoch, best_state, stale = float("inf"), 0, None, 0
        history: list[dict[str, float]] = []
        epoch = 0
        for epoch in range(1, config.epochs + 1):
            train_loss = train_one_epoch(head, xt, yt, optimizer=optimizer, loss_fn=loss_fn,
                                         batch_size=config.batch_size, generator=generator)
            if scheduler is not None:
                scheduler.step()
            val_loss = evaluate_loss(head, xv, yv, loss_fn=loss_fn)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
            crash_point("train.epoch")
            if progress:
                progress(epoch, config.epochs, history[-1])
            if not config.keep_best:
                if math.isfinite(val_loss):
                    best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(head.state_dict())
                else:
                    best_state = None
            elif val_loss < best_loss - 1e-7:
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


@contextlib.contextmanager
def fit_threads(torch_threads: int, blas_threads: int | None = None) -> Iterator[None]:
    """Torch's intra-op threads set to ``torch_threads`` and the BLAS pools' (numpy's and scipy's, under
    the linear recipes and the monitoring reference) to ``blas_threads`` (None: the same) inside; 0 leaves
    one as it is; both restored after. A reduction's order, so a head's bytes, can depend on either: the
    card records both (:func:`training_environment`). Their defaults differ (torch: physical cores; BLAS:
    logical CPUs or ``OPENBLAS_NUM_THREADS``), so one count is not the other's."""
    import scipy.linalg  # noqa: F401 - loads scipy's own BLAS now: threadpoolctl limits loaded ones only
    from threadpoolctl import threadpool_limits

    blas = torch_threads if blas_threads is None else blas_threads
    before = torch.get_num_threads()
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    try:
        with threadpool_limits(limits=blas if blas > 0 else None, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def training_environment() -> dict[str, str | int]:
    """What the head's bytes depend on besides its inputs and settings: library versions and the torch and
    BLAS thread counts (recorded on the card; ``xray reproduce`` rebuilds with the same counts and names a
    version that differs)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from threadpoolctl import threadpool_info

    blas = [int(lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]
    out: dict[str, str | int] = {"python": platform.python_version(), "machine": platform.machine(),
                                 "torch_threads": torch.get_num_threads(),
                                 "blas_threads": max(blas, default=0)}
    for package in ("torch", "numpy", "scipy", "scikit-learn", "safetensors"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # a source build without metadata
            out[package] = "unknown"
    return out


def load_head(state_dict: dict[str, torch.Tensor], in_dim: int, n_classes: int, *,
              hidden: tuple[int, ...], dropout: float) -> Head:
    """Rebuild a head from its weights. A checkpoint without the standardisation or temperature
    buffers (saved before they existed) gets the identity: mean 0, std 1, temperature 1, which
    predicts exactly as it did then. Any other missing or unexpected key is an error."""
    head = build_head(in_dim, n_classes, hidden=hidden, dropout=dropout)
    defaults = {k: v for k, v in head.state_dict().items() if k in HEAD_BUFFERS}
    head.load_state_dict({**defaults, **state_dict})
    head.eval()
    return head
