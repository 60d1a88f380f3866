"""Seeded, stratified subsamples of a split's films, for the steps whose cost grows faster than the films
(the shortcut audit's probes, the head-recipe comparison): at hospital scale they run on at most
``XRAY_SUBSAMPLE_FILMS`` films, drawn per stratum in proportion, and say so where their result is shown."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def stratified_subsample(strata: Sequence[Hashable], size: int, *, seed: int) -> np.ndarray | None:
    """Sorted indices of about ``size`` films, each stratum (e.g. label × site) keeping its share (at least
    one film of each); None when there are ``size`` films or fewer, i.e. when every film is used."""
    n = len(strata)
    if n <= size:
        return None
    keys = np.asarray([str(s) for s in strata])
    names, which = np.unique(keys, return_inverse=True)
    rng = np.random.default_rng(seed)
    picked = []
    for k in range(len(names)):
        members = np.flatnonzero(which == k)
        take = max(1, int(round(len(members) * size / n)))
        picked.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


__all__ = ["stratified_subsample"]
