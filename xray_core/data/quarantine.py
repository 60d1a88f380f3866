"""Quarantine: a copy of every rejected file that was read, under ``quarantine/``, named by its
sha256 prefix and a random suffix (two rejections of the same bytes never overwrite each other).

A rejected DICOM that parses is kept de-identified, like the store (``XRAY_DICOM_STORE``).
"""

from __future__ import annotations

import re
import uuid

from xray_core.data.catalogue import patient_salt
from xray_core.data.deidentify import deidentify
from xray_core.data.dicom import DICOM_ERRORS
from xray_core.io.storage import get_storage
from xray_core.settings import Settings


def quarantine_bytes(settings: Settings, data: bytes, reason: str | None) -> bytes:
    """A rejected DICOM (wrong modality, no pixels, ...) is quarantined de-identified like the store
    (XRAY_DICOM_STORE); one that does not even parse cannot be, and keeps its bytes (SECURITY.md)."""
    from xray_core.data.images import sniff_format

    if settings.dicom_store != "deidentified" or reason == "unreadable_dicom" or sniff_format(data) != "dicom":
        return data
    try:
        return deidentify(data, salt=patient_salt(settings), site_mode=settings.site_from_dicom)
    except DICOM_ERRORS:
        return data


def quarantine_copy(settings: Settings, *, name: str, sha256: str | None, data: bytes | None,
                    stored_rel: str | None, reason: str | None = None) -> str | None:
    """Copy a rejected file's bytes under quarantine/; None when it was never read (missing, outside
    the root, too large, or beside the label folders)."""
    if data is None and stored_rel is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:] or "file"
    rel = f"quarantine/{(sha256 or 'unread')[:16]}-{uuid.uuid4().hex[:8]}-{safe}"
    store = get_storage(settings)
    if data is not None:
        store.write_bytes(rel, quarantine_bytes(settings, data, reason))
    else:
        # Decoded fine, then found in conflict under the write lock (the same bytes with another
        # label earlier in this batch, or from a concurrent ingest): _prepare dropped the bytes but
        # stored them, and the store file holds exactly the same bytes.
        store.copy(stored_rel, rel)
    return rel
