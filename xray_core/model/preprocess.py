"""Grayscale X-ray -> normalised 3-channel tensor for densenet161, as small preset classes.

View 0 is the deterministic evaluation transform (resize the whole image). Views 1..K are seeded
augmentations in the spirit of the original tutorial (random resized crop, small rotation,
horizontal flip). Each augmented view draws its randomness from a ``torch.Generator`` seeded from
(image sha256, view number), so view 3 of an image is the same tensor on every machine and every
run: that is what lets the feature cache store each (image, view) once.

Everything here that changes the pixels fed to the backbone is listed in :func:`spec_dict`, which
goes into the backbone fingerprint; change the code's behaviour -> bump ``PREPROCESS_VERSION``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xray_core.data.dicom import WINDOWING_SPEC

# Bump when the transforms below change behaviour: it changes every backbone fingerprint, so old
# cached features (made with the old pixels) are no longer used.
PREPROCESS_VERSION = "1"

# ImageNet statistics, because the backbone was trained with them; the gray channel is replicated
# to RGB before normalising, as torchvision's ImageNet weights expect 3 channels.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# RandomResizedCrop's aspect-ratio range (torchvision's default), fixed rather than a setting.
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
# Pixel value (in [0, 1] gray, before normalisation) for corners uncovered by rotation: black,
# like the background of a radiograph.
ROTATION_FILL = 0.0


def spec_dict(settings: Any) -> dict[str, Any]:
    """Everything about preprocessing that changes the features (JSON-able, for the fingerprint).

    The number of views K is deliberately absent: view k is the same whatever K is, so raising K
    only adds views to the cache instead of invalidating it.
    """
    return {
        "version": PREPROCESS_VERSION,
        "input_size": int(settings.input_size),
        "channels": "gray-replicated-to-3",
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},  # per RGB channel
        "resize": "bilinear-antialias",
        "eval": "resize-whole-image",
        "train": {
            "order": "random-resized-crop,rotate,hflip",
            "rotation_degrees": float(settings.aug_rotation),
            "crop_scale": [float(x) for x in settings.aug_crop_scale],
            "crop_ratio": list(CROP_RATIO),
            "hflip": bool(settings.aug_hflip),
            "rotation_fill": ROTATION_FILL,
            "view_seed": "sha256('xray-view:<sha256>:<view>:<seed>')[:8] little-endian",
        },
        # How DICOM values become grey (VOI LUT / window / percentile, inversion): a change re-embeds.
        "dicom_windowing": dict(WINDOWING_SPEC),
    }


def _check_gray(gray: np.ndarray) -> torch.Tensor:
    """(H, W) float array in [0, 1] -> (1, 1, H, W) float32 tensor; ValueError otherwise."""
    arr = np.asarray(gray)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected a 2-D (H, W) grayscale array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected a float array in [0, 1], got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise ValueError(f"expected values in [0, 1], got min {lo} max {hi}")
    return torch.from_numpy(arr)[None, None]


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    # Antialias matters when shrinking a 2000 px radiograph to 224 px: without it, thin structures
    # alias into noise.
    out = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def _to_input(img: torch.Tensor) -> torch.Tensor:
    """(1, 1, S, S) gray in [0, 1] -> (3, S, S) ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return ((img[0].expand(3, -1, -1) - mean) / std).contiguous()


class EvalTransform:
    """View 0: resize the whole image to ``size`` x ``size``; no randomness."""

    def __init__(self, *, size: int) -> None:
        self.size = int(size)

    def __call__(self, gray: np.ndarray) -> torch.Tensor:
        return _to_input(_resize(_check_gray(gray), self.size))


class TrainTransform:
    """Views 1..K: random resized crop, rotation by up to +-``rotation`` degrees, horizontal flip.

    All randomness comes from the ``generator`` argument, drawn in a fixed order, so the output is
    a pure function of (image, parameters, generator state). Cropping happens on the full image
    (a cheap slice) and rotation after resizing, so the cost does not grow with the source size.
    """

    def __init__(self, *, size: int, rotation: float, crop_scale: tuple[float, float], hflip: bool) -> None:
        self.size = int(size)
        self.rotation = float(rotation)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = bool(hflip)

    def __call__(self, gray: np.ndarray, *, generator: torch.Generator) -> torch.Tensor:
        img = _check_gray(gray)
        top, left, h, w = self._crop_params(img.shape[-2], img.shape[-1], generator)
        img = _resize(img[..., top : top + h, left : left + w], self.size)
        angle = (_uniform(generator) * 2.0 - 1.0) * self.rotation
        if self.rotation > 0 and angle != 0.0:
            img = _rotate(img, angle)
        flip = _uniform(generator) < 0.5
        if self.hflip and flip:
            img = img.flip(-1)
        return _to_input(img)

    def _crop_params(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawing from ``g`` instead of the global RNG."""
        area = height * width
        lo, hi = self.crop_scale
        log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        for _ in range(10):
            target = area * (lo + (hi - lo) * _uniform(g))
            ratio = math.exp(log_lo + (log_hi - log_lo) * _uniform(g))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
                left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
                return top, left, h, w
        # Fallback: the largest centred crop within the ratio range (as torchvision does).
        in_ratio = width / height
        if in_ratio < CROP_RATIO[0]:
            w, h = width, int(round(width / CROP_RATIO[0]))
        elif in_ratio > CROP_RATIO[1]:
            h, w = height, int(round(height * CROP_RATIO[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g).item())


def _rotate(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (1, 1, S, S) about its centre, bilinear, uncovered corners = ROTATION_FILL."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    out = TF.rotate(img[0], degrees, interpolation=InterpolationMode.BILINEAR, fill=[ROTATION_FILL])
    return out[None].clamp_(0.0, 1.0)


def view_generator(sha256: str, view: int, seed: int = 0) -> torch.Generator:
    """A CPU generator seeded from (image sha256, view, seed): the same view everywhere, always."""
    digest = hashlib.sha256(f"xray-view:{sha256}:{int(view)}:{int(seed)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def make_view(gray: np.ndarray, view: int, sha256: str, settings: Any) -> torch.Tensor:
    """The (3, S, S) input tensor for ``view`` of the image: 0 = eval transform, k >= 1 = augmentation k."""
    if view < 0:
        raise ValueError(f"view must be 0 (eval) or a positive augmentation number, got {view}")
    if view == 0:
        return EvalTransform(size=settings.input_size)(gray)
    transform = TrainTransform(
        size=settings.input_size,
        rotation=settings.aug_rotation,
        crop_scale=tuple(settings.aug_crop_scale),
        hflip=settings.aug_hflip,
    )
    return transform(gray, generator=view_generator(sha256, view))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESS_VERSION",
    "spec_dict",
    "EvalTransform",
    "TrainTransform",
    "view_generator",
    "make_view",
]
