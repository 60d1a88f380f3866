"""Print the README's settings table (variable | default | allowed) from the one rules table.

    .venv/bin/python scripts/settings_table.py

The README's table is this output; tests/unit/test_settings.py checks that every XRAY_* variable
appears in the README, so a new setting cannot go undocumented.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray_core.rules import RULES  # noqa: E402
from xray_core.settings import ENV_BY_FIELD, Settings  # noqa: E402

PATH_DEFAULTS = {"home": "`./var`", "database_url": "`sqlite:///$XRAY_HOME/catalogue.db`",
                 "incoming_dir": "unset",
                 "allowed_roots": "`XRAY_INCOMING`'s parent (itself if that is `/`), else none"}


def _default(name: str) -> str:
    if name in PATH_DEFAULTS:
        return PATH_DEFAULTS[name]
    field = next(f for f in dataclasses.fields(Settings) if f.name == name)
    value = field.default
    if value is None or value == ():
        return "unset"
    if name == "file_mode":
        return f"`{value:04o}`"
    if isinstance(value, tuple):
        return "`" + ",".join(str(v) for v in value) + "`"
    return f"`{value}`"


def main() -> None:
    env = ENV_BY_FIELD
    print("| variable | default | allowed |\n|---|---|---|")
    for name, rule in RULES.items():
        allowed = rule.allowed.removeprefix("must be ").replace("|", "\\|")
        print(f"| `{env[name]}` | {_default(name)} | {allowed} |")


if __name__ == "__main__":
    main()
