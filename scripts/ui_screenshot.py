"""Screenshot the Prefect UI in headless Chromium: the manual check that each retrain's decision shows
where an operator looks. Three pages:

- the flow-runs list (``runs.png``): each run's final state name (Promoted, Kept, Skipped, Blocked,
  Insufficient evidence, Failed) as its badge;
- a deployment page, Runs tab (``deployment.png``): by default the deployment of the newest retrain
  run; its description names the schedule's time zone. **All run states** is chosen in the tab's state
  filter first, so runs with a custom state name show (README "Every run on a deployment page");
- a paused run's page with its review form open (``review-form.png``): the newest paused run (a retrain
  waiting for its reviewer, e.g. ``scripts/first_week.py --stop-at-review``); the form is behind the
  page's Resume button, so the browser is driven (Chrome DevTools protocol) to click it first. With no
  paused run on the server, that picture is skipped and the output says so.

    make ui-screenshot          # with `make serve` running: var/ui/runs.png, deployment.png, review-form.png
    python scripts/ui_screenshot.py --url http://127.0.0.1:4311/runs --out-dir /tmp/ui \
        --deployment retrain/nightly

It also prints the latest flow runs, their state names and decision tags as the API has them, so the
pictures can be checked against them. Exit codes: 0 written, 1 the server or the browser failed, 2 bad
usage (e.g. no Chromium: the message says how to install it; a --deployment that does not exist).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, urlsplit

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


def _post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def latest_runs(api: str, limit: int = 8) -> list[tuple[str, str, str, list[str]]]:
    """(flow-run name, state type, state name, tags) of the newest runs that have started, newest first.

    Scheduled runs (the nightly's next ones) are left out: the runs page lists past runs by default.
    """
    runs = _post(api, "/flow_runs/filter", {"limit": limit, "sort": "START_TIME_DESC",
                                            "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}}})
    return [(r["name"], (r.get("state") or {}).get("type", "?"), (r.get("state") or {}).get("name", "?"),
             list(r.get("tags") or [])) for r in runs]


def deployment_id(api: str, name: str | None) -> str:
    """The id of deployment ``name`` (``flow/deployment``); without a name, the deployment of the newest
    retrain run, else ``retrain/nightly``. A name that is not deployed is bad usage (exit 2)."""
    if name is None:
        newest = _post(api, "/flow_runs/filter", {
            "limit": 1, "sort": "START_TIME_DESC", "flows": {"name": {"any_": ["retrain"]}},
            "flow_runs": {"deployment_id": {"is_null_": False}, "start_time": {"is_null_": False}}})
        if newest:
            return str(newest[0]["deployment_id"])
        name = "retrain/nightly"
    flow, _, deployment = name.partition("/")
    try:
        url = f"{api}/deployments/name/{quote(flow)}/{quote(deployment)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(json.load(resp)["id"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise SystemExit(_usage_error(f"no deployment {name!r} on the server; e.g. --deployment "
                                          "retrain/nightly (`prefect deployment ls` lists them)")) from None
        raise


def paused_run(api: str) -> str | None:
    """The id of the newest paused flow run (a retrain waiting for its reviewer), or None."""
    runs = _post(api, "/flow_runs/filter", {"limit": 1, "sort": "START_TIME_DESC",
                                            "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})
    return str(runs[0]["id"]) if runs else None


class Capture(NamedTuple):
    """One picture: the page's URL, the file it is written to, and a button to click first (if any)."""

    url: str
    out: Path
    click: tuple[str, ...] = ()


def captures(runs_url: str, deployment: str, out_dir: Path, paused: str | None = None) -> list[Capture]:
    """The pages ``make ui-screenshot`` pictures, in order: the runs list, then the deployment's page on
    its Runs tab (the UI's default there lists every state type but Scheduled, so custom-named states
    such as Kept show; a filter by state names hides them: README "Every run on a deployment page"),
    then the paused run ``paused`` with its Resume button clicked: the review form."""
    parts = urlsplit(runs_url)
    base = f"{parts.scheme}://{parts.netloc}"
    pages = [Capture(runs_url, out_dir / "runs.png"),
             Capture(f"{base}/deployments/deployment/{deployment}?tab=Runs", out_dir / "deployment.png",
                    click=("All run states",))]
    if paused is not None:
        pages.append(Capture(f"{base}/runs/flow-run/{paused}", out_dir / "review-form.png",
                             click=("Resume",)))
    return pages


def screenshot(browser: str, url: str, out: Path, *, width: int, height: int, wait_ms: int) -> None:
    """Render ``url`` headless and write a PNG to ``out`` (via a temp name, so a failure leaves no half file).

    ``wait_ms`` is Chromium's virtual-time budget: the UI is a single-page app that fetches the runs
    after it loads, and the budget lets those requests finish before the picture is taken.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    with tempfile.TemporaryDirectory(prefix="ui-screenshot-") as profile:
        cmd = [*_browser_cmd(browser, profile, width, height), f"--virtual-time-budget={wait_ms}",
               f"--screenshot={tmp}", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0 or not tmp.exists() or tmp.read_bytes()[:8] != PNG_MAGIC:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}")
    tmp.replace(out)


def _browser_cmd(browser: str, profile: str, width: int, height: int) -> list[str]:
    cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", f"--window-size={width},{height}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to start as root with its sandbox on
    return cmd


# Choose the option of a visible <select> whose text is exactly the given one (the UI's state filter is a
# native select), else click the innermost visible element with that text (a button); true when found.
_CLICK_JS = """(() => { const text = %s;
  for (const select of document.querySelectorAll('select')) {
    const option = [...select.options].find(o => o.textContent.trim() === text);
    if (option && select.offsetParent !== null) {
      select.value = option.value;
      for (const type of ['input', 'change']) select.dispatchEvent(new Event(type, {bubbles: true}));
      return true; } }
  const hits = [...document.querySelectorAll('button, [role=option], li, span, div, a')].filter(
    e => e.offsetParent !== null && e.textContent.trim() === text);
  const el = hits.find(e => ![...e.children].some(c => hits.includes(c))) || hits[0];
  if (!el) return false;
  for (const type of ['pointerdown', 'mousedown', 'pointerup', 'mouseup'])
    el.dispatchEvent(new MouseEvent(type, {bubbles: true}));
  el.click(); return true; })()"""


def screenshot_after_click(browser: str, url: str, out: Path, buttons: tuple[str, ...], *, width: int,
                           height: int, wait_ms: int) -> None:
    """Open ``url`` in headless Chromium driven through the DevTools protocol, click the elements that
    read ``buttons`` in turn once the page has loaded, and write a PNG of what then shows to ``out``."""
    import base64
    import itertools

    from websockets.sync.client import connect  # installed with prefect

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-screenshot-") as profile:
        cmd = [*_browser_cmd(browser, profile, width, height), "--remote-debugging-port=0", "about:blank"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text().strip():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("Chromium did not open its DevTools port")
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                page = next(t for t in json.load(resp) if t.get("type") == "page")
            ids = itertools.count(1)
            with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                def call(method: str, **params: object) -> dict:
                    n = next(ids)
                    ws.send(json.dumps({"id": n, "method": method, "params": params}))
                    while (reply := json.loads(ws.recv(timeout=60))).get("id") != n:
                        pass
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

                call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                     mobile=False)
                call("Page.navigate", url=url)
                deadline = time.monotonic() + wait_ms / 1000
                for text in buttons:
                    clicked = False
                    while not clicked and time.monotonic() < deadline:
                        time.sleep(1.0)
                        clicked = call("Runtime.evaluate", expression=_CLICK_JS % json.dumps(text),
                                       userGesture=True)["result"].get("value") is True
                    if not clicked:
                        raise RuntimeError(f"nothing to click reading {text!r} on {url} within {wait_ms} ms")
                time.sleep(3.0)  # what the click opened renders
                data = call("Page.captureScreenshot", format="png")["data"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    png = base64.b64decode(data)
    if png[:8] != PNG_MAGIC:
        raise RuntimeError("Chromium returned no PNG")
    tmp = out.with_name(f".{out.name}.tmp.png")
    tmp.write_bytes(png)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:4200/runs",
                        help="the UI's runs page; the other pages are on its server (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("var/ui"),
                        help="folder for runs.png and deployment.png (default: %(default)s)")
    parser.add_argument("--deployment", help="flow/deployment to picture, e.g. retrain/nightly (default: the "
                                             "deployment of the newest retrain run, else retrain/nightly)")
    parser.add_argument("--width", type=int, default=1440, help="viewport width in px (default: %(default)s)")
    # 1500 px leaves room for about ten runs below the filters and the duration chart.
    parser.add_argument("--height", type=int, default=1500,
                        help="viewport height in px (default: %(default)s)")
    parser.add_argument("--wait-ms", type=int, default=15000,
                        help="virtual time for each page to load its data, ms (default: %(default)s)")
    parser.add_argument("--chromium", help="the browser binary (default: $CHROMIUM, else chromium on PATH)")
    args = parser.parse_args(argv)
    for name in ("width", "height", "wait_ms"):
        if getattr(args, name) <= 0:
            return _usage_error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.deployment is not None and args.deployment.count("/") != 1:
        return _usage_error(f"--deployment {args.deployment!r} is not flow/deployment, e.g. retrain/nightly")
    browser = find_browser(args.chromium)
    api = api_base(args.url)
    try:
        runs = latest_runs(api)
        deployment = deployment_id(api, args.deployment)
        paused = paused_run(api)
    except (OSError, ValueError) as exc:
        print(f"error: the Prefect API at {api} did not answer ({exc}); start it with `make serve`",
              file=sys.stderr)
        return 1
    print("latest flow runs (the state name is what the runs list shows; the decision tag filters find):")
    for name, state_type, state_name, tags in runs:
        decision = next((t for t in tags if t.startswith("decision:")), "")
        print(f"  {name:<28} {state_name} ({state_type}) {decision}".rstrip())
    if paused is None:
        print("no paused run on the server: the review form is not pictured (scripts/first_week.py "
              "--stop-at-review leaves one)")
    for capture in captures(args.url, deployment, args.out_dir, paused):
        size = {"width": args.width, "height": args.height, "wait_ms": args.wait_ms}
        try:
            if capture.click:
                screenshot_after_click(browser, capture.url, capture.out, capture.click, **size)
            else:
                screenshot(browser, capture.url, capture.out, **size)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {capture.out} ({capture.out.stat().st_size // 1024} KB) from {capture.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
