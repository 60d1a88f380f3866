"""``make demo``'s three arrivals, small, through the real retrain flow under the Prefect test harness.

Both sites are synthetic here (:mod:`xray_core.data.synthetic_sites`), the way the demo runs when the
real folders are absent: paediatric normal/pneumonia in two batches, then an adult site that holds
every covid19 film. The story's key outputs are checked: a first champion, a decision at arrival 2,
the shortcut audit firing at arrival 3 with the per-site rows, and nothing promoted under ``block``:
the run is tagged ``decision:blocked`` and sends ``xray.retrain.blocked``, and the drift its own check
flags in the new site is sent as ``xray.drift.detected`` from source ``retrain``. The settings line names
every setting that differs from its default; a second test holds it and the README to the Makefile.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from flows.demo import COVID_SITE, DEMO_MARKER, PAEDIATRIC_SITE, SyntheticSize, run_demo, settings_line
from xray_core.settings import load_settings, reset_settings

DEMO_ENV = {
    "XRAY_MIN_TEST_PER_CLASS": "2",
    "XRAY_FLOOR_MACRO_AUROC": "0.5",
    # At 32 px with a random backbone and ~2 test films per class the calibrated threshold can land on
    # one side (AUROC 1.0, sensitivity 0.0); the story needs a first champion, not a good one.
    "XRAY_FLOOR_SENSITIVITY": "0.0",
    "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0",
    "XRAY_PATIENT_REGEX": "",
    "XRAY_SHORTCUT_POLICY": "block",  # the Makefile's default for the demo
    "XRAY_REVIEW": "off",  # the Makefile's too: the demo plays the reviewer (xray promote), no run waits
}
PROJECT = Path(__file__).resolve().parents[2]
SMALL = SyntheticSize(paediatric_patients=20, covid_patients=8, covid_normal_patients=3, size=64)


def _events(name: str, resource: str | None) -> list:
    """Events named ``name`` (on ``resource``, when given) on the session's server, once sent."""
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()

    async def read() -> list:
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=50)
            return [e for e in page.events if resource is None or e.resource.id == resource]

    deadline, found = time.monotonic() + 60, asyncio.run(read())
    while not found and time.monotonic() < deadline:  # persisted by the server shortly after
        time.sleep(0.5)
        found = asyncio.run(read())
    return found


def _tags(flow_run_id: str) -> list[str]:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> list[str]:
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).tags

    return asyncio.run(read())


@pytest.fixture
def story(xray_env, monkeypatch, prefect_server):
    """The demo once, small and synthetic, with the demo's block policy (one run: three retrains)."""
    for key, value in DEMO_ENV.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    out = io.StringIO()
    result = run_demo(load_settings(), sample=None, out=out, synthetic=SMALL)
    return result, out.getvalue()


def test_the_three_arrivals_tell_the_story(story):
    result, text = story
    first, second, third = result["runs"]
    assert result["synthetic"] == [f"{PAEDIATRIC_SITE} batch 1", f"{PAEDIATRIC_SITE} batch 2",
                                   f"the {COVID_SITE} site"]
    assert "SYNTHETIC second site" in text  # said on screen when the real collection is absent

    assert first["state"] == "Promoted" and first["champion_after"] == first["train"]["version"]
    assert first["state_message"].startswith(f"v{first['train']['version']} becomes the first champion")
    assert second["champion_eval"]["version"] == first["champion_after"]  # scored against the champion
    assert second["decision"]["decision"] in {"promote", "keep", "insufficient_evidence", "blocked"}
    assert (second["challenger_eval"]["test_set_fingerprint"]
            == second["champion_eval"]["test_set_fingerprint"])

    audit = third["audit"]
    assert audit["flagged"] and audit["sites"] == sorted([COVID_SITE, PAEDIATRIC_SITE])
    assert any(f"covid19 films come only from site {COVID_SITE}" in w for w in audit["warnings"])
    assert (f"shortcut audit: covid19 films come only from site {COVID_SITE}; the label is predictable from "
            "the site (AUROC") in text
    assert "and from film metadata (AUROC" in text

    assert third["state"] == "Blocked" and third["decision"]["decision"] == "blocked"
    assert third["champion_after"] == second["champion_after"]  # nothing promoted at arrival 3
    assert "decision: blocked. Nothing was promoted because the shortcut audit" in text

    # the per-site rows of arrival 3, the drift placeholder, the closing summary, models and status
    arrival_3 = text.split("=== arrival 3")[1].split("What the tutorial")[0]
    per_site = arrival_3.split("per-site (challenger, test split):")[1].splitlines()
    rows = [line.split()[0] for line in per_site[3:] if line.startswith("  ") and line.strip()]
    assert PAEDIATRIC_SITE in rows and COVID_SITE in rows
    assert "drift/OOD: " in arrival_3 and "not checked" not in arrival_3  # the new site against the champion
    summary = "\n".join(result["summary"])
    assert "XRAY_SHORTCUT_POLICY=block: nothing was promoted" in summary
    assert "$ xray models" in text and "$ xray status" in text

    # The settings line names every setting that differs from its default, the lowered floors included.
    line = next(row for row in text.splitlines() if row.startswith("Demo settings: "))
    for shown in ("XRAY_MIN_TEST_PER_CLASS=2", "XRAY_FLOOR_MACRO_AUROC=0.5", "XRAY_FLOOR_SENSITIVITY=0.0",
                  "XRAY_GUARDRAIL_SENSITIVITY_DROP=1.0", "XRAY_SHORTCUT_POLICY=block", "XRAY_INPUT_SIZE=32"):
        assert shown in line, line

    # Arrival 3 was Blocked: its run is tagged so, and xray.retrain.blocked names the waiting challenger; a
    # drift its own check flagged was sent as xray.drift.detected from source "retrain".
    blocked = _events("xray.retrain.blocked", f"xray.model.v{third['train']['version']}")
    assert [e.payload["trigger"] for e in blocked] == ["demo"]
    assert "decision:blocked" in _tags(third["flow_run_id"])
    assert third["drift"]["flagged"]  # the adult site against the paediatric champion
    drifted = [c["subject"] for c in third["drift"]["checks"] if c.get("drift")]
    champion = f"xray.model.v{third['champion_after']}"  # blocked: the champion it was checked against stays
    for subject in drifted:
        resource = f"xray.site.{subject.removeprefix('site ')}" if subject.startswith("site ") else champion
        sent = [e for e in _events("xray.drift.detected", resource) if e.payload.get("source") == "retrain"]
        assert [e.payload["subject"] for e in sent] == [subject], sent
        assert sent[0].resource["xray.source"] == "retrain"
        related = {r.id for r in sent[0].related}  # Prefect adds the run's own resources (flow run, flow)
        assert champion in related and f"prefect.flow-run.{third['flow_run_id']}" in related


def test_fresh_refuses_a_home_without_the_marker(xray_env, tmp_path):
    from xray_core.errors import UsageError

    settings = load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "catalogue.db").write_bytes(b"real")
    with pytest.raises(UsageError, match=DEMO_MARKER):
        run_demo(settings, sample=None, out=io.StringIO(), fresh=True)
    assert (settings.home / "catalogue.db").read_bytes() == b"real"


def _makefile_demo_env() -> dict[str, str]:
    """The XRAY_* variables the Makefile's DEMO_ENV sets, with the values it gives them by default."""
    import re

    text = (PROJECT / "Makefile").read_text()
    block = text.split("DEMO_ENV :=", 1)[1].split("\n# ", 1)[0]
    return {var: plain or default for var, default, plain in
            re.findall(r"(XRAY_[A-Z0-9_]+)=(?:\$\$\{\1:-([^}]*)\}|(\S+))", block)}


def test_the_settings_line_and_the_readme_say_every_setting_the_makefile_gives_the_demo():
    """No hand list: the line comes from the settings that differ from their defaults, so whatever
    DEMO_ENV sets (the lowered floors included) is said, and the README's demo section names each."""
    demo_env = _makefile_demo_env()
    assert {"XRAY_FLOOR_MACRO_AUROC", "XRAY_FLOOR_SENSITIVITY", "XRAY_MIN_TEST_PER_CLASS"} <= set(demo_env)
    line = settings_line(load_settings(demo_env))
    for var, value in demo_env.items():
        shown = Path(value).resolve() if var == "XRAY_HOME" else value  # a folder is shown absolute
        assert f"{var}={shown}" in line, (var, line)
    readme = (PROJECT / "README.md").read_text()
    demo_section = readme.split("## What the demo shows", 1)[1].split("\n## ", 1)[0]
    missing = [f"{var}={value}" for var, value in demo_env.items()
               if var != "XRAY_HOME" and f"{var}={value}" not in demo_section]
    assert not missing, f"the README's demo section does not say {missing}"
