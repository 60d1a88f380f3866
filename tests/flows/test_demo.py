"""``make demo``'s three arrivals, small, through the real retrain flow under the Prefect test harness.

Both sites are synthetic here (:mod:`xray_core.data.synthetic_sites`), the way the demo runs when the
real folders are absent: paediatric normal/pneumonia in two batches, then an adult site that holds
every covid19 film. The story's key outputs are checked: a first champion, a decision at arrival 2,
the shortcut audit firing at arrival 3 with the per-site rows, and nothing promoted under ``block``.
The drift flag (issue 14) is not built yet: only its placeholder line is checked.
"""

from __future__ import annotations

import io

import pytest

from flows.demo import COVID_SITE, DEMO_MARKER, PAEDIATRIC_SITE, SyntheticSize, run_demo
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
SMALL = SyntheticSize(paediatric_patients=20, covid_patients=8, covid_normal_patients=3, size=64)


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
    assert result["synthetic"] == [f"{PAEDIATRIC_SITE} batch 1", f"{PAEDIATRIC_SITE} batch 2", f"the {COVID_SITE} site"]
    assert "SYNTHETIC second site" in text  # said on screen when the real collection is absent

    assert first["state"] == "Promoted" and first["champion_after"] == first["train"]["version"]
    assert first["state_message"].startswith(f"v{first['train']['version']} becomes the first champion")
    assert second["champion_eval"]["version"] == first["champion_after"]  # scored against the champion
    assert second["decision"]["decision"] in {"promote", "keep", "insufficient_evidence", "blocked"}
    assert second["challenger_eval"]["test_set_fingerprint"] == second["champion_eval"]["test_set_fingerprint"]

    audit = third["audit"]
    assert audit["flagged"] and audit["sites"] == sorted([COVID_SITE, PAEDIATRIC_SITE])
    assert any(f"covid19 films come only from site {COVID_SITE}" in w for w in audit["warnings"])
    assert f"shortcut audit: covid19 films come only from site {COVID_SITE}; the label is predictable from the " \
           "site (AUROC" in text
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


def test_fresh_refuses_a_home_without_the_marker(xray_env, tmp_path):
    from xray_core.errors import UsageError

    settings = load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "catalogue.db").write_bytes(b"real")
    with pytest.raises(UsageError, match=DEMO_MARKER):
        run_demo(settings, sample=None, out=io.StringIO(), fresh=True)
    assert (settings.home / "catalogue.db").read_bytes() == b"real"
