"""Small helpers for `make serve`: wait until the local Prefect server answers, check what gets deployed.

`prefect.yaml` takes the nightly retrain's incoming folder, cron schedule and timezone from the
environment (``XRAY_INCOMING``, ``XRAY_SCHEDULE``, ``XRAY_TIMEZONE``; `make serve` sets them from
``INCOMING``, ``SCHEDULE``, ``TIMEZONE``). Prefect's ``{{ $VAR }}`` templating has no defaults and leaves
an unset variable as literal text (or an empty string), so `check-deploy` refuses to go on unless all
three are set and valid, and says what it is about to deploy.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Environment variable -> the `make serve` variable that sets it (named in error messages).
DEPLOY_VARS = {"XRAY_INCOMING": "INCOMING", "XRAY_SCHEDULE": "SCHEDULE", "XRAY_TIMEZONE": "TIMEZONE"}
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
    """Validate the values prefect.yaml templates into retrain/nightly, with Prefect's own schedule model.

    Checking here, before `prefect deploy`, turns a typo into one clear message instead of a pydantic
    trace halfway through deploying (or, for the folder, a parameter that is silently a literal
    ``{{ $XRAY_INCOMING }}``). A missing folder is fine: it is read only when a nightly run starts.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    missing = [f"{var} (make serve {make}=...)"
               for var, make in DEPLOY_VARS.items() if not env.get(var, "").strip()]
    if missing:
        raise DeployConfigError(f"not set: {', '.join(missing)}; prefect.yaml reads them, so deploy with "
                                "`make serve` or `make deploy`, which set defaults")
    incoming = Path(env["XRAY_INCOMING"]).expanduser()
    if not incoming.is_absolute():
        raise DeployConfigError(f"INCOMING={env['XRAY_INCOMING']!r} is relative; the worker runs flows in "
                                "the project folder, so give an absolute path, e.g. INCOMING=/data/incoming")
    cron, timezone = env["XRAY_SCHEDULE"].strip(), env["XRAY_TIMEZONE"].strip()
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
    if argv == ["check-deploy"]:
        try:
            config = nightly_config(os.environ)
        except DeployConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(describe(config, os.environ))
        return 0
    print("usage: python -m flows.serve {wait-for-server | check-deploy}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
