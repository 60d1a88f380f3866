"""``xray monitor`` end to end on a tiny catalogue: nothing new → a quiet check; a shifted site
ingested → its films are checked against the champion's reference, recorded, reported and shown in
``xray status``; films already checked are not checked again."""

from __future__ import annotations

import json

import pytest
from tinymodel import tiny_home

from xray_cli.main import main


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from xray_core.registry.versions import promote_manually

    with tiny_home(tmp_path_factory.mktemp("monitor"), patients_per_label=15) as h:
        promote_manually(h.settings, h.versions[0], reason="test champion")
        yield h


def test_monitor_checks_new_films_once_records_and_reports(home, tmp_path, capsys):
    from xray_core.data.ingest import ingest_source
    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
    from xray_core.pipeline.monitor import run_monitor

    quiet = run_monitor(home.settings)
    assert quiet["n"] == 0 and quiet["summary"] == "nothing new since the last check" and not quiet["drift"]

    site = tmp_path / "far"
    write_site_dataset(site, SiteStyle(name="far", size=96, gamma=2.5, border=14), patients_per_label=8)
    ingest_source(site, manifest=site / "manifest.csv", settings=home.settings)
    result = run_monitor(home.settings)
    assert result["n"] == 16 and result["checks"][0]["subject"] == "all new films"
    check = result["checks"][0]
    assert check["ood_line"].startswith(f"{check['ood_flagged']} of 16 films look unlike this model's "
                                        f"training data (conformal p <= 0.05; "
                                        f"{check['ood_expected']:.1f} expected by chance)")
    assert (check["ood_coarse"] is None) == (check["ood_line"].endswith(")"))  # a small home: said if coarse
    assert 0 <= check["ood_expected"] <= 0.05 * 16
    assert {"mmd_p", "ks_p", "prevalence", "verdict"} <= set(check)
    assert result["drift"] and check["ood_flagged"] >= 12  # a border and another contrast: unlike training
    report = open(result["report"]).read()
    assert "not proof that performance fell" in report and "all new films" in report
    # performance before labels (CBPE): carried by the check, stored with it, unreliable beside drift
    assert check["performance"]["n"] == 16 and not check["performance"]["reliable"]
    assert result["performance"] == check["performance"] and "realised" not in check  # monitor: no labels
    assert "estimated accuracy (before labels)" in report and "(unreliable)" in report
    assert main(["monitor", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["n"] == 0  # already checked
    assert main(["status", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)["drift_checks"]
    assert [c["kind"] for c in checks[:3]] == ["monitor"] * 3 and checks[1]["drift"] is True
    assert main(["status"]) == 0
    assert "drift checks (newest first" in capsys.readouterr().out

    # its films are labelled in the catalogue: the next retrain's check finds the stored estimate and
    # realises it (it has nothing new of its own to check)
    retrain_check = run_monitor(home.settings, kind="retrain")
    assert retrain_check["n"] == 0
    (earlier,) = retrain_check["earlier"]
    assert earlier["id"] == result["id"] and earlier["kind"] == "monitor" and earlier["labelled"] == 16
    assert earlier["estimate"]["accuracy"] == pytest.approx(check["performance"]["accuracy"], abs=2e-3)
    assert earlier["realised"]["n"] == 16 and 0 <= earlier["realised"]["accuracy"] <= 1


def test_per_site_checks_name_sites_the_champion_was_not_validated_on(home, tmp_path):
    from xray_core.data.ingest import ingest_source
    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
    from xray_core.monitor.checks import images_since
    from xray_core.monitor.drift import NEW_SITE
    from xray_core.monitor.reference import model_reference
    from xray_core.pipeline.monitor import run_monitor
    from xray_core.registry.versions import load_model

    model = load_model(home.settings, home.versions[0])
    reference = model_reference(model)
    assert reference is not None and reference.sites and reference.val_sites is not None
    # the reference records sites by the rule the monitor reads them by (an ingest's default site too)
    assert set(reference.sites) <= {r[5] for r in images_since(home.settings, None)}
    run_monitor(home.settings)  # anything earlier tests left unchecked
    for seed, name in enumerate(("north", "south")):  # another seed: identical films would be deduplicated
        write_site_dataset(tmp_path / name, SiteStyle(name=name, size=64, border=6), patients_per_label=3,
                           seed=seed)
        ingest_source(tmp_path / name, manifest=tmp_path / name / "manifest.csv", settings=home.settings)
    result = run_monitor(home.settings)
    per_site = {c["subject"]: c for c in result["checks"][1:]}
    assert set(per_site) == {"site north", "site south"} and result["drift"]
    assert all(c["new_site"] and NEW_SITE in c["verdict"] for c in per_site.values())
    # a new site is judged by its tests against the pooled reference, not by its name alone
    flagged = sorted(c["subject"].removeprefix("site ") for c in per_site.values() if c["drift"])
    assert result["sites"] == flagged
