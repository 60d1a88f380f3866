"""Every ``XRAY_*`` setting is declared once, in ``xray_core.settings.Settings``, and checked at start-up.

Table-driven: each field's own examples (one allowed raw value, several not; derived from its range
or given beside it) are loaded through ``load_settings``, so a setting whose words, range and parser
disagree fails here rather than hours into a retrain. The configs and the docs page that derive from
the declaration are checked against it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from xray_cli.main import main
from xray_core import rules
from xray_core.data.dicom import DicomPolicy
from xray_core.errors import SettingsError
from xray_core.evaluate.promotion import PolicyConfig
from xray_core.model.train import HeadConfig
from xray_core.pipeline.unchanged import EXECUTION_SETTINGS, TRAINING_SETTINGS
from xray_core.report.settings_line import changed_settings
from xray_core.settings import (
    ENV_BY_FIELD,
    ENV_VARS,
    FIELDS,
    Settings,
    load_settings,
    reset_settings,
    settings_page,
    validate,
)

PROJECT = Path(__file__).resolve().parents[2]
EXAMPLES = {name: rules.examples(FIELDS[name]) for name in ENV_BY_FIELD}
BAD_CASES = [(name, bad) for name, (_, bads) in EXAMPLES.items() for bad in bads]


def _load(tmp_path: Path, **env: str) -> Settings:
    return load_settings({"XRAY_HOME": str(tmp_path / "home"), **env})


def test_every_setting_has_one_variable_words_and_examples_both_ways() -> None:
    assert len(set(ENV_VARS)) == len(ENV_VARS) == len(ENV_BY_FIELD)
    assert all(var.startswith("XRAY_") and var == var.upper() for var in ENV_VARS)
    # only the folders under XRAY_HOME are derived rather than read
    assert set(FIELDS) - set(ENV_BY_FIELD) == {"store_dir", "features_dir", "models_dir", "reports_dir",
                                               "quarantine_dir"}
    lacking = [name for name, (good, bad) in EXAMPLES.items() if not good or not bad]
    assert not lacking, f"settings need an allowed and at least one refused raw example: {lacking}"
    assert all(rules.allowed_text(FIELDS[name]).startswith("must be ") for name in ENV_BY_FIELD)


def test_the_defaults_are_allowed(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    validate(settings)
    assert settings.home == (tmp_path / "home").resolve() and settings.store_dir == settings.home / "store"
    assert settings.database_url == f"sqlite:///{settings.home / 'catalogue.db'}"


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_an_allowed_value_loads(tmp_path: Path, name: str) -> None:
    """The example is read from its variable (the value changes) and the result is allowed."""
    baseline = getattr(_load(tmp_path), name)
    settings = _load(tmp_path, **{ENV_BY_FIELD[name]: EXAMPLES[name][0]})
    assert getattr(settings, name) != baseline
    validate(settings)


@pytest.mark.parametrize("name, bad", BAD_CASES, ids=[f"{n}={b!r}" for n, b in BAD_CASES])
def test_a_value_outside_the_range_is_a_settings_error_naming_what_is_allowed(tmp_path: Path, name: str,
                                                                             bad: str) -> None:
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, **{ENV_BY_FIELD[name]: bad})
    message = str(err.value)
    assert message.startswith(f"{ENV_BY_FIELD[name]}="), message
    assert rules.allowed_text(FIELDS[name]) in message


@pytest.mark.parametrize("var, raw, message", [
    # the holes users found, with the whole message they now get
    ("XRAY_TARGET_SPECIFICITY", "90",
     "XRAY_TARGET_SPECIFICITY=90: must be in (0, 1) (a fraction: 0.9 means 90%)"),
    ("XRAY_HEAD_DROPOUT", "1.5", "XRAY_HEAD_DROPOUT=1.5: must be in [0, 1) (fraction of units dropped)"),
    ("XRAY_PROMOTION_MARGIN", "-0.01", "XRAY_PROMOTION_MARGIN=-0.01: must be in [0, 1] "),
    ("XRAY_SPLIT_RATIOS", "nan,nan,nan",
     "XRAY_SPLIT_RATIOS=nan,nan,nan: must be three comma-separated fractions"),
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


def test_a_bad_home_is_reported_alone_not_with_the_paths_derived_from_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({"XRAY_HOME": "var\0x", "XRAY_VIEWS": "-1"})
    assert [line.split("=")[0] for line in str(err.value).splitlines()] == ["XRAY_HOME", "XRAY_VIEWS"]


@pytest.mark.parametrize("name", sorted(ENV_BY_FIELD))
def test_changed_settings_name_exactly_what_was_set(tmp_path: Path, name: str) -> None:
    """Each variable set to an allowed value is named, and nothing else is: not the defaults derived from
    it (the database under XRAY_HOME, the allowed roots beside XRAY_INCOMING)."""
    var = ENV_BY_FIELD[name]
    allowed = str(tmp_path / "other") if name == "home" else EXAMPLES[name][0]  # its example is the default
    changed = changed_settings(_load(tmp_path, **{var: allowed}))
    assert set(changed) == {"XRAY_HOME", var}, changed


def test_changed_settings_of_the_defaults_is_empty_and_values_read_as_set(tmp_path: Path) -> None:
    assert changed_settings(load_settings({})) == {}
    changed = changed_settings(_load(tmp_path, XRAY_HEAD_L2_GRID="0.1, 1", XRAY_FLOOR_SENSITIVITY="0.6",
                                     XRAY_PATIENT_SALT="s3cret"))
    assert changed == {"XRAY_HOME": str(tmp_path / "home"), "XRAY_PATIENT_SALT": "(set)",
                       "XRAY_FLOOR_SENSITIVITY": "0.6", "XRAY_HEAD_L2_GRID": "0.1,1.0"}


def test_list_syntax_empty_values_and_names(tmp_path: Path) -> None:
    """The syntax people write in the environment, not JSON; empty is unset except for the regex; only
    exact upper-case names of declared settings are read."""
    s = _load(tmp_path, XRAY_LABELS="Normal, pneumonia", XRAY_HEAD_HIDDEN="none",
              XRAY_SPLIT_RATIOS="0.8/0.1/0.1", XRAY_ALLOWED_MODALITIES="any", XRAY_FILE_MODE="644",
              XRAY_AUG_HFLIP=" Off ", XRAY_EPOCHS="",
              XRAY_PATIENT_REGEX="", xray_views="9", XRAY_SCHEDULE="0 2 * * *", XRAY_INCOMING="/data/in")
    assert (s.labels, s.head_hidden, s.split_ratios) == (("normal", "pneumonia"), (), (0.8, 0.1, 0.1))
    assert (s.allowed_modalities, s.file_mode, s.aug_hflip) == ((), 0o644, False)
    assert (s.epochs, s.patient_regex, s.views) == (FIELDS["epochs"].default, "", FIELDS["views"].default)
    assert s.incoming_dir == Path("/data/in").resolve() and s.allowed_roots == (Path("/data").resolve(),)


def test_settings_are_frozen_and_overrides_name_real_fields(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    with pytest.raises(ValidationError):
        settings.epochs = 3  # type: ignore[misc]  # the assignment frozen settings refuse
    # not validated, as dataclasses.replace was: old model cards are served at precision "legacy"
    assert settings.with_overrides(embed_precision="legacy").embed_precision == "legacy"
    with pytest.raises(TypeError, match="no_such_setting"):
        settings.with_overrides(no_such_setting=1)


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


def test_policy_and_head_configs_take_their_defaults_from_the_declaration(tmp_path: Path) -> None:
    defaults = _load(tmp_path)
    assert PolicyConfig() == PolicyConfig.from_settings(defaults)
    assert HeadConfig() == HeadConfig.from_settings(defaults)
    assert HeadConfig().schedule == defaults.lr_schedule == "cosine"
    assert DicomPolicy() == DicomPolicy(defaults.allowed_modalities, defaults.require_chest)
    changed = _load(tmp_path, XRAY_EPOCHS="3", XRAY_PROMOTION_MARGIN="0.05")
    assert HeadConfig.from_settings(changed).epochs == 3
    assert PolicyConfig.from_settings(changed).margin == 0.05


def test_the_rerun_markers_name_settings() -> None:
    """EXECUTION_SETTINGS (a rerun ignores them) and TRAINING_SETTINGS come from per-field markers."""
    assert EXECUTION_SETTINGS <= set(FIELDS) and set(TRAINING_SETTINGS) <= set(FIELDS)
    assert not EXECUTION_SETTINGS & set(TRAINING_SETTINGS)
    assert {"home", "store_dir", "embed_workers", "file_mode"} <= EXECUTION_SETTINGS
    # subsample_films: the recipe comparison's subsample above it can choose another head
    assert {"epochs", "learning_rate", "views", "lr_schedule", "subsample_films"} <= set(TRAINING_SETTINGS)
    assert "promotion_margin" not in EXECUTION_SETTINGS | set(TRAINING_SETTINGS)


def test_docs_settings_page_is_generated_from_the_declaration() -> None:
    """docs/settings.md is `python scripts/settings_table.py --write`'s output: regenerate it after
    adding or changing a setting."""
    page = (PROJECT / "docs" / "settings.md").read_text()
    assert page == settings_page(), "regenerate docs/settings.md: python scripts/settings_table.py --write"
    assert all(f"| `{var}` |" in page for var in ENV_VARS)


def test_public_settings_never_show_a_password_in_a_url(tmp_path: Path) -> None:
    """public_dict feeds model cards, `xray status --json` and the demo's settings line: a PostgreSQL
    password or storage credentials must not reach them (the database URL used to be shown as set)."""
    settings = _load(tmp_path, XRAY_DATABASE_URL="postgresql+psycopg://xray:pw-db-7@db.local/xray",
                     XRAY_STORAGE_URL="memory://key-9:secret-9@bucket/xray")
    shown = json.dumps(settings.public_dict()) + json.dumps(changed_settings(settings))
    assert "pw-db-7" not in shown and "secret-9" not in shown and "key-9" not in shown
    assert settings.public_dict()["database_url"] == "postgresql+psycopg://xray:***@db.local/xray"
    assert settings.public_dict()["storage_url"] == "memory://***@bucket/xray"
    assert settings.database_url.endswith("pw-db-7@db.local/xray")  # the value itself is kept
