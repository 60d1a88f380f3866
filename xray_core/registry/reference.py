"""The locked reference (the bio-creep guard) and the test set's reuse count, read from the audit trail.

A chain of challengers each "not worse" than the last can drift well below the first validated model
(bio-creep). So every challenger is also compared with one fixed model, the **locked reference**: the
first champion ever, unless ``xray lock N --reason`` named another. No column holds it: a lock is an
audit row (decision ``lock``, ``to_version`` the new reference, ``from_version`` the one it replaced,
``champion_after`` the champion, unchanged), and without one the reference is the ``champion_after``
of the first audit row that names a champion. A catalogue made before locks existed therefore needs no
migration: its first champion is its reference.

The **test-set reuse count** is derived the same way: the challengers whose decision was recorded
against a test set (the audit rows' ``metrics.challenger.test_set_fingerprint``). The split only grows,
so new test patients start a new count.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import session_scope
from db.schema import Evaluation, Promotion
from xray_core.data.catalogue import open_catalogue
from xray_core.errors import UsageError
from xray_core.registry.versions import champion_version, existing_model, load_model, promotion_dict
from xray_core.settings import Settings

LOCK = "lock"  # the audit row's decision


def locked_reference(session: Session) -> tuple[int | None, str]:
    """(the locked reference's version, how it was chosen); (None, why) before any champion."""
    lock = session.scalar(select(Promotion).where(Promotion.decision == LOCK)
                          .order_by(Promotion.id.desc()).limit(1))
    if lock is not None and lock.to_version is not None:
        return lock.to_version, f"locked by {lock.actor or lock.trigger}: {lock.rationale}"
    first = session.scalar(select(Promotion.champion_after).where(Promotion.champion_after.is_not(None))
                           .order_by(Promotion.id).limit(1))
    if first is None:
        return None, "no champion yet: the first champion becomes the locked reference"
    return first, "the first champion (no xray lock since)"


def reference_version(settings: Settings) -> int | None:
    """The locked reference's version, None before the first champion."""
    with session_scope(open_catalogue(settings)) as s:
        return locked_reference(s)[0]


def lock_reference(settings: Settings, version: int, *, reason: str, trigger: str = "cli",
                   actor: str | None = None) -> dict[str, Any]:
    """Make ``version`` the locked reference, audited with ``reason`` (the ``lock`` audit row, as a dict).

    Refused (UsageError, exit 2) without a reason, for an unknown version, one never scored on a test
    set (there is nothing to say it deserves trust) or the reference already; a version whose files are
    missing or altered is refused by loading it (every challenger will be scored against it)."""
    if not reason.strip():
        raise UsageError("locking a reference needs --reason")
    with session_scope(open_catalogue(settings)) as s:
        existing_model(s, version)
        previous, _ = locked_reference(s)
        if previous == version:
            raise UsageError(f"model version {version} is already the locked reference")
        if s.scalar(select(Evaluation.id).where(Evaluation.model_id == version).limit(1)) is None:
            raise UsageError(f"model version {version} was never scored on a test set, so it cannot be the "
                             "locked reference; lock an evaluated version (see xray models)")
    load_model(settings, version)
    with session_scope(open_catalogue(settings)) as s:
        champion = champion_version(s)
        row = Promotion(from_version=previous, to_version=version, decision=LOCK, champion_after=champion,
                        rationale=f"locked reference {_v(previous)} -> v{version}: {reason.strip()}",
                        metrics={"reference": {"previous": previous, "version": version}},
                        trigger=trigger, actor=actor)
        s.add(row)
        s.flush()
        return promotion_dict(row)


def _v(version: int | None) -> str:
    return "none" if version is None else f"v{version}"


def count_test_set_reuse(settings: Settings, fingerprint: str) -> dict[str, Any]:
    """How many decisions the test set ``fingerprint`` has informed (distinct challengers whose recorded
    decision names it), against ``XRAY_TEST_REUSE_BUDGET``, with the report's sentence."""
    named = Promotion.metrics["challenger"]["test_set_fingerprint"].as_string()
    with session_scope(open_catalogue(settings)) as s:
        n = int(s.scalar(select(func.count(func.distinct(Promotion.to_version)))
                         .where(named == fingerprint)) or 0)
    budget = settings.test_reuse_budget
    over = n > budget
    line = f"This test set ({fingerprint[:8]}) has informed {n} decision{'s' if n != 1 else ''}"
    line += (f": more than XRAY_TEST_REUSE_BUDGET={budget}. Decisions made on it may fit its films rather "
             "than new patients (adaptive overfitting); new test patients from arrivals refresh it."
             if over else f" (XRAY_TEST_REUSE_BUDGET={budget}).")
    return {"fingerprint": fingerprint, "decisions": n, "budget": budget, "over_budget": over, "line": line}


__all__ = ["LOCK", "locked_reference", "lock_reference", "reference_version", "count_test_set_reuse"]
