"""A bad ``XRAY_*`` setting stops the console entry point with exit code 2 and a one-line reason,
checked in a real process (as a cron job or a Prefect worker would run it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_status_with_a_bad_setting_exits_2_naming_variable_and_range(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "XRAY_HOME": str(tmp_path / "home"),
           "XRAY_HEAD_DROPOUT": "1.5", "XRAY_SPLIT_RATIOS": "nan,nan,nan"}
    proc = subprocess.run([sys.executable, "-m", "xray_cli.main", "status"], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "XRAY_HEAD_DROPOUT=1.5: must be in [0, 1) (fraction of units dropped)" in proc.stderr
    assert "XRAY_SPLIT_RATIOS=nan,nan,nan: must be three comma-separated fractions" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "home").exists()  # refused before anything was created
