"""A forked child leaves the parent's database connections alone (db/engine.py ``_after_fork_in_child``):
its engine starts a new pool, and the connection the parent holds still works after the child used the
catalogue and exited. Run in a fresh process that forks (this test process has threads)."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROJECT, TEST_ENV

SCRIPT = r"""
import os, sys
from db.engine import get_engine

engine = get_engine(sys.argv[1])
held = engine.connect()                      # checked out in the parent, kept across the fork
held.exec_driver_sql("SELECT count(*) FROM images").scalar()
held.commit()  # its transaction ends (every one is BEGIN IMMEDIATE); the connection stays checked out
parent_pool = id(engine.pool)
pid = os.fork()
if pid == 0:
    import gc, db.engine
    gc.collect()                               # the parent's pool is kept, not collected (and closed)
    new_pool = id(engine.pool) != parent_pool and id(db.engine._inherited_pools[0]) == parent_pool
    with engine.connect() as conn:             # the child's own connection
        conn.exec_driver_sql("SELECT count(*) FROM images").scalar()
    os._exit(0 if new_pool else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), held.exec_driver_sql("SELECT 1").scalar())
"""


def test_a_forked_child_gets_its_own_pool_and_the_parents_connection_still_works(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    done = subprocess.run([sys.executable, "-c", SCRIPT, url], cwd=PROJECT, capture_output=True, text=True,
                          env={**TEST_ENV, "PYTHONPATH": str(PROJECT)}, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # the child's pool was new (exit 0); the parent's connection answers (1)
    assert done.stdout.split() == ["0", "1"], done.stderr[-3000:]
