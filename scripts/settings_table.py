"""Print or write ``docs/settings.md``, generated from the one settings declaration.

    .venv/bin/python scripts/settings_table.py            # print the page
    .venv/bin/python scripts/settings_table.py --write    # update docs/settings.md

tests/unit/test_settings.py fails when the committed page and the declaration differ, so a setting
added, changed or removed without regenerating the page cannot go unnoticed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xray_core.settings import settings_page  # noqa: E402 - after the project root is importable


def main(argv: list[str]) -> int:
    page = settings_page()
    if argv == ["--write"]:
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "settings.md").write_text(page)
    elif not argv:
        sys.stdout.write(page)
    else:
        sys.stderr.write("usage: settings_table.py [--write]\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
