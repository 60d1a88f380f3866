"""The README's incoming folder, as its tree shows it, through the ``retrain`` flow with the nightly
deployment's parameters (``prefect.yaml``): two dated batches that are complete (one with READY and a
batch.toml, one manifest as exported with an ATTRIBUTION.md, settled) and one still being copied. The
run takes the two, catalogued under their real labels and sites with nothing quarantined, and leaves the
third; a run before READY appears is Skipped naming the batch it waits for; the run after takes it."""

from __future__ import annotations

import csv
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import fetch

from db.schema import Image, IncomingBatch, Rejection
from xray_core.data.synthetic import write_dataset
from xray_core.settings import get_settings, reset_settings

PROJECT = Path(__file__).resolve().parents[2]
TAKEN, LEFT = ("2026-11-20", "2026-11-21"), "2026-11-22"  # the README's batches: two complete, one copying
POLICY = {"XRAY_MIN_TEST_PER_CLASS": "2", "XRAY_FLOOR_MACRO_AUROC": "0.5", "XRAY_FLOOR_SENSITIVITY": "0.3",
          "XRAY_GUARDRAIL_SENSITIVITY_DROP": "1.0"}


def readme_tree() -> dict[str, list[str]]:
    """The README's incoming tree: each batch folder and its entries (``normal/<image>``, ``READY``)."""
    text = (PROJECT / "README.md").read_text()
    block = text.split("```\n/data/incoming/\n", 1)[1].split("```", 1)[0]
    tree: dict[str, list[str]] = {}
    for line in block.splitlines():
        m = re.match(r"^([│ ]*)[├└]── (\S+)", line)
        if m and len(m.group(1)) == 0:
            batch = m.group(2).rstrip("/")
            tree[batch] = []
        elif m:
            tree[batch].append(m.group(2))
    return tree


def drop(incoming: Path, batch: str, entries: list[str], offset: int) -> None:
    """Write one batch as the README draws it: films in the label folders it names (a manifest naming
    them when it shows one), and its READY, batch.toml and side files."""
    labels = tuple(e.split("/")[0] for e in entries if e.endswith("/<image>"))
    root = incoming / batch
    write_dataset(root, labels=labels, patients_per_label=8, images_per_patient=1, size=64, seed=offset,
                  patient_offset=offset, manifest="manifest.csv" in entries)
    if "manifest.csv" in entries:  # as exported: a site column and one the system does not know of
        with open(root / "manifest.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        with open(root / "manifest.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([[*rows[0], "site", "license"]] +
                                     [[*r, "hospital-b", "CC BY 4.0"] for r in rows[1:]])
    for entry in entries:
        if entry == "READY":
            (root / entry).touch()
        elif entry == "batch.toml":
            (root / entry).write_text('site = "hospital-a"\n')
        elif entry.endswith(".md"):
            (root / entry).write_text("Films: CC BY 4.0, see the source.\n")


def settle(root: Path, seconds_ago: float = 3600) -> None:
    when = time.time() - seconds_ago
    for path in [*root.rglob("*"), root]:
        os.utime(path, (when, when))


def nightly_parameters(incoming: Path) -> dict:
    """``retrain/nightly``'s parameters from prefect.yaml, its incoming folder the one INCOMING names."""
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    return {**nightly["parameters"], "incoming": str(incoming)}


@pytest.fixture
def nightly(xray_env, monkeypatch, prefect_server, tmp_path):
    incoming = tmp_path / "data" / "incoming"
    for key, value in {**POLICY, "XRAY_INCOMING": str(incoming)}.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    return incoming


def test_readme_batches_two_taken_one_left_for_the_next_run(nightly: Path) -> None:
    from flows.retrain import retrain

    tree = readme_tree()
    assert tuple(tree) == (*TAKEN, LEFT), tree  # the batches this test drops are the README's
    if "manifest.csv" not in tree["2026-11-21"] or "ATTRIBUTION.md" not in tree["2026-11-21"]:
        pytest.fail(f"the README's second batch is no longer a manifest with a side file: {tree}")
    for k, (batch, entries) in enumerate(tree.items()):
        drop(nightly, batch, entries, offset=100 * k)
    assert "READY" not in tree["2026-11-21"] and "READY" not in tree[LEFT]
    settle(nightly / "2026-11-21")  # complete without READY: unchanged for an hour (settle time 900 s)
    params = nightly_parameters(nightly)
    assert params["use_incoming"] is True and params["trigger"] == "schedule"

    first = retrain(**params)
    rows = {b["name"]: b for b in first["incoming"]["batches"]}
    assert {name: rows[name]["state"] for name in rows} == {"2026-11-20": "taken", "2026-11-21": "taken",
                                                            LEFT: "waiting"}
    assert rows["2026-11-20"]["added"] == 16 and rows["2026-11-21"]["added"] == 16
    assert rows["2026-11-21"]["side_files"] == ["ATTRIBUTION.md"]
    assert "no READY file" in rows[LEFT]["detail"]
    assert f"incoming {LEFT}: waiting (no READY file" in " ".join(first["notes"])
    assert first["status"] == "completed", first["summary"]
    settings = get_settings()
    assert {i.label for i in fetch(settings, Image)} == {"normal", "pneumonia"}  # never a date as a label
    assert {i.site for i in fetch(settings, Image)} == {"hospital-a", "hospital-b"}
    assert fetch(settings, Rejection) == []  # READY, batch.toml, ATTRIBUTION.md, manifest.csv: no quarantine
    assert sorted(b.name for b in fetch(settings, IncomingBatch)) == list(TAKEN)
    report = Path(first["report"]).read_text()
    assert f"| {LEFT} | waiting | no READY file" in report

    # Still being copied at the next run: nothing new to train on, and the title says what waits.
    os.utime(nightly / LEFT, None)
    skipped = retrain(**params)
    assert skipped["status"] == "skipped" and skipped["ingests"] == []
    title = Path(skipped["report"]).read_text().splitlines()[0]
    champion = f"champion v{first['champion_after']} stays; " if first["champion_after"] else ""
    assert title == f"# Skipped: {champion}1 batch waiting ({LEFT}) in {nightly}"
    assert skipped["summary"].startswith(f"Skipped: 1 batch waiting ({LEFT}) in {nightly}")

    (nightly / LEFT / "READY").touch()  # the copy finished
    last = retrain(**params)
    assert [(b["name"], b["state"], b["added"]) for b in last["incoming"]["batches"]] == [(LEFT, "taken", 8)]
    assert last["incoming"]["taken_earlier"] == 2 and len(last["ingests"]) == 1  # the others not read again
    assert sorted(b.name for b in fetch(settings, IncomingBatch)) == [*TAKEN, LEFT]
