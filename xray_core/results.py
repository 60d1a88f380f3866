"""The typed values one retrain passes from step to step, and the :class:`RunResult` they add up to.

The recipe (:mod:`xray_core.pipeline.recipe`) builds them; :mod:`xray_core.report` renders a
:class:`RunResult`; ``flows/`` read it for the flow's state, artifacts and events. They live here,
below both, so that the report never imports the pipeline (imports go pipeline → report).

Nested payloads whose shape belongs to another module stay plain JSON-able dicts, typed
``dict[str, Any]`` on purpose: the metrics (:func:`xray_core.evaluate.metrics.compute_metrics`), the
shortcut audit (:mod:`xray_core.evaluate.audit`), the drift check and an ingest's summary. What the
recipe itself reads or decides on is a typed field.

``RunResult.as_dict()`` is the ``result.json`` format, key for key and in the same order as before the
recipe was typed (``tests/integration/test_result_json.py`` holds real runs' files to compare with).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from xray_core.data.ingest import IngestSummary
from xray_core.data.snapshot import SplitData, load_snapshot
from xray_core.evaluate.promotion import DECISION_STATES


class NotReached(enum.Enum):
    """A step the run did not reach (its key is absent from ``result.json``), unlike a step that ran
    and found nothing (``None``: e.g. no champion to evaluate)."""

    NOT_REACHED = "not reached"


NOT_REACHED = NotReached.NOT_REACHED



def run_state(status: str | None, decision: str | None, *, error: Any = None) -> str | None:
    """The run's state as the flow names it (one of :data:`~xray_core.evaluate.promotion.RUN_STATES`):
    ``Failed`` or ``Skipped`` from the status, otherwise the one the decision maps to; None for a run
    still in progress. The only place a state is derived (the recipe, the failure path and the
    report of an old ``result.json`` without a ``state`` all ask here)."""
    if status == "failed" or error:
        return "Failed"
    if status == "skipped":
        return "Skipped"
    return DECISION_STATES.get(decision or "")


def outcome_sentence(state: str | None, challenger: int | None, before: int | None,
                     after: int | None) -> str | None:
    """What happened to the champion, in versions: ``v3 replaces v2``, ``champion v2 stays (v3 not
    promoted)``. The one wording of a run's outcome: the report's title after the state, and the start
    of the state's message (the policy's rationale follows). ``before``: the champion the challenger
    was compared with; ``after``: the champion once the decision was recorded (another process may
    have moved it: a ``stale`` decision)."""
    new = "the challenger" if challenger is None else f"v{challenger}"
    stays = after if after is not None else before
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
        return f"champion v{after} stays; nothing new to train on" if after is not None else (
            "nothing new to train on")
    if state == "Failed":
        return f"champion v{stays} unchanged" if stays is not None else "the champion was not changed"
    return None

@dataclass(frozen=True)
class Snapshot:
    """The split one run works on, frozen to ``<run dir>/split.json`` so every step (a Prefect task,
    a Dask worker on another host) and the report see the same images while others ingest more.
    Only the path travels between tasks (tasks pass paths and small values, never whole splits)."""

    path: Path

    def load(self) -> SplitData:
        return load_snapshot(self.path)


@dataclass(frozen=True)
class EmbedResult:
    """What embedding the run's split cost: (image, view) pairs requested, found cached, computed."""

    requested: int
    cached: int
    computed: int
    recomputed_corrupt: int
    images: int
    seconds: float  # wall clock
    backbone_fingerprint: str  # the feature cache's folder, and the models' compatibility key
    backbone_random_init: bool  # offline mode: the report warns
    backbone_calls: int
    fan_out: dict[str, Any] = field(default_factory=dict)  # over Dask: shards, shard_seconds, threads

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> EmbedResult:
        own = {f.name for f in fields(cls)} - {"fan_out"}
        return cls(**{k: stats[k] for k in own}, fan_out={k: v for k, v in stats.items() if k not in own})

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {**{k: v for k, v in out.items() if k != "fan_out"}, **self.fan_out}


@dataclass(frozen=True)
class TrainResult:
    """The challenger just trained and registered as a candidate (its card holds the rest)."""

    version: int
    labels: list[str]
    threshold: float | None  # operating point on calibrated probabilities (binary models only)
    best_epoch: int
    epochs_run: int
    recipe: str  # the head recipe chosen on held-out patients
    recipe_reason: str
    temperature: float
    val_metrics: dict[str, Any]  # n, accuracy, balanced_accuracy, macro_auroc on held-out patients
    smoke_test: str
    training_set_fingerprint: str
    backbone_fingerprint: str
    backbone_random_init: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """One model scored on the run's test split; its probabilities travel with it, so deciding and
    reporting never re-read the test features."""

    version: int
    test_set_fingerprint: str
    n_images: int
    metrics: dict[str, Any]  # compute_metrics + intervals, bootstrap, slices
    labels: list[str]
    probabilities: list[list[float]]  # n x classes, in test-split order
    shas: list[str]
    sites: list[str]
    views: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The promotion policy's decision after the per-site guardrail and the shortcut audit."""

    # promote | keep | blocked | insufficient_evidence; after a review approved | rejected | review_expired;
    # stale once recorded too late
    decision: str
    promote: bool
    rationale: str
    checks: list[dict[str, Any]]  # {"name", "passed", "detail"}
    evidence: dict[str, Any] | None = None  # insufficient_evidence: the numbers a decision would need
    site_drops: Any = None  # per-site metric drops against the champion (none without a champion)
    comparison: dict[str, Any] | None = None  # paired bootstrap against the champion
    # The reviewer's answer when the verdict waited for one (xray_core.pipeline.review.reviewed): mode,
    # answer, reviewer, reason, requested_at, deadline, answered_at; None when no review was asked.
    review: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recorded:
    """The audit row the decision was recorded as, and who is champion after it."""

    decision: str  # the verdict's, or "stale" when the champion moved since evaluation
    rationale: str
    champion_after: int | None


@dataclass(frozen=True)
class ReportFiles:
    """The run's report files and the artifact description (the decision first)."""

    markdown: str
    html: str
    result_json: str
    description: str


@dataclass
class RunResult:
    """Everything one retrain found and decided, filled in step by step (a failure report shows the
    part a run reached). Fields are in ``result.json``'s order."""

    flow_run_id: str | None
    run_name: str | None
    trigger: str
    backbone_weights: str
    backbone_random_init: bool
    run_dir: str
    ingests: list[IngestSummary] = field(default_factory=list)  # one per folder or manifest
    notes: list[str] = field(default_factory=list)
    drift: dict[str, Any] | None = None  # checked only when films arrived and a champion exists
    split_counts: dict[str, dict[str, int]] | None = None
    near_duplicates: dict[str, Any] | None = None
    label_history: dict[str, Any] | None = None
    embed: EmbedResult | None = None
    audit: dict[str, Any] | None = None
    train: TrainResult | None = None
    challenger_eval: Evaluation | None = None
    champion_eval: Evaluation | None = None
    decision: Verdict | None = None
    champion_after: int | None | NotReached = NOT_REACHED
    registry: list[dict[str, Any]] | None = None  # the registry re-scored on this test set
    status: str | None = None  # completed | skipped | failed
    state: str | None = None  # one of RUN_STATES
    error: str | None = None
    state_message: str = ""
    audit_recorded: bool = False  # a failed run's audit row was written
    report_error: str | None = None
    report: ReportFiles | None = None

    @property
    def version(self) -> int | None:
        """The challenger's version (None before training)."""
        return self.train.version if self.train else None

    @property
    def state_line(self) -> str:
        """``<State>: <message>``: the CLI's first line, the flow's log line (``summary`` in result.json)."""
        return f"{self.state}: {self.state_message}"

    def as_dict(self, *, with_report: bool = True) -> dict[str, Any]:
        """The ``result.json`` format; ``with_report`` adds the report files' paths (once written)."""
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("flow_run_id", "run_name", "trigger", "backbone_weights", "backbone_random_init")
        }
        out.update(ingests=[i.as_dict() for i in self.ingests], notes=list(self.notes), run_dir=self.run_dir)
        if self.drift is not None:
            out["drift"] = self.drift
        if self.split_counts is not None:
            out.update(
                split_counts=self.split_counts,
                near_duplicates=self.near_duplicates,
                label_history=self.label_history,
            )
        if self.embed is not None:
            out.update(embed=self.embed.as_dict(), backbone_fingerprint=self.embed.backbone_fingerprint)
        if self.audit is not None:
            out["audit"] = self.audit
        if self.train is not None:
            out.update(train=self.train.as_dict(), version=self.train.version)
        if self.challenger_eval is not None:
            out.update(
                challenger_eval=self.challenger_eval.as_dict(),
                champion_eval=self.champion_eval.as_dict() if self.champion_eval else None,
            )
        if self.decision is not None:
            out["decision"] = {
                k: getattr(self.decision, k)
                for k in ("decision", "promote", "rationale", "checks", "evidence", "site_drops")
            }
            if self.decision.review is not None:  # only a reviewed run has it: older files stay as they were
                out["decision"]["review"] = self.decision.review
            if self.champion_after is not NOT_REACHED:
                out["champion_after"] = self.champion_after
        if self.registry is not None:
            out["registry"] = self.registry
        if self.status is not None:
            out.update(status=self.status, state=self.state)
            if self.error is not None:
                out["error"] = self.error
            out["state_message"] = self.state_message
            if self.decision is None and self.champion_after is not NOT_REACHED:
                out["champion_after"] = self.champion_after  # a skipped run: the champion it left
            out["summary"] = self.state_line
        if self.audit_recorded:
            out["audit_recorded"] = True
        if self.report_error is not None:
            out["report_error"] = self.report_error
        if with_report and self.report is not None:
            out.update(
                report=self.report.markdown,
                report_html=self.report.html,
                result_json=self.report.result_json,
                description=self.report.description,
                report_path=self.report.markdown,
            )
        return out

    def digest(self) -> dict[str, Any]:
        """What the flow and the CLI return: the key numbers, not the full metric dicts (those are in
        the report and ``result.json``)."""
        full = self.as_dict()
        keep = (
            "flow_run_id",
            "status",
            "state",
            "state_message",
            "summary",
            "trigger",
            "ingests",
            "split_counts",
            "embed",
            "champion_after",
            "report",
            "report_html",
            "description",
            "notes",
            "backbone_random_init",
            "report_error",
        )
        out = {k: full.get(k) for k in keep}
        out["decision"] = full.get("decision")
        out["drift"] = self.drift
        audit = self.audit or {}
        out["audit"] = (
            {k: audit.get(k) for k in ("flagged", "warnings", "policy", "sites")} if audit else None
        )
        train = full.get("train") or {}
        out["train"] = {
            k: train.get(k) for k in ("version", "threshold", "best_epoch", "epochs_run", "smoke_test")
        }
        for name, ev in (("challenger_eval", self.challenger_eval), ("champion_eval", self.champion_eval)):
            out[name] = (
                None
                if ev is None
                else {
                    "version": ev.version,
                    "test_set_fingerprint": ev.test_set_fingerprint,
                    "n_images": ev.n_images,
                    **{k: ev.metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_auroc")},
                    "intervals": {
                        k: ev.metrics.get("intervals", {}).get(k)
                        for k in ("macro_auroc", "balanced_accuracy")
                    },
                }
            )
        return out
