"""The locked reference at a drifted site with real models (issue 26): the breach step scores the champion
and the locked reference from the feature cache on the flagged site's films catalogued after both were
created (every routine split), and ``XRAY_REFERENCE_BREACH=rollback`` restores the reference as champion
through ``registry.rollback`` (compare-and-set, an audit row with the reason). Tiny 32 px models."""

from __future__ import annotations

from tinymodel import tiny_home

from xray_core.data.ingest import ingest_source
from xray_core.data.snapshot import load_split_data, save_snapshot
from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
from xray_core.pipeline.breach import measure_breaches, restore_reference
from xray_core.pipeline.embed import embed_step
from xray_core.pipeline.executor import DirectExecutor
from xray_core.pipeline.steps import train_step
from xray_core.registry.listing import history
from xray_core.registry.reference import lock_reference, reference_version
from xray_core.registry.versions import promote_manually
from xray_core.results import RunResult, Snapshot, TrainResult

# margin 0: whichever of the two tiny models is measured lower at the new site is "in breach"
ENV = {"XRAY_REFERENCE_BREACH": "rollback", "XRAY_REFERENCE_MARGIN": "0", "XRAY_MIN_TEST_PER_CLASS": "2"}


def test_a_breach_is_measured_on_the_sites_new_films_and_rollback_restores_the_reference(tmp_path):
    with tiny_home(tmp_path, models=2, patients_per_label=8, extra_env=ENV) as home:
        settings = home.settings
        first, second = home.versions
        promote_manually(settings, first, reason="first champion: the locked reference")
        promote_manually(settings, second, reason="second champion")
        # a restyled site with a faint finding: the two models tell its films apart differently
        new = tmp_path / "clinic-b"
        write_site_dataset(new, SiteStyle("clinic-b", gamma=1.8, border=3, marker="PORTABLE", signal=0.15),
                           patients_per_label=8, seed=5)
        ingest_source(new, manifest=new / "manifest.csv", settings=settings)  # after both models
        data = load_split_data(settings)
        embed_step(settings, data)
        snapshot = Snapshot(save_snapshot(tmp_path / "split.json", data))
        challenger = train_step(settings, data)["version"]
        drift = {"flagged": True, "checks": [{"subject": "all new films", "drift": True},
                                             {"subject": "site clinic-b", "drift": True}]}

        (check,) = measure_breaches(settings, drift, second, challenger, snapshot)
        assert check.site == "clinic-b" and check.films == 16 and check.difference is not None
        if not check.breached:  # the other way round: champion `first`, reference `second` (xray lock)
            assert check.difference > 0, check
            lock_reference(settings, second, reason="the better one here", trigger="test")
            promote_manually(settings, first, reason="back to the first")
            (check,) = measure_breaches(settings, drift, first, challenger, snapshot)
        champion, reference = check.champion, check.reference
        assert check.breached and check.difference < 0 and reference_version(settings) == reference
        assert check.challenger_check is not None and check.challenger_check["name"] == "breach_site"
        assert 0 < check.challenger_check["films"] < 16  # outside its training split only

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
        assert f"at site clinic-b on 16 new films; challenger v{challenger} not promoted" in row["rationale"]
