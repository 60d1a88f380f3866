"""Turn the ``XRAY_DEVICE`` setting into a ``torch.device``, and ``XRAY_EMBED_PRECISION`` into the
arithmetic the backbone forward runs in on it.

Asking for a GPU that is not there is a usage error, not a silent fall back to the CPU: an embedding
run that the user expected to take minutes on a GPU would otherwise take hours without a word.
Use ``auto`` to mean "a GPU if there is one".
"""

from __future__ import annotations

import torch

from xray_core.errors import SettingsError

ALLOWED = "auto, cpu, cuda or cuda:N"


def pick_device(setting: str) -> torch.device:
    """Return the device named by ``setting`` (auto | cpu | cuda | cuda:N), checking it exists."""
    value = (setting or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        index_text = value.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise SettingsError(f"XRAY_DEVICE={setting!r}: use {ALLOWED}")
        if not torch.cuda.is_available():
            raise SettingsError(
                f"XRAY_DEVICE={setting} but no CUDA device is available; use auto or cpu"
            )
        if index_text:
            count = torch.cuda.device_count()
            if int(index_text) >= count:
                raise SettingsError(
                    f"XRAY_DEVICE={setting} but only {count} CUDA device(s) exist "
                    f"(cuda:0..cuda:{count - 1}); use auto, cpu or an existing index"
                )
            return torch.device("cuda", int(index_text))
        return torch.device("cuda")
    raise SettingsError(f"XRAY_DEVICE={setting!r}: use {ALLOWED}")


# What a resolved precision can be. fp16: autocast on CUDA without bf16. legacy: what the backbone did
# before the precision was a setting (fp32 on the CPU, bf16/fp16 autocast on CUDA), for model cards that
# do not record one; its fingerprint is the one those models and caches were filed under.
PRECISIONS = ("fp32", "bf16", "fp16", "legacy")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bfloat16 arithmetic in hardware: a CUDA device that supports it, or a
    CPU with AVX512-BF16 or AMX tiles. On other CPUs bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":  # private torch helpers (torch.cpu): absent in some release -> not native
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(bool(check()) for check in checks if check is not None)
    return False


def pick_precision(setting: str, device: torch.device) -> str:
    """The backbone forward's precision for ``setting`` (auto | fp32 | bf16) on ``device``.

    ``auto`` is bf16 where the device does it natively (features are stored as float16 anyway; on
    this project's 2-core AVX512-BF16 machine a 224 px forward ran 2.2x faster, relative error of
    the features 0.7%), fp16 on a CUDA device without bf16 (what CUDA always used), fp32 otherwise.
    ``bf16`` on a device without native support is allowed (emulated: slow, and its last bits may
    differ from native bf16 as they differ between thread counts).
    """
    value = (setting or "auto").strip().lower()
    if value in PRECISIONS:  # fp16 and legacy only arrive from a model card, never from the setting
        return value
    if value == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    raise SettingsError(f"XRAY_EMBED_PRECISION={setting!r}: use auto, fp32 or bf16")


__all__ = ["PRECISIONS", "native_bf16", "pick_device", "pick_precision"]
