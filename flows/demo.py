"""``make demo``: the main job, ad hoc. Batch 1 arrives → first champion; batch 2 arrives → a challenger
is trained, compared with the champion on the same test set, and the decision is shown.

Uses ``../shared/data/cxr-sample`` when present (its patients split into two arriving batches),
otherwise synthetic images; says which, and that the backbone is random-init when it is.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

from flows.retrain import retrain
from xray_core.report.terminal import render_models, render_status
from xray_core.settings import Settings

BATCH_1_SHARE = 0.7  # of the sample's patients arrive first; the rest arrive in batch 2
# Written into XRAY_HOME when the demo creates it. ``--fresh`` deletes a home only when this file is
# there: XRAY_HOME may point at a real catalogue (or at $HOME), and rmtree must never guess.
DEMO_MARKER = ".xray-demo-home"


def _stage_sample(sample: Path, incoming: Path) -> list[Path]:
    """Copy the sample into two batch folders with their own manifests, split by patient."""
    with open(sample / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    patients = sorted({r["patient_id"] for r in rows}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    first = set(patients[: int(len(patients) * BATCH_1_SHARE)])
    manifests = []
    for n, members in ((1, [r for r in rows if r["patient_id"] in first]),
                       (2, [r for r in rows if r["patient_id"] not in first])):
        batch = incoming / f"batch-{n}"
        for r in members:
            target = batch / r["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copy2(sample / r["file"], target)
        with open(batch / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["file", "label", "patient_id"])
            writer.writeheader()
            writer.writerows({"file": r["file"], "label": r["label"], "patient_id": r["patient_id"]} for r in members)
        manifests.append(batch / "manifest.csv")
    return manifests


def _stage_synthetic(incoming: Path) -> list[Path]:
    from xray_core.data.synthetic import write_dataset

    manifests = []
    for n, (offset, patients) in enumerate(((0, 36), (1000, 24)), start=1):
        batch = incoming / f"batch-{n}"
        write_dataset(batch, patients_per_label=patients, images_per_patient=1, size=256, seed=n,
                      manifest=True, patient_offset=offset)
        manifests.append(batch / "manifest.csv")
    return manifests


def prepare_demo_home(home: Path, *, fresh: bool) -> None:
    """Make ``home`` ready for the demo; with ``fresh``, delete it first, but only if the demo made it.

    Why a marker rather than a heuristic: ``XRAY_HOME`` is a setting, so a typo or a leftover export
    can point it at a real catalogue with its store and models. Only a home that holds
    :data:`DEMO_MARKER` (or an empty folder) is ever removed; anything else raises UsageError
    (exit 2) and is left exactly as it was. The marker is written only into a home the demo creates.
    """
    from xray_core.errors import UsageError

    if os.path.lexists(home) and (home.is_symlink() or not home.is_dir()):
        raise UsageError(f"XRAY_HOME={home} is not a folder; the demo needs a folder of its own "
                         "(e.g. XRAY_HOME=var/demo)")
    exists = home.is_dir()
    empty = exists and not any(home.iterdir())
    if fresh and exists and not empty:
        if not (home / DEMO_MARKER).is_file():
            raise UsageError(
                f"refusing --fresh: XRAY_HOME={home} was not created by `xray demo` (no {DEMO_MARKER} marker), "
                "so it may hold a real catalogue, store or models. Only a demo home is deleted; point "
                "XRAY_HOME at a new folder (e.g. XRAY_HOME=var/demo) or remove this one yourself.")
        shutil.rmtree(home)
        exists = empty = False
    if not exists or empty:
        home.mkdir(parents=True, exist_ok=True)
        (home / DEMO_MARKER).write_text("created by `xray demo`; `xray demo --fresh` may delete this folder\n",
                                        encoding="utf-8")


def run_demo(settings: Settings, *, sample: Path | None, out: TextIO, fresh: bool = False) -> dict[str, Any]:
    from xray_core.registry.listing import list_models
    from xray_core.report.status import status_report

    prepare_demo_home(settings.home, fresh=fresh)
    incoming = settings.home / "incoming"
    if sample is not None and (sample / "manifest.csv").is_file():
        manifests = _stage_sample(sample, incoming)
        out.write(f"Data: the real sample {sample} (120 paediatric chest X-rays, CC BY 4.0), split by patient "
                  "into two arriving batches.\n")
    else:
        manifests = _stage_synthetic(incoming)
        out.write("Data: synthetic X-ray-like images (../shared/data/cxr-sample not found), two arriving batches.\n")
    if settings.backbone_weights == "random":
        out.write("Backbone: RANDOM-INIT densenet161 (offline: no ImageNet download). The numbers show the "
                  "system works end to end, not a clinically useful model.\n")
    out.write(f"Demo settings: input {settings.input_size} px, {settings.views} augmented views, minimum test "
              f"images per class {settings.min_test_per_class}.\n\n")
    results = []
    for n, manifest in enumerate(manifests, start=1):
        out.write(f"=== batch {n} arrives: {manifest.parent}\n")
        result = retrain(manifests=[str(manifest)], use_incoming=False, trigger="demo")
        results.append(result)
        ing = result["ingests"][0]
        out.write(f"ingested {ing['added']} new images ({ing['duplicates']} duplicates, {ing['rejected']} quarantined)\n")
        for role, ev in (("challenger", result["challenger_eval"]), ("champion", result["champion_eval"])):
            if ev:
                out.write(f"{role:<10} v{ev['version']}: test macro AUROC {ev['macro_auroc']:.3f}, balanced accuracy "
                          f"{ev['balanced_accuracy']:.3f} on the same {ev['n_images']} test images\n")
        out.write(f"{result['state']}: {result['state_message']}\n")
        out.write(f"report: {result['report']} (open report.html beside it in a browser)\n\n")
    out.write(render_models(list_models(settings)) + "\n\n")
    status = status_report(settings)
    out.write(render_status(status).split("\nsettings:")[0] + "\n")
    out.write(f"\nEverything is under {settings.home} (catalogue.db, store/, features/, models/, reports/).\n")
    return {"runs": results, "home": str(settings.home)}
