"""Quarantine: one copy of each rejected content that was read, under ``quarantine/``, named by the
sha256 of the bytes written (``quarantine/ab/ab12....png``).

Why content-addressed: a manifest of a million rows naming one film with alternating labels used to
write a new copy per ``label_conflict`` row (29,920 copies, 27 GB, in 10 minutes). Now every row
pointing at the same bytes points at the same file, so a hostile batch adds at most one copy per
distinct content. The original file name stays in the rejection row (``path``), not in the copy's.

Why a cap (``XRAY_QUARANTINE_MAX_BYTES``): distinct bad files can still be many. A copy that would
take the folder past the cap is skipped; its rejection row is written all the same, with no
``quarantine_path`` and a detail that says why. The folder's size is measured once per ingest (one
listing, when the first copy is needed) and kept as a running total, never walked per row. Two
ingests running at once each count from their own start, so together they may pass the cap by what
the other added.

A rejected DICOM that parses is kept de-identified, like the store (``XRAY_DICOM_STORE``), and is
named by the sha256 of the de-identified bytes (the copy is deterministic, so the same original
quarantined twice is still one file). Copies written by older versions
(``quarantine/<sha16>-<random>-<name>``) are left where they are; their rows keep naming them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from xray_core.data.catalogue import patient_salt
from xray_core.data.deidentify import deidentify
from xray_core.data.dicom import DICOM_ERRORS
from xray_core.io.storage import Storage, get_storage
from xray_core.settings import Settings

FOLDER = "quarantine"
# A copy's name ends like the store's, so a person can open it; content the sniffer does not know has none.
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


def quarantine_bytes(settings: Settings, data: bytes, reason: str | None) -> bytes:
    """A rejected DICOM (wrong modality, no pixels, ...) is quarantined de-identified like the store
    (XRAY_DICOM_STORE); one that does not even parse cannot be, and keeps its bytes (SECURITY.md)."""
    from xray_core.data.images import sniff_format

    if (settings.dicom_store != "deidentified" or reason == "unreadable_dicom"
            or sniff_format(data) != "dicom"):
        return data
    try:
        return deidentify(data, salt=patient_salt(settings), site_mode=settings.site_from_dicom)
    except DICOM_ERRORS:
        return data


def quarantine_key(sha256: str, extension: str = "") -> str:
    """Where the bytes whose sha256 is ``sha256`` are quarantined (256 sub-folders, as in the store)."""
    return f"{FOLDER}/{sha256[:2]}/{sha256}{extension}"


@dataclass
class Quarantine:
    """The quarantine as one ingest writes it: content-addressed copies under a byte cap.

    :meth:`copy` returns the key a rejection row names (None: never read, or skipped at the cap) and
    a note for the row's detail when the copy was skipped. The counters feed the ingest summary.
    """

    settings: Settings
    max_bytes: int
    storage: Storage
    written: int = 0  # new copies this ingest
    bytes_written: int = 0
    shared: int = 0  # rows that point at a copy already there (written earlier, or by this ingest)
    skipped: int = 0  # rows left without a copy because of the cap
    _held: int | None = None  # bytes under quarantine/: measured once, when the first copy needs it
    # What this ingest already placed, so 10,000 rows naming one file cost one lookup, not 10,000
    # de-identifications, hashes and existence checks: (original sha256, kept raw?) or a store key.
    _placed: dict[object, str] = field(default_factory=dict)

    @classmethod
    def for_ingest(cls, settings: Settings) -> Quarantine:
        return cls(settings, settings.quarantine_max_bytes, get_storage(settings))

    def copy(self, *, sha256: str | None, data: bytes | None, stored_rel: str | None,
             stored_sha256: str | None = None, reason: str | None = None) -> tuple[str | None, str | None]:
        """Quarantine a rejected file's bytes: ``data`` as read, or else the store file ``stored_rel``
        (whose content has sha256 ``stored_sha256``, that of the original unless de-identified).

        Returns ``(key, None)``, ``(None, note)`` when the cap stopped the copy, or ``(None, None)``
        when the file was never read (missing, outside the root, too large, beside the label folders).
        """
        if data is not None and sha256 is not None:
            kept_raw = reason == "unreadable_dicom"
            memo: object = (sha256, kept_raw)
            if memo in self._placed:
                return self._reuse(self._placed[memo])
            payload = quarantine_bytes(self.settings, data, reason)
            content_sha = sha256 if payload is data else hashlib.sha256(payload).hexdigest()
            key = quarantine_key(content_sha, _extension(payload))
            return self._place(memo, key, content_sha, len(payload),
                               lambda: self.storage.write_bytes(key, payload))
        if stored_rel is not None and (stored_content := stored_sha256 or sha256):
            # Decoded fine, then found in conflict under the write lock (the same bytes with another
            # label earlier in this batch, or from a concurrent ingest): the bytes were stored, and the
            # store file holds exactly what the quarantine keeps (de-identified for DICOM).
            if stored_rel in self._placed:
                return self._reuse(self._placed[stored_rel])
            content_sha = stored_content
            key = quarantine_key(content_sha, _suffix(stored_rel))
            return self._place(stored_rel, key, content_sha, self.storage.size(stored_rel),
                               lambda: self.storage.copy(stored_rel, key))
        return None, None

    def summary(self) -> dict:
        """What the ingest summary reports (``quarantine``)."""
        why = None
        if self.skipped:
            why = (f"each would take quarantine/ ({self._held or 0:,} bytes) past XRAY_QUARANTINE_MAX_BYTES="
                   f"{self.max_bytes:,}; their rejection rows are written without a copy")
        return {"copies_written": self.written, "bytes_written": self.bytes_written,
                "rows_sharing_a_copy": self.shared, "copies_skipped": self.skipped, "skipped_because": why,
                "max_bytes": self.max_bytes}

    def _reuse(self, key: str) -> tuple[str, None]:
        self.shared += 1
        return key, None

    def _place(self, memo: object, key: str, content_sha: str, size: int,
               write: Callable[[], None]) -> tuple[str | None, str | None]:
        if self._holds(key, content_sha):
            self._placed[memo] = key
            return self._reuse(key)
        if self._held is None:
            self._held = self.storage.total_size(FOLDER)
        if self._held + size > self.max_bytes:
            self.skipped += 1  # not remembered: a later row of the same bytes is judged (and counted) again
            return None, (f"not copied to quarantine: the copy ({size:,} bytes) would take quarantine/ "
                          f"({self._held:,} bytes) past XRAY_QUARANTINE_MAX_BYTES={self.max_bytes:,}")
        write()  # atomic: a reader (or a concurrent ingest writing the same bytes) sees all or nothing
        self._held += size
        self.written += 1
        self.bytes_written += size
        self._placed[memo] = key
        return key, None

    def _holds(self, key: str, content_sha: str) -> bool:
        """Whether ``key`` already holds exactly these bytes (then it is shared, not written again).

        Its content is checked, not only its name: a damaged copy is replaced (atomically) rather
        than pointed at. Asked once per distinct content per ingest (see ``_placed``)."""
        if not self.storage.exists(key):
            return False
        try:
            return hashlib.sha256(self.storage.read_bytes(key)).hexdigest() == content_sha
        except FileNotFoundError:  # removed meanwhile
            return False


def _extension(data: bytes) -> str:
    from xray_core.data.images import sniff_format

    return EXTENSIONS.get(sniff_format(data) or "", "")


def _suffix(key: str) -> str:
    name = key.rpartition("/")[2]
    return "." + name.rpartition(".")[2] if "." in name else ""


__all__ = ["Quarantine", "quarantine_bytes", "quarantine_key", "FOLDER"]
