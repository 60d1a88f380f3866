"""Small helpers for `make serve`: wait until the local Prefect server answers."""

from __future__ import annotations

import sys
import time
import urllib.request


def wait_for_server(url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the Prefect server at {url} did not answer within {timeout_s:.0f} s; see var/prefect/server.log")


if __name__ == "__main__":
    import os

    if sys.argv[1:] == ["wait-for-server"]:
        wait_for_server(os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    else:
        raise SystemExit("usage: python -m flows.serve wait-for-server")
