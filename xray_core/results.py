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
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from xray_core.data.ingest import IngestSummary
from xray_core.data.snapshot import SplitData, load_snapshot
from xray_core.evaluate.breach import RESTORED, BreachCheck
from xray_core.evaluate.promotion import DECISION_STATES


class NotReached(enum.Enum):
    """A step the run did not reach (its key is absent from ``result.json``), unlike a step that ran
    and found nothing (``None``: e.g. no champion to evaluate)."""

    NOT_REACHED = "not reached"


NOT_REACHED = NotReached.NOT_REACHED

_T = TypeVar("_T")


def _lenient(cls: type[_T], d: Mapping[str, Any], **fallback: Any) -> _T:
    """``cls`` from the keys of ``d`` it names (others ignored): a field ``d`` lacks takes its default,
    else ``fallback``'s value, else None. For ``result.json`` files written by older versions, which
    lack keys added since; a current file carries every key."""
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]  # cls is a dataclass (every caller's is)
        if f.name in d:
            values[f.name] = d[f.name]
        elif f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
        else:
            values[f.name] = fallback.get(f.name)
    return cls(**values)



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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, backbone_fingerprint: str | None = None) -> EmbedResult:
        """From ``result.json``'s ``embed`` (:meth:`as_dict`); the fingerprint is a top-level key there."""
        own = {f.name for f in fields(cls)} - {"fan_out"}
        return _lenient(cls, {**d, "fan_out": {k: v for k, v in d.items() if k not in own}},
                        requested=0, cached=0, computed=0, recomputed_corrupt=0, images=0, seconds=0.0,
                        backbone_fingerprint=backbone_fingerprint or "",
                        backbone_random_init=False, backbone_calls=0)

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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainResult:
        """From ``result.json``'s ``train`` (:meth:`as_dict`)."""
        return _lenient(cls, d, labels=[], best_epoch=0, epochs_run=0, recipe="", recipe_reason="",
                        temperature=1.0, val_metrics={}, smoke_test="", training_set_fingerprint="",
                        backbone_fingerprint="", backbone_random_init=False)

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
    views: list[str | None]  # None: the film's view is not recorded

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evaluation:
        """From ``result.json``'s ``challenger_eval``/``champion_eval`` or an evaluate step's dict."""
        metrics = d.get("metrics") or {}
        return _lenient(cls, d, test_set_fingerprint="", n_images=len(d.get("probabilities") or []),
                        metrics=metrics, labels=list(metrics.get("labels") or []), probabilities=[], shas=[],
                        sites=[], views=[])

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
    # films the champion got right and the challenger gets wrong (xray_core.evaluate.flips); None
    # without a champion. ``negative_flips`` in result.json.
    negative_flips: dict[str, Any] | None = None
    # the locked reference: version, metric, margin, comparison, passed (pipeline.guards.reference_summary)
    reference: dict[str, Any] | None = None
    # The reviewer's answer when the verdict waited for one (xray_core.pipeline.review.reviewed): mode,
    # answer, reviewer, reason, requested_at, deadline, answered_at; None when no review was asked.
    review: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        return _lenient(cls, d, promote=d.get("decision") == "promote", rationale="", checks=[])

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
    html_contents: tuple[str, ...] | None = None  # what report.html shows (None: not recorded)


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
    # the incoming folder's batches: taken, waiting, refused (xray_core.data.incoming.run_record);
    # None when the run scanned no incoming folder (the key is then absent from result.json)
    incoming: dict[str, Any] | None = None
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
    # the champion against the locked reference at each site the drift check flagged (issue 26,
    # xray_core.pipeline.breach); ``breach_checks`` in result.json, absent when none was measured
    breach_checks: list[BreachCheck] = field(default_factory=list)
    decision: Verdict | None = None
    champion_after: int | None | NotReached = NOT_REACHED
    # decisions this test set informed, with XRAY_TEST_REUSE_BUDGET (registry.reference.count_test_set_reuse)
    test_set_reuse: dict[str, Any] | None = None
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
    def reference_restored(self) -> bool:
        """XRAY_REFERENCE_BREACH=rollback restored the locked reference as champion in this run."""
        return any(b.action == RESTORED for b in self.breach_checks)

    @property
    def state_line(self) -> str:
        """``<State>: <message>``: the CLI's first line, the flow's log line (``summary`` in result.json)."""
        return f"{self.state}: {self.state_message}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        """A run from its ``result.json`` (:meth:`as_dict` plus the report paths the writer adds), so
        that a run written earlier renders through the same typed renderers. Keys an older file lacks
        take their defaults; a file without ``state_message`` takes it from its ``summary``."""
        state, summary = d.get("state"), str(d.get("summary") or "")
        message = d.get("state_message", summary.removeprefix(f"{state}: ") if state else summary)
        train = d.get("train") or ({"version": d["version"]} if d.get("version") is not None else None)
        contents = d.get("report_html_contents")
        report = ReportFiles(markdown=d.get("report") or d.get("report_path") or "",
                             html=d.get("report_html") or "", result_json=d.get("result_json") or "",
                             description=d.get("description") or "",
                             html_contents=None if contents is None else tuple(contents))
        return replace(
            _lenient(cls, d, trigger="", backbone_weights="", backbone_random_init=False, run_dir=""),
            ingests=[_lenient(IngestSummary, i, source_id=0, source="") for i in d.get("ingests") or []],
            embed=(EmbedResult.from_dict(d["embed"], backbone_fingerprint=d.get("backbone_fingerprint"))
                   if d.get("embed") else None),
            train=TrainResult.from_dict(train) if train else None,
            challenger_eval=Evaluation.from_dict(d["challenger_eval"]) if d.get("challenger_eval") else None,
            champion_eval=Evaluation.from_dict(d["champion_eval"]) if d.get("champion_eval") else None,
            breach_checks=[BreachCheck.from_dict(b) for b in d.get("breach_checks") or []],
            decision=(Verdict.from_dict({**d["decision"], "negative_flips": d.get("negative_flips"),
                                         "reference": d.get("reference")})
                      if d.get("decision") else None),
            champion_after=d.get("champion_after", NOT_REACHED), state_message=message or "",
            report=report if report.markdown or report.html else None)

    def as_dict(self, *, with_report: bool = True) -> dict[str, Any]:
        """The ``result.json`` format; ``with_report`` adds the report files' paths (once written)."""
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("flow_run_id", "run_name", "trigger", "backbone_weights", "backbone_random_init")
        }
        out["ingests"] = [i.as_dict() for i in self.ingests]
        if self.incoming is not None:
            out["incoming"] = self.incoming
        out.update(notes=list(self.notes), run_dir=self.run_dir)
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
        if self.breach_checks:  # only a run whose drift check flagged a site (issue 26)
            out["breach_checks"] = [b.as_dict() for b in self.breach_checks]
        if self.decision is not None:
            out["decision"] = {
                k: getattr(self.decision, k)
                for k in ("decision", "promote", "rationale", "checks", "evidence", "site_drops")
            }
            if self.decision.review is not None:  # only a reviewed run has it: older files stay as they were
                out["decision"]["review"] = self.decision.review
            if self.champion_after is not NOT_REACHED:
                out["champion_after"] = self.champion_after
            if self.decision.negative_flips is not None:  # only against a champion (issue 26)
                out["negative_flips"] = self.decision.negative_flips
            if self.decision.reference is not None:  # the locked reference (issue 26)
                out["reference"] = self.decision.reference
        if self.test_set_reuse is not None:
            out["test_set_reuse"] = self.test_set_reuse
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
        keep = ("flow_run_id", "status", "state", "state_message", "summary", "trigger", "ingests",
                "incoming", "split_counts", "embed", "champion_after", "report", "report_html", "description",
                "notes", "backbone_random_init", "report_error")
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
