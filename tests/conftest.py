"""Shared fixtures: an isolated XRAY_HOME per test, small-image settings, the real sample's path."""

from __future__ import annotations

import os
import uuid
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
    # fp32, not auto: auto is bf16 only on CPUs with native bf16, and the suite must compute the same
    # numbers on every machine; tests/integration/test_backbone.py sets auto and bf16 on purpose.
    "XRAY_EMBED_PRECISION": "fp32",
    "XRAY_INPUT_SIZE": "32",
    "XRAY_VIEWS": "2",
    "XRAY_MIN_IMAGE_SIDE": "32",
    "XRAY_EPOCHS": "8",
    "XRAY_BOOTSTRAP_SAMPLES": "200",
    "XRAY_PATIENT_SALT": "test-salt",
    # Files prepared in the test process, so monkeypatched readers and decoders apply; the worker
    # pool is tested on purpose (tests/integration/test_parallel_ingest.py, crash and concurrency tests).
    "XRAY_INGEST_WORKERS": "1",
    # No sequestered test set: the suite's split tests expect train/val/test at XRAY_SPLIT_RATIOS exactly;
    # the tests of the sequestered set turn it on (tests/unit/test_sequester.py).
    "XRAY_SEQUESTER_FRACTION": "0",
}

# Low floors on tiny synthetic sites, and the shortcut audit blocking (so XRAY_REVIEW defaults to
# "blocked"): what the review tests (tests/flows/test_review_server.py, tests/integration/test_review_wait.py)
# need for a run that waits for its reviewer.
BLOCKING_POLICY = {
    "XRAY_MIN_TEST_PER_CLASS": "2",
    "XRAY_FLOOR_MACRO_AUROC": "0.5",
    "XRAY_FLOOR_SENSITIVITY": "0.3",
    "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0",
    "XRAY_PATIENT_REGEX": "",
    "XRAY_SHORTCUT_POLICY": "block",
    "XRAY_HEAD_RECIPE": "linear",
    "XRAY_HEAD_L2_GRID": "0.1",
}


def write_confounded_sites(root: Path) -> tuple[str, str]:
    """Two synthetic sites whose label goes with the site (paeds: normal; adult: covid19, larger 16-bit
    films with a border and a PORTABLE marker), so the shortcut audit blocks; their manifests' paths."""
    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset

    write_site_dataset(root / "paeds", SiteStyle("paeds", size=64), labels=("normal",), patients_per_label=12,
                       seed=1)
    adult = SiteStyle("adult", size=96, bit_depth=16, gamma=0.7, border=6, marker="PORTABLE")
    write_site_dataset(root / "adult", adult, labels=("covid19",), patients_per_label=12, seed=2)
    return str(root / "paeds" / "manifest.csv"), str(root / "adult" / "manifest.csv")


# The PostgreSQL lane: with XRAY_TEST_POSTGRES_URL set (`make test-postgres`, run by .ci/run), the
# catalogue tests run against a fresh PostgreSQL database per test instead of a SQLite file.
POSTGRES_URL = os.environ.get("XRAY_TEST_POSTGRES_URL", "")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers",
                            "sqlite_only: reads the SQLite file itself; skipped in the PostgreSQL lane")


# Collected first, so that under `make test`'s workers (--dist loadfile --no-loadscope-reorder hands out
# files in collection order, a file to one worker) they do not end the suite: the files that mostly wait
# on a real Prefect server (the first week, the review form; minutes of waiting on one worker), then the
# kill points (~6 minutes of subprocesses on one worker, ~1.5 since its runs fork from tests/zygote.py;
# collected in place it started after the flows and was the last to finish: `--durations`).
FIRST = ("tests/flows/test_first_week.py", "tests/flows/test_review_server.py",
         "tests/integration/test_crash_safety.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, path in enumerate(FIRST) if item.nodeid.startswith(path)), len(FIRST))

    items.sort(key=rank)  # stable: else as collected
    if not POSTGRES_URL:
        return
    skip = pytest.mark.skip(
        reason="reads the SQLite catalogue file directly; not part of the PostgreSQL lane")
    for item in items:
        if "sqlite_only" in item.keywords:
            item.add_marker(skip)


def fresh_database_url(tmp_dir: Path) -> tuple[str, object]:
    """A new empty catalogue database: a SQLite file in ``tmp_dir``, or a new PostgreSQL database in
    the lane. Returns (url, drop) where ``drop()`` removes it."""
    if not POSTGRES_URL:
        return f"sqlite:///{tmp_dir / 'catalogue.db'}", lambda: None
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"xt_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url, drop = fresh_database_url(tmp_path / "home")
    yield url
    drop()


@pytest.fixture
def xray_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str) -> dict[str, str]:
    """Point XRAY_HOME at a fresh temp folder and apply the small test settings.

    Flows called in a test may name any path under the test's temp folder (XRAY_ALLOWED_ROOTS): the
    tests of the confinement itself set their own roots."""
    env = {"XRAY_HOME": str(tmp_path / "home"), "XRAY_ALLOWED_ROOTS": str(tmp_path), **TEST_ENV}
    if POSTGRES_URL:
        env["XRAY_DATABASE_URL"] = database_url
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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server (SQLite) for the whole test session, PREFECT_HOME in a temp dir."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield {"api_url": PREFECT_API_URL.value(), "home": str(home)}


def sha(data: bytes) -> str:
    """sha256 hex of bytes (what the store names files by)."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def fetch(settings: Settings, model) -> list:  # model: a mapped class
    """Every row of one catalogue table."""
    from sqlalchemy import select

    from db import session_scope
    from xray_core.data.catalogue import open_catalogue

    with session_scope(open_catalogue(settings)) as s:
        return list(s.scalars(select(model)))


def snapshot(settings: Settings) -> dict:
    """Every row of the tables an ingest writes, and every file under store/ and quarantine/
    (tests compare two snapshots to prove that something wrote nothing)."""
    from sqlalchemy import select

    from db import session_scope
    from db.schema import Image, Patient, Rejection, SeenFile, Source
    from xray_core.data.catalogue import open_catalogue

    tables = {}
    with session_scope(open_catalogue(settings)) as s:
        for model in (Source, Image, Patient, Rejection, SeenFile):
            cols = [c.key for c in model.__table__.columns]
            tables[model.__tablename__] = sorted(
                tuple(str(getattr(row, c)) for c in cols) for row in s.scalars(select(model)))
    files = sorted(str(p.relative_to(settings.home)) for sub in ("store", "quarantine")
                   for p in (settings.home / sub).rglob("*") if p.is_file())
    return {"tables": tables, "files": files}
