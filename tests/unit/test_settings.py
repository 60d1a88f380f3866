"""Every ``XRAY_*`` setting is checked at start-up against the one table in ``xray_core.settings``.

Table-driven: each rule's own examples (one allowed raw value, several not) are loaded through
``load_settings``, so adding a setting without a rule, or a rule whose words, predicate and parser
disagree, fails here rather than hours into a retrain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import xray_core.settings as settings_module
from xray_cli.main import main
from xray_core.errors import SettingsError
from xray_core.settings import ENV_VARS, RULES, Settings, load_settings, reset_settings, validate

VARS = settings_module._VARS  # field name -> environment variable, every setting
BAD_CASES = [(name, bad) for name, rule in RULES.items() for bad in rule.bad]


def _load(tmp_path: Path, **env: str) -> Settings:
    return load_settings({"XRAY_HOME": str(tmp_path / "home"), **env})


def _expected(name: str, raw: str):
    """What ``raw`` should load as: the field's own parser, or the path/URL rule for the three paths."""
    if name in ("home", "incoming_dir"):
        return Path(raw).expanduser().resolve()
    if name == "database_url":
        return raw
    _, parse = settings_module._FIELDS[name]
    return parse(VARS[name], raw)


def test_every_setting_has_exactly_one_rule() -> None:
    fields = set(settings_module._FIELDS) | set(settings_module._PATH_FIELDS)
    assert set(RULES) == fields, (
        f"settings without a rule: {sorted(fields - set(RULES))}; rules without a setting: "
        f"{sorted(set(RULES) - fields)} (add one line to xray_core.settings.RULES per setting)")
    assert set(ENV_VARS) == set(VARS.values()) and len(ENV_VARS) == len(RULES)
    assert {f.name for f in Settings.__dataclass_fields__.values()} >= set(RULES)


def test_every_rule_has_examples_both_ways() -> None:
    lacking = [name for name, rule in RULES.items() if not rule.good or not rule.bad]
    assert not lacking, f"rules need a good and at least one bad raw example: {lacking}"


def test_the_defaults_are_allowed(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    validate(settings)
    assert all(rule.passes(getattr(settings, name)) for name, rule in RULES.items())


@pytest.mark.parametrize("name", list(RULES))
def test_an_allowed_value_loads(tmp_path: Path, name: str) -> None:
    good = RULES[name].good
    settings = _load(tmp_path, **{VARS[name]: good})
    assert getattr(settings, name) == _expected(name, good)


@pytest.mark.parametrize("name, bad", BAD_CASES, ids=[f"{n}={b!r}" for n, b in BAD_CASES])
def test_a_value_outside_the_rule_is_a_settings_error_naming_what_is_allowed(tmp_path: Path, name: str,
                                                                            bad: str) -> None:
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, **{VARS[name]: bad})
    message = str(err.value)
    assert message.startswith(f"{VARS[name]}="), message
    assert RULES[name].allowed in message


@pytest.mark.parametrize("var, raw, message", [
    # the holes users found, with the whole message they now get
    ("XRAY_TARGET_SPECIFICITY", "90", "XRAY_TARGET_SPECIFICITY=90: must be in (0, 1) (a fraction: 0.9 means 90%)"),
    ("XRAY_HEAD_DROPOUT", "1.5", "XRAY_HEAD_DROPOUT=1.5: must be in [0, 1) (fraction of units dropped)"),
    ("XRAY_PROMOTION_MARGIN", "-0.01", "XRAY_PROMOTION_MARGIN=-0.01: must be in [0, 1] "),
    ("XRAY_SPLIT_RATIOS", "nan,nan,nan", "XRAY_SPLIT_RATIOS=nan,nan,nan: must be three comma-separated fractions"),
    ("XRAY_HEAD_HIDDEN", "-3", "XRAY_HEAD_HIDDEN=-3: must be none (a linear head) or up to 8"),
    ("XRAY_INPUT_SIZE", "100000", "XRAY_INPUT_SIZE=100000: must be an integer in [32, 1024] (square side"),
    ("XRAY_LEARNING_RATE", "inf", "XRAY_LEARNING_RATE=inf: must be in (0, 1] (Adam step size)"),
])
def test_reported_holes_are_closed(tmp_path: Path, var: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, **{var: raw})
    assert str(err.value).startswith(message)


def test_every_bad_setting_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, XRAY_EPOCHS="ten", XRAY_DEVICE="gpu", XRAY_HEAD_DROPOUT="1.5")
    lines = str(err.value).splitlines()
    assert sorted(line.split("=")[0] for line in lines) == ["XRAY_DEVICE", "XRAY_EPOCHS", "XRAY_HEAD_DROPOUT"]


def test_secrets_are_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, XRAY_PATIENT_SALT="hunter2\n")
    assert "hunter2" not in str(err.value) and "XRAY_PATIENT_SALT=(hidden)" in str(err.value)
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, XRAY_DATABASE_URL="nosuch://admin:hunter2@db/xray")
    assert "hunter2" not in str(err.value) and "nosuch://***@db/xray" in str(err.value)


def test_a_home_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SettingsError, match=r"XRAY_HOME=.*: must be a folder path"):
        load_settings({"XRAY_HOME": str(tmp_path / "file")})


def test_validate_checks_settings_built_in_code(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    with pytest.raises(SettingsError, match=r"^XRAY_HEAD_DROPOUT=nan: must be in \[0, 1\)"):
        validate(settings.with_overrides(head_dropout=float("nan")))
    with pytest.raises(SettingsError, match=r"^XRAY_VIEWS=2.5: must be an integer in \[0, 64\]"):
        validate(settings.with_overrides(views=2.5))


def test_the_cli_exits_2_naming_the_setting(xray_env, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("XRAY_HEAD_DROPOUT", "1.5")
    reset_settings()
    assert main(["status", "--json"]) == 2
    err = capsys.readouterr().err
    assert "XRAY_HEAD_DROPOUT=1.5: must be in [0, 1) (fraction of units dropped)" in err


def test_every_setting_is_documented_in_the_settings_page() -> None:
    """docs/settings.md (the settings table moved there from the README) is generated from RULES
    (scripts/settings_table.py): a setting added without regenerating it fails here."""
    from pathlib import Path

    from xray_core.settings import ENV_BY_FIELD

    page = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    missing = [var for var in ENV_BY_FIELD.values() if f"`{var}`" not in page]
    assert not missing, f"regenerate docs/settings.md (scripts/settings_table.py): {missing}"
