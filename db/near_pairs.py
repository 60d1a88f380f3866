"""Near-identical films by perceptual hash, without comparing every pair: multi-index hashing.

Two 64-bit hashes within ``d`` bits of each other agree exactly on at least one of ``d + 1`` disjoint
bit bands (pigeonhole: ``d`` differing bits cannot touch ``d + 1`` bands). So a query looks up only the
films sharing one of its band values (a binary search in each band's sorted array), then verifies
those candidates by an exact popcount. On random hashes a 7-band index (d = 6, bands of 9-10 bits)
reads about 1/73 of the catalogue per query, and a 4-band one (d = 3, 16 bits) about 1/16,000.
Real pHashes are not uniform (chest films look alike), so more candidates share a band there; the
answer stays exact either way, only the work grows.

Bands narrower than 8 bits (``d`` >= 8) select too little to pay for themselves: :class:`BandIndex`
then scans every hash (one vectorised XOR and popcount, a few ms per query at 1M).

``pairs_within`` finds all pairs of a set at once (the catalogue's ``near_pairs`` table, backfilled
by migration 0005): 4 bands of 16 bits, where a pair within ``d`` bits differs in at most ``d // 4``
bits of some band; for each band and each choice of those bits, hashes equal once the chosen bits are
cleared are grouped by sorting, and only pairs inside a group are verified.

This module is storage-side (migration 0005 uses it) and imports nothing from ``xray_core``.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import sqlalchemy as sa

NEAR_PAIR_MAX_DISTANCE = 6  # bits of 64: the pairs ``near_pairs`` holds, and what ``xray status`` lists
# the closest pairs a new film records at ingest (xray_core.data.admission.record_near_pairs)
NEAR_PAIRS_PER_FILM = 32
MIN_BAND_BITS = 8  # narrower bands (d >= 8) fall back to a linear scan
_U64 = (1 << 64) - 1
_BYTE_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as uint8 (np.bitwise_count where NumPy has it, i.e. 2.0 and later)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    per_byte = _BYTE_POPCOUNT[np.ascontiguousarray(x).view(np.uint8)]
    return per_byte.reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def band_layout(bands: int) -> list[tuple[int, int]]:
    """(shift, mask) of ``bands`` disjoint bit bands covering all 64 bits, widths differing by at most 1."""
    width, extra = divmod(64, bands)
    layout, shift = [], 0
    for b in range(bands):
        w = width + (1 if b < extra else 0)
        layout.append((shift, (1 << w) - 1))
        shift += w
    return layout


def _band_dtype(mask: int) -> type:
    """The smallest unsigned type holding a band: NumPy radix-sorts 16-bit keys (much faster)."""
    return np.uint16 if mask < (1 << 16) else np.uint32 if mask < (1 << 32) else np.uint64


class BandIndex:
    """uint64 hashes, searchable within ``radius`` bits by ``radius + 1`` bands; grows by ``add``.

    Each band keeps a sorted copy of its values and their positions. Hashes added after the last sort
    sit in a tail that every query scans; the tail is merged in when it passes 1/64 of the index (at
    least 2,048), so a sort of the whole index happens once per that many additions.
    """

    def __init__(self, hashes: np.ndarray, radius: int) -> None:
        self.radius = max(int(radius), 0)
        bands = self.radius + 1
        self._layout = band_layout(bands) if 64 // bands >= MIN_BAND_BITS else None
        self._hashes = np.array(hashes, dtype=np.uint64)
        self._n = len(self._hashes)
        self._sorted_n = 0
        self._keys: list[np.ndarray] = []
        self._order: list[np.ndarray] = []
        self._sort()

    def __len__(self) -> int:
        return self._n

    @property
    def banded(self) -> bool:
        """False when the radius is too wide for bands and every query scans all hashes."""
        return self._layout is not None

    def _sort(self) -> None:
        self._sorted_n = self._n
        if self._layout is None:
            return
        live = self._hashes[: self._n]
        self._keys, self._order = [], []
        for shift, mask in self._layout:
            values: np.ndarray = ((live >> np.uint64(shift)) & np.uint64(mask)).astype(_band_dtype(mask))
            order = np.argsort(values, kind="stable")
            self._order.append(order.astype(np.int64))
            self._keys.append(values[order])

    def add(self, value: int) -> int:
        """Append one hash; returns its position."""
        if self._n == len(self._hashes):
            grown = np.zeros(max(1024, 2 * len(self._hashes)), dtype=np.uint64)
            grown[: self._n] = self._hashes[: self._n]
            self._hashes = grown
        self._hashes[self._n] = np.uint64(int(value) & _U64)
        self._n += 1
        if self._layout is not None and self._n - self._sorted_n > max(2048, self._sorted_n // 64):
            self._sort()
        return self._n - 1

    def within(self, value: int, distance: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions ascending, distances) of every hash within ``distance`` bits of ``value``."""
        if self._n == 0 or distance < 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        q = np.uint64(int(value) & _U64)
        if self._layout is None or distance > self.radius:
            candidates = np.arange(self._n)  # no bands, or a wider question than they answer
        else:
            parts = [np.arange(self._sorted_n, self._n)]
            for (shift, mask), keys, order in zip(self._layout, self._keys, self._order):
                key = keys.dtype.type((q >> np.uint64(shift)) & np.uint64(mask))
                parts.append(order[np.searchsorted(keys, key, "left"):np.searchsorted(keys, key, "right")])
            candidates = np.concatenate(parts)
        dist = popcount64(self._hashes[candidates] ^ q)
        hit = dist <= distance
        positions, first = np.unique(candidates[hit], return_index=True)
        return positions, dist[hit][first].astype(np.int64)


def pairs_within(hashes: np.ndarray, distance: int, *, groups: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of ``hashes`` within ``distance`` bits, as arrays (i, j, distance), by (i, j).

    With ``groups`` (one integer per hash, e.g. a patient code), pairs inside one group are left out.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    found_i, found_j = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    if n >= 2 and distance >= 0:
        for shift, mask in band_layout(4):
            band = ((h >> np.uint64(shift)) & np.uint64(mask)).astype(np.uint16)  # 16 bits: radix sort
            for bits in combinations(range(16), distance // 4):
                i, j = _close_pairs_in_runs(band & np.uint16(mask & ~sum(1 << b for b in bits)), h, distance)
                found_i.append(i)
                found_j.append(j)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    if groups is not None:
        keep = np.asarray(groups)[i] != np.asarray(groups)[j]
        i, j = i[keep], j[keep]
    pairs = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    lo, hi = pairs // max(n, 1), pairs % max(n, 1)
    return lo, hi, popcount64(h[lo] ^ h[hi]).astype(np.int64)


def _close_pairs_in_runs(keys: np.ndarray, h: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) with equal keys and hashes within ``distance``: sort by key, then compare
    each position with the one ``step`` = 1, 2, ... further along its run of equal keys (work is
    proportional to the candidate pairs, not n^2; hashes are read in sorted order, not gathered)."""
    order = np.argsort(keys, kind="stable")
    k_sorted, h_sorted = keys[order], h[order]
    n = len(keys)
    starts = np.flatnonzero(np.concatenate(([True], k_sorted[1:] != k_sorted[:-1])))
    run_end = np.repeat(np.append(starts[1:], n), np.diff(np.append(starts, n)))  # end of each position's run
    active = np.flatnonzero(run_end - np.arange(n) > 1)  # positions with at least one later partner
    out_i, out_j = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    step = 1
    while len(active):
        close = active[popcount64(h_sorted[active] ^ h_sorted[active + step]) <= distance]
        out_i.append(order[close])
        out_j.append(order[close + step])
        step += 1
        active = active[run_end[active] > active + step]
    return np.concatenate(out_i), np.concatenate(out_j)


def backfill_near_pairs(conn: sa.Connection, *, distance: int = NEAR_PAIR_MAX_DISTANCE) -> int:
    """Fill ``near_pairs`` with the pairs of catalogued images of different patients within ``distance``
    bits, each film with at most its NEAR_PAIRS_PER_FILM closest earlier films, as ingest records them
    (migration 0005; idempotent: rows already there are kept). Returns pairs added."""
    rows = conn.execute(sa.text("SELECT id, phash, patient_id FROM images ORDER BY id")).all()
    if len(rows) < 2:
        return 0
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    hashes = np.array([r[1] for r in rows], dtype=np.int64).view(np.uint64)
    _, codes = np.unique(np.array([r[2] for r in rows], dtype=object).astype(str), return_inverse=True)
    lo, hi, dist = pairs_within(hashes, distance, groups=codes)
    # As ingest records them: each film (the later id, hi) keeps its NEAR_PAIRS_PER_FILM closest earlier
    # films.
    order = np.lexsort((lo, dist, hi))
    lo, hi, dist = lo[order], hi[order], dist[order]
    first = np.flatnonzero(np.concatenate(([True], hi[1:] != hi[:-1])))
    rank = np.arange(len(hi)) - np.repeat(first, np.diff(np.append(first, len(hi))))
    keep = rank < NEAR_PAIRS_PER_FILM
    lo, hi, dist = lo[keep], hi[keep], dist[keep]
    existing = {tuple(r) for r in conn.execute(sa.text("SELECT image_a, image_b FROM near_pairs"))}
    values = [{"a": int(ids[a]), "b": int(ids[b]), "d": int(d)} for a, b, d in zip(lo, hi, dist)
              if (int(ids[a]), int(ids[b])) not in existing]
    for start in range(0, len(values), 10_000):
        conn.execute(sa.text("INSERT INTO near_pairs (image_a, image_b, distance) VALUES (:a, :b, :d)"),
                     values[start:start + 10_000])
    return len(values)
