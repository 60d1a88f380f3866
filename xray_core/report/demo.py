"""The demo's story on the terminal: pure text over the retrain results (``flows/demo.py`` drives it).

Each arrival shows its state line, both models' numbers on the same test set, the shortcut audit in
one sentence per confounded label, the per-site table, the drift/OOD line and the decision; the
closing summary names what a pooled ">98% accuracy" would have hidden, with the run's own numbers.
Nothing is recomputed here, so the terminal says what the reports and the decisions rest on.
"""

from __future__ import annotations

from typing import Any

from xray_core.report.format import table


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def shortcut_sentences(shortcuts: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per label from a single site, e.g. "covid19 films come only from site adult-covid;
    the label is predictable from the site (AUROC 1.00) and from film metadata (AUROC 0.97)"."""
    out = []
    for label, s in shortcuts.items():
        meta = (_n(s["metadata_auroc"]) if s["metadata_auroc"] is not None
                else f"not run: {s['metadata_note']}")
        out.append(f"{label} films come only from site {s['site']}; the label is predictable from the site "
                   f"(AUROC {_n(s['site_auroc'])}) and from film metadata (AUROC {meta}), {label} "
                   "against the rest")
    return out


def site_rows(evaluation: dict[str, Any] | None) -> list[list[Any]]:
    """Per-site rows of one evaluation: site, films per label, macro AUROC (or why not judged)."""
    slices = (((evaluation or {}).get("metrics") or {}).get("slices") or {}).get("site") or {}
    rows = []
    for site, sl in slices.items():
        counts = ", ".join(f"{k} {v}" for k, v in (sl.get("counts") or {}).items() if v)
        judged = sl.get("judged", True)
        auroc = _n(sl.get("macro_auroc")) if judged else f"not judged: {sl.get('reason')}"
        rows.append([site, sl.get("n"), counts, auroc])
    return rows


def drift_lines(result: dict[str, Any]) -> list[str]:
    """The drift/out-of-distribution check of the new arrivals against the champion's reference (the
    retrain's ``drift`` step); "not checked" when there was no champion or nothing new, rather than
    implying the data looked familiar."""
    drift = result.get("drift")
    if not drift:
        return ["drift/OOD: not checked (no champion to compare with, or nothing new)"]
    if isinstance(drift, dict):
        warnings = drift.get("warnings") or []
        if warnings:
            return [f"drift/OOD: {w}" for w in warnings]
        return ["drift/OOD: "
                f"{drift.get('summary') or ('FLAGGED' if drift.get('flagged') else 'no drift found')}"]
    return [f"drift/OOD: {drift}"]


def _model_line(role: str, ev: dict[str, Any]) -> str:
    m = ev["metrics"]
    return (f"  {role:<10} v{ev['version']} ({', '.join(ev.get('labels') or m.get('labels') or [])}): macro "
            f"AUROC {m.get('macro_auroc', 0):.3f}, accuracy {m.get('accuracy', 0):.3f}, balanced accuracy "
            f"{m.get('balanced_accuracy', 0):.3f} on {ev['n_images']} test films")


def render_arrival(n: int, title: str, result: dict[str, Any]) -> list[str]:
    """The terminal's account of one arrival: state, both models' numbers, audit, sites, drift, decision."""
    out = [f"=== arrival {n}: {title}"]
    for ing in result.get("ingests") or []:
        out.append(f"ingested {ing['added']} new films ({ing['duplicates']} duplicates, "
                   f"{ing['rejected']} quarantined)")
    out.append(f"{result['state']}: {result['state_message']}")
    challenger, champion = result.get("challenger_eval"), result.get("champion_eval")
    if challenger:
        fingerprint = challenger["test_set_fingerprint"][:8]
        out.append(f"both models on the same test set {fingerprint} (each scored on the test films of "
                   "its own labels):")
        out.append(_model_line("challenger", challenger))
        if champion:
            out.append(_model_line("champion", champion))
    audit = result.get("audit") or {}
    for s in shortcut_sentences(result.get("shortcuts") or {}):
        out.append(f"shortcut audit: {s}")
    for w in audit.get("warnings") or []:
        out.append(f"  audit warning: {w}")
    if audit and not audit.get("flagged"):
        out.append("shortcut audit: no shortcut found")
    rows = site_rows(challenger)
    if rows:
        out += ["per-site (challenger, test split):",
                *("  " + line
                  for line in table(["site", "films", "by label", "macro AUROC"], rows).splitlines())]
    if n == 3 or result.get("drift"):
        out += drift_lines(result)
    decision = result.get("decision") or {}
    if decision.get("decision") == "blocked":
        first = (audit.get("warnings") or ["a shortcut"])[0]
        champion_now = (f"the champion stays v{result['champion_after']}"
                        if result.get("champion_after") is not None
                        else "there is still no champion")
        out.append("decision: blocked. Nothing was promoted because the shortcut audit flagged the data "
                   f"({first}), and XRAY_SHORTCUT_POLICY={audit.get('policy')} stops automatic promotion; "
                   f"{champion_now}.")
    elif decision:
        out.append(f"decision: {decision.get('decision')}")
    if result.get("report"):
        out.append(f"report: {result['report']} (report.html beside it)")
    return out


def closing_summary(results: list[dict[str, Any]]) -> list[str]:
    """What a tutorial's pooled ">98% accuracy" would have hidden, in this run's own numbers."""
    last = results[-1] if results else {}
    challenger = last.get("challenger_eval")
    audit = last.get("audit") or {}
    out = ["What the tutorial's \">98% accuracy\" would have hidden, in this run's numbers:"]
    if challenger:
        m = challenger["metrics"]
        out.append(f"- pooled, v{challenger['version']} scores accuracy {m.get('accuracy', 0):.3f} and macro "
                   f"AUROC {m.get('macro_auroc', 0):.3f} on {challenger['n_images']} test films: one number "
                   "for two worlds.")
    for s in shortcut_sentences(last.get("shortcuts") or {}):
        out.append(f"- {s}: a model can score by recognising the collection, not the lungs.")
    probe = (audit.get("site_probe") or {}).get("auroc")
    if probe is not None:
        out.append(f"- the frozen backbone's features tell the sites apart (AUROC {probe:.2f}), so the head "
                   "can learn the site.")
    for row in site_rows(challenger):
        out.append(f"- site {row[0]}: {row[1]} test films ({row[2]}), macro AUROC {row[3]}.")
    if last.get("state") == "Blocked":
        out.append("- XRAY_SHORTCUT_POLICY=block: nothing was promoted; the champion stays "
                   f"v{last.get('champion_after')}.")
    elif last.get("state"):
        out.append(f"- the run ended {last['state']}; the champion is v{last.get('champion_after')}.")
    return out
