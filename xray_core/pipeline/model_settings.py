"""Which settings serve an existing model: the backbone it was trained on, rebuilt from its card.

A model's features come from its backbone: weights, preprocessing and the forward's precision. The
current settings may differ (another ``XRAY_INPUT_SIZE``, or ``XRAY_EMBED_PRECISION=auto`` now picking
bf16 where the model was trained in fp32). Champion scoring always rebuilds the model's own backbone;
prediction and monitoring keep the current weights and preprocessing but, with ``auto``, the model's
own precision, so an upgrade does not stop a champion from predicting.
"""

from __future__ import annotations

from typing import Any

from xray_core.settings import Settings


def settings_for_card(settings: Settings, card: dict[str, Any]) -> Settings:
    """``settings`` with everything that shapes a model's features taken from its card: weights,
    preprocessing and the forward's precision (``legacy`` for cards from before it was recorded)."""
    saved = card.get("settings", {})
    keys = ("backbone_weights", "backbone_seed", "input_size", "aug_rotation", "aug_hflip")
    changes = {k: saved[k] for k in keys if k in saved}
    if "aug_crop_scale" in saved:
        changes["aug_crop_scale"] = tuple(saved["aug_crop_scale"])
    changes["embed_precision"] = card_precision(card)
    return settings.with_overrides(**changes)


def card_precision(card: dict[str, Any]) -> str:
    """The backbone precision a model was trained with: ``legacy`` for cards from before it was
    recorded (fp32 on the CPU, autocast on CUDA, under the fingerprint they were filed under; see
    ``xray_core.model.backbone.fingerprint``)."""
    return str(card.get("backbone_precision") or "legacy")


def settings_for_fingerprint(settings: Settings, fingerprint: str) -> Settings | None:
    """The settings, at the precision that gives the backbone ``fingerprint``, of the current weights and
    preprocessing; None when none does. With ``XRAY_EMBED_PRECISION=auto`` every precision counts (a
    model is served with its own), otherwise only the one set. Fingerprints only: no forward runs."""
    from xray_core.model.backbone import load_backbone

    tried = (["auto", "fp32", "bf16", "fp16", "legacy"] if settings.embed_precision == "auto"
             else [settings.embed_precision])
    for precision in tried:
        own = settings.with_overrides(embed_precision=precision)
        if load_backbone(own).fingerprint == fingerprint:
            return own
    return None


def settings_for_model(settings: Settings, card: dict[str, Any]) -> Settings:
    """The settings to embed films for an existing model with: with ``XRAY_EMBED_PRECISION=auto`` the
    model's own precision, so a champion trained in fp32 keeps predicting (and being monitored) on
    fp32 features on a machine where auto now picks bf16 for new models. An explicit setting wins
    (a model from another precision is then refused as from another backbone, as before)."""
    if settings.embed_precision != "auto":
        return settings
    return settings.with_overrides(embed_precision=card_precision(card))


__all__ = ["card_precision", "settings_for_card", "settings_for_fingerprint", "settings_for_model"]
