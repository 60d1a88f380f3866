"""Turn the ``XRAY_DEVICE`` setting into a ``torch.device``.

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


__all__ = ["pick_device"]
