"""`make serve`'s deploy check and override: the values `make deploy` sets on retrain/nightly (and
the time zone of monitor/daily, maintenance/weekly and audit/monthly), their defaults (the ones
prefect.yaml deploys), and the errors.
tests/flows/test_deploy.py deploys the file and applies the override on a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.serve import (
    AUDIT_CRON,
    DEFAULTS,
    MAINTENANCE_CRON,
    MONITOR_CRON,
    DeployConfigError,
    audit_description,
    describe,
    main,
    maintenance_description,
    monitor_description,
    nightly_config,
    nightly_description,
)

GOOD = {"XRAY_INCOMING": "/data/incoming", "XRAY_SCHEDULE": "0 2 * * *", "XRAY_TIMEZONE": "Europe/Zurich"}


def test_valid_values_pass_and_a_missing_folder_is_no_error(tmp_path):
    env = {**GOOD, "XRAY_INCOMING": str(tmp_path / "not-there-yet"), "XRAY_SCHEDULE": "30 3 * * 1-5",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    config = nightly_config(env)
    assert (config.incoming, config.cron, config.timezone) == (tmp_path / "not-there-yet", "30 3 * * 1-5",
                                                              "Europe/Zurich")
    shown = describe(config, env)
    assert "does not exist yet" in shown and "'30 3 * * 1-5' in Europe/Zurich" in shown
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in shown and "DO_NOT_TRACK=1" in shown


def test_an_existing_folder_is_not_flagged(tmp_path):
    shown = describe(nightly_config({**GOOD, "XRAY_INCOMING": str(tmp_path)}), {})
    assert f"incoming {tmp_path}\n" in shown + "\n" and "does not exist" not in shown


@pytest.mark.parametrize(("change", "named", "allowed"), [
    ({"XRAY_SCHEDULE": "every night"}, "SCHEDULE='every night'", "'0 2 * * *'"),
    ({"XRAY_SCHEDULE": "0 25 * * *"}, "SCHEDULE='0 25 * * *'", "five fields"),
    ({"XRAY_TIMEZONE": "Mars/Olympus"}, "TIMEZONE='Mars/Olympus'", "Europe/Zurich"),
    ({"XRAY_INCOMING": "data/incoming"}, "INCOMING='data/incoming' is relative", "absolute path"),
])
def test_bad_values_name_the_variable_and_what_is_allowed(change, named, allowed):
    with pytest.raises(DeployConfigError) as err:
        nightly_config({**GOOD, **change})
    assert named in str(err.value) and allowed in str(err.value)


def test_unset_or_empty_values_are_the_defaults():
    config = nightly_config({"XRAY_TIMEZONE": " "})
    assert (str(config.incoming), config.cron, config.timezone) == ("/data/incoming", "0 2 * * *",
                                                                    "Europe/Zurich")
    assert nightly_config({}) == config


def test_check_deploy_exits_2_on_bad_input_and_0_with_a_summary(monkeypatch, capsys):
    for var, value in {**GOOD, "XRAY_SCHEDULE": "nightly"}.items():
        monkeypatch.setenv(var, value)
    assert main(["check-deploy"]) == 2
    assert "SCHEDULE='nightly'" in capsys.readouterr().err
    monkeypatch.setenv("XRAY_SCHEDULE", "0 2 * * *")
    assert main(["check-deploy"]) == 0
    assert "retrain/nightly: schedule '0 2 * * *' in Europe/Zurich" in capsys.readouterr().out
    assert main(["deploy-everything"]) == 2
    assert "usage" in capsys.readouterr().err


def test_override_without_a_server_is_one_line_and_exit_1(monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for var in DEFAULTS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")  # what the message names
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        assert main(["override"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not set the deployments through the Prefect API at http://127.0.0.1:{port}")
    assert "make serve" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_prefect_yaml_holds_the_defaults_and_no_templates():
    """A bare `prefect deploy --all` deploys what `make deploy` would set with no variables given: the
    same folder, cron and time zone, and the descriptions `override` writes (time zone included)."""
    import yaml

    text = (Path(__file__).resolve().parents[2] / "prefect.yaml").read_text()
    assert "{{" not in text  # Prefect fills `{{ $VAR }}` with no default: a bare deploy got literal text
    spec = yaml.safe_load(text)
    by_name = {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}
    nightly = by_name[("flows/retrain.py:retrain", "nightly")]
    on_drift = by_name[("flows/retrain.py:retrain", "on-drift")]
    daily = by_name[("flows/monitor.py:monitor", "daily")]
    config = nightly_config({})
    incoming = DEFAULTS["XRAY_INCOMING"]
    assert nightly["parameters"]["incoming"] == on_drift["parameters"]["incoming"] == incoming
    assert [(s["cron"], s["timezone"]) for s in nightly["schedules"]] == [(config.cron, config.timezone)]
    assert [(s["cron"], s["timezone"]) for s in daily["schedules"]] == [(MONITOR_CRON, config.timezone)]
    assert nightly["description"] == nightly_description(config.cron, config.timezone)
    assert daily["description"] == monitor_description(config.timezone)
    weekly = by_name[("flows/maintenance.py:maintenance", "weekly")]
    assert [(s["cron"], s["timezone"]) for s in weekly["schedules"]] == [(MAINTENANCE_CRON, config.timezone)]
    assert weekly["description"] == maintenance_description(config.timezone)
    monthly = by_name[("flows/audit.py:audit", "monthly")]
    assert [(s["cron"], s["timezone"]) for s in monthly["schedules"]] == [(AUDIT_CRON, config.timezone)]
    assert monthly["description"] == audit_description(config.timezone)
    assert spec["pull"] is None  # Prefect records the folder deployed from: no variable to set
