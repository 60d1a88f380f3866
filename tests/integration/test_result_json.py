"""``result.json`` keeps its format: three real runs (a first champion, a skip, a challenger kept
against the champion) written by today's recipe match, key for key and in order, the files the
recipe wrote before it became typed (``result_json/*.json``, captured with the dict-based
``cycle.py`` at commit d1016d1). One change on purpose: the outcome sentence at the start of
``state_message`` and ``summary`` is worded once since (``report.format.outcome_sentence``; see the migration
notes in docs/architecture.md), so the two files that carry one say ``v1 becomes the first champion``
and ``champion v1 stays (v2 not promoted)``.

Only what differs between two identical runs is masked: the temp folder, the run folders' UTC
stamps and wall-clock ``seconds``. Floats compare to 1e-6 relative, because the CPU convolutions
behind the features change in their last bits with the thread count (see ``Backbone.embed``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from xray_core.data.synthetic import write_dataset
from xray_core.pipeline.cycle import run_retrain
from xray_core.pipeline.recipe import RetrainRequest
from xray_core.settings import load_settings, reset_settings

GOLDEN = Path(__file__).parent / "result_json"
# Keys added since the capture, each with where it may appear: the old keys keep their order and values.
# ``attributes``: an ingest summary's manifest attributes (issue 25; {} for a folder). At the top level
# (""): ``negative_flips`` against the champion (issue 26), in a run that had one; ``reference`` (the locked
# reference) and ``test_set_reuse`` in a decided run (issue 26). ADDED_CHECKS: checks a decision may have
# gained since (the locked reference's, whenever there is one), skipped in ``decision/checks``.
# ``performance`` and ``realised`` in each drift check: the champion's performance estimated before labels
# (CBPE) and the realised value on the new films, and ``ood_coarse`` (why the per-film flag is coarse,
# or None; issue 27). ``challenger_high`` in a per-site drop: the challenger's interval the drop was judged
# against (XRAY_GUARDRAIL_SITE_EVIDENCE, issue 26). ``breach_checks`` at the top level: the champion against
# the locked reference at each site the drift check flagged (issue 26), only in a run that flagged one.
# ``site`` in a drift check of one known site's films (the breach reads it; issue 26).
ADDED_KEYS = {"ingests": {"attributes"},
              "": {"negative_flips", "reference", "test_set_reuse", "breach_checks"},
              "checks": {"performance", "realised", "ood_coarse", "site"}, "site_drops": {"challenger_high"}}
ADDED_CHECKS = {"reference"}
POLICY = {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0", "XRAY_FLOOR_SENSITIVITY": "0"}
STAMP = re.compile(r"\d{8}T\d{6}Z")


def normalise(value: Any, root: str) -> Any:
    """The run's JSON with the temp root, UTC stamps and wall-clock seconds masked."""
    if isinstance(value, dict):
        return {k: None if k == "seconds" else normalise(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, root) for v in value]
    if isinstance(value, str):
        return STAMP.sub("<stamp>", value.replace(root, "<tmp>"))
    return value


def same(got: Any, want: Any, where: str = "") -> None:
    """Assert equal JSON, key order included; floats to 1e-6 relative. Keys in :data:`ADDED_KEYS` may
    appear where listed (the old keys keep their order around them)."""
    if isinstance(want, dict):
        top = "/" not in where
        added = next((keys for part, keys in ADDED_KEYS.items()
                      if (top and not part) or (part and f"/{part}[" in where)), set())
        assert isinstance(got, dict), f"{where}: {got!r} is not an object"
        old = [k for k in got if k not in added or k in want]
        assert old == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            same(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        if where.endswith("/decision/checks"):
            got = [c for c in got if c.get("name") not in ADDED_CHECKS]
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (
            f"{where}: {got!r} != {want!r}"
        )
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture
def three_runs(xray_env, tmp_path, monkeypatch) -> dict[str, dict[str, Any]]:
    for key in [k for k in os.environ if k.startswith("XRAY_") and k not in xray_env]:
        monkeypatch.delenv(key)  # the golden files were written with the test settings and POLICY alone
    for key, value in POLICY.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    write_dataset(tmp_path / "src", patients_per_label=8, images_per_patient=1, size=64, seed=3)
    runs = {
        "promoted": run_retrain(
            load_settings(),
            RetrainRequest(sources=(str(tmp_path / "src"),), trigger="test", flow_run_id="run-one"),
        ),
        "skipped": run_retrain(load_settings(), RetrainRequest(trigger="test", flow_run_id="run-two")),
    }
    write_dataset(
        tmp_path / "more", patients_per_label=3, images_per_patient=1, size=64, seed=9, patient_offset=50
    )
    runs["second"] = run_retrain(
        load_settings(),
        RetrainRequest(sources=(str(tmp_path / "more"),), trigger="test", flow_run_id="run-three"),
    )
    second = Path(runs["second"].run_dir) / "report.md"
    return {
        **{name: normalise(json.loads((Path(outcome.run_dir) / "result.json").read_text()), str(tmp_path))
           for name, outcome in runs.items()},
        "second report.md": second.read_text(),
    }


def test_result_json_keeps_its_format(three_runs):
    report = three_runs.pop("second report.md")
    assert [run["state"] for run in three_runs.values()] == ["Promoted", "Skipped", "Kept"]
    for name, got in three_runs.items():
        same(got, json.loads((GOLDEN / f"{name}.json").read_text()), name)
    # negative flips against the champion (issue 26): only the run that had one, on every test film
    assert "negative_flips" not in three_runs["promoted"] and "negative_flips" not in three_runs["skipped"]
    flips = three_runs["second"]["negative_flips"]
    counts = flips["counts"]
    assert flips["n"] == three_runs["second"]["challenger_eval"]["n_images"] == sum(counts.values())
    assert len(flips["flipped"]) == counts["negative_flips"] and set(flips["by_site"])
    assert flips["negative_flip_rate"]["high"] is not None and flips["samples"] > 0
    assert "## Negative flips" in report and f"**{counts['negative_flips']}**, a negative flip rate" in report
    # the locked reference and the test set's reuse (issue 26): none before the first champion, then the
    # first champion, which is this run's champion too (scored once, its comparison reused)
    first, second = three_runs["promoted"], three_runs["second"]
    assert first["reference"]["version"] is None and "reference" not in [c["name"] for c in
                                                                          first["decision"]["checks"]]
    ref = second["reference"]
    assert (ref["version"], ref["same_as_champion"], ref["margin"]) == (1, True, 0.02)
    check = next(c for c in second["decision"]["checks"] if c["name"] == "reference")
    assert check["passed"] == ref["passed"] and "locked reference v1" in check["detail"]
    assert first["test_set_reuse"]["decisions"] == 1 and second["test_set_reuse"]["decisions"] >= 1
    assert "Locked reference v1 (the champion)" in report and "This test set (" in report
