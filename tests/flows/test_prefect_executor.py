"""The Prefect executor reads each step's declared options: the task's name, the retry on transient
I/O, the progress artifact and the Dask fan-out (no flow run needed: the task is only built)."""

from __future__ import annotations

from flows.common import transient_io
from flows.retrain import PrefectExecutor
from xray_core.pipeline import recipe
from xray_core.settings import load_settings


def _task(settings, fn):
    call = PrefectExecutor(settings).step(fn)
    return call.func, call.keywords  # functools.partial over the Prefect task


def test_steps_become_tasks_with_the_options_declared_beside_them(xray_env):
    settings = load_settings()
    ingest, injected = _task(settings, recipe.ingest)
    assert (ingest.name, ingest.retries, ingest.retry_condition_fn) == ("ingest", 1, transient_io)
    assert callable(injected["progress"])
    audit, injected = _task(settings, recipe.audit)
    assert (audit.name, audit.retries, injected) == ("audit", 0, {})
    embed, injected = _task(settings, recipe.embed)
    assert (embed.name, embed.retries, sorted(injected)) == ("embed", 1, ["progress"])


def test_embed_fans_out_over_dask_only_when_workers_are_set(xray_env):
    _, injected = _task(load_settings({"XRAY_EMBED_DASK_WORKERS": "2"}), recipe.embed)
    assert sorted(injected) == ["fan_out", "progress"]
    _, injected = _task(load_settings({"XRAY_EMBED_DASK_WORKERS": "2"}), recipe.train)
    assert "fan_out" not in injected  # only a step that declares it may fan out
