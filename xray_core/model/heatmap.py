"""Grad-CAM heatmaps through the frozen densenet161 into the trained head, and PNG overlays.

Method (Selvaraju et al., 2017, "Grad-CAM"): run view 0 of the image through the densenet feature
extractor and keep its last feature map A (2208 channels of h x w, after the ReLU that the backbone
applies before pooling). Continue as the model does (global average pool -> head) and take the
gradient of the chosen class's *logit* with respect to A. Each channel's weight is the spatial mean
of its gradient; the map is ReLU(sum_k weight_k * A_k), scaled to [0, 1] by its maximum and upsampled
bilinearly to the original image's size. For a linear head this is exactly the class activation map
(CAM); for the MLP head it is its first-order approximation at this image.

Limits, said plainly (also in the README): the map has the feature map's resolution (input / 32:
7 x 7 at 224 px, 2 x 2 at 64 px, 1 x 1 at 32 px, where it is constant and says nothing), so it is
blurry and shows *where the features that drove the logit came from*, not a lesion outline and not
a diagnosis. Each map is scaled by its own maximum, so colours are comparable within one image, not
across images. With a random-init backbone (``XRAY_BACKBONE_WEIGHTS=random``) the maps are
meaningless.

Gradients flow only through pool + head: A is detached from the backbone and made a leaf, so the
backbone's weights stay frozen, no gradients accumulate anywhere, and the cost is one ordinary
forward per image plus a tiny backward.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Overlay look: the heatmap's opacity at its maximum (0 where the map is 0, so unimportant regions
# show the radiograph untouched).
OVERLAY_MAX_ALPHA = 0.5


def _activations(backbone: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> the last feature map after ReLU, (N, 2208, h, w) float32 on the CPU."""
    module = backbone.features  # FrozenDenseNetFeatures: eval mode always, parameters frozen
    backbone.calls += 1
    x = x.to(backbone.device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return F.relu(module.features(x)).float().cpu()


def gradcam_batch(backbone: Any, head: torch.nn.Module, grays: Sequence[np.ndarray], *,
                  class_indices: Sequence[int], settings: Any) -> list[np.ndarray]:
    """Grad-CAM of ``class_indices[i]`` for each image: float32 (H_i, W_i) maps in [0, 1].

    ``grays`` are the checked grayscale images (float, [0, 1]) at their original sizes; each map has
    its image's size. An all-zero map means no positive evidence for that class in this image.
    """
    from xray_core.model.preprocess import make_view

    if len(grays) != len(class_indices):
        raise ValueError(f"{len(grays)} images but {len(class_indices)} class indices")
    if not grays:
        return []
    x = torch.stack([make_view(g, 0, "", settings) for g in grays])
    act = _activations(backbone, x).requires_grad_(True)  # a leaf: gradients stop here
    head.eval()  # dropout off: the map explains the deployed prediction
    with torch.enable_grad():
        logits = head(torch.flatten(F.adaptive_avg_pool2d(act, 1), 1))
        index = torch.as_tensor(list(class_indices), dtype=torch.long).view(-1, 1)
        # Images are independent in the head, so one backward of the summed logits gives each
        # image's own gradient; autograd.grad leaves the head's .grad fields untouched.
        (grads,) = torch.autograd.grad(logits.gather(1, index).sum(), act)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1): channel importance
    cams = F.relu((weights * act.detach()).sum(dim=1))  # (N, h, w)
    out = []
    for cam, gray in zip(cams, grays):
        peak = float(cam.max())
        cam = cam / peak if peak > 0 else torch.zeros_like(cam)
        h, w = np.asarray(gray).shape
        up = F.interpolate(cam[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        out.append(up.clamp_(0.0, 1.0).numpy().astype(np.float32))
    return out


def gradcam(backbone: Any, head: torch.nn.Module, gray: np.ndarray, *, class_index: int,
            settings: Any) -> np.ndarray:
    """Grad-CAM of one image for ``class_index``: float32 (H, W) in [0, 1], the original's size."""
    return gradcam_batch(backbone, head, [gray], class_indices=[class_index], settings=settings)[0]


def _jet(v: np.ndarray) -> np.ndarray:
    """Jet-like colormap: [0, 1] -> RGB floats in [0, 1] (blue -> cyan -> yellow -> red)."""
    four = 4.0 * v[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue
    return np.clip(1.5 - np.abs(four - centres), 0.0, 1.0)


def overlay_png(gray: np.ndarray, cam: np.ndarray, *, text: str) -> bytes:
    """The radiograph with the heatmap blended over it and ``text`` in a box at the top left; PNG bytes.

    The PNG has the original's size, so it registers pixel for pixel with the source image. The
    heatmap's opacity grows with its value (``OVERLAY_MAX_ALPHA`` at the peak).
    """
    from PIL import Image, ImageDraw

    g = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)
    c = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)
    if g.shape != c.shape:
        raise ValueError(f"image {g.shape} and heatmap {c.shape} differ in size")
    alpha = (OVERLAY_MAX_ALPHA * c)[..., None]
    rgb = (1.0 - alpha) * g[..., None] + alpha * _jet(c)
    img = Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    font = _font(draw, text, width=img.size[0], height=img.size[1])
    left, top, right, bottom = draw.textbbox((2, 2), text, font=font)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _font(draw: Any, text: str, *, width: int, height: int) -> Any:
    """Pillow's default font, 1/20 of the image's shorter side, shrunk (down to 6 px) until the text
    fits the width: radiographs are large, but test images are 64 px."""
    from PIL import ImageFont

    size = max(10, min(width, height) // 20)
    try:
        while True:
            font = ImageFont.load_default(size=size)
            if size <= 6 or draw.textlength(text, font=font) <= width - 4:
                return font
            size -= 1
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def heatmap_caption(label: str, probability: float, version: int | None, *,
                    threshold: float | None = None, positive_label: str | None = None) -> str:
    """The text drawn on an overlay, e.g. ``pneumonia p=0.503 >= threshold 0.498 · v3``.

    ``probability`` is the predicted ``label``'s probability. ``threshold`` is a binary model's
    operating threshold on the disease class (``positive_label``; None: ``label`` itself). Without it,
    a film predicted normal at p_normal 0.4997 read "normal 0.50", which looks like a coin toss decided
    the wrong way; with it the caption says the rule that made the call: when ``label`` is the
    disease class, ``label p >= threshold``; otherwise the disease class's probability (1 - p, two
    classes) and ``< threshold``, e.g. ``normal · pneumonia p=0.500 < threshold 0.510 · v3``.
    Three decimals, so a probability just past the threshold does not round onto it. ASCII ``>=``,
    not ``≥``: Pillow's default font has no glyph for it (a box is drawn) and its bitmap fallback
    cannot encode it at all; ``·`` is Latin-1 and renders in both.
    """
    suffix = f" · v{version}" if version is not None else ""
    if threshold is None:
        return f"{label} p={probability:.3f}{suffix}"
    if positive_label is None or positive_label == label:
        return f"{label} p={probability:.3f} >= threshold {threshold:.3f}{suffix}"
    return f"{label} · {positive_label} p={1.0 - probability:.3f} < threshold {threshold:.3f}{suffix}"


__all__ = ["gradcam", "gradcam_batch", "overlay_png", "heatmap_caption", "OVERLAY_MAX_ALPHA"]
