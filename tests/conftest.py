"""Shared fixtures: an isolated XRAY_HOME per test, small-image settings, the real sample's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from db import dispose_engines
from xray_core.settings import Settings, load_settings, reset_settings

PROJECT = Path(__file__).resolve().parent.parent
SAMPLE = PROJECT.parent / "shared" / "data" / "cxr-sample"

# Small, fast defaults for every test: 32-64 px inputs, random-init backbone, few views.
TEST_ENV = {
    "XRAY_BACKBONE_WEIGHTS": "random",
    "XRAY_DEVICE": "cpu",
    "XRAY_INPUT_SIZE": "32",
    "XRAY_VIEWS": "2",
    "XRAY_MIN_IMAGE_SIDE": "32",
    "XRAY_EPOCHS": "8",
    "XRAY_BOOTSTRAP_SAMPLES": "200",
    "XRAY_PATIENT_SALT": "test-salt",
}


@pytest.fixture
def xray_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point XRAY_HOME at a fresh temp folder and apply the small test settings."""
    env = {"XRAY_HOME": str(tmp_path / "home"), **TEST_ENV}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    dispose_engines()
    yield env
    reset_settings()
    dispose_engines()


@pytest.fixture
def settings(xray_env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "manifest.csv").exists():
        pytest.skip(f"real sample not present at {SAMPLE} (../shared/data/cxr-sample is absent)")
    return SAMPLE
