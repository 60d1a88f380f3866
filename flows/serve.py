"""Small helpers for `make serve`: wait until the local Prefect server answers, check and apply the
nightly retrain's folder, schedule and time zone.

`prefect.yaml` deploys as it is (a bare ``prefect --no-prompt deploy --all``) with the defaults in
:data:`DEFAULTS`. `make serve` and `make deploy` deploy it the same way, then ``override`` sets their
``INCOMING``, ``SCHEDULE`` and ``TIMEZONE`` (environment ``XRAY_INCOMING``, ``XRAY_SCHEDULE``,
``XRAY_TIMEZONE``) on the deployments through the API: the ``incoming`` parameter of retrain/nightly
and retrain/on-drift, the schedule of retrain/nightly and the time zone of monitor/daily,
maintenance/weekly and audit/monthly, and the descriptions that name them. Prefect's own
``{{ $VAR }}`` templating has no defaults (an unset variable was deployed as literal text), and
``prefect deploy --cron`` adds a schedule beside the file's instead of replacing it, hence the API.
``check-deploy`` checks the values first and says what will be set.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Environment variable (set by `make serve INCOMING=... SCHEDULE=... TIMEZONE=...`) -> what prefect.yaml
# deploys, and what an unset or empty variable means; tests/flows/test_serve.py checks the file agrees.
DEFAULTS = {"XRAY_INCOMING": "/data/incoming", "XRAY_SCHEDULE": "0 2 * * *", "XRAY_TIMEZONE": "Europe/Zurich"}
MONITOR_CRON = "30 6 * * *"  # monitor/daily's schedule; only its time zone follows TIMEZONE
MAINTENANCE_CRON = "0 4 * * 0"  # maintenance/weekly's (Sundays 04:00); only its time zone follows TIMEZONE
AUDIT_CRON = "0 5 1 * *"  # audit/monthly's (the 1st, 05:00); only its time zone follows TIMEZONE
# The settings that keep a local server and its clients from sending anonymous usage data to Prefect.
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


class DeployConfigError(ValueError):
    """A value `make serve` would template into prefect.yaml is missing or invalid (exit 2)."""


@dataclass(frozen=True)
class NightlyConfig:
    incoming: Path  # absolute; it may not exist yet (it is only read when a nightly run starts)
    cron: str  # five-field cron expression (or @daily, @hourly, ...), as Prefect accepts it
    timezone: str  # IANA name, e.g. Europe/Zurich; the cron is read in this zone (summer time included)


def wait_for_server(url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the Prefect server at {url} did not answer within {timeout_s:.0f} s; see "
                     "its server.log")


def nightly_config(env: Mapping[str, str]) -> NightlyConfig:
    """The nightly retrain's folder, cron and time zone from ``env`` (unset or empty: :data:`DEFAULTS`),
    validated with Prefect's own schedule model.

    Checking here, before anything is deployed or started, turns a typo into one clear message
    instead of a pydantic trace halfway through. A missing folder is fine: it is read only when a
    nightly run starts.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    values = {var: env.get(var, "").strip() or default for var, default in DEFAULTS.items()}
    incoming = Path(values["XRAY_INCOMING"]).expanduser()
    if not incoming.is_absolute():
        raise DeployConfigError(f"INCOMING={values['XRAY_INCOMING']!r} is relative; the worker runs flows in "
                                "the project folder, so give an absolute path, e.g. INCOMING=/data/incoming")
    cron, timezone = values["XRAY_SCHEDULE"], values["XRAY_TIMEZONE"]
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        bad = {str(err["loc"][0]) for err in exc.errors() if err.get("loc")}
        if "cron" in bad:
            raise DeployConfigError(f"SCHEDULE={cron!r} is not a cron expression; allowed: five fields "
                                    "'minute hour day-of-month month day-of-week', e.g. SCHEDULE='0 2 * * *' "
                                    "(02:00 every day), or @daily / @hourly") from None
        raise DeployConfigError(f"TIMEZONE={timezone!r} is not an IANA time zone; allowed: names such as "
                                "Europe/Zurich, America/New_York or UTC") from None
    return NightlyConfig(incoming=incoming, cron=cron, timezone=timezone)


def nightly_description(cron: str, timezone: str) -> str:
    """retrain/nightly's description: its schedule and time zone first (the deployments list shows it)."""
    return (f"Runs at cron `{cron}`, time zone {timezone}. Scans the incoming folder (parameter incoming), "
            "retrains, compares with the champion, promotes or keeps.")


def monitor_description(timezone: str) -> str:
    """monitor/daily's description, its schedule and time zone first."""
    return (f"Runs at cron `{MONITOR_CRON}`, time zone {timezone}. Checks films ingested (and lists predict "
            "batches) since the last check against the champion's reference; writes "
            "reports/monitor-<stamp>/report.md and the drift-report artifact, emits xray.drift.detected.")


def maintenance_description(timezone: str) -> str:
    """maintenance/weekly's description, its schedule and time zone first."""
    return (f"Runs at cron `{MAINTENANCE_CRON}`, time zone {timezone}. Retention (xray gc): deletes the "
            "files of old never-promoted models (their catalogue rows stay, marked pruned), unused feature "
            "folders and old report files (result.json stays); publishes the gc-report artifact.")


def audit_description(timezone: str) -> str:
    """audit/monthly's description, its schedule and time zone first."""
    return (f"Runs at cron `{AUDIT_CRON}`, time zone {timezone}. Scores the champion and the locked "
            "reference on the sequestered test set (xray audit), records the result, publishes the "
            "sequester-audit artifact and emits xray.audit.degraded when the champion falls below the "
            "reference by more than XRAY_REFERENCE_MARGIN.")


@dataclass(frozen=True)
class Override:
    """What ``override`` sets on one deployed deployment (None: left as deployed)."""

    deployment: str  # flow/deployment
    incoming: Path | None = None
    cron: str | None = None
    timezone: str | None = None
    description: str | None = None


def overrides(config: NightlyConfig) -> list[Override]:
    """The changes `make deploy` makes to what a bare ``prefect deploy --all`` deployed."""
    return [
        Override("retrain/nightly", incoming=config.incoming, cron=config.cron, timezone=config.timezone,
                 description=nightly_description(config.cron, config.timezone)),
        Override("retrain/on-drift", incoming=config.incoming),
        Override("monitor/daily", cron=MONITOR_CRON, timezone=config.timezone,
                 description=monitor_description(config.timezone)),
        Override("maintenance/weekly", cron=MAINTENANCE_CRON, timezone=config.timezone,
                 description=maintenance_description(config.timezone)),
        Override("audit/monthly", cron=AUDIT_CRON, timezone=config.timezone,
                 description=audit_description(config.timezone)),
    ]


async def apply_overrides(config: NightlyConfig) -> list[str]:
    """Set ``config`` on the deployments on ``PREFECT_API_URL``; one line per deployment changed.

    Parameters are merged (only ``incoming`` changes); each schedule's cron and time zone is replaced
    in place, so the deployment keeps one schedule (the server drops the runs the old one had
    scheduled). A deployment that is not there is an error naming the deploy command.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound

    done: list[str] = []
    async with get_client() as client:
        for change in overrides(config):
            try:
                deployment = await client.read_deployment_by_name(change.deployment)
            except ObjectNotFound:
                raise DeployConfigError(
                    f"no deployment {change.deployment} on the server; deploy prefect.yaml first "
                    "(`prefect --no-prompt deploy --all`, or `make deploy`)") from None
            update: dict[str, Any] = {}
            if change.incoming is not None:
                update["parameters"] = {**deployment.parameters, "incoming": str(change.incoming)}
            if change.description is not None:
                update["description"] = change.description
            if update:
                await client.update_deployment(deployment.id, DeploymentUpdate(**update))
            if change.cron is not None:
                for schedule in deployment.schedules:
                    cron = CronSchedule(cron=change.cron, timezone=change.timezone)
                    await client.update_deployment_schedule(deployment.id, schedule.id, schedule=cron)
            said = [f"incoming {change.incoming}"] if change.incoming is not None else []
            said += [f"schedule '{change.cron}' in {change.timezone}"] if change.cron is not None else []
            done.append(f"{change.deployment}: {', '.join(said)} (set on the server)")
    return done


def describe(config: NightlyConfig, env: Mapping[str, str]) -> str:
    """What `make serve` set, in the words an operator checks it by."""
    exists = "" if config.incoming.is_dir() else "  (does not exist yet: deployed anyway)"
    telemetry = ", ".join(f"{k}={env.get(k, '(unset)')}" for k in TELEMETRY_OFF)
    return "\n".join([
        f"retrain/nightly: incoming {config.incoming}{exists}",
        f"retrain/nightly: schedule '{config.cron}' in {config.timezone}",
        f"telemetry: {telemetry}",
    ])


def main(argv: list[str]) -> int:
    if argv == ["wait-for-server"]:
        wait_for_server(os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
        return 0
    if argv in (["check-deploy"], ["override"]):
        try:
            config = nightly_config(os.environ)
        except DeployConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if argv == ["check-deploy"]:
            print(describe(config, os.environ))
            return 0
        import asyncio

        import httpx

        try:
            print("\n".join(asyncio.run(apply_overrides(config))))
        except DeployConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (OSError, httpx.HTTPError) as exc:
            api = os.environ.get("PREFECT_API_URL", "(PREFECT_API_URL unset)")
            print(f"error: could not set the deployments through the Prefect API at {api} "
                  f"({type(exc).__name__}: {exc}); is its server running (`make serve`)?", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m flows.serve {wait-for-server | check-deploy | override}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
