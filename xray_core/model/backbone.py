"""The frozen densenet161 feature extractor, its weights, and its fingerprint.

The backbone never trains, so every (image, view) is embedded once and cached under the backbone's
*fingerprint*: a sha256 over the architecture name, the weights' actual tensor bytes, the
preprocessing spec and the forward's arithmetic (``XRAY_EMBED_PRECISION`` and the device type, named
only when it is not what the backbone computed before the setting existed, so those fingerprints
stay as they were; see :func:`fingerprint`). Any change in any of them gives a
new fingerprint and so a fresh feature folder; nothing stale is ever reused. The fingerprint hashes
weight *content*, not the setting's text, so the same weights reached via ``random`` or via a saved
file share their cached features.

Weights (``XRAY_BACKBONE_WEIGHTS``):
- ``imagenet``: torchvision's ``DenseNet161_Weights.IMAGENET1K_V1`` (downloaded once into the torch
  hub cache; offline machines get a message saying where to put the file);
- ``random``: untrained, initialised from ``XRAY_BACKBONE_SEED`` (tests and demos);
- a path to a ``.safetensors`` or ``.pth``/``.pt`` state dict (never unpickled beyond tensors).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from xray_core.errors import BackboneWeightsError
from xray_core.model.device import pick_device, pick_precision

ARCH = "torchvision.densenet161"
FEATURE_DIM = 2208
ALLOWED_WEIGHTS = "imagenet | random | /path/to/weights.safetensors | /path/to/weights.pth (.pt)"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Peak inference memory of densenet161 per view, as a multiple of the input tensor's size
# (measured on the CPU at 224 px: ~36 MB per image for a 0.57 MB input, i.e. ~64x). Used only to
# shrink the embedding batch so that XRAY_EMBED_MEMORY_MB is respected.
ACTIVATION_FACTOR = 64
# Old densenet checkpoints (including torchvision's own download) name layers 'norm.1' etc.;
# torchvision renames them on load, and so do we (torchvision.models.densenet's pattern, plus
# num_batches_tracked for files re-saved from a newer model in the old naming).
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                      r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class FrozenDenseNetFeatures(nn.Module):
    """densenet161.features + ReLU + global average pool + flatten -> (N, 2208).

    ``train()`` is overridden to keep eval mode: a stray ``model.train()`` elsewhere would
    otherwise let batch norm use batch statistics (and update its running stats), silently
    changing features that are cached as if they were fixed.
    """

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features  # keys stay "features.*", as in a full densenet161 state dict
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenDenseNetFeatures:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1)


@dataclass(eq=False)
class Backbone:
    """A loaded, frozen backbone and the fingerprint its cached features are filed under."""

    features: nn.Module  # FrozenDenseNetFeatures: (N, 3, S, S) -> (N, 2208), eval mode always
    fingerprint: str  # sha256 hex of arch + weights content + preprocessing spec (not the views count)
    weights: str  # the XRAY_BACKBONE_WEIGHTS value it was loaded from
    random_init: bool  # True for untrained weights: fine for tests, useless for diagnosis
    device: torch.device
    calls: int = field(default=0)  # forward batches run so far (tests count these)
    forward_batch: int = 16  # images per forward, padded up to it (see embed); the effective embed batch size
    precision: str = "fp32"  # the forward's arithmetic: fp32 | bf16 | fp16 | legacy (see device.PRECISIONS)
    weights_sha256: str = ""  # content hash of the weights alone (lets callers re-derive the fingerprint)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised float -> (N, 2208) float32 on the CPU.

        Every forward runs on exactly ``forward_batch`` images: the input is cut into chunks of that
        size and the last chunk is padded with copies of its last image (their outputs are dropped).
        Why: CPU convolution kernels pick their blocking by batch size, so an image's features differ
        in the last bits with the size of the batch it was embedded in. Measured at 32 and 64 px: on
        two threads batches of 2-16 agreed (a batch of 1 did not); on one thread
        (``OMP_NUM_THREADS=1``) batches of 2-15 agreed and a batch of 16 differed from them. A resumed
        run, a Dask shard or ``xray predict`` embed other batch sizes than one uninterrupted run. A
        fixed forward size makes features a function of the image, the fingerprint, the thread count
        and ``forward_batch`` only (an image's result does not depend on its position or on the other
        images in the batch). The price is the padding: at most ``forward_batch - 1`` extra images
        per call.

        With ``precision`` bf16 or fp16 the forward runs under autocast (on the CPU too): features are
        stored as float16 anyway, and it roughly halves the time where the device does bf16 in
        hardware (:func:`xray_core.model.device.pick_precision`).
        """
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, S, S) batch, got shape {tuple(batch.shape)}")
        size = max(1, int(self.forward_batch))
        outs = []
        for start in range(0, batch.shape[0], size):
            chunk = batch[start : start + size]
            n = chunk.shape[0]
            if n < size:
                chunk = torch.cat([chunk, chunk[-1:].expand(size - n, -1, -1, -1)])
            self.calls += 1
            x = chunk.to(self.device, dtype=torch.float32, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            dtype = autocast_dtype(self.precision, self.device)
            with torch.inference_mode():
                if dtype is not None:
                    with torch.autocast(self.device.type, dtype=dtype):
                        out = self.features(x)
                else:
                    out = self.features(x)
                outs.append(out[:n].float().cpu())
        if not outs:
            return torch.empty(0, FEATURE_DIM)
        # A copy made outside inference mode is an ordinary tensor: callers may feed it to autograd.
        return torch.cat(outs).clone()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a resolved precision on ``device``; None for a plain fp32 forward."""
    if precision == "legacy":  # as before the setting: autocast on CUDA only
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def effective_batch_size(settings: Any) -> int:
    """Views per backbone call: XRAY_EMBED_BATCH_SIZE, shrunk to fit XRAY_EMBED_MEMORY_MB.

    Estimate per view = input bytes (3 * S * S * 4) * ACTIVATION_FACTOR. Decoded images waiting
    in the DataLoader's prefetch queue (2 per worker) come on top of this.
    """
    per_view = 3 * settings.input_size * settings.input_size * 4 * ACTIVATION_FACTOR
    fits = (settings.embed_memory_mb * 1024 * 1024) // per_view
    return int(max(1, min(settings.embed_batch_size, fits)))


def load_backbone(settings: Any) -> Backbone:
    """Load (or reuse) the backbone named by ``settings``; raises BackboneWeightsError if it cannot.

    Loading and hashing densenet161 costs about a second, so results are cached in-process per
    (weights, seed, device, preprocessing spec); a weights *file* is also keyed by its size and
    modification time, so replacing the file is noticed.
    """
    from xray_core.model.preprocess import spec_dict

    device = pick_device(settings.device)
    weights = str(settings.backbone_weights).strip()
    kind = weights.lower()
    seed = int(settings.backbone_seed) if kind == "random" else 0
    file_key: tuple[int, int] | None = None
    if kind not in ("random", "imagenet"):
        path = Path(weights).expanduser()
        if path.is_file():
            st = path.stat()
            file_key = (st.st_size, st.st_mtime_ns)
    precision = pick_precision(getattr(settings, "embed_precision", "auto"), device)
    spec_json = json.dumps(spec_dict(settings), sort_keys=True)
    return _cached_backbone(weights, seed, str(device), file_key, spec_json, effective_batch_size(settings),
                            precision)


def clear_backbone_cache() -> None:
    """Forget loaded backbones (frees their memory; tests use it to force a reload)."""
    _cached_backbone.cache_clear()
    _load_module.cache_clear()


@functools.lru_cache(maxsize=4)
def _cached_backbone(
    weights: str, seed: int, device: str, file_key: tuple[int, int] | None,
    spec_json: str, forward_batch: int, precision: str,
) -> Backbone:
    module, weights_hash, random_init = _load_module(weights, seed, device, file_key)
    return Backbone(
        features=module,
        fingerprint=fingerprint(weights_hash, json.loads(spec_json), precision, torch.device(device).type),
        weights=weights,
        random_init=random_init,
        device=torch.device(device),
        weights_sha256=weights_hash,
        forward_batch=forward_batch,
        precision=precision,
    )


def fingerprint(weights_sha256: str, spec: Mapping[str, Any], precision: str = "fp32",
                device_type: str = "cpu") -> str:
    """sha256 over architecture, weights content hash, preprocessing spec and the forward's arithmetic.

    The arithmetic is named as ``<device type>-<precision>`` (bf16 from a CPU and from a GPU differ in
    more than the last bits), except for what the backbone computed before precision was a setting
    (fp32 on the CPU, ``legacy`` autocast on CUDA): those keep the fingerprint they were filed under.
    """
    content: dict[str, Any] = {"arch": ARCH, "weights_sha256": weights_sha256, "preprocess": spec}
    if not (precision == "legacy" or (precision == "fp32" and device_type == "cpu")):
        content["precision"] = f"{device_type}-{precision}"
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def hash_weights(module: nn.Module) -> str:
    """sha256 of a module's state dict: every key, dtype, shape and tensor bytes, in key order."""
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_module(
    weights: str, seed: int, device: str, file_key: tuple[int, int] | None
) -> tuple[FrozenDenseNetFeatures, str, bool]:
    from torchvision.models import densenet161

    kind = weights.lower()
    if kind == "random":
        # A local seed: the global RNG (and so anyone else's randomness) is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = densenet161(weights=None)
        random_init = True
    elif kind == "imagenet":
        model = densenet161(weights=None)
        _load_into(model.features, _imagenet_state_dict(), source="imagenet")
        random_init = False
    else:
        model = densenet161(weights=None)
        _load_into(model.features, _read_weights_file(weights), source=weights)
        random_init = False
    module = FrozenDenseNetFeatures(model.features)
    digest = hash_weights(module)  # hashed on the CPU in float32, before moving to the device
    module = module.to(torch.device(device)).to(memory_format=torch.channels_last)
    return module, digest, random_init


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import DenseNet161_Weights

    w = DenseNet161_Weights.IMAGENET1K_V1
    try:
        # Uses the torch hub cache when the file is already there; downloads otherwise.
        return w.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError/HTTPError are OSErrors
        filename = os.path.basename(urlparse(w.url).path)
        target = Path(torch.hub.get_dir()) / "checkpoints" / filename
        raise BackboneWeightsError(
            f"XRAY_BACKBONE_WEIGHTS=imagenet: could not get torchvision's ImageNet densenet161 weights "
            f"({type(exc).__name__}: {exc}). Download {w.url} on a machine with internet access and "
            f"place it at {target} (the torch hub cache; TORCH_HOME moves it), or set "
            f"XRAY_BACKBONE_WEIGHTS to a local weights file ({filename} works as a path), or to "
            f"'random' (untrained: for tests and demos only)."
        ) from exc


def _read_weights_file(value: str) -> Mapping[str, Any]:
    path = Path(value).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(
            f"XRAY_BACKBONE_WEIGHTS={value!r} is neither a known value nor an existing file. "
            f"Allowed: {ALLOWED_WEIGHTS}"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix in _TORCH_SUFFIXES:
            # weights_only=True: tensors and plain containers only, never arbitrary pickled objects.
            obj = torch.load(path, weights_only=True, map_location="cpu")
        else:
            raise BackboneWeightsError(
                f"XRAY_BACKBONE_WEIGHTS={value!r}: unsupported file type {suffix or '(none)'}; "
                f"use a .safetensors or .pth/.pt state dict. Allowed: {ALLOWED_WEIGHTS}"
            )
    except BackboneWeightsError:
        raise
    except Exception as exc:  # any parse failure of a user-supplied file is the user's to fix
        raise BackboneWeightsError(
            f"XRAY_BACKBONE_WEIGHTS={value!r}: cannot read the weights file "
            f"({type(exc).__name__}: {exc}). It must be a densenet161 state dict saved with "
            f"safetensors or torch.save (tensors only)."
        ) from exc
    if isinstance(obj, Mapping):
        for nested in ("state_dict", "model"):  # common training-checkpoint layouts
            if isinstance(obj.get(nested), Mapping):
                obj = obj[nested]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneWeightsError(
            f"XRAY_BACKBONE_WEIGHTS={value!r}: the file does not hold a state dict of tensors"
        )
    return obj


def _load_into(features: nn.Module, state: Mapping[str, Any], *, source: str) -> None:
    """Load a full-densenet161 or features-only state dict into ``features``, strictly."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")  # saved from DataParallel
        match = _OLD_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        cleaned[key] = tensor
    if any(k.startswith("features.") for k in cleaned):
        # A full model (the classifier is unused: we take pooled features) or features-prefixed keys.
        picked = {k.removeprefix("features."): v for k, v in cleaned.items() if k.startswith("features.")}
    else:
        picked = {k: v for k, v in cleaned.items() if not k.startswith("classifier.")}
    expected = features.state_dict()
    # Old checkpoints (torchvision's ImageNet file included) lack batch norm's num_batches_tracked;
    # it does not affect eval-mode outputs and BatchNorm fills it in on load.
    missing = sorted(k for k in set(expected) - set(picked) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(picked) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(picked)
                         if tuple(picked[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise BackboneWeightsError(
            f"XRAY_BACKBONE_WEIGHTS={source!r}: not densenet161 weights: {'; '.join(parts)}. "
            f"Expected a torchvision densenet161 state dict (full model or 'features.*' keys)."
        )
    features.load_state_dict(picked, strict=True)


__all__ = [
    "ACTIVATION_FACTOR",
    "ARCH",
    "FEATURE_DIM",
    "Backbone",
    "FrozenDenseNetFeatures",
    "effective_batch_size",
    "load_backbone",
    "clear_backbone_cache",
    "fingerprint",
    "hash_weights",
]
