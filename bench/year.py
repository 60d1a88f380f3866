"""A simulated year of nights through the real recipe (issue 26; a benchmark, not a test).

Every night is one :func:`xray_core.pipeline.cycle.run_retrain` with the direct executor (what
``xray retrain --local`` runs) in a temp XRAY_HOME, on a random-init backbone (offline) at a small input
size, followed by ``xray gc`` with the default retention (``--gc-every``). Arrivals come from the
synthetic multi-site generator (:mod:`xray_core.data.synthetic_sites`, with a weak disease signal); the
scenario (``bench/scenarios/year.toml``) says which sites send films when and what goes wrong.

Each site also has a large *truth pool*, never ingested: every champion, challenger and the locked
reference are scored on it through the registry's model loading (:func:`load_model`, sha256-verified)
and the project's feature cache (kept in a separate home, so the measured home holds only what the
nights wrote). That gives each model's true AUROC, overall and per site, and per-site sensitivity.

    python bench/year.py [--nights 52] [--size 32] [--out bench/results/year.json] [--png ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from year_guard import guard_summary, truth_resolution, worst_gap  # bench/ is on sys.path as a script runs

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "scenarios" / "year.toml"
BASE_ENV = {"XRAY_BACKBONE_WEIGHTS": "random", "XRAY_DEVICE": "cpu", "XRAY_EMBED_PRECISION": "fp32",
            "XRAY_VIEWS": "2", "XRAY_EPOCHS": "8", "XRAY_BOOTSTRAP_SAMPLES": "200",
            "XRAY_PATIENT_SALT": "year", "XRAY_INGEST_WORKERS": "1"}
LABELS = ("normal", "pneumonia")
YEAR_START = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)  # night 0 of the simulated year (a Monday, 02:00 UTC)


def night_date(night: int, nights: int) -> datetime:
    """The simulated date of ``night``: the year's nights spread over 52 weeks (weekly at 52 nights).

    Each night's report folder is named with this date and ``xray gc`` runs as of it, so the retention of
    reports (``XRAY_KEEP_REPORTS_DAYS``, by the date in the folder's name) sees a year go by rather than
    the minutes the benchmark takes."""
    return YEAR_START + timedelta(days=night * 364 / nights)
POSITIVE = "pneumonia"


def load_scenario(path: Path = SCENARIO) -> dict[str, Any]:
    return tomllib.loads(Path(path).read_text(encoding="utf-8"))


def night_of(month: float, nights: int) -> int:
    return min(int(month / 12 * nights), nights - 1)


def truth_patients(scenario: dict[str, Any]) -> int:
    """Patients per label in each truth pool (one film each)."""
    return int(scenario["arrivals"].get("truth_patients_per_label", 500))


class World:
    """The sites' styles over the year and their truth pools (written once per style, never ingested)."""

    def __init__(self, scenario: dict[str, Any], nights: int, size: int, root: Path) -> None:
        from xray_core.data.synthetic_sites import SiteStyle

        self.scenario, self.nights, self.size, self.root = scenario, nights, size, root
        signal = float(scenario["arrivals"].get("signal", 1.0))
        self.base = {s["name"]: SiteStyle(name=s["name"], size=size, gamma=float(s.get("gamma", 1.0)),
                                          border=int(s.get("border", 0)), marker=str(s.get("marker", "")),
                                          signal=signal) for s in scenario["sites"]}
        self.start = {s["name"]: night_of(float(s.get("from_month", 0)), nights) for s in scenario["sites"]}
        self.events = [{**e, "night": night_of(float(e["month"]), nights)}
                       for e in scenario.get("events", [])]
        self.pools: dict[str, list[tuple[Path, str]]] = {}

    def style(self, site: str, night: int) -> tuple[str, Any]:
        """(pool key, SiteStyle) of ``site`` on ``night``: a restyle event changes both from its night."""
        key, style = site, self.base[site]
        for e in self.events:
            if e["kind"] == "restyle" and e["site"] == site and night >= e["night"]:
                style = replace(style, gamma=float(e.get("gamma", style.gamma)),
                                border=int(e.get("border", style.border)), marker=str(e.get("marker", "")))
                key = f"{site}@n{e['night']}"
        return key, style

    def active(self, night: int) -> list[str]:
        return [s for s, first in self.start.items() if night >= first]

    def events_on(self, night: int) -> list[dict[str, Any]]:
        """Events of ``night``; a quiet month covers its nights (at least one)."""
        out = [e for e in self.events if e["kind"] != "quiet" and e["night"] == night]
        return out + [e for e in self.events if e["kind"] == "quiet" and e["night"] <= night
                      < max(e["night"] + 1, int((float(e["month"]) + 1) / 12 * self.nights))]

    def pool(self, site: str, night: int) -> tuple[str, list[tuple[Path, str]]]:
        from xray_core.data.synthetic_sites import write_site_dataset

        key, style = self.style(site, night)
        if key not in self.pools:
            n = truth_patients(self.scenario)
            recs = write_site_dataset(self.root / "truth" / key.replace("@", "_"), style, labels=LABELS,
                                      patients_per_label=n, seed=900_001 + len(self.pools),
                                      patient_offset=10_000_000, manifest=False)
            self.pools[key] = [(r.path, r.label) for r in recs]
        return key, self.pools[key]

    def arrivals(self, night: int) -> tuple[list[str], list[str]]:
        """Write this night's batch (one manifest per site); return (manifests, what happened)."""
        from xray_core.data.synthetic_sites import write_site_dataset

        events = self.events_on(night)
        if any(e["kind"] == "quiet" for e in events):
            return [], ["quiet"]
        labels = LABELS
        happened = [f"{e['kind']}:{e.get('site', '')}" for e in events if e["kind"] == "restyle"]
        happened += [f"new_site:{s}" for s, first in self.start.items() if first == night > 0]
        one = next((e for e in events if e["kind"] == "one_label"), None)
        if one:
            labels, happened = (str(one["label"]),), [*happened, f"one_label:{one['label']}"]
        per = int(self.scenario["arrivals"]["patients_per_label"])
        manifests = []
        for i, site in enumerate(self.active(night)):
            folder = self.root / "arrivals" / f"night-{night:03d}" / site
            write_site_dataset(folder, self.style(site, night)[1], labels=labels, patients_per_label=per,
                               seed=night * 101 + i, patient_offset=night * 1000)
            manifests.append(str(folder / "manifest.csv"))
        flip = next((e for e in events if e["kind"] == "flip_labels"), None)
        if flip:
            flipped = sum(flip_labels(Path(m), float(flip["fraction"]), seed=night) for m in manifests)
            happened.append(f"flip_labels:{flipped} films")
        return manifests, happened


def flip_labels(manifest: Path, fraction: float, *, seed: int) -> int:
    """Swap the label column of ``fraction`` of the manifest's rows (the films stay where they are)."""
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(rows), size=int(round(fraction * len(rows))), replace=False)
    for i in chosen:
        rows[i]["label"] = LABELS[1 - LABELS.index(rows[i]["label"])]
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(chosen)


class Truth:
    """Scores registered models on the truth pools: load_model + the project's FeatureCache."""

    def __init__(self, settings: Any, truth_home: Path) -> None:
        from xray_core.model.backbone import load_backbone
        from xray_core.model.features import FeatureCache
        from xray_core.settings import load_settings

        self.settings = settings
        own = load_settings({**{k: v for k, v in os.environ.items() if k.startswith("XRAY_")},
                             "XRAY_HOME": str(truth_home)})
        self.cache = FeatureCache(load_backbone(own), own)
        self.memo: dict[tuple[int, str], dict[str, float | None]] = {}
        self.gap_memo: dict[tuple[int, int, str], dict[str, float | None]] = {}  # a champion kept for nights
        self.features: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _x(self, key: str, pool: list[tuple[Path, str]]) -> tuple[np.ndarray, np.ndarray]:
        from xray_core.io.fsutil import sha256_file
        from xray_core.model.features import EmbedItem

        if key not in self.features:
            items = [EmbedItem(sha256=sha256_file(p), path=p.resolve()) for p, _ in pool]
            self.cache.ensure(items, [0])
            y = np.array([label == POSITIVE for _, label in pool])
            self.features[key] = (self.cache.load([i.sha256 for i in items], 0), y)
        return self.features[key]

    def score(self, version: int, key: str, pool: list[tuple[Path, str]]) -> dict[str, float | None]:
        """True AUROC and sensitivity (at the model's threshold) of ``version`` on one pool."""
        from sklearn.metrics import roc_auc_score

        from xray_core.model.train import predict_proba
        from xray_core.registry.versions import load_model

        if (version, key) not in self.memo:
            model = load_model(self.settings, version, backbone_fingerprint=self.cache.backbone.fingerprint)
            x, y = self._x(key, pool)
            p = predict_proba(model.head, x)[:, model.labels.index(POSITIVE)]
            threshold = model.threshold if model.threshold is not None else 0.5
            self.memo[(version, key)] = {"auroc": float(roc_auc_score(y, p)),
                                         "sensitivity": float(np.mean(p[y] >= threshold)), "p": p.tolist()}
        return self.memo[(version, key)]

    def gaps(self, version: int | None, reference: int | None,
             pools: dict[str, tuple[str, list]]) -> dict[str, dict[str, float | None]] | None:
        """Per site, ``version``'s true AUROC minus the reference's with a paired 95% bootstrap interval
        over the truth pool's films (one per patient; 2,000 resamples): the pool is finite, so a "true"
        gap has its own uncertainty."""
        from xray_core.evaluate.intervals import paired_bootstrap_difference

        if version is None or reference is None:
            return None
        out = {}
        for site, (key, pool) in pools.items():
            if (version, reference, key) not in self.gap_memo:
                y = self._x(key, pool)[1].astype(int)  # 1 = POSITIVE, as LABELS orders them
                a, b = (np.asarray(self.score(v, key, pool)["p"]) for v in (version, reference))
                d = paired_bootstrap_difference(y, np.column_stack([1 - a, a]), np.column_stack([1 - b, b]),
                                                list(LABELS), np.arange(y.size), metric="macro_auroc",
                                                thresholds=(0.5, 0.5), negative_label=LABELS[0],
                                                n_samples=2000)
                self.gap_memo[(version, reference, key)] = {
                    k: None if d[k] is None else round(float(d[k]), 4) for k in ("difference", "low", "high")}
            out[site] = self.gap_memo[(version, reference, key)]
        return out

    def of(self, version: int | None, pools: dict[str, tuple[str, list]]) -> dict[str, Any] | None:
        """Overall (pooled over the night's sites) and per-site truth of ``version``."""
        from sklearn.metrics import roc_auc_score

        if version is None:
            return None
        per = {site: self.score(version, key, pool) for site, (key, pool) in pools.items()}
        p = np.concatenate([np.asarray(per[s]["p"]) for s in pools])
        y = np.concatenate([self._x(key, pool)[1] for key, pool in pools.values()])
        return {"version": version, "auroc": round(float(roc_auc_score(y, p)), 4),
                "sites": {s: {"auroc": round(float(v["auroc"] or 0), 4),
                              "sensitivity": round(float(v["sensitivity"] or 0), 4)} for s, v in per.items()}}


def disk_use(home: Path) -> dict[str, int]:
    """Bytes under each top-level folder of the home (the catalogue's files counted as one)."""
    out: dict[str, int] = {}
    for child in sorted(home.iterdir()):
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        name = "catalogue" if child.name.startswith("catalogue") else child.name
        if not name.endswith(".lock"):
            out[name] = out.get(name, 0) + sum(p.stat().st_size for p in files)
    return out


def night_row(night: int, result: dict[str, Any], wall: float, happened: list[str],
              cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """One night of year.json; ``cost``: the night's CPU seconds and per-step costs (TimedExecutor)."""
    decision = result.get("decision") or {}
    flips = (result.get("negative_flips") or {}).get("negative_flip_rate") or {}
    reference = result.get("reference") or {}
    ingest_s = sum(float(i.get("seconds") or 0) for i in result.get("ingests") or [])
    embed_s = float((result.get("embed") or {}).get("seconds") or 0)
    return {"night": night, "events": happened, "state": result.get("state"),
            "films": sum(int(i.get("added") or 0) for i in result.get("ingests") or []),
            "decision": decision.get("decision"), "version": result.get("version"),
            "champion_after": result.get("champion_after"),
            "failed_checks": [c["name"] for c in decision.get("checks", []) if not c.get("passed")],
            "reference": {**{k: reference.get(k) for k in ("version", "passed", "same_as_champion", "low")},
                          "breach": breach_rows(result)} if reference else None,
            "negative_flip_rate": flips.get("point"), "negative_flip_high": flips.get("high"),
            "test_set_reuse": (result.get("test_set_reuse") or {}).get("decisions"),
            "drift": {"flagged": (result.get("drift") or {}).get("flagged"),
                      "sites": [c.get("subject") for c in (result.get("drift") or {}).get("checks") or []
                                if c.get("drift")]} if result.get("drift") else None,
            "seconds": {"total": round(wall, 3), "ingest": round(ingest_s, 3), "embed": round(embed_s, 3),
                        "rest": round(wall - ingest_s - embed_s, 3), **(cost or {})}}


def breach_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The night's measures of the champion against the locked reference at each site the drift check
    flagged (result.json's ``breach_checks``): site, status, gap (champion minus reference), films (those
    of the site's drift episode, ``drift_began``, since both models were created), action."""
    return [{"site": b.get("site"), "status": b.get("status"), "kind": b.get("kind", "auroc"),
             "gap": b.get("difference"), "detection": b.get("detection"),
             "films": b.get("films"), "drift_began": b.get("drift_began"), "action": b.get("action"),
             "challenger_check": (b.get("challenger_check") or {}).get("passed")}
            for b in result.get("breach_checks") or []]


def year_env(root: Path, size: int, scenario: dict[str, Any]) -> dict[str, str]:
    """The XRAY_* variables a year runs under (its home is ``root/home``)."""
    return {**BASE_ENV, "XRAY_HOME": str(root / "home"), "XRAY_ALLOWED_ROOTS": str(root),
            "XRAY_INPUT_SIZE": str(size), "XRAY_MIN_IMAGE_SIDE": str(min(size, 32)),
            **{k: str(v) for k, v in scenario.get("settings", {}).items()}}


def run_year(nights: int, size: int, root: Path, scenario: dict[str, Any], *, gc_every: int = 1,
             audit_every: int | None = None, log: Any = print, partial: Path | None = None) -> dict[str, Any]:
    """Run ``nights`` cycles of ``scenario`` under ``root``; return year.json's content (``partial``:
    also write the nights so far there after each night, so a stopped run leaves its rows).

    Every ``audit_every`` nights (default: monthly, nights / 12) the sequestered-set audit runs, as the
    ``audit/monthly`` deployment would (``xray audit``: champion against the locked reference on films
    no routine decision sees).
    """
    from xray_core.errors import XrayError
    from xray_core.pipeline.cycle import run_retrain
    from xray_core.pipeline.recipe import RetrainRequest
    from xray_core.pipeline.retention import run_gc
    from xray_core.pipeline.sequester import run_audit
    from xray_core.pipeline.timing import TimedExecutor, cpu_seconds
    from xray_core.registry.reference import reference_version
    from xray_core.settings import load_settings, reset_settings

    home = root / "home"
    os.environ.update(year_env(root, size, scenario))
    reset_settings()
    settings = load_settings()
    world, truth = World(scenario, nights, size, root), Truth(settings, root / "truth-home")
    rows: list[dict[str, Any]] = []
    champion: int | None = None
    audit_every = audit_every if audit_every is not None else max(1, round(nights / 12))
    for night in range(nights):
        manifests, happened = world.arrivals(night)
        pools = {s: world.pool(s, night) for s in world.active(night)}
        timer, today = TimedExecutor(), night_date(night, nights)
        run_dir = settings.reports_dir / f"{today:%Y%m%dT%H%M%SZ}-night{night:03d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        try:
            result = run_retrain(settings, RetrainRequest(manifests=tuple(manifests), trigger="schedule",
                                                          run_name=f"night-{night}"), timer,
                                 run_dir=run_dir).as_dict()
        except XrayError as exc:  # a failed night is a row too (the run recorded its audit row)
            result = {**exc.xray_result.as_dict(), "error": str(exc)}  # type: ignore[attr-defined]
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        row = night_row(night, result, wall, happened, cost={"cpu": round(cpu, 3), "steps": timer.totals()})
        before = champion
        champion = result.get("champion_after") if isinstance(result.get("champion_after"), int) else before
        row["truth"] = {"champion_before": truth.of(before, pools), "champion": truth.of(champion, pools),
                        "challenger": truth.of(result.get("version"), pools),
                        "reference": truth.of(reference_version(settings), pools),
                        "champion_gap": truth.gaps(champion, reference_version(settings), pools)}
        if gc_every and (night + 1) % gc_every == 0:
            row["gc_bytes"] = run_gc(settings, now=today + timedelta(hours=6))["bytes"]
        if audit_every and (night + 1) % audit_every == 0:
            audit = run_audit(settings, trigger="schedule")
            row["audit"] = {k: audit.get(k) for k in ("status", "champion", "reference", "n_images",
                                                      "sequestered_patients")}
        row["disk"] = disk_use(home)
        rows.append(row)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"partial": True, "nights": nights, "size": size, "rows": rows}))
        t = row["truth"]["champion"]
        log(f"night {night:3d} {row['state'] or '-':22s} v{row['version']} champion v{champion} "
            f"true {t['auroc'] if t else '-'} {row['seconds']['total']:.1f}s "
            f"{sum(row['disk'].values()) / 1e6:.1f} MB {' '.join(happened)}")
    margin = float(settings.reference_margin)
    return {"nights": nights, "size": size, "margin": margin, "scenario": scenario,
            "rows": rows,
            "summary": summarise(rows, margin, world.start, len(LABELS) * truth_patients(scenario))}


def _gain(row: dict[str, Any], *, by_site: bool = False) -> float | None:
    """The challenger's true AUROC minus the champion's before the night: pooled over the night's sites,
    or (``by_site``) the mean of the per-site differences (pooling also rewards calibration across sites)."""
    t = row["truth"]
    if not t["challenger"] or not t["champion_before"]:
        return None
    new, old = t["challenger"], t["champion_before"]
    if by_site:
        diffs = [new["sites"][s]["auroc"] - old["sites"][s]["auroc"] for s in new["sites"]]
        return round(float(np.mean(diffs)), 4)
    return round(new["auroc"] - old["auroc"], 4)


PER_FILM_STEPS = ("ingest", "embed")  # their cost follows the night's new films, not the past nights


def night_cost(row: dict[str, Any]) -> dict[str, float]:
    """The night's wall and CPU seconds without the steps that work per new film (ingest, embed)."""
    steps = row["seconds"].get("steps") or {}
    per_film = [steps.get(s, {}) for s in PER_FILM_STEPS]
    wall = row["seconds"]["total"] - sum(s.get("seconds", 0) for s in per_film)
    cpu = row["seconds"].get("cpu", 0) - sum(s.get("cpu_seconds", 0) for s in per_film)
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)}


def cost_growth(rows: list[dict[str, Any]], early: int = 5) -> dict[str, Any] | None:
    """Night ``early`` against the last night that ran the recipe, ingest and embedding excluded.

    CPU seconds are the criterion on a shared machine (wall time measures the load too); the step whose
    CPU time grew most is named. Each side is also given as the median of three nights around it, since
    one night's decision (a promotion renders more) moves its cost.
    """
    ran = [r for r in rows if r["decision"] and r["seconds"].get("steps")]
    first = next((i for i, r in enumerate(ran) if r["night"] >= early), None)
    if first is None or ran[first] is ran[-1]:
        return None
    a, b = ran[first], ran[-1]
    ca, cb = night_cost(a), night_cost(b)
    window_a, window_b = ran[max(first - 1, 0):first + 2], ran[-3:]

    def median(window: list[dict[str, Any]], key: str) -> float:
        return round(float(np.median([night_cost(r)[key] for r in window])), 3)

    steps_a, steps_b = a["seconds"]["steps"], b["seconds"]["steps"]
    growth = {s: round(steps_b[s]["cpu_seconds"] - steps_a.get(s, {}).get("cpu_seconds", 0.0), 3)
              for s in steps_b if s not in PER_FILM_STEPS}
    return {"early_night": a["night"], "late_night": b["night"],
            "early": ca, "late": cb,
            "ratio_cpu": round(cb["cpu_seconds"] / ca["cpu_seconds"], 3) if ca["cpu_seconds"] else None,
            "ratio_wall": round(cb["seconds"] / ca["seconds"], 3) if ca["seconds"] else None,
            "ratio_cpu_median3": round(median(window_b, "cpu_seconds") / median(window_a, "cpu_seconds"), 3)
            if median(window_a, "cpu_seconds") else None,
            "films_early": a.get("films"), "films_late": b.get("films"),
            "step_cpu_growth": dict(sorted(growth.items(), key=lambda kv: -kv[1])),
            "grows_most": max(growth, key=lambda s: growth[s]) if growth else None}


def breach_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How often the champion was measured below the locked reference at a drifted site (kind ``auroc``)
    or its calls there fell (``sensitivity``, reported only), and what was done (XRAY_REFERENCE_BREACH),
    over the year."""
    measured = [(r["night"], b) for r in rows for b in (r.get("reference") or {}).get("breach") or []]
    breaches = [(night, b) for night, b in measured if b["status"] == "breach"]
    return {"measured": len(measured), "breaches": len(breaches),
            "nights": sorted({night for night, _ in breaches}),
            "nights_by_kind": {kind: sorted({n for n, b in breaches if b.get("kind", "auroc") == kind})
                               for kind in ("auroc", "sensitivity")},
            "by_action": dict(sorted(Counter(str(b["action"]) for _, b in breaches).items())),
            "not_enough_films": sum(b["status"] == "not enough films" for _, b in measured),
            "not_measured": sum(b["status"] == "not measured" for _, b in measured)}


def disk_check(ten: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """The issue's disk criterion: the home at the last night is at most twice its size at night 10 plus
    what the films that arrived since take in the store and the feature cache."""
    new_films = sum(max(last["disk"].get(k, 0) - ten["disk"].get(k, 0), 0) for k in ("store", "features"))
    home_ten, home_last = sum(ten["disk"].values()), sum(last["disk"].values())
    bound = 2 * home_ten + new_films
    return {"night_10": home_ten, "last": home_last, "new_films_store_and_features": new_films,
            "bound": bound, "held": home_last <= bound,
            "growth_by_folder": {k: last["disk"].get(k, 0) - ten["disk"].get(k, 0)
                                 for k in sorted(set(ten["disk"]) | set(last["disk"]))}}


def summarise(rows: list[dict[str, Any]], margin: float, starts: dict[str, int],
              truth_films: int) -> dict[str, Any]:
    """The issue's Done-when numbers a year of nights can answer (``starts``: each site's first night;
    ``truth_films``: films in each truth pool)."""
    worst = worst_gap(rows)
    promoted = [r for r in rows if r["state"] == "Promoted" and r["truth"]["champion_before"]]
    gains = [_gain(r) for r in promoted]
    not_promoted = [r for r in rows if r["decision"] and r["state"] != "Promoted"]
    missed = [r["night"] for r in not_promoted if (_gain(r) or 0) > margin]
    missed_sites = [r["night"] for r in not_promoted if (_gain(r, by_site=True) or 0) > margin]
    events = {}
    for kind in ("flip_labels", "one_label", "restyle"):
        r = next((r for r in rows if any(h.startswith(kind) for h in r["events"])), None)
        if r:
            events[kind] = {"night": r["night"], "state": r["state"], "failed_checks": r["failed_checks"],
                            "true_gain": _gain(r), "true_gain_by_site_mean": _gain(r, by_site=True),
                            "harmful_promotion": r["state"] == "Promoted"
                            and (_gain(r) or 0) < -margin}
    ten = rows[min(10, len(rows) - 1)]
    return {
        "reference_guard_held": worst["gap"] is None or worst["gap"] >= -margin,
        "worst_champion_minus_reference": worst,
        "reference_guard_by_cause": guard_summary(rows, margin),
        "truth_pool": truth_resolution(rows, margin, truth_films),
        "promotions": len(promoted),
        "promotions_with_positive_true_gain": sum(1 for g in gains if g and g > 0),
        "share_positive_gain": round(sum(1 for g in gains if g and g > 0) / len(gains), 3) if gains else None,
        "missed_improvements_nights": missed, "missed_improvements_nights_by_site_mean": missed_sites,
        "events": events,
        "failed_check_counts": {name: sum(name in r["failed_checks"] for r in rows)
                                for name in sorted({c for r in rows for c in r["failed_checks"]})},
        "cost_growth": cost_growth(rows),
        "drift_flagged_nights": [r["night"] for r in rows if (r.get("drift") or {}).get("flagged")],
        "reference_breaches": breach_summary(rows),
        "audits": {status: [r["night"] for r in rows if (r.get("audit") or {}).get("status") == status]
                   for status in ("ok", "degraded", "inconclusive", "skipped")},
        "home_bytes": {f"night_{ten['night']}": sum(ten["disk"].values()),
                       f"night_{rows[-1]['night']}": sum(rows[-1]["disk"].values())},
        "disk_check": disk_check(ten, rows[-1]),
        "sites": {s: {"first_night": n} for s, n in starts.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=52, help="retrain cycles, one a week (default 52)")
    parser.add_argument("--size", type=int, default=32, help="film and input size in pixels (default 32)")
    parser.add_argument("--scenario", default=str(SCENARIO), help="the scenario TOML")
    parser.add_argument("--gc-every", type=int, default=1, help="xray gc after every N nights (0: never)")
    parser.add_argument("--audit-every", type=int, default=None,
                        help="sequestered-set audit every N nights (default: monthly, nights / 12; 0: never)")
    parser.add_argument("--out", default=str(HERE / "results" / "year.json"))
    parser.add_argument("--png", default=str(HERE / "results" / "year.png"))
    parser.add_argument("--keep", default=None, help="run in this folder and keep it (default: a temp dir)")
    parser.add_argument("--summarise", action="store_true",
                        help="run nothing: recompute --out's summary (and --png) from the nights it holds")
    args = parser.parse_args()
    if args.summarise:
        out = json.loads(Path(args.out).read_text())
        starts = {s: v["first_night"] for s, v in out["summary"]["sites"].items()}
        out["summary"] = summarise(out["rows"], out["margin"], starts,
                                   len(LABELS) * truth_patients(out["scenario"]))
        out["summarised"] = " ".join(["python", "bench/year.py", *sys.argv[1:]])
        return publish_year(out, args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xray-year-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        out = run_year(args.nights, args.size, root, load_scenario(Path(args.scenario)),
                       gc_every=args.gc_every, audit_every=args.audit_every, partial=Path(args.out))
    out["command"] = " ".join(["python", "bench/year.py", *sys.argv[1:]])
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    publish_year(out, args)


def publish_year(out: dict[str, Any], args: argparse.Namespace) -> None:
    """Write year.json and the timeline PNG, and print the summary."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    if args.png:
        from year_plot import plot  # bench/ is on sys.path when a benchmark runs as a script

        plot(out, Path(args.png))
    print(json.dumps(out["summary"], default=str))


if __name__ == "__main__":
    main()
