"""The retrain run report: markdown for the Prefect UI and for ``XRAY_HOME/reports/<run>/``.

Pure functions of the run's result dict, so the report is testable without Prefect. The numbers and
sentences are built here, in Python, as a plain context dict; the layout lives in Jinja2 templates
(``templates/report.md.j2``, and ``report.html.j2`` for :mod:`xray_core.report.html`), so a change of
wording or order is a template edit, not a string-concatenation hunt.

The report leads with the run's decision (``result["state"]``: Promoted, Kept, Blocked, Skipped,
Insufficient evidence or Failed, with ``result["state_message"]``), derived from the decision or status when
the result predates those keys, and shows only sections that have content: a failed or skipped run has
no empty comparison heading and promises no figures it lacks.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from xray_core.evaluate.promotion import RUN_STATES
from xray_core.report.format import format_interval
from xray_core.report.sites import audit_context, label_history_context, site_metric_rows, slice_sections
from xray_core.results import outcome_sentence
from xray_core.results import run_state as derive_state
from xray_core.settings import Settings

KEY_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc", "brier", "ece")
DESCRIPTION_MAX_CHARS = 200  # Prefect shows artifact descriptions in one table cell


# --------------------------------------------------------------------------- templates


@functools.lru_cache(maxsize=1)
def template_environment() -> Any:
    """The Jinja2 environment of both report templates (built once; templates are cached in it).

    Autoescape is on for ``*.html.j2`` only: HTML gets every value escaped by Jinja, markdown gets the
    text as written. ``StrictUndefined`` turns a typo in a template, or a context key a code change
    forgot, into an error in the tests instead of a silently empty line in a clinician's report.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("xray_core.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md_cell"] = md_cell
    return env


def render_template(name: str, context: dict[str, Any]) -> str:
    return template_environment().get_template(name).render(context)


def md_cell(value: Any) -> str:
    """A value as one markdown table cell: a ``|`` would end the cell early and a newline the row."""
    return "" if value is None else str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


# --------------------------------------------------------------------------- the decision, first


def run_state(result: dict[str, Any]) -> str | None:
    """The run's state as the flow names it (one of :data:`~xray_core.evaluate.promotion.RUN_STATES`), or
    None when unknown.

    ``result["state"]`` when present; otherwise derived: a failure or skip from ``status``, else the
    policy's ``decision``. A result without any of these (a run still in progress) has no state.
    """
    if result.get("state") in RUN_STATES:
        return result["state"]
    return derive_state(result.get("status"), (result.get("decision") or {}).get("decision"),
                        error=result.get("error"))


def challenger_version(result: dict[str, Any]) -> int | None:
    for source in (result.get("challenger_eval"), result.get("train"), result):
        if source and source.get("version") is not None:
            return source["version"]
    return None


def champion_before(result: dict[str, Any]) -> int | None:
    """The champion the challenger was compared with (None: there was none, or no comparison)."""
    return (result.get("champion_eval") or {}).get("version")


def _v(version: int | None, fallback: str) -> str:
    return fallback if version is None else f"v{version}"


def champion_change(result: dict[str, Any]) -> str | None:
    """What happened to the champion, in versions (:func:`xray_core.results.outcome_sentence`)."""
    return outcome_sentence(run_state(result), challenger_version(result), champion_before(result),
                            result.get("champion_after"))


def state_message(result: dict[str, Any]) -> str | None:
    """The one-line rationale under the title: ``result["state_message"]``, else the skip summary or
    the error; None for decided runs without one (their Decision section has the full rationale)."""
    if result.get("state_message"):
        return str(result["state_message"])
    state = run_state(result)
    if state == "Skipped" and result.get("summary"):
        return str(result["summary"])
    if state == "Failed" and result.get("error"):
        return str(result["error"])
    return None


def title(result: dict[str, Any]) -> str:
    """``Promoted: v3 replaces v2``; a run without a state falls back to its name."""
    state = run_state(result)
    if state is None:
        return f"Retrain run {result.get('run_name') or result.get('flow_run_id') or ''}".rstrip()
    return f"{state}: {champion_change(result)}"


def artifact_description(result: dict[str, Any]) -> str:
    """A short description of the run's report artifact that starts with the decision and versions,
    e.g. ``Promoted v3 (was v2)``, ``Kept v2; challenger v3 rejected``, ``Skipped: nothing new in ...``,
    ``Failed: OSError: ...``; the state message follows when there is room (at most 200 characters).

    Prefect lists artifacts by key with this description, so a run history reads as decisions.
    """
    state, new, old = run_state(result), challenger_version(result), champion_before(result)
    message = state_message(result)
    challenger = _v(new, "the challenger")
    if state == "Promoted":
        text = f"Promoted {challenger} " + (f"(was v{old})" if old is not None else "(first champion)")
    elif state == "Kept":
        text = (f"Kept v{old}; challenger {challenger} rejected" if old is not None
                else f"Kept: no champion; challenger {challenger} rejected")
    elif state == "Blocked":
        text = (f"Blocked {challenger} (shortcut audit); "
                + (f"kept v{old}" if old is not None else "no champion"))
    elif state == "Insufficient evidence":
        text = ("Insufficient evidence: " + (f"kept v{old}; " if old is not None else "no champion; ")
                + f"challenger {challenger} not judged")
    elif state in ("Skipped", "Failed"):
        text, message = f"{state}: {message or champion_change(result)}", None
    else:
        text = title(result)
    if message:
        text += f" — {message}"
    return text if len(text) <= DESCRIPTION_MAX_CHARS else text[:DESCRIPTION_MAX_CHARS - 1].rstrip() + "…"


def random_init(result: dict[str, Any]) -> bool:
    """Whether the report must carry the random-init warning (also on failed and skipped runs)."""
    return result.get("backbone_weights") == "random" or bool(result.get("backbone_random_init"))


# --------------------------------------------------------------------------- tables


def metrics_rows(challenger: dict[str, Any] | None, champion: dict[str, Any] | None, *,
                 sites: bool = True) -> list[dict[str, Any]]:
    """Rows for the metrics table artifact: one per metric, both models side by side, with intervals.

    With ``sites`` (the ``retrain-metrics`` artifact), per-site rows follow (``macro_auroc @ site
    paeds``, ...), because pooled numbers can hide a collapse on one site; report.md has its own
    "By site" section instead.
    """
    rows = []
    for key in KEY_METRICS:
        row: dict[str, Any] = {"metric": key}
        for name, ev in (("challenger", challenger), ("champion", champion)):
            if ev is None:
                row[name] = "-"
                continue
            m = ev["metrics"]
            row[name] = format_interval({"point": m.get(key),
                                         **{b: m.get("intervals", {}).get(key, {}).get(b)
                                            for b in ("low", "high")}})
        rows.append(row)
    for name, ev in (("challenger", challenger), ("champion", champion)):
        if ev is None:
            continue
        for label, pc in ev["metrics"].get("per_class", {}).items():
            iv = ev["metrics"].get("intervals", {}).get(f"per_class.{label}.sensitivity", {})
            rows.append({"metric": f"sensitivity[{label}] ({name})",
                         name: format_interval({"point": pc.get("sensitivity"), "low": iv.get("low"),
                                                "high": iv.get("high")}),
                         "challenger" if name == "champion" else "champion": ""})
    return rows + (site_metric_rows(challenger, champion) if sites else [])


def registry_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the ``model-registry`` table artifact: each model's latest numbers with the size,
    fingerprint and date of the test set they were measured on, and a note when that set is older."""
    return [{"version": m["version"], "status": m["status"],
             "macro_auroc": format_interval(m["metrics"].get("macro_auroc")),
             "balanced_accuracy": format_interval(m["metrics"].get("balanced_accuracy")),
             "n_images": m.get("n_images"), "test_set": (m.get("test_set_fingerprint") or "")[:8],
             "scored": (m.get("scored_at") or "")[:10], "note": m.get("note") or "",
             "promoted": (m.get("last_promoted") or {}).get("time", "")[:19]}
            for m in models]


def interval(metrics: dict[str, Any], key: str) -> str:
    """``0.912 [0.880, 0.941]``: a metric's point value with its bootstrap interval, if any."""
    return format_interval({"point": metrics.get(key), **metrics.get("intervals", {}).get(key, {})})


# --------------------------------------------------------------------------- the shared context


def _data_context(result: dict[str, Any]) -> dict[str, Any] | None:
    """Ingests, split counts, near-duplicates and embedding; None when the run recorded none of them."""
    if not any(k in result for k in ("ingests", "split_counts", "near_duplicates", "embed")):
        return None
    ingests = [[i.get("manifest") or i.get("source"), i.get("added"), i.get("duplicates"),
                i.get("skipped_unchanged"), i.get("rejected"),
                ", ".join(f"{k}: {v}" for k, v in sorted((i.get("rejected_by_reason") or {}).items())) or "-"]
               for i in result.get("ingests") or []]
    counts = result.get("split_counts") or {}
    labels = sorted({label for split in counts.values() for label in split})
    embed = result.get("embed") or None
    return {
        "ingest_headers": ["source", "new", "duplicate", "unchanged", "quarantined", "quarantine reasons"],
        "ingests": ingests,
        "split_headers": ["split", *labels, "total"],
        "splits": [[s, *[counts[s].get(lab, 0) for lab in labels], sum(counts[s].values())] for s in counts],
        "near_duplicates": result.get("near_duplicates"),
        "embed": None if embed is None else {k: embed.get(k, 0)
                                             for k in ("computed", "cached",
                                                       "recomputed_corrupt", "seconds")},
    }


def report_context(result: dict[str, Any]) -> dict[str, Any]:
    """Everything both templates show, as plain values (numbers already formatted)."""
    evals = [(role, result[key])
             for role, key in (("challenger", "challenger_eval"), ("champion", "champion_eval"))
             if result.get(key)]
    ch = result.get("challenger_eval")
    boot = (ch or {}).get("metrics", {}).get("bootstrap", {}) if ch else {}
    dec = result.get("decision")
    fingerprint = result.get("backbone_fingerprint")
    return {
        "title": title(result),
        "state": run_state(result),
        "message": state_message(result),
        "run_name": result.get("run_name") or result.get("flow_run_id"),
        "flow_run_id": result.get("flow_run_id"),
        "trigger": result.get("trigger"),
        "random_init": random_init(result),
        "backbone_weights": result.get("backbone_weights"),
        "backbone_fingerprint": fingerprint[:16] if fingerprint else None,
        "models": [{"role": role, "version": ev["version"], "n_images": ev["n_images"],
                    "macro_auroc": interval(ev["metrics"], "macro_auroc"),
                    "balanced_accuracy": interval(ev["metrics"], "balanced_accuracy")} for role, ev in evals],
        "test_set": None if not ch else {"fingerprint": ch["test_set_fingerprint"][:16],
                                         "n_images": ch["n_images"], "bootstrap_samples": boot.get("samples"),
                                         "patients": boot.get("patients")},
        "decision": None if not dec else {"decision": dec["decision"],
                                          "rationale": dec.get("rationale") or "",
                                          "checks": [[c["name"], "yes" if c["passed"] else "no", c["detail"]]
                                                     for c in dec.get("checks") or []]},
        "champion_after": result.get("champion_after"),
        "data": _data_context(result),
        "audit": audit_context(result.get("audit")),
        "slice_sections": slice_sections(evals),
        "label_history": label_history_context(result.get("label_history")),
        "error": result.get("error"),
        # the error gets its own section unless the message under the title already says it all
        "show_error": bool(result.get("error")) and str(result["error"]) not in (state_message(result) or ""),
        "report_path": result.get("report_path"),
    }


def html_report_contents(result: dict[str, Any]) -> list[str]:
    """What ``report.html`` shows beyond the summary: ``result["report_html_contents"]`` as
    :func:`~xray_core.report.html.write_run_html` recorded it, else only what the evaluations alone
    guarantee (so the link never promises ROC curves or heatmaps the file lacks)."""
    if result.get("report_html_contents") is not None:
        return list(result["report_html_contents"])
    if result.get("challenger_eval"):
        return ["metrics with 95% intervals", "per-class metrics", "confusion matrices"]
    return []


def retrain_markdown(result: dict[str, Any]) -> str:
    """The human report of one retrain run (the ``retrain-report`` artifact and ``report.md``)."""
    ch, champ = result.get("challenger_eval"), result.get("champion_eval")
    context = report_context(result)
    context.update(
        report_html=result.get("report_html"),
        report_html_contents=html_report_contents(result),
        metrics_header=(["metric", f"challenger (v{ch['version']})",
                         f"champion (v{champ['version']})" if champ else "champion"]
                        if ch else []),
        metrics_rows=[[r["metric"], r.get("challenger", ""), r.get("champion", "")]
                      for r in metrics_rows(ch, champ, sites=False)]
        if ch else [],
    )
    # Skipped blocks leave runs of blank lines; markdown reads one blank line the same, the raw text doesn't.
    return re.sub(r"\n{3,}", "\n\n", render_template("report.md.j2", context)).strip() + "\n"


def write_run_markdown(settings: Settings, result: dict[str, Any], run_dir: Path) -> tuple[Path, str]:
    """Write ``run_dir/report.md`` (mode ``settings.file_mode``: people open it); return path and text."""
    from xray_core.io.fsutil import atomic_write_text, utf8_safe

    markdown = utf8_safe(retrain_markdown(result))  # the artifact gets the same (valid UTF-8) text
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, markdown, mode=settings.file_mode)
    return path, markdown


__all__ = ["KEY_METRICS", "retrain_markdown", "write_run_markdown", "artifact_description", "run_state",
           "title", "champion_change", "state_message", "metrics_rows", "registry_rows", "report_context",
           "template_environment", "render_template"]
