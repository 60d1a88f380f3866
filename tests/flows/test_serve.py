"""`make serve`'s deploy check: the values prefect.yaml templates into retrain/nightly, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.serve import DeployConfigError, describe, main, nightly_config

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
    ({"XRAY_TIMEZONE": ""}, "XRAY_TIMEZONE (make serve TIMEZONE=...)", "make deploy"),
])
def test_bad_values_name_the_variable_and_what_is_allowed(change, named, allowed):
    with pytest.raises(DeployConfigError) as err:
        nightly_config({**GOOD, **change})
    assert named in str(err.value) and allowed in str(err.value)


def test_unset_values_are_all_listed():
    with pytest.raises(DeployConfigError) as err:
        nightly_config({})
    assert all(var in str(err.value) for var in ("XRAY_INCOMING", "XRAY_SCHEDULE", "XRAY_TIMEZONE"))


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


def test_prefect_yaml_reads_the_nightly_values_from_the_environment():
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["parameters"]["incoming"] == "{{ $XRAY_INCOMING }}"
    assert nightly["schedules"][0]["cron"] == "{{ $XRAY_SCHEDULE }}"
    assert nightly["schedules"][0]["timezone"] == "{{ $XRAY_TIMEZONE }}"
