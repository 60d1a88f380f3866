"""Plain-text tables for the terminal. ``--json`` output never goes through here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from xray_core.report.format import format_interval, table

if TYPE_CHECKING:  # xray_cli imports this module at start-up: render_terminated must stay cheap
    from xray_core.results import RunResult


def render_ingest(s: dict[str, Any]) -> str:
    out = [f"source {s['source_id']}: {s['manifest'] or s['source']}",
           f"  files {s['files']}: added {s['added']}, duplicates {s['duplicates']}, "
           f"unchanged (skipped) {s['skipped_unchanged']}, rejected {s['rejected']}  ({s['seconds']} s)"]
    if s["added_by_label"]:
        out.append("  added by label: " + ", ".join(f"{k} {v}"
                                                    for k, v in sorted(s["added_by_label"].items())))
    if s["rejected_by_reason"]:
        out.append("  rejected by reason: " + ", ".join(f"{k} {v}"
                                                        for k, v in sorted(s["rejected_by_reason"].items())))
    q = s.get("quarantine") or {}  # absent in summaries stored before content-addressed quarantine
    if q.get("copies_written") or q.get("rows_sharing_a_copy"):
        out.append(f"  quarantine: {q['copies_written']} new copies ({q['bytes_written']:,} bytes); "
                   f"{q['rows_sharing_a_copy']} row(s) point at a copy already there")
    if q.get("copies_skipped"):
        out.append(f"  quarantine: {q['copies_skipped']} copies skipped: {q['skipped_because']}")
    out.append(f"  new patients {s['new_patients']}; new splits: "
               + ", ".join(f"{k} {v}" for k, v in s["split_assignments"].items()))
    if s["patients_without_id"]:
        out.append(f"  note: {s['patients_without_id']} image(s) had no patient id; each is its own patient")
    attributes = s.get("attributes") or {}  # absent in summaries stored before issue 25
    if attributes.get("columns"):
        out.append("  kept as attributes: " + ", ".join(attributes["columns"]))
    if attributes.get("conflicts"):
        out.append(f"  attributes: {attributes['conflicts']} value(s) differ from what films already "
                   "catalogued hold; the stored values stay, e.g. " + "; ".join(
                       f"{e['file']} {e['name']}: stored {e['stored'][:40]!r}, given {e['given'][:40]!r}"
                       for e in attributes.get("examples", [])[:3]))
    return "\n".join(out)


def render_status(r: dict[str, Any]) -> str:
    cat = r["catalogue"]
    out = [f"XRAY_HOME {r['home']}", f"catalogue {r['database_url']}", "",
           f"images {cat['images']} from {cat['sources']} source run(s); patients {cat['patients']['total']}"]
    rows = [[label, v["train"], v["val"], v["test"], v["unassigned"], sum(v.values())]
            for label, v in cat["by_label_and_split"].items()]
    if rows:
        out += ["", table(["label", "train", "val", "test", "unassigned", "total"], rows)]
    out += ["",
            "patients by id source: "
            + (", ".join(f"{k} {v}" for k, v in cat["patients"]["by_id_source"].items()) or "none")]
    rej = cat["rejections"]
    out.append(f"rejections {rej['total']}"
               + (": " + ", ".join(f"{k} {v}" for k, v in rej["by_reason"].items()) if rej["total"] else ""))
    nd = cat["near_duplicates"]
    out.append(f"near-duplicate pairs across splits (pHash distance <= {nd['max_distance']}): "
               f"{nd['pairs_across_splits']}")
    for e in (nd.get("examples") or [])[:5]:
        out.append(f"  {e.get('file_a')} (patient {e.get('patient_a')}, {e['split_a']}) ~ {e.get('file_b')} "
                   f"(patient {e.get('patient_b')}, {e['split_b']}): {e['distance']} bits")
    if cat.get("views"):
        out.append("films per view: " + ", ".join(f"{k} {v}" for k, v in cat["views"].items()))
    out += render_attributes(r.get("attributes"))
    out += _status_sites(r)
    for note in cat["notes"]:
        out.append(f"note: {note}")
    gone = r.get("interrupted") or {}
    for src in gone.get("ingests", []):
        out.append(f"interrupted ingest: source {src['source_id']} {src['path']} (started "
                   f"{src['started_at']})")
    if gone.get("undecided_candidates"):
        out.append("candidates with no decision (a killed retrain, or `xray train`): "
                   + ", ".join(f"v{v}" for v in gone["undecided_candidates"]))
    if r.get("feature_cache"):
        header = ["feature cache (backbone fingerprint)", "files", "MiB", "catalogued images cached",
                  "models"]
        out += ["", table(header,
                          [[c["fingerprint"][:16], c.get("files", ""), round(c.get("bytes", 0) / 2**20, 1),
                            c.get("coverage", ""),
                            ", ".join(f"v{m['version']} {m['status']}" for m in c.get("models", []))
                            or "-"] for c in r["feature_cache"]])]
    models = r.get("models") or {}
    if models:
        out += ["", f"champion: {models.get('champion') or 'none'}; versions: {models.get('versions', 0)}"]
    checks = r.get("drift_checks") or []
    if checks:
        out += ["",
                "drift checks (newest first; evidence that inputs changed, not proof that performance fell):"]
        out += [f"  {c['created_at'][:19]} {c['kind']} {c['subject'][:60]}: {c['n']} films, "
                f"{c['ood_flagged']} unlike the training data; "
                f"{'DRIFT ' if c['drift'] else ''}{c['verdict'][:160]}" for c in checks]
    s = r["settings"]
    out += ["", "settings:"] + [f"  {k} = {v}" for k, v in s.items()]
    return "\n".join(out)


def render_attributes(attributes: dict[str, Any] | None) -> list[str]:
    """``manifest attributes on 42 films: license 42, doi 40``: films carrying each name, most first."""
    if not attributes or not attributes.get("films"):
        return []
    names = ", ".join(f"{name} {n}" for name, n in attributes["by_name"].items())
    return [f"manifest attributes on {attributes['films']} film(s), films per name: {names}",
            *([f"  note: {attributes['note']}"] if attributes.get("note") else [])]


def _status_sites(r: dict[str, Any]) -> list[str]:
    """Where the films come from: images per site × label × split, patients whose labels changed, and
    the latest shortcut audit's flags."""
    out: list[str] = []
    by_site = (r.get("sites") or {}).get("by_site_label_split") or {}
    rows = [[site, label, v["train"], v["val"], v["test"], v["unassigned"], sum(v.values())]
            for site, labels in by_site.items() for label, v in labels.items()]
    if rows:
        out += ["", table(["site", "label", "train", "val", "test", "unassigned", "total"], rows)]
    history = r["catalogue"].get("label_history") or {}
    if history.get("patients"):
        out += ["", f"patients with films of different labels: {history['patients']} "
                    f"({history.get('in_test', 0)} in the test split)"]
        from xray_core.report.sites import films_text

        for e in (history.get("examples") or [])[:5]:
            out.append(f"  {e['patient_id']} ({e.get('split') or 'unassigned'}): {films_text(e['films'])}")
        if history["patients"] > 5:
            out.append(f"  ... and {history['patients'] - 5} more (xray status --json lists them)")
    audit = r.get("audit")
    if audit:
        where = (f"decision #{audit['promotion_id']} {audit['decision']}"
                 + (f" of v{audit['challenger']}" if audit.get("challenger") is not None else "")
                 + f", {(audit.get('time') or '')[:19]}; XRAY_SHORTCUT_POLICY={audit.get('policy')}")
        out += ["", f"shortcut audit ({where}): " + ("FLAGGED" if audit["flagged"] else "no shortcut found")]
        out += [f"  warning: {w}" for w in audit["warnings"]]
    elif "audit" in r:
        out += ["", "shortcut audit: none yet (runs at every retrain)"]
    return out


def render_slices(slices: dict[str, Any] | None) -> list[str]:
    """One table per dimension (site, view) of one evaluation's slices; slices not judged say why."""
    from xray_core.report.sites import slice_table, worth_showing

    out: list[str] = []
    for dimension in ("site", "view"):
        part = (slices or {}).get(dimension)
        if worth_showing(part):
            t = slice_table(dimension, part)
            out += ["", f"by {dimension}:", table(t["headers"], t["rows"])]
    return out


def render_models(models: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """The registry table: each model's latest numbers with the test set (size, fingerprint, date)
    they were measured on, so numbers on different test sets are never read side by side unmarked."""
    if not models:
        return "no model versions yet (xray train or xray retrain)"
    rows = [[m["version"], m["status"] + (" (locked reference)" if m.get("locked_reference") else "")
             + (" (pruned)" if m.get("pruned_at") else ""),
             format_interval(m["metrics"].get("macro_auroc")),
             format_interval(m["metrics"].get("balanced_accuracy")), m.get("n_images") or "-",
             (m.get("test_set_fingerprint") or "-")[:8], (m.get("scored_at") or "-")[:10],
             (m["last_promoted"] or {}).get("time", "")[:19], m.get("note") or ""]
            for m in models]
    out = table(["version", "status", "macro AUROC [95% CI]", "balanced acc [95% CI]", "n", "test set",
                 "scored", "promoted", "note"], rows)
    return "\n".join([out, *(f"note: {n}" for n in notes)])


def render_history(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no decisions recorded yet"
    out = []
    for r in rows:
        out.append(f"#{r['id']} {r['time'][:19]} {r['decision']}: {r['from_version']} -> champion "
                   f"{r['champion_after']} (challenger {r['to_version']}; trigger {r['trigger']}"
                   f"{'; by ' + r['actor'] if r.get('actor') else ''}"
                   f"{'; flow run ' + r['flow_run_id'] if r.get('flow_run_id') else ''})")
        out.append(f"    {r['rationale']}")
    return "\n".join(out)


def render_review(sent: dict[str, Any]) -> str:
    """``xray review``: what was sent to which run, then how the run ended (or that it has not yet)."""
    target = f"v{sent['version']}: " if sent.get("version") is not None else ""
    lines = [f"{target}{sent['decision']} sent to flow run {sent['flow_run_name']} ({sent['flow_run_id']}) "
             f"as {sent['reviewer']}: {sent['reason']}"]
    outcome = sent.get("outcome")
    if outcome:
        lines.append(f"the run ended {outcome['state']}: {outcome.get('message') or ''}".rstrip())
    else:
        lines.append("the run has not ended yet (it records the answer, then re-scores and reports): see "
                     "xray models --history" + (f" or {sent['url']}" if sent.get("url") else ""))
    return "\n".join(lines)


def render_lineage(m: dict[str, Any]) -> str:
    out = [f"model {m['version']} ({m['status']}), created {m['created_at'][:19]}",
           f"  checkpoint {m['checkpoint_dir']} sha256 {m['checkpoint_sha256']}"
           + (f" (pruned {m['pruned_at'][:10]} by xray gc: files deleted)" if m.get("pruned_at") else ""),
           f"  backbone {m['backbone_weights']} fingerprint {m['backbone_fingerprint']}",
           f"  training set fingerprint {m['training_set_fingerprint']}",
           f"  labels {m['labels']} threshold {m['threshold']}",
           f"  images: train {len(m['images']['train'])}, val {len(m['images']['val'])}",
           "  sources: " + "; ".join(f"{s['id']} {s['manifest'] or s['path']}" for s in m["sources"])]
    for e in m["evaluations"]:
        out.append(f"  evaluated on test set {e['test_set_fingerprint'][:12]} ({e['n_images']} images): "
                   f"macro AUROC {format_interval(e['metrics'].get('macro_auroc'))}"
                   + (" (per-site slices dropped by xray gc)" if e.get("detail_pruned") else ""))
    latest = m.get("slices")
    if latest:
        shown = render_slices(latest)
        if shown:
            out += ["",
                    f"latest evaluation (test set {latest['test_set_fingerprint'][:12]}, "
                    f"{latest['n_images']} images, {(latest.get('scored_at') or '')[:19]}), sliced:", *shown]
    return "\n".join(out)


def render_train(r: dict[str, Any]) -> str:
    t, e = r["train"], r["embed"]
    m = r["test"]["metrics"]
    out = [f"embedded {e['computed']} new (image, view) pairs, {e['cached']} from cache ({e['seconds']} s); "
           f"backbone {e['backbone_fingerprint'][:12]}"
           + (" (RANDOM-INIT: offline test weights)" if e["backbone_random_init"] else ""),
           f"trained model {t['version']}: best epoch {t['best_epoch']} of {t['epochs_run']}, threshold "
           f"{t['threshold']}",
           f"  {t['smoke_test']}",
           f"test set ({r['test']['n_images']} images): accuracy {format_interval(m['accuracy'])}, balanced "
           f"accuracy {format_interval(m['balanced_accuracy'])}, macro AUROC "
           f"{format_interval(m['macro_auroc'])}"]
    return "\n".join(out)


def render_retrain(r: dict[str, Any]) -> str:
    """The decision first, then the numbers it rests on, then where the report is."""
    state = r.get("state") or str(r.get("status"))
    out = [f"{state}: {r.get('state_message') or r.get('summary') or ''}".rstrip()]
    if r.get("backbone_random_init"):
        out.append("warning: the backbone is RANDOM-INIT (XRAY_BACKBONE_WEIGHTS=random): the numbers show "
                   "the pipeline works, not a clinically useful model")
    for note in r.get("notes") or []:
        out.append(f"note: {note}")
    for warning in (r.get("drift") or {}).get("warnings") or []:
        out.append(f"drift/OOD against the champion: {warning}")
    audit = r.get("audit") or {}
    for warning in audit.get("warnings") or []:
        out.append(f"shortcut audit: {warning} (XRAY_SHORTCUT_POLICY={audit.get('policy')})")
    for drop in (r.get("decision") or {}).get("site_drops") or []:
        out.append(f"site {drop['site']}: {drop['metric']} {drop['challenger']:.3f} vs champion "
                   f"{drop['champion']:.3f}")
    for name in ("challenger_eval", "champion_eval"):
        ev = r.get(name)
        if ev:
            iv = ev.get("intervals") or {}
            auroc = format_interval({"point": ev.get("macro_auroc"), **(iv.get("macro_auroc") or {})})
            bacc = format_interval({"point": ev.get("balanced_accuracy"),
                                    **(iv.get("balanced_accuracy") or {})})
            out.append(f"{name.split('_')[0]:<10} v{ev['version']}: macro AUROC {auroc}, balanced accuracy "
                       f"{bacc} on {ev['n_images']} test images (test set {ev['test_set_fingerprint'][:8]})")
    if r.get("champion_after") is not None:
        out.append(f"champion now: v{r['champion_after']}")
    if r.get("report"):
        out.append(f"report: {r['report']}" + (f" (and {r['report_html']})" if r.get("report_html") else ""))
    return "\n".join(out)


def render_terminated(result: RunResult | None, *, command: str = "retrain") -> str:
    """The one line a SIGTERM'd command prints: for a retrain, what its audit row (if any) now says."""
    if command != "retrain":
        return ("terminated (SIGTERM); what was committed before stays, the transaction in progress was "
                "rolled back" + (" and this ingest is recorded as failed; the next ingest takes up the rest"
                          if command == "ingest" else ""))
    if result is None:
        return "terminated (SIGTERM) before a retrain started or after it finished: nothing to record"
    if result.audit_recorded:
        return f"terminated; the audit row says: {result.state_message}"
    return (f"terminated; its audit row could not be recorded ({result.state_message}); the next "
            "retrain closes what it left (xray models --history)")


def render_incoming(r: dict[str, Any]) -> str:
    """``xray incoming``: one line per batch folder, its state and why (taken, ready, waiting, refused)."""
    counts = ", ".join(f"{n} {state}" for state, n in (r.get("counts") or {}).items() if n)
    out = [f"incoming {r['folder']} (XRAY_INCOMING_SETTLE_S={r['settle_s']}): {counts or 'no batch folders'}"]
    if r.get("note"):
        out.append(r["note"])
    width = max([len(b["name"]) for b in r.get("batches") or []] + [5])
    for b in r.get("batches") or []:
        ready = " (the next retrain takes it)" if b["state"] == "ready" else ""
        out.append(f"  {b['name']:<{width}}  {b['state']:<8} {b['detail']}{ready}")
    return "\n".join(out)


def render_predict(r: dict[str, Any]) -> str:
    out = [f"model v{r['model_version']} (labels {', '.join(r['labels'])}, threshold {r['threshold']}): "
           f"{r['predicted']} predicted, {r['rejected']} unreadable of {r['files']} files"]
    if r.get("backbone_random_init"):
        out.append("note: the backbone is random-init (offline mode)")
    if r.get("out"):
        out.append(f"CSV: {r['out']}")
    if r.get("heatmaps"):
        out.append(f"Grad-CAM overlays: {r['heatmaps']}")
    if r.get("ood"):
        out.append(r["ood"]["line"])
    if r.get("drift"):
        out.append(r["drift"]["verdict"])
    if r.get("performance"):
        from xray_core.monitor.performance import estimate_line

        out.append(estimate_line(r["performance"]))
    for row in r.get("rows", []):
        probs = ", ".join(f"{k[2:]} {v}" for k, v in row.items() if k.startswith("p_") and v != "")
        ood = " [unlike the training data]" if row.get("in_distribution") == "false" else ""
        out.append(f"  {row['file']}: {row['predicted_label'] or row['error']}"
                   + (f" ({probs})" if probs else "") + ood)
    return "\n".join(out)


def predict_markdown(r: dict[str, Any], out: str, heatmaps: str | None) -> str:
    """The ``predict-summary`` artifact of a predict batch: the count of films unlike the model's
    training data leads (with its rule, and the coarse-flag note when there is one), then what was
    predicted and where the CSV (``ood_p``, ``in_distribution`` per film) and the overlays are."""
    lines = [f"**{r['ood']['line']}**", "",
             f"Model v{r['model_version']} predicted {r['predicted']} of {r['files']} files "
             f"({r['rejected']} unreadable, listed with reasons). CSV: `{out}` (per film: `ood_p`, "
             "`in_distribution`)"]
    if heatmaps:
        lines += ["", f"Grad-CAM overlays: `{heatmaps}` (films out of distribution say so on the overlay)"]
    if r.get("performance"):
        from xray_core.monitor.performance import estimate_line

        lines += ["", estimate_line(r["performance"])]
    if r.get("backbone_random_init"):
        lines += ["", "> backbone is random-init (offline mode)"]
    return "\n".join(lines)


def render_monitor(r: dict[str, Any]) -> str:
    """``xray monitor``: the summary, one line per checked batch (its performance estimate below it),
    predict batches, the report's path."""
    from xray_core.monitor.performance import estimate_line

    out = [r["summary"]]
    for c in r.get("checks", []):
        out.append(f"  {c['subject']}: {c['ood_line']}; {c['verdict']}")
        if c.get("performance"):
            out.append(f"    {estimate_line(c['performance'])}")
    for c in r.get("predict_checks", []):
        out.append(f"  predict {c['subject']}: {c['n']} films, {c['ood_flagged']} unlike the training data; "
                   f"{c['verdict']}")
    if r.get("report"):
        out.append(f"report: {r['report']}")
    out.append("A drift warning is evidence that the inputs changed, not proof that performance fell.")
    return "\n".join(out)
