"""Formatting shared by every renderer (terminal, markdown, HTML, the site tables), so that none of
them imports another only for a helper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xray_core.results import NOT_REACHED, RunResult


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_interval(m: dict[str, Any] | None) -> str:
    if not m or m.get("point") is None:
        return "-"
    lo, hi = m.get("low"), m.get("high")
    return f"{m['point']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


ELLIPSIS = "…"


def cut_words(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: unchanged when it fits, else cut at the last word
    boundary that leaves room for an ellipsis (``"… kept v2; challenger v3…"``), never mid-word.

    Only when the last word boundary lies in the first half of the room (a long path, a hash) is the
    word cut inside: dropping it whole would leave less than half of what fits. The one cut of every
    artifact description (Prefect shows them in one table cell)."""
    if len(text) <= limit:
        return text
    if limit <= len(ELLIPSIS):
        return ELLIPSIS[:limit]
    head = text[: limit - len(ELLIPSIS)]
    if not text[len(head)].isspace():  # the cut falls inside a word: go back to its start
        boundary = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
        if boundary >= len(head) // 2:
            head = head[:boundary]
    return head.rstrip(" \t\n,;:·—-") + ELLIPSIS


def outcome_sentence(state: str | None, challenger: int | None, before: int | None,
                     after: int | None, *, pending: str | None = None, restored: bool = False) -> str | None:
    """What happened to the champion, in versions: ``v3 replaces v2``, ``champion v2 stays (v3 not
    promoted)``. The one wording of a run's outcome: the report's title after the state, and the start
    of the state's message (the policy's rationale follows). ``before``: the champion the challenger
    was compared with; ``after``: the champion once the decision was recorded (another process may
    have moved it: a ``stale`` decision). ``pending``: batches of the incoming folder still waiting or
    refused (:func:`xray_core.data.incoming.pending_phrase`): a skip then says so, not "nothing new".
    ``restored``: the run restored the locked reference ``after`` as champion (XRAY_REFERENCE_BREACH)."""
    new = "the challenger" if challenger is None else f"v{challenger}"
    stays = after if after is not None else before
    if restored and state != "Promoted":  # XRAY_REFERENCE_BREACH=rollback
        return f"locked reference v{after} restored as champion in place of v{before} ({new} not promoted)"
    if state == "Promoted":
        return f"{new} replaces v{before}" if before is not None else f"{new} becomes the first champion"
    if state == "Kept":
        return (f"champion v{stays} stays ({new} not promoted)" if stays is not None
                else f"no champion yet ({new} not promoted)")
    if state == "Blocked":
        return (f"champion v{stays} stays ({new} blocked by the shortcut audit)" if stays is not None
                else f"no champion yet ({new} blocked by the shortcut audit)")
    if state == "Insufficient evidence":
        return (f"champion v{stays} stays; too few test images to judge {new}" if stays is not None
                else f"too few test images to judge {new}; no champion yet")
    if state == "Skipped":
        why = pending or "nothing new to train on"
        return f"champion v{after} stays; {why}" if after is not None else why
    if state == "Failed":
        return f"champion v{stays} unchanged" if stays is not None else "the champion was not changed"
    return None


def outcome_message(result: RunResult) -> str:
    """The state's message of a decided run: what happened to the champion (the report's title says the
    same), then the policy's rationale."""
    assert result.decision is not None  # only called once decided
    before = result.champion_eval.version if result.champion_eval else None
    after = None if result.champion_after is NOT_REACHED else result.champion_after
    said = outcome_sentence(result.state, result.version, before, after, restored=result.reference_restored)
    return f"{said}. {result.decision.rationale}"
