"""The promotion policy: should the challenger replace the champion? A pure function, no DB, no I/O.

The flow scores both models on the identical current test split (:func:`xray_core.evaluate.metrics.
compute_metrics`), compares them with a paired patient-clustered bootstrap
(:func:`xray_core.evaluate.intervals.paired_bootstrap_difference`) and hands the numbers to :func:`decide`.
Keeping the rule pure means it is table-tested exhaustively and its rationale, stored in the audit
row, can be re-derived from the stored metrics.

Rules, in order:

1. Too few test images of any class -> ``insufficient_evidence`` (a CI from 5 pneumonia cases means
   nothing, so no numbers can promote).
2. No champion -> absolute floors on macro AUROC and each disease class's sensitivity.
3. A champion -> the chosen metric's paired difference: non-inferiority (lower bound above -margin and
   point difference >= 0) or superiority (lower bound above 0).
4. Guardrail: a disease class whose sensitivity drops by more than the allowed amount vetoes
   promotion even when the headline metric passes (a better macro AUROC must not buy missed pneumonia).

After the policy, the recipe applies the vetoes that need more than the pooled metrics
(:func:`xray_core.pipeline.guards.apply_guards`): the per-site guardrail, the negative-flip veto
(:func:`negative_flip_check`, with ``XRAY_MAX_NEGATIVE_FLIP``), the locked reference (:func:`reference_check`,
with ``XRAY_REFERENCE_MARGIN``) and the shortcut audit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from xray_core.errors import UsageError
from xray_core.evaluate.evidence import plan_evidence
from xray_core.settings import PROMOTION_METRICS, PROMOTION_MODES, Settings, setting_default

# Metrics are ratios of counts and percentiles of float differences: values that are equal on
# paper can differ in the last bits. Comparisons treat anything within this as equal.
_TOL = 1e-9


class PolicyError(UsageError, ValueError):
    """The policy was configured or called in a way it cannot honour (unknown metric or mode,
    missing or mismatched comparison). A UsageError, so the CLI exits with code 2."""


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of :func:`decide`; build it with :meth:`from_settings` (``XRAY_*`` variables). Each
    default is the setting's declared one (:mod:`xray_core.settings`), named in the comment."""

    min_test_per_class: int = setting_default("min_test_per_class")  # fewer test images per class: none
    floor_macro_auroc: float = setting_default("floor_macro_auroc")  # first model only
    floor_sensitivity: float = setting_default("floor_sensitivity")  # every disease class, first model only
    metric: str = setting_default("promotion_metric")  # one of PROMOTION_METRICS
    mode: str = setting_default("promotion_mode")  # non-inferiority | superiority
    margin: float = setting_default("promotion_margin")  # how much worse the CI's lower bound may be
    guardrail_sensitivity_drop: float = setting_default("guardrail_sensitivity_drop")  # per disease class
    negative_label: str = setting_default("negative_label")  # every other label is a disease class
    target_specificity: float = setting_default("target_specificity")  # names the metric in the rationale
    test_fraction: float = setting_default("split_ratios")[2]  # the test share: for evidence planning only

    def __post_init__(self) -> None:
        if self.metric not in PROMOTION_METRICS:
            raise PolicyError(
                f"Invalid promotion metric {self.metric!r}. Only {', '.join(PROMOTION_METRICS)} "
                "are supported."
            )
        if self.mode not in PROMOTION_MODES:
            raise PolicyError(
                f"Invalid promotion mode {self.mode!r}. Only {', '.join(PROMOTION_MODES)} are supported."
            )
        if self.margin < 0 or self.guardrail_sensitivity_drop < 0 or self.min_test_per_class < 0:
            raise PolicyError(
                "margin, guardrail_sensitivity_drop and min_test_per_class must not be negative")

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyConfig:
        return cls(
            min_test_per_class=settings.min_test_per_class,
            floor_macro_auroc=settings.floor_macro_auroc,
            floor_sensitivity=settings.floor_sensitivity,
            metric=settings.promotion_metric,
            mode=settings.promotion_mode,
            margin=settings.promotion_margin,
            guardrail_sensitivity_drop=settings.guardrail_sensitivity_drop,
            negative_label=settings.negative_label,
            target_specificity=settings.target_specificity,
            test_fraction=settings.split_ratios[2],
        )


# A retrain run's final state (what the Prefect runs list and the CLI show) for each recorded decision;
# Skipped and Failed come from the run itself, not from a decision of the policy.
RUN_STATES = ("Promoted", "Kept", "Blocked", "Skipped", "Insufficient evidence", "Failed")
DECISION_STATES = {"promote": "Promoted", "keep": "Kept", "stale": "Kept", "blocked": "Blocked",
                   "insufficient_evidence": "Insufficient evidence", "failed": "Failed",
                   # a reviewer's answer (xray_core.pipeline.review)
                   "approved": "Promoted", "rejected": "Kept", "review_expired": "Kept"}


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concluded and why; stored with the promotion audit row."""

    decision: str  # "promote" | "keep" | "insufficient_evidence"
    promote: bool
    rationale: str  # human-readable, with the numbers
    checks: list[dict[str, Any]] = field(default_factory=list)  # {"name", "passed", "detail"}
    evidence: dict[str, Any] | None = None  # insufficient_evidence: evidence.plan_evidence's numbers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# formatting


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _metric_name(metric: str, target_specificity: float) -> str:
    if metric == "sensitivity_at_specificity":
        return f"sensitivity at {target_specificity:.0%} specificity"
    return {"macro_auroc": "macro AUROC", "balanced_accuracy": "balanced accuracy"}[metric]


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


# --------------------------------------------------------------------------------------------------
# the policy


def decide(
    challenger: dict, champion: dict | None, comparison: dict | None, config: PolicyConfig
) -> Decision:
    """Promote, keep, or refuse to decide; see the module docstring for the rules and their order.

    ``challenger`` and ``champion`` are :func:`~xray_core.evaluate.metrics.compute_metrics` dicts on the same
    test set; ``comparison`` the :func:`~xray_core.evaluate.intervals.paired_bootstrap_difference` output for
    ``config.metric`` (ignored, and may be None, when there is no champion).
    """
    _validate(challenger, champion, comparison, config)
    labels: list[str] = list(challenger["labels"])
    per_class = challenger["per_class"]
    diseases = [lab for lab in labels if lab != config.negative_label]

    # 1. enough test images of every class?
    small = [(lab, int(per_class[lab]["support"])) for lab in labels
             if per_class[lab]["support"] < config.min_test_per_class]
    counts = ", ".join(f"{lab} {per_class[lab]['support']}" for lab in labels)
    if small:
        named = " and ".join(f"'{lab}' ({n})" for lab, n in small)
        detail = (f"test images per class: {counts}; XRAY_MIN_TEST_PER_CLASS={config.min_test_per_class} "
                  f"requires at least {config.min_test_per_class} of each")
        rationale = (
            f"Insufficient evidence: the test set has too few images of {named}; "
            f"XRAY_MIN_TEST_PER_CLASS={config.min_test_per_class} requires at least "
            f"{config.min_test_per_class} test images per class before any decision. "
            "No promotion, whatever the metrics say; add labelled test images or lower "
            "XRAY_MIN_TEST_PER_CLASS."
        )
        patients = (challenger.get("bootstrap") or {}).get("patients")
        evidence = plan_evidence({lab: int(per_class[lab]["support"]) for lab in labels},
                                 config.min_test_per_class, test_fraction=config.test_fraction,
                                 images_per_patient=challenger["n"] / patients if patients else 1.0)
        return Decision("insufficient_evidence", False, f"{rationale} {evidence['summary']}",
                        [_check("test_size", False, detail)], evidence=evidence)
    checks = [_check("test_size", True,
                     f"test images per class: {counts} (minimum {config.min_test_per_class})")]

    if champion is None:
        return _decide_first_model(challenger, diseases, config, checks)
    return _decide_against_champion(challenger, champion, comparison or {}, diseases, config, checks)


def _validate(challenger: dict, champion: dict | None, comparison: dict | None, config: PolicyConfig) -> None:
    if not isinstance(config, PolicyConfig):
        raise PolicyError(f"config must be a PolicyConfig, got {type(config).__name__}")
    if champion is None:
        return
    if comparison is None:
        raise PolicyError("a champion exists but no comparison was given: run "
                          "paired_bootstrap_difference first")
    if comparison.get("metric") != config.metric:
        raise PolicyError(
            f"the comparison is of {comparison.get('metric')!r} but the policy decides on {config.metric!r} "
            "(XRAY_PROMOTION_METRIC); recompute the comparison for that metric"
        )
    same_set = (champion.get("labels") == challenger.get("labels")
                and champion.get("n") == challenger.get("n")
                and all(champion["per_class"][lab]["support"] == challenger["per_class"][lab]["support"]
                        for lab in challenger["labels"]))
    if not same_set:
        raise PolicyError("challenger and champion metrics come from different test sets; score both "
                          "on the same one")


def _decide_first_model(challenger: dict, diseases: list[str], config: PolicyConfig,
                        checks: list[dict[str, Any]]) -> Decision:
    macro = challenger.get("macro_auroc")
    macro_ok = macro is not None and macro >= config.floor_macro_auroc - _TOL
    macro_text = (f"macro AUROC {_f(macro)} {'>=' if macro_ok else '<'} floor {config.floor_macro_auroc:.3f} "
                  "(XRAY_FLOOR_MACRO_AUROC)")
    checks.append(_check("floor_macro_auroc", macro_ok, macro_text))

    sens_parts, failed_sens = [], []
    for lab in diseases:
        s = challenger["per_class"][lab]["sensitivity"]
        ok = s is not None and s >= config.floor_sensitivity - _TOL
        sens_parts.append(f"{lab} {_f(s)} {'>=' if ok else '<'} {config.floor_sensitivity:.3f}")
        if not ok:
            failed_sens.append(f"{lab} sensitivity {_f(s)} < floor {config.floor_sensitivity:.3f}")
    sens_text = ("disease-class sensitivity: " + ("; ".join(sens_parts) or "no disease classes")
                 + " (XRAY_FLOOR_SENSITIVITY)")
    checks.append(_check("floor_sensitivity", not failed_sens, sens_text))

    lead = "No champion yet, so the challenger is judged against absolute floors. "
    if macro_ok and not failed_sens:
        rationale = lead + f"{macro_text[0].upper()}{macro_text[1:]}; {sens_text}. All floors hold. Promote."
        return Decision("promote", True, rationale, checks)
    macro_failed = f"macro AUROC {_f(macro)} < floor {config.floor_macro_auroc:.3f} (XRAY_FLOOR_MACRO_AUROC)"
    failed = [] if macro_ok else [macro_failed]
    failed += [f + " (XRAY_FLOOR_SENSITIVITY)" for f in failed_sens]
    rationale = lead + "Failed floors: " + "; ".join(failed) + ". Keep: no model is promoted."
    return Decision("keep", False, rationale, checks)


def _direction(name: str, diff: float) -> str:
    """``the challenger's macro AUROC is 0.042 lower`` (or higher, or equal): the point difference in
    words."""
    if abs(diff) <= _TOL:
        return f"the challenger's {name} equals the champion's"
    return f"the challenger's {name} is {abs(diff):.3f} {'higher' if diff > 0 else 'lower'}"


def _non_inferiority_verdict(name: str, diff: float, low: float, level: float,
                             margin: float) -> tuple[bool, str]:
    """Whether non-inferiority is shown, and why in one plain sentence.

    Both conditions are stated as facts about the challenger, each with its own number, so a reader
    never has to untangle "fails ... but ... is below 0" (two failures joined by a word of contrast).
    """
    bound_ok = low > -margin + _TOL
    sign_ok = diff >= -_TOL
    point = _direction(name, diff)
    bound = (f"the {level:.0%} lower bound of the difference ({_signed(low)}) is "
             + (f"above the allowed {-margin:+.3f}" if bound_ok
                else f"at or below the allowed {-margin:+.3f}"))
    if bound_ok and sign_ok:
        return True, f"shown non-inferior (margin {margin:g}): {point}, and {bound}"
    if not bound_ok and not sign_ok:
        return False, f"not shown non-inferior (margin {margin:g}): {point}, and {bound}"
    if not bound_ok:  # the point estimate is fine, the uncertainty is not
        return False, (f"not shown non-inferior (margin {margin:g}): {point}, but {bound}, so a drop larger "
                       "than the margin is not ruled out")
    return False, (f"not shown non-inferior (margin {margin:g}): {bound}, but {point}, and the rule also "
                   "requires the point difference to be at least 0")


def _decide_against_champion(challenger: dict, champion: dict, comparison: dict, diseases: list[str],
                             config: PolicyConfig, checks: list[dict[str, Any]]) -> Decision:
    target = comparison.get("target_specificity", config.target_specificity)
    name = _metric_name(config.metric, target)
    diff, low, high = comparison.get("difference"), comparison.get("low"), comparison.get("high")
    level = comparison.get("level", 0.95)
    used, total = comparison.get("n_samples_used"), comparison.get("n_samples")
    resamples = f"{used}" if total in (None, used) else f"{used} of {total}"
    head = (f"Challenger {name} {_f(comparison.get('challenger'))} vs champion "
            f"{_f(comparison.get('champion'))}: difference {_signed(diff)}, {level:.0%} CI [{_signed(low)}, "
            f"{_signed(high)}] over {resamples} patient-clustered bootstrap resamples; ")

    if diff is None or low is None:
        metric_ok = False
        verdict = f"the difference could not be estimated ({name} is undefined on this test set)"
    elif config.mode == "non-inferiority":
        metric_ok, verdict = _non_inferiority_verdict(name, diff, low, level, config.margin)
    else:  # superiority
        metric_ok = low > _TOL
        bound = f"the {level:.0%} lower bound of the difference ({_signed(low)})"
        verdict = (f"shown superior: {bound} is above 0" if metric_ok
                   else f"not shown superior: {bound} is not above 0")
    checks.append(_check("comparison", metric_ok, f"{config.mode}: " + head + verdict))

    # guardrail on point differences of each disease class's sensitivity (same numbers as the
    # comparison's sensitivity_differences; its CI is quoted when present)
    intervals = comparison.get("sensitivity_differences") or {}
    drops = []
    parts = []
    for lab in diseases:
        new, old = challenger["per_class"][lab]["sensitivity"], champion["per_class"][lab]["sensitivity"]
        d = None if new is None or old is None else new - old
        ci = intervals.get(lab) or {}
        ci_text = f", CI [{_signed(ci.get('low'))}, {_signed(ci.get('high'))}]" if ci else ""
        parts.append(f"{lab} {_f(old)} -> {_f(new)} ({_signed(d)}{ci_text})")
        if d is None or d < -config.guardrail_sensitivity_drop - _TOL:
            drops.append(f"{lab} sensitivity fell from {_f(old)} to {_f(new)} ({_signed(d)})" if d is not None
                         else f"{lab} sensitivity could not be computed")
    guard_ok = not drops
    checks.append(_check("guardrail", guard_ok,
                         "disease-class sensitivity, champion -> challenger: " + ("; ".join(parts) or "none")
                         + f"; allowed drop {config.guardrail_sensitivity_drop:g} "
                           "(XRAY_GUARDRAIL_SENSITIVITY_DROP)"))
    if guard_ok:
        guard_text = ("Guardrail: no disease-class sensitivity dropped more than "
                      f"{config.guardrail_sensitivity_drop:g}.")
    else:
        guard_text = (f"Guardrail tripped: {'; '.join(drops)}, more than the allowed "
                      f"{config.guardrail_sensitivity_drop:g} (XRAY_GUARDRAIL_SENSITIVITY_DROP).")

    promote = metric_ok and guard_ok
    if promote:
        ending = "Promote."
    elif metric_ok:
        ending = f"Keep the champion: the {name} comparison passes but the guardrail vetoes it."
    else:
        ending = "Keep the champion."
    rationale = f"{head}{verdict}. {guard_text} {ending}"
    return Decision("promote" if promote else "keep", promote, rationale, checks)


def negative_flip_check(flips: dict[str, Any], max_rate: float) -> dict[str, Any]:
    """The negative-flip veto as a policy check ``{"name", "passed", "detail"}``: it fails when the upper
    bound of the negative flip rate's interval (:func:`xray_core.evaluate.flips.negative_flips`: films the
    champion got right and the challenger gets wrong) exceeds ``max_rate`` (``XRAY_MAX_NEGATIVE_FLIP``),
    or when the rate could not be estimated (no film scored by both)."""
    rate, counts = flips.get("negative_flip_rate") or {}, flips.get("counts") or {}
    high, level = rate.get("high"), flips.get("level", 0.95)
    numbers = (f"negative flip rate {_f(rate.get('point'))} ({counts.get('negative_flips', 0)} of "
               f"{flips.get('n', 0)} films: champion right, challenger wrong), {level:.0%} CI "
               f"[{_f(rate.get('low'))}, {_f(high)}]")
    if high is None:
        passed, verdict = False, "could not be estimated: no test film was scored by both models"
    elif high > max_rate + _TOL:
        passed, verdict = False, f"the upper bound {_f(high)} exceeds the allowed {max_rate:g}"
    else:
        passed, verdict = True, f"the upper bound {_f(high)} is within the allowed {max_rate:g}"
    return _check("negative_flips", passed, f"{numbers}: {verdict} (XRAY_MAX_NEGATIVE_FLIP)")


def reference_check(comparison: dict[str, Any] | None, version: int, margin: float, metric: str,
                    target_specificity: float, why_not: str | None = None) -> dict[str, Any]:
    """The bio-creep guard as a policy check ``{"name": "reference", "passed", "detail"}``: the challenger
    must be non-inferior to the locked reference ``version`` on the same test films, i.e. the lower bound
    of the paired difference (``comparison``: challenger minus reference, from
    :func:`~xray_core.evaluate.intervals.paired_bootstrap_difference`) above ``-margin``
    (``XRAY_REFERENCE_MARGIN``), whatever ``XRAY_PROMOTION_MODE`` is. It fails when the difference
    cannot be estimated; ``why_not`` says why there is no comparison at all."""
    name = _metric_name(metric, target_specificity)
    low = None if comparison is None else comparison.get("low")
    if comparison is None or low is None or comparison.get("difference") is None:
        reason = why_not or f"the difference could not be estimated ({name} is undefined on this test set)"
        return _check("reference", False, f"locked reference v{version}: {reason} (XRAY_REFERENCE_MARGIN)")
    level = comparison.get("level", 0.95)
    numbers = (f"locked reference v{version}: challenger {name} {_f(comparison.get('challenger'))} vs "
               f"reference {_f(comparison.get('champion'))}, difference {_signed(comparison['difference'])}, "
               f"{level:.0%} CI [{_signed(low)}, {_signed(comparison.get('high'))}]")
    passed = low > -margin + _TOL
    verdict = (f"the lower bound is above the allowed {-margin:+.3f}" if passed
               else f"the lower bound is at or below the allowed {-margin:+.3f}: a drop larger than the "
                    "margin below the locked reference is not ruled out")
    return _check("reference", passed, f"{numbers}; {verdict} (XRAY_REFERENCE_MARGIN)")


__all__ = ["Decision", "PolicyConfig", "PolicyError", "decide", "negative_flip_check", "reference_check"]
