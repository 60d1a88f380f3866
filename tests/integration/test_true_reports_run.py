"""True reports of a real retrain, run as a user runs it (``xray retrain --local``), twice:

1. site ``paeds`` sends normal and pneumonia films: the first champion;
2. site ``adult`` sends covid19 and normal films: a label the champion does not know (so it is scored
   on part of the test split only), a drift check against the champion, and covid19 coming from one
   site only (a shortcut-audit warning).

Half of each site's films have no recorded view. One module-scoped pair of runs; each test checks one
promise of the reports against it: strict JSON in every file a run writes, the ``(unknown)`` view row,
the drift section, the audit sentence's own number, what each model was scored on, and owner-only
``features/`` and ``models/``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ENV

POLICY = {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0", "XRAY_FLOOR_SENSITIVITY": "0",
          "XRAY_PATIENT_REGEX": "", "XRAY_SPLIT_RATIOS": "0.5,0.1,0.4", "XRAY_DRIFT_PERMUTATIONS": "99"}


def strict_json(text: str) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _with_views(root: Path, view: str) -> Path:
    """Give every other film of the site's manifest a view; the others stay blank (not recorded)."""
    manifest = root / "manifest.csv"
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "view"])
        writer.writeheader()
        writer.writerows({**row, "view": view if i % 2 == 0 else ""} for i, row in enumerate(rows))
    return manifest


def _retrain(manifest: Path) -> dict[str, Any]:
    """``xray retrain --local --no-incoming --manifest M --json``: its exit code must be 0."""
    from db import dispose_engines
    from xray_cli.main import main
    from xray_core.settings import reset_settings

    reset_settings()
    dispose_engines()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["retrain", "--local", "--no-incoming", "--manifest", str(manifest), "--json"])
    assert code == 0, out.getvalue()[-2000:]
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, Any]]:
    from db import dispose_engines
    from xray_core.data.synthetic_sites import SiteStyle, write_site_dataset
    from xray_core.settings import load_settings, reset_settings

    root = tmp_path_factory.mktemp("true-reports")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**TEST_ENV, **POLICY, "XRAY_HOME": str(home)}.items():
            mp.setenv(key, value)
        old = os.umask(0o022)  # a common default: the private folders must not depend on a strict umask
        try:
            write_site_dataset(root / "paeds", SiteStyle("paeds", size=48), patients_per_label=8, seed=1)
            first = _retrain(_with_views(root / "paeds", "PA"))
            write_site_dataset(root / "adult", SiteStyle("adult", size=64, border=4),
                               labels=("covid19", "normal"), patients_per_label=8, seed=2, patient_offset=100)
            second = _retrain(_with_views(root / "adult", "AP"))
            yield {"home": home, "first": first, "second": second, "settings": load_settings(),
                   "run_dir": Path(second["report"]).parent}
        finally:
            os.umask(old)
            reset_settings()
            dispose_engines()


def test_the_second_run_compared_with_the_first_champion(runs):
    assert runs["first"]["state"] == "Promoted" and runs["first"]["champion_after"] == 1
    assert runs["second"]["champion_eval"]["version"] == 1 and runs["second"]["drift"] is not None


def test_every_json_file_a_run_writes_is_strict(runs):
    files = [p for p in runs["home"].rglob("*.json")]
    names = {p.name for p in files}
    assert {"result.json", "split.json", "card.json"} <= names, names
    for path in files:
        strict_json(path.read_text(encoding="utf-8"))  # raises on a NaN token
    result = strict_json((runs["run_dir"] / "result.json").read_text())
    views = result["challenger_eval"]["views"]
    assert None in views and ("AP" in views or "PA" in views)  # unknown views are null, not NaN


def test_films_without_a_view_keep_their_unknown_row(runs):
    result = strict_json((runs["run_dir"] / "result.json").read_text())
    by_view = result["challenger_eval"]["metrics"]["slices"]["view"]
    unknown = sum(v is None for v in result["challenger_eval"]["views"])
    assert unknown and by_view["(unknown)"]["n"] == unknown
    assert sum(s["n"] for s in by_view.values()) == result["challenger_eval"]["n_images"]
    md = (runs["run_dir"] / "report.md").read_text()
    view_section = md.split("## By view\n", 1)[1].split("\n## ", 1)[0]
    assert f"| (unknown) | {unknown} |" in view_section


def test_the_drift_check_is_in_both_reports(runs):
    result = strict_json((runs["run_dir"] / "result.json").read_text())
    drift = result["drift"]
    first = drift["checks"][0]
    md = (runs["run_dir"] / "report.md").read_text()
    section = md.split("## Drift of the new films\n", 1)[1].split("\n## ", 1)[0]
    lead = ("**Flagged: the new films do not look like the champion's training data.**" if drift["flagged"]
            else "No drift flagged.")
    assert lead in section and drift["summary"] in section
    assert (f"- {first['subject']}: MMD p={first['mmd_p']:.3g}; {first['ood_flagged']} of {first['n']} films "
            "look unlike the champion's training data") in section
    html = (runs["run_dir"] / "report.html").read_text()
    assert '<section id="drift">' in html and f"MMD p={first['mmd_p']:.3g}" in html
    # the new films are labelled: the champion's estimate made from probabilities alone beside the realised
    from xray_core.monitor.performance import beside_line

    assert first["performance"]["n"] == first["n"]
    if not first["realised"]["n"]:  # covid19 arrives, a label the first champion does not know
        assert "labels the champion was not trained on (covid19)" in first["realised"]["note"]
    else:
        assert first["realised"]["n"] == first["n"]
    line = f"- {first['subject']}: {beside_line(first['performance'], first['realised'])}"
    assert line in section and beside_line(first["performance"], first["realised"]) in html


def test_the_audit_sentence_quotes_the_number_of_the_label_it_names(runs):
    result = strict_json((runs["run_dir"] / "result.json").read_text())
    audit = result["audit"]
    (sentence,) = [w for w in audit["warnings"] if w.startswith("covid19 films come only from site adult")]
    # covid19 against the rest, from the site alone, by hand from the audit's own label x site counts:
    # every covid19 film scores adult's covid19 share; adult's other films tie with it, paeds' score 0.
    table = audit["label_site"]["table"]
    tied = sum(n for label, n in table["adult"].items() if label != "covid19")
    others = tied + sum(table["paeds"].values())
    by_hand = (others - tied + 0.5 * tied) / others
    assert sentence.endswith(f"(AUROC {by_hand:.2f} from the site alone, covid19 against the rest)")
    md = (runs["run_dir"] / "report.md").read_text()
    assert sentence in md


def test_what_each_model_was_scored_on_is_said(runs):
    result = strict_json((runs["run_dir"] / "result.json").read_text())
    total = sum(result["split_counts"]["test"].values())
    champion, challenger = result["champion_eval"], result["challenger_eval"]
    assert champion["labels"] == ["normal", "pneumonia"] and champion["n_images"] < total
    md = (runs["run_dir"] / "report.md").read_text()
    assert "(same test set)" not in md
    assert f"- challenger v{challenger['version']}: all {total} test images" in md
    assert (f"- champion v1: {champion['n_images']} of {total} test images: those labelled normal or "
            "pneumonia, the labels v1 knows (it has no covid19 output)") in md


def test_features_and_models_are_private_to_their_owner(runs):
    for name in ("store", "quarantine", "features", "models"):
        path = runs["home"] / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, name
    assert (runs["home"] / "features").is_dir() and (runs["home"] / "models").is_dir()
