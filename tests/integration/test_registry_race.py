"""Two processes promoting at once: the champion switch is a compare-and-set in one transaction.

Moved from tests/unit/test_registry.py (unchanged): it forks, which the unit lane refuses. The heads are
tiny (tests/registry_heads.py), so no backbone is involved.
"""

from __future__ import annotations

import multiprocessing
import queue

import pytest
import torch
from registry_heads import champions, db_count, save, status_of

from db import dispose_engines
from db.schema import Model, Promotion
from xray_core.registry.listing import history
from xray_core.registry.versions import promote_manually
from xray_core.settings import Settings


def _promote_in_child(settings: Settings, version: int, barrier, results) -> None:
    torch.set_num_threads(1)
    try:
        barrier.wait(timeout=30)
        row = promote_manually(settings, version, reason=f"race for {version}",
                               trigger="test", actor=str(version))
        results.put(("ok", version, row["from_version"], row["champion_after"]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("error", version, f"{type(exc).__name__}: {exc}", None))


def test_two_processes_promoting_at_once_leave_one_champion_and_two_audit_rows(settings: Settings):
    ctx = multiprocessing.get_context("fork")
    champion = None
    for round_ in range(4):
        a, b = save(settings, seed=10 + 2 * round_), save(settings, seed=11 + 2 * round_)
        rows_before = db_count(settings, Promotion)
        dispose_engines()  # no SQLite connection crosses the fork
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_promote_in_child, args=(settings, v, barrier, results)) for v in (a, b)]
        for p in procs:
            p.start()
        outcomes = []
        try:
            for _ in procs:
                outcomes.append(results.get(timeout=60))
        except queue.Empty:
            pytest.fail(f"round {round_}: a promoting process did not report within 60 s")
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        assert all(o[0] == "ok" for o in outcomes), outcomes
        assert [p.exitcode for p in procs] == [0, 0]
        now = champions(settings)
        assert len(now) == 1 and now[0] in (a, b), now
        assert db_count(settings, Promotion) == rows_before + 2
        # The two switches serialised: the first replaced the old champion, the second the first.
        first, second = sorted(outcomes, key=lambda o: o[2] != champion)
        assert first[2] == champion and second[2] == first[1] and second[3] == now[0] == second[1]
        loser = first[1]
        assert status_of(settings, loser) == "retired"
        champion = now[0]
    assert db_count(settings, Model, Model.status == "champion") == 1
    assert len(history(settings)) == 8
