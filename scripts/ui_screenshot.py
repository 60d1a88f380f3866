"""Screenshot the Prefect UI's flow-runs page in headless Chromium: the manual check that each retrain's
decision (its final state name: Promoted, Kept, Skipped, Insufficient evidence, Failed) shows in the
runs list, where an operator looks first.

    make ui-screenshot                      # with `make serve` running: var/ui/runs.png
    python scripts/ui_screenshot.py --url http://127.0.0.1:4311/runs --out /tmp/runs.png

It also prints the latest flow runs and their state names as the API has them, so the picture can be
checked against them. Exit codes: 0 written, 1 the server or the browser failed, 2 bad usage (e.g. no
Chromium: the message says how to install it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_browser(explicit: str | None) -> str:
    """The Chromium to run: --chromium, $CHROMIUM, or the first of BROWSERS on PATH."""
    wanted = explicit or os.environ.get("CHROMIUM")
    if wanted:
        found = shutil.which(wanted)
        if not found:
            raise SystemExit(_usage_error(f"Chromium {wanted!r} was not found or is not executable"))
        return found
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    raise SystemExit(_usage_error(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); install it with "
                                  "`sudo apt-get install -y chromium` (Debian/Ubuntu), or pass "
                                  "--chromium PATH"))


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def api_base(page_url: str) -> str:
    """http://host:port/api for a UI page URL (the UI and the API share one server in Prefect 3)."""
    parts = urlsplit(page_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SystemExit(_usage_error(f"--url {page_url!r} is not an http(s) URL; e.g. http://127.0.0.1:4200/runs"))
    return f"{parts.scheme}://{parts.netloc}/api"


def latest_runs(api: str, limit: int = 8) -> list[tuple[str, str, str]]:
    """(flow-run name, state type, state name) of the newest runs that have started, newest first.

    Scheduled runs (the nightly's next ones) are left out: the runs page lists past runs by default.
    """
    body = json.dumps({"limit": limit, "sort": "START_TIME_DESC",
                       "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}}}).encode()
    req = urllib.request.Request(f"{api}/flow_runs/filter", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        runs = json.load(resp)
    return [(r["name"], (r.get("state") or {}).get("type", "?"), (r.get("state") or {}).get("name", "?"))
            for r in runs]


def screenshot(browser: str, url: str, out: Path, *, width: int, height: int, wait_ms: int) -> None:
    """Render ``url`` headless and write a PNG to ``out`` (via a temp name, so a failure leaves no half file).

    ``wait_ms`` is Chromium's virtual-time budget: the UI is a single-page app that fetches the runs
    after it loads, and the budget lets those requests finish before the picture is taken.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    with tempfile.TemporaryDirectory(prefix="ui-screenshot-") as profile:
        cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={tmp}", url]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to start as root with its sandbox on
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0 or not tmp.exists() or tmp.read_bytes()[:8] != PNG_MAGIC:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:4200/runs",
                        help="the UI page (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("var/ui/runs.png"),
                        help="PNG to write (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1440, help="viewport width in px (default: %(default)s)")
    # 1500 px leaves room for about ten runs below the filters and the duration chart.
    parser.add_argument("--height", type=int, default=1500,
                        help="viewport height in px (default: %(default)s)")
    parser.add_argument("--wait-ms", type=int, default=15000,
                        help="virtual time for the page to load its data, ms (default: %(default)s)")
    parser.add_argument("--chromium", help="the browser binary (default: $CHROMIUM, else chromium on PATH)")
    args = parser.parse_args(argv)
    for name in ("width", "height", "wait_ms"):
        if getattr(args, name) <= 0:
            return _usage_error(f"--{name.replace('_', '-')} must be a positive integer")
    browser = find_browser(args.chromium)
    api = api_base(args.url)
    try:
        runs = latest_runs(api)
    except (OSError, ValueError) as exc:
        print(f"error: the Prefect API at {api} did not answer ({exc}); start it with `make serve`",
              file=sys.stderr)
        return 1
    print("latest flow runs (the state name is what the runs list shows):")
    for name, state_type, state_name in runs:
        print(f"  {name:<28} {state_name} ({state_type})")
    try:
        screenshot(browser, args.url, args.out, width=args.width, height=args.height, wait_ms=args.wait_ms)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB) from {args.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
