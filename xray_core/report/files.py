"""The files of one retrain run's report, written in one place with the right permissions.

``report.html`` (and its full-size heatmaps), ``report.md`` and ``result.json`` are for people to
open, so they get ``settings.file_mode`` (XRAY_FILE_MODE, default 0640) instead of the private 0600
of the store, features and models. Both executors of the retrain recipe (the Prefect flow and
``run_retrain``) call :func:`write_run_reports` so they write the same files the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from xray_core.results import ReportFiles, RunResult
from xray_core.settings import Settings


@dataclass(frozen=True)
class RunReport:
    markdown_path: Path
    html_path: Path
    result_path: Path
    markdown: str  # the same text as report.md, for the Prefect markdown artifact
    description: str  # artifact_description(run): the decision first, <= 200 characters
    html_contents: tuple[str, ...]  # what report.html shows beyond its summary


def write_run_reports(settings: Settings, run: RunResult, run_dir: Path) -> RunReport:
    """Write ``report.html``, ``report.md`` and ``result.json`` into ``run_dir``.

    The HTML goes first: it says what it could show, and the markdown links to it promising only
    that. ``run`` itself is not changed; the written ``result.json`` is its
    :meth:`~xray_core.results.RunResult.as_dict` with the report files' paths (``report_path``,
    ``report_html_contents``, ``report_html``), strict JSON (:func:`~xray_core.io.fsutil.json_text`).
    """
    from xray_core.io.fsutil import atomic_write_text, json_text
    from xray_core.report.html import write_run_html
    from xray_core.report.markdown import artifact_description, write_run_markdown

    run_dir = Path(run_dir)
    description = artifact_description(run)
    files = ReportFiles(markdown=str(run_dir / "report.md"), html=str(run_dir / "report.html"),
                        result_json=str(run_dir / "result.json"), description=description)
    html_path, contents = write_run_html(settings, run, run_dir, files)
    files = replace(files, html=str(html_path), html_contents=tuple(contents))
    markdown_path, markdown = write_run_markdown(settings, run, run_dir, files)
    result = {**run.as_dict(with_report=False), "report_path": files.markdown,
              "report_html_contents": contents, "report_html": files.html}
    result_path = Path(files.result_json)
    atomic_write_text(result_path, json_text(result, indent=2, default=str), mode=settings.file_mode)
    return RunReport(markdown_path=markdown_path, html_path=html_path, result_path=result_path,
                     markdown=markdown, description=description, html_contents=files.html_contents or ())


__all__ = ["RunReport", "write_run_reports"]
