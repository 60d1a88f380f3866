"""The retrain run report: markdown for the Prefect UI and for ``XRAY_HOME/reports/<run>/``.

Pure functions of the run's :class:`~xray_core.results.RunResult`, so the report is testable without
Prefect (a ``result.json`` written earlier renders through :meth:`RunResult.from_dict`). The numbers
and sentences are built here, in Python, as a plain context dict; the layout lives in Jinja2 templates
(``templates/report.md.j2``, and ``report.html.j2`` for :mod:`xray_core.report.html`), so a change of
wording or order is a template edit, not a string-concatenation hunt.

The report leads with the run's state (Promoted, Kept, Blocked, Skipped, Insufficient evidence or
Failed, with its message), derived from the decision or status when the run recorded none, and shows
only sections that have content: a failed or skipped run has no empty comparison heading and promises
no figures it lacks.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from xray_core.data.incoming import pending_phrase
from xray_core.evaluate.promotion import RUN_STATES
from xray_core.report.drift import drift_context
from xray_core.report.flips import flip_rows, flips_context
from xray_core.report.format import cut_words, format_interval, outcome_sentence
from xray_core.report.reference import breach_lines, reference_context
from xray_core.report.sites import audit_context, label_history_context, site_metric_rows, slice_sections
from xray_core.results import Evaluation, NotReached, ReportFiles, RunResult
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


def run_state(run: RunResult) -> str | None:
    """The run's state as the flow names it (one of :data:`~xray_core.evaluate.promotion.RUN_STATES`),
    or None when unknown: ``run.state`` when set; otherwise derived (a failure or skip from the status,
    else the policy's decision). A run without any of these (still in progress) has no state."""
    if run.state in RUN_STATES:
        return run.state
    return derive_state(run.status, run.decision.decision if run.decision else None, error=run.error)


def challenger_version(run: RunResult) -> int | None:
    if run.challenger_eval is not None:
        return run.challenger_eval.version
    return run.version


def champion_before(run: RunResult) -> int | None:
    """The champion the challenger was compared with (None: there was none, or no comparison)."""
    return run.champion_eval.version if run.champion_eval else None


def champion_after(run: RunResult) -> int | None:
    """The champion once the run ended (None: none, or the run did not get that far)."""
    return None if isinstance(run.champion_after, NotReached) else run.champion_after


def _v(version: int | None, fallback: str) -> str:
    return fallback if version is None else f"v{version}"


def champion_change(run: RunResult) -> str | None:
    """What happened to the champion, in versions (:func:`xray_core.report.format.outcome_sentence`)."""
    return outcome_sentence(run_state(run), challenger_version(run), champion_before(run),
                            champion_after(run), pending=pending_phrase(run.incoming),
                            restored=run.reference_restored)


def state_message(run: RunResult) -> str | None:
    """The one-line rationale under the title: the run's state message, else a failure's error; None
    for decided runs without one (their Decision section has the full rationale)."""
    if run.state_message:
        return run.state_message
    if run_state(run) == "Failed" and run.error:
        return run.error
    return None


def title(run: RunResult) -> str:
    """``Promoted: v3 replaces v2``; a run without a state falls back to its name."""
    state = run_state(run)
    if state is None:
        return f"Retrain run {run.run_name or run.flow_run_id or ''}".rstrip()
    return f"{state}: {champion_change(run)}"


def artifact_description(run: RunResult) -> str:
    """A short description of the run's report artifact that starts with the decision and versions,
    e.g. ``Promoted v3 (was v2)``, ``Kept v2; challenger v3 rejected``, ``Skipped: nothing new in ...``,
    ``Failed: OSError: ...``; the state message follows when there is room (at most 200 characters,
    cut at a word: :func:`~xray_core.report.format.cut_words`).

    Prefect lists artifacts by key with this description, so a run history reads as decisions.
    """
    state, new, old = run_state(run), challenger_version(run), champion_before(run)
    message = state_message(run)
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
        text, message = f"{state}: {message or champion_change(run)}", None
    else:
        text = title(run)
    if message:
        text += f" — {message}"
    return cut_words(text, DESCRIPTION_MAX_CHARS)


def random_init(run: RunResult) -> bool:
    """Whether the report must carry the random-init warning (also on failed and skipped runs)."""
    return run.backbone_weights == "random" or run.backbone_random_init


# --------------------------------------------------------------------------- what each model was scored on


def evaluations(run: RunResult) -> list[tuple[str, Evaluation]]:
    """(role, evaluation) of the models the run scored, challenger first."""
    return [(role, ev) for role, ev in (("challenger", run.challenger_eval), ("champion", run.champion_eval))
            if ev is not None]


def split_test_size(run: RunResult) -> int | None:
    """Images in the run's test split (each model is scored on those whose label it knows)."""
    counts = (run.split_counts or {}).get("test")
    if counts:
        return int(sum(counts.values()))
    return max((ev.n_images for _, ev in evaluations(run)), default=None)


def same_images(run: RunResult) -> bool:
    """Whether every model was scored on every test image (a champion that lacks a label the test
    split holds is scored on the images of its own labels only)."""
    total = split_test_size(run)
    return all(ev.n_images == total for _, ev in evaluations(run))


def scored_on(run: RunResult) -> list[str]:
    """One line per model saying what it was scored on: ``all 26 test images``, or ``20 of 26 test
    images: those labelled normal or pneumonia, the labels v2 knows (it has no covid19 output)``."""
    total = split_test_size(run)
    present = sorted((run.split_counts or {}).get("test") or {})
    out = []
    for role, ev in evaluations(run):
        if ev.n_images == total:
            out.append(f"{role} v{ev.version}: all {total} test images")
            continue
        missing = [label for label in present if label not in ev.labels]
        why = f" (it has no {' or '.join(missing)} output)" if missing else ""
        out.append(f"{role} v{ev.version}: {ev.n_images} of {total} test images: those labelled "
                   f"{' or '.join(ev.labels)}, the labels v{ev.version} knows{why}")
    return out


def comparison_words(run: RunResult) -> str:
    """``same test set`` when every model was scored on every test image; otherwise ``same test split,
    not the same images`` (:func:`scored_on` says which)."""
    return "same test set" if same_images(run) else "same test split, not the same images"


# --------------------------------------------------------------------------- tables


def metrics_rows(challenger: Evaluation | None, champion: Evaluation | None, *,
                 sites: bool = True, flips: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows for the metrics table artifact: one per metric, both models side by side, with intervals.

    With ``sites`` (the ``retrain-metrics`` artifact), per-site rows follow (``macro_auroc @ site
    paeds``, ...), because pooled numbers can hide a collapse on one site; report.md has its own
    "By site" section instead. ``flips`` (the run's ``negative_flips``) adds the challenger's negative
    flip rate and positive congruence against the champion, overall and per site.
    """
    rows = []
    for key in KEY_METRICS:
        row: dict[str, Any] = {"metric": key}
        for name, ev in (("challenger", challenger), ("champion", champion)):
            row[name] = "-" if ev is None else interval(ev.metrics, key)
        rows.append(row)
    for name, ev in (("challenger", challenger), ("champion", champion)):
        if ev is None:
            continue
        for label, pc in ev.metrics.get("per_class", {}).items():
            iv = ev.metrics.get("intervals", {}).get(f"per_class.{label}.sensitivity", {})
            rows.append({"metric": f"sensitivity[{label}] ({name})",
                         name: format_interval({"point": pc.get("sensitivity"), "low": iv.get("low"),
                                                "high": iv.get("high")}),
                         "challenger" if name == "champion" else "champion": ""})
    return rows + (site_metric_rows(challenger, champion) if sites else []) + flip_rows(flips)


def registry_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the ``model-registry`` table artifact: each model's latest numbers with the size,
    fingerprint and date of the test set they were measured on, and a note when that set is older."""
    return [{"version": m["version"],
             "status": m["status"] + (" (locked reference)" if m.get("locked_reference") else ""),
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


def _data_context(run: RunResult) -> dict[str, Any]:
    """Ingests, split counts, near-duplicates and embedding (every run records its ingests)."""
    ingests = [[i.manifest or i.source, i.added, i.duplicates, i.skipped_unchanged, i.rejected,
                ", ".join(f"{k}: {v}" for k, v in sorted(i.rejected_by_reason.items())) or "-"]
               for i in run.ingests]
    counts = run.split_counts or {}
    labels = sorted({label for split in counts.values() for label in split})
    embed = run.embed
    incoming = run.incoming or {}
    return {
        "ingest_headers": ["source", "new", "duplicate", "unchanged", "quarantined", "quarantine reasons"],
        "ingests": ingests,
        "incoming": None if not incoming else {
            "folder": incoming.get("folder"), "taken_earlier": incoming.get("taken_earlier", 0),
            "headers": ["batch", "state", "detail"],
            "rows": [[b["name"], b["state"], b["detail"] if b["state"] != "taken" else
                      f"{b.get('added', 0)} added, {b.get('duplicates', 0)} duplicates, "
                      f"{b.get('quarantined', 0)} quarantined"] for b in incoming.get("batches") or []]},
        "split_headers": ["split", *labels, "total"],
        "splits": [[s, *[counts[s].get(lab, 0) for lab in labels], sum(counts[s].values())] for s in counts],
        "near_duplicates": run.near_duplicates,
        "embed": None if embed is None else {"computed": embed.computed, "cached": embed.cached,
                                             "recomputed_corrupt": embed.recomputed_corrupt,
                                             "seconds": embed.seconds},
    }


def report_context(run: RunResult, files: ReportFiles | None = None) -> dict[str, Any]:
    """Everything both templates show, as plain values (numbers already formatted). ``files``: where
    the report files are (default: the run's own, once written), for the reports to name each other."""
    files = files or run.report
    evals = evaluations(run)
    ch = run.challenger_eval
    boot = ch.metrics.get("bootstrap", {}) if ch else {}
    dec = run.decision
    fingerprint = run.embed.backbone_fingerprint if run.embed else None
    return {
        "title": title(run),
        "state": run_state(run),
        "message": state_message(run),
        "run_name": run.run_name or run.flow_run_id,
        "flow_run_id": run.flow_run_id,
        "trigger": run.trigger,
        "random_init": random_init(run),
        "backbone_weights": run.backbone_weights,
        "backbone_fingerprint": fingerprint[:16] if fingerprint else None,
        "models": [{"role": role, "version": ev.version, "n_images": ev.n_images,
                    "macro_auroc": interval(ev.metrics, "macro_auroc"),
                    "balanced_accuracy": interval(ev.metrics, "balanced_accuracy")} for role, ev in evals],
        "test_set": None if not ch else {
            "fingerprint": ch.test_set_fingerprint[:16], "n_images": split_test_size(run),
            "bootstrap_samples": boot.get("samples"), "patients": boot.get("patients"),
            "same_images": same_images(run), "scored_on": scored_on(run),
            "comparison": comparison_words(run)},
        "decision": None if not dec else {"decision": dec.decision, "rationale": dec.rationale or "",
                                          "checks": [[c["name"], "yes" if c["passed"] else "no", c["detail"]]
                                                     for c in dec.checks or []]},
        "champion_after": champion_after(run),
        "data": _data_context(run),
        "drift": drift_context(run.drift),
        "negative_flips": flips_context(dec.negative_flips if dec else None),
        "reference": reference_context(dec.reference if dec else None), "test_set_reuse": run.test_set_reuse,
        "breach": breach_lines(run.breach_checks),
        "audit": audit_context(run.audit),
        "slice_sections": slice_sections(evals),
        "label_history": label_history_context(run.label_history),
        "error": run.error,
        # the error gets its own section unless the message under the title already says it all
        "show_error": bool(run.error) and str(run.error) not in (state_message(run) or ""),
        "report_path": files.markdown if files and files.markdown else None,
    }


def html_report_contents(run: RunResult, files: ReportFiles | None) -> list[str]:
    """What ``report.html`` shows beyond the summary: what :func:`~xray_core.report.html.write_run_html`
    recorded (``files.html_contents``), else only what the evaluations alone guarantee (so the link
    never promises ROC curves or heatmaps the file lacks)."""
    if files is not None and files.html_contents is not None:
        return list(files.html_contents)
    if run.challenger_eval is not None:
        return ["metrics with 95% intervals", "per-class metrics", "confusion matrices"]
    return []


def retrain_markdown(run: RunResult, files: ReportFiles | None = None) -> str:
    """The human report of one retrain run (the ``retrain-report`` artifact and ``report.md``).
    ``files``: where the report files are (default: the run's own, once written)."""
    files = files or run.report
    ch, champ = run.challenger_eval, run.champion_eval
    context = report_context(run, files)
    context.update(
        report_html=files.html if files and files.html else None,
        report_html_contents=html_report_contents(run, files),
        metrics_header=(["metric", f"challenger (v{ch.version})",
                         f"champion (v{champ.version})" if champ else "champion"] if ch else []),
        metrics_rows=[[r["metric"], r.get("challenger", ""), r.get("champion", "")]
                      for r in metrics_rows(ch, champ, sites=False)] if ch else [],
    )
    # Skipped blocks leave runs of blank lines; markdown reads one blank line the same, the raw text doesn't.
    return re.sub(r"\n{3,}", "\n\n", render_template("report.md.j2", context)).strip() + "\n"


def drift_markdown(run: RunResult) -> str | None:
    """The ``drift-report`` artifact of a run that checked drift (None when it did not): the same
    text as report.md's "Drift of the new films" section, under a title that says whether it flagged."""
    context = drift_context(run.drift)
    if context is None:
        return None
    head = "Drift of the new films: " + ("flagged" if context["flagged"] else "not flagged")
    name = run.run_name or run.flow_run_id
    text = render_template("drift-report.md.j2", {"title": head + (f" (retrain run {name})" if name else ""),
                                                  "drift": context})
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def write_run_markdown(settings: Settings, run: RunResult, run_dir: Path,
                       files: ReportFiles | None = None) -> tuple[Path, str]:
    """Write ``run_dir/report.md`` (mode ``settings.file_mode``: people open it); return path and text."""
    from xray_core.io.fsutil import atomic_write_text, utf8_safe

    markdown = utf8_safe(retrain_markdown(run, files))  # the artifact gets the same (valid UTF-8) text
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, markdown, mode=settings.file_mode)
    return path, markdown


__all__ = ["KEY_METRICS", "retrain_markdown", "write_run_markdown", "artifact_description", "run_state",
           "title", "champion_change", "state_message", "metrics_rows", "registry_rows", "report_context",
           "template_environment", "render_template", "evaluations", "same_images", "scored_on",
           "comparison_words", "drift_markdown"]
