"""Admission rules applied when a decoded film is written to the catalogue: its site, its view
(``XRAY_ALLOWED_VIEWS``), and near-identical films of *different* patients.

**Site**: a manifest's ``site`` column, else ``xray ingest --site NAME`` (or the flow's ``site``), else
DICOM's institution (``XRAY_SITE_FROM_DICOM``), else the source folder's name, so a second collection
is a second site even when nobody said so.

**Exact copies** of a catalogued film under another patient id: :func:`duplicate_of_another_patient`.

**Views**: with ``XRAY_ALLOWED_VIEWS=PA,AP`` a film of another *known* view (``LATERAL``) is quarantined
as ``view_not_allowed``; a film of unknown view is kept and counted.

**Near copies**: the same film stored twice under two patient ids.

In public collections one film sometimes appears under two patient ids (re-exported, re-encoded,
resized). If the two copies land in different splits, the test set contains a training film. Exact
byte duplicates are caught by sha256; near copies need the perceptual hash.

Calibrated on the real films beside the project (``python bench/near_copies.py``): a JPEG re-encode at
quality 75 moves at most 2 bits of the 64-bit pHash (0 on the paediatric films), a half-size resize
at most 2, while the closest two *different* paediatric patients of the 120-film sample are 6 bits
apart and the closest two adult patients 10. ``XRAY_NEAR_COPY_DISTANCE`` (default 3) sits between them. A
crop of a few per cent moves the hash up to 10 bits and is not caught: that is a limit of a global hash, said
in the README.

A new film within the distance of another patient's film is quarantined as
``near_duplicate_other_patient`` (naming both) unless the two patients are already known to sit in
the same split, or one side has no real patient id (each such image is its own "patient"); then it is
stored, and the pair is linked in the ingest summary.

Whatever the verdict setting (``-1`` included), every film catalogued has its pairs with other
patients' films within 6 bits written to ``near_pairs`` (:func:`record_near_pairs`), which is what
``xray status`` lists once splits are assigned. Each write group first adds the films another ingest
catalogued meanwhile (:meth:`NearCopyIndex.refresh`, under the catalogue's write lock), so two ingests
running at once compare their films with each other's too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import in_blocks
from db.near_pairs import NEAR_PAIR_MAX_DISTANCE, NEAR_PAIRS_PER_FILM, BandIndex
from db.schema import Image, NearPair, Patient
from xray_core.data.prepare import Prepared
from xray_core.data.sites import normalise_view, source_site
from xray_core.settings import Settings


@dataclass
class NearCopyIndex:
    """The pHashes of every catalogued film (loaded once per ingest, grown as films are added).

    Searched by multi-index hashing (:class:`db.near_pairs.BandIndex`): ``radius + 1`` pHash bands, so
    a query within ``radius`` bits reads only the films sharing a band value with it (under a ms at 1M
    films, against 16 ms for the former linear scan at 100k); wider questions scan every film. Only ids
    and hashes are loaded (at 1M films, also reading patient ids and names tripled the load); a film's
    patient and name are read when it is first found near another, or known when added here.
    """

    radius: int = NEAR_PAIR_MAX_DISTANCE
    ids: list[int] = field(default_factory=list)  # image id per position
    _bands: BandIndex | None = None
    _facts: dict[int, tuple[str, str]] = field(default_factory=dict)  # position -> (patient id, file name)
    _seen_up_to: int = 0  # the highest image id read from the catalogue
    _own: set[int] = field(default_factory=set)  # ids this process added after that
    # (phash, searched distance, positions, dists)
    _last: tuple[int, int, np.ndarray, np.ndarray] | None = None

    @classmethod
    def load(cls, session: Session, *, radius: int = NEAR_PAIR_MAX_DISTANCE) -> NearCopyIndex:
        """Every catalogued film, indexed for questions within ``radius`` bits (ingest passes the larger
        of XRAY_NEAR_COPY_DISTANCE and the distance ``near_pairs`` records)."""
        rows = session.execute(select(Image.id, Image.phash).order_by(Image.id)).all()
        index = cls(radius=radius, ids=[r[0] for r in rows])
        hashes = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)).view(np.uint64)
        index._bands = BandIndex(hashes, radius)
        index._seen_up_to = index.ids[-1] if index.ids else 0
        return index

    def refresh(self, session: Session) -> None:
        """Add the films another process catalogued since this index was loaded (call under the write
        lock, so two ingests running at once still see each other's films)."""
        for image_id, phash, patient, name in session.execute(
                select(Image.id, Image.phash, Image.patient_id, Image.original_name)
                .where(Image.id > self._seen_up_to).order_by(Image.id)):
            if image_id not in self._own:
                self.add(image_id, phash, patient, name, own=False)
            self._seen_up_to = max(self._seen_up_to, image_id)

    def add(self, image_id: int, phash: int, patient: str, name: str, *, own: bool = True) -> None:
        if self._bands is None:
            self._bands = BandIndex(np.zeros(0, dtype=np.uint64), self.radius)
        self._facts[len(self.ids)] = (patient, name)
        self.ids.append(int(image_id))
        self._bands.add(int(phash))
        self._last = None
        if own:
            self._own.add(int(image_id))

    def facts(self, positions: list[int], session: Session | None = None) -> dict[int, tuple[str, str]]:
        """(patient id, file name) of the films at ``positions``, read from the catalogue when not known."""
        missing = {self.ids[p]: p for p in positions if p not in self._facts}
        if missing and session is None:
            raise ValueError("films loaded from the catalogue need a session to read their patients")
        ids = sorted(missing)
        for block in in_blocks(ids):
            assert session is not None  # films are missing: checked above
            for image_id, patient, name in session.execute(
                    select(Image.id, Image.patient_id, Image.original_name).where(Image.id.in_(block))):
                self._facts[missing[image_id]] = (patient, name)
        return {p: self._facts[p] for p in positions}

    def other_patients_within(self, phash: int, patient: str, max_distance: int,
                              session: Session | None = None) -> list[tuple[int, int]]:
        """(position, distance) of every film of another patient within ``max_distance``, closest first.

        A question within the bands' radius costs the same at any distance (the band lookups decide
        the candidates), so it is asked at the radius and kept: ingest's second question about the
        same film (the verdict at XRAY_NEAR_COPY_DISTANCE, then the pairs at 6 bits) is a filter."""
        if self._bands is None or not self.ids:
            return []
        value = int(phash)
        if self._last is not None and self._last[0] == value and max_distance <= self._last[1]:
            positions, dist = self._last[2], self._last[3]
        else:
            searched = max(max_distance, self.radius)
            positions, dist = self._bands.within(value, searched)
            self._last = (value, searched, positions, dist)
        close = dist <= max_distance
        positions, dist = positions[close], dist[close]
        facts = self.facts(positions.tolist(), session)
        return sorted(((int(p), int(d)) for p, d in zip(positions, dist) if facts[int(p)][0] != patient),
                      key=lambda t: (t[1], t[0]))


def record_near_pairs(session: Session, index: NearCopyIndex, image_id: int, phash: int, patient: str) -> int:
    """Write ``near_pairs`` rows for a film just catalogued (before ``index.add`` of it): the films of
    other patients within NEAR_PAIR_MAX_DISTANCE bits, whatever the splits are now, at most the
    NEAR_PAIRS_PER_FILM closest. Returns how many.

    Why a cap: in a collection of near-identical films (a phantom series, blank or synthetic films; 32 px
    synthetic films of 16 anatomies wrote 2 million pairs for the first 44,000 films, and ingest slowed to
    5 films/s) every new film is near thousands; status only needs to know that a film has near copies
    across splits, and :func:`xray_core.data.catalogue.near_duplicate_pairs` says how many films reached
    the cap (their totals are then lower bounds)."""
    found = index.other_patients_within(phash, patient, NEAR_PAIR_MAX_DISTANCE, session)[:NEAR_PAIRS_PER_FILM]
    for pos, distance in found:
        other = index.ids[pos]
        session.add(NearPair(image_a=min(other, image_id), image_b=max(other, image_id), distance=distance))
    return len(found)


def near_copy_verdict(session: Session, index: NearCopyIndex, *, phash: int, patient: str, name: str,
                      max_distance: int, id_given: bool = True) -> tuple[str, str] | dict | None:
    """None (no near copy); a ``(reason, detail)`` rejection; or a link dict (stored and reported).

    Every near copy is judged, not only the closest: one safe match (same split) must not hide another
    in a different split."""
    found = index.other_patients_within(phash, patient, max_distance, session)
    if not found:
        return None
    facts = index.facts([pos for pos, _ in found])
    others = {facts[pos][0] for pos, _ in found}
    known = {pid: (split, source) for pid, split, source in session.execute(
        select(Patient.patient_id, Patient.split, Patient.id_source)
        .where(Patient.patient_id.in_([patient, *others])))}
    mine, my_source = known.get(patient, (None, None))
    links = []
    for pos, distance in found:
        other_patient, other_file = facts[pos]
        theirs, their_source = known.get(other_patient, (None, None))
        link = {"image": index.ids[pos], "patient": other_patient, "distance": distance, "split": theirs,
                "file": name, "other_file": other_file}
        if mine is not None and mine == theirs:
            links.append(link)
        elif "image" in (my_source, their_source) or (my_source is None and not id_given):
            # A "patient" that is only the image itself (no manifest column, DICOM PatientID or regex match)
            # says nothing about who the person is: linked and reported (status lists near duplicates
            # across splits), not quarantined as if two known patients shared a film.
            links.append({**link, "note": "no patient id on one side"})
        else:
            where = f"{theirs or 'no split yet'} vs {mine or 'a new patient'}"
            return ("near_duplicate_other_patient",
                    f"{name} (patient {patient}) and image {index.ids[pos]} {other_file} (patient "
                    f"{other_patient}) are {distance} pHash bits apart (<= {max_distance}, "
                    f"XRAY_NEAR_COPY_DISTANCE); their splits ({where}) could differ, which would leak a film "
                    "between train and test")
    return links[0]


@dataclass(frozen=True)
class SiteRule:
    """Where an ingest's films come from unless a row says otherwise."""

    explicit: str | None  # xray ingest --site NAME / the flow's site parameter
    folder: str  # the source folder's name: the last resort

    @classmethod
    def for_source(cls, explicit: str | None, source: str) -> SiteRule:
        return cls(explicit.strip() if explicit and explicit.strip() else None, source_site(source))

    def site_of(self, manifest_site: str | None, dicom_site: str | None) -> str:
        return manifest_site or self.explicit or dicom_site or self.folder


def admit(session: Session, settings: Settings, index: NearCopyIndex, *, meta: dict,
          manifest_site: str | None, sites: SiteRule, patient: str, name: str,
          id_given: bool = True) -> tuple[str, str] | dict | None:
    """Fill ``meta``'s site and view in place; return a rejection, a same-split near-copy link, or None."""
    meta["site"] = sites.site_of(manifest_site, meta.get("site"))
    meta["view"] = normalise_view(meta.get("view"))
    if settings.allowed_views and meta["view"] and meta["view"] not in settings.allowed_views:
        return ("view_not_allowed", f"view {meta['view']} is not in XRAY_ALLOWED_VIEWS="
                                    f"{','.join(settings.allowed_views)}")
    if settings.near_copy_distance < 0:
        return None
    return near_copy_verdict(session, index, phash=meta["phash"], patient=patient, name=name,
                             max_distance=settings.near_copy_distance, id_given=id_given)


def claimed_patient(prep: Prepared) -> str | None:
    """The patient id the row itself names (a manifest cell, or XRAY_PATIENT_REGEX on a non-DICOM
    file name), or None. A DICOM's own PatientID is not a claim: the same bytes carry the same one."""
    named = prep.id_source == "manifest"
    if named or (prep.id_source == "filename" and (prep.meta or {}).get("format") != "dicom"):
        return prep.patient_id
    return None


def duplicate_of_another_patient(s: Session, prep: Prepared, existing: Image) -> tuple[str, str] | None:
    """``duplicate_other_patient`` when a known film's row names another patient than the stored film's.

    The film stays catalogued once, under its first patient: which one is right is for a person to
    decide, and the row names both. A stored film whose patient is only the image itself (no id
    anywhere) is not contradicted, as for near copies (:func:`near_copy_verdict`), and nor is one
    whose patient id came from another kind of source (manifest vs file name)."""
    claimed = claimed_patient(prep)
    if claimed is None or claimed == existing.patient_id:
        return None
    first = s.get(Patient, existing.patient_id)  # one query per group at most: the session caches it
    # Only ids of one kind contradict each other: a folder first ingested with its manifest
    # ("kermany-IM-0216") and again by file name ("IM-0216") names the same patient in two schemes.
    if first is None or first.id_source != prep.id_source:
        return None
    first_id = existing.patient_id  # as the catalogue stores it: a DICOM PatientID only salted
    return ("duplicate_other_patient",
            f"{prep.cand.rel} (patient {claimed}) is byte for byte image {existing.id} "
            f"{existing.original_name} (patient {first_id}); the film stays catalogued once, under "
            f"patient {first_id}. Not copied to quarantine: the stored film ({existing.stored_path}) is "
            "the same bytes")
