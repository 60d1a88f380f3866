"""The files of one retrain run's report, written in one place with the right permissions.

``report.html`` (and its full-size heatmaps), ``report.md`` and ``result.json`` are for people to
open, so they get ``settings.file_mode`` (XRAY_FILE_MODE, default 0640) instead of the private 0600
of the store, features and models. Both executors of the retrain recipe (the Prefect flow and
``run_retrain``) call :func:`write_run_reports` so they write the same files the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xray_core.results import RunResult
from xray_core.settings import Settings


@dataclass(frozen=True)
class RunReport:
    markdown_path: Path
    html_path: Path
    result_path: Path
    markdown: str  # the same text as report.md, for the Prefect markdown artifact
    description: str  # artifact_description(result): the decision first, <= 200 characters


def write_run_reports(settings: Settings, run: RunResult, run_dir: Path) -> RunReport:
    """Write ``report.html``, ``report.md`` and ``result.json`` into ``run_dir``.

    The HTML goes first: it records what it could show (``report_html_contents``), and the markdown
    links to it promising only that. ``run`` itself is not changed; the written ``result.json`` (its
    :meth:`~xray_core.results.RunResult.as_dict`) carries the report paths.
    """
    from xray_core.io.fsutil import atomic_write_text, json_text
    from xray_core.report.html import write_run_html
    from xray_core.report.markdown import artifact_description, write_run_markdown

    run_dir = Path(run_dir)
    result = {**run.as_dict(with_report=False), "report_path": str(run_dir / "report.md")}
    result["report_html"] = str(write_run_html(settings, result, run_dir))
    markdown_path, markdown = write_run_markdown(settings, result, run_dir)
    result_path = run_dir / "result.json"
    atomic_write_text(result_path, json_text(result, indent=2, default=str), mode=settings.file_mode)
    return RunReport(markdown_path=markdown_path,
                     html_path=Path(result["report_html"]), result_path=result_path, markdown=markdown,
                     description=artifact_description(result))


__all__ = ["RunReport", "write_run_reports"]
