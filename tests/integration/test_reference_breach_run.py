"""The locked reference at a drifted site with real models (issue 26): the breach step scores the champion
and the locked reference from the feature cache on the flagged site's films catalogued after both were
created (every routine split: not the site's older films, nor a sequestered patient's), the challenger on
those of the test split only (not val), and ``XRAY_REFERENCE_BREACH=rollback`` restores the reference as
champion through ``registry.rollback`` (compare-and-set, an audit row with the reason and the numbers).
Tiny models."""

from __future__ import annotations

from datetime import UTC, datetime

from tinymodel import tiny_home

from xray_core.data.ingest import ingest_source
from xray_core.data.snapshot import load_split_data, save_snapshot
from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
from xray_core.pipeline.breach import measure_breaches, model_facts, restore_reference
from xray_core.pipeline.detection import earlier_test_rows
from xray_core.pipeline.embed import embed_step
from xray_core.pipeline.executor import DirectExecutor
from xray_core.pipeline.sequester import sequestered_rows
from xray_core.pipeline.steps import evaluate_step, train_step
from xray_core.registry.listing import history
from xray_core.registry.reference import lock_reference, reference_version
from xray_core.registry.versions import promote_manually
from xray_core.results import RunResult, Snapshot, TrainResult

# margin 0: whichever of the two tiny models is measured lower at the new site is "in breach"
ENV = {"XRAY_REFERENCE_BREACH": "rollback", "XRAY_REFERENCE_MARGIN": "0", "XRAY_MIN_TEST_PER_CLASS": "2"}


def test_a_breach_is_measured_on_the_sites_new_films_and_rollback_restores_the_reference(tmp_path):
    style = SiteStyle("clinic-b", gamma=1.8, border=3, marker="PORTABLE", signal=0.15)
    with tiny_home(tmp_path, models=0, patients_per_label=8, extra_env=ENV) as home:
        settings = home.settings
        # 6 films of the site catalogued BEFORE the models were created: not new to them, never counted
        old = tmp_path / "clinic-b-old"
        write_site_dataset(old, style, patients_per_label=3, seed=4, patient_offset=100)
        ingest_source(old, manifest=old / "manifest.csv", settings=settings)
        data = load_split_data(settings)
        embed_step(settings, data)
        first, second = (train_step(settings.with_overrides(train_seed=k), data)["version"] for k in (0, 1))
        for version in (first, second):
            evaluate_step(settings, version, data)
        promote_manually(settings, first, reason="first champion: the locked reference")
        promote_manually(settings, second, reason="second champion")
        # a restyled site with a faint finding: the two models tell its films apart differently; a quarter
        # of its new patients sequestered (only the audit reads them)
        new = tmp_path / "clinic-b"
        write_site_dataset(new, style, patients_per_label=8, seed=5)
        ingest_source(new, manifest=new / "manifest.csv",
                      settings=settings.with_overrides(sequester_fraction=0.25))  # after both models
        data = load_split_data(settings)
        embed_step(settings, data)
        snapshot = Snapshot(save_snapshot(tmp_path / "split.json", data))
        challenger = train_step(settings, data)["version"]
        drift = {"flagged": True, "checks": [{"subject": "all new films", "drift": True},
                                             {"subject": "site clinic-b", "drift": True}]}
        newer = {f"clinic-b-p{n}" for n in range(16)}
        sequestered = [r for r in sequestered_rows(settings) if r.patient_id in newer]
        counted = 16 - len(sequestered)
        in_test = len([r for r in data.test if r.patient_id in newer])
        assert sequestered and 0 < in_test < counted
        assert [r for r in data.val if r.patient_id in newer]  # val films of the site: not the challenger's

        (check,) = measure_breaches(settings, drift, second, challenger, snapshot)
        assert check.site == "clinic-b" and check.films == counted and check.difference is not None
        if not check.breached:  # the other way round: champion `first`, reference `second` (xray lock)
            assert check.difference > 0, check
            lock_reference(settings, second, reason="the better one here", trigger="test")
            promote_manually(settings, first, reason="back to the first")
            (check,) = measure_breaches(settings, drift, first, challenger, snapshot)
        champion, reference = check.champion, check.reference
        assert check.breached and check.difference < 0 and reference_version(settings) == reference
        assert check.challenger_check is not None and check.challenger_check["name"] == "breach_site"
        assert check.challenger_check["films"] == in_test  # the test split only: no val film

        # the detection baseline: the site's TEST films catalogued up to the cut, newest first, none other
        test = {r.id: r for r in data.test}
        site_test = sorted((r.id for r in data.test if r.patient_id.startswith("clinic-b")), reverse=True)
        old_test = [i for i in site_test if test[i].patient_id not in newer]
        assert [r.id for r in earlier_test_rows(settings, "clinic-b", test, datetime.now(UTC))] == site_test
        created = max(model_facts(settings, v)[0] for v in (first, second))
        assert [r.id for r in earlier_test_rows(settings, "clinic-b", test, created)] == old_test
        newest = earlier_test_rows(settings, "clinic-b", test, datetime.now(UTC), 1)
        assert [r.id for r in newest] == site_test[:1]
        assert earlier_test_rows(settings, "elsewhere", test, datetime.now(UTC)) == []

        # nothing is measured without a flagged site, nor with too few films of a class
        quiet = {"flagged": False, "checks": []}
        assert measure_breaches(settings, quiet, champion, challenger, snapshot) == []
        (few,) = measure_breaches(settings.with_overrides(min_test_per_class=9), drift, champion, challenger,
                                  snapshot)
        assert few.status == "not enough films" and few.action == "none"
        # alert: reported, nothing restored
        alert = settings.with_overrides(reference_breach="alert")
        (reported,) = measure_breaches(alert, drift, champion, challenger, snapshot)
        assert reported.breached and reported.action == "reported" and reported.challenger_check is None

        run = RunResult(flow_run_id=None, run_name="t", trigger="test", backbone_weights="random",
                        backbone_random_init=True, run_dir=str(tmp_path),
                        train=TrainResult.from_dict({"version": challenger}), breach_checks=[check],
                        champion_after=champion)  # the challenger was not promoted
        restore_reference(alert, DirectExecutor(), run, "test", None)
        assert run.champion_after == champion and not run.reference_restored

        restore_reference(settings, DirectExecutor(), run, "test", None)
        assert run.champion_after == reference and run.reference_restored
        row = history(settings)[-1]
        assert (row["decision"], row["from_version"], row["to_version"]) == ("rollback", champion, reference)
        assert row["rationale"].startswith(f"rollback from {champion} to {reference}: XRAY_REFERENCE_BREACH=")
        said = f"at site clinic-b on {counted} new films; challenger v{challenger} not promoted"
        assert said in row["rationale"]
        (kept,) = row["metrics"]["breach"]  # the numbers, in the restore's audit row
        assert (kept["site"], kept["films"], kept["action"]) == ("clinic-b", counted, "reference restored")
        assert kept["gap"] == check.difference and kept["low"] == check.low
