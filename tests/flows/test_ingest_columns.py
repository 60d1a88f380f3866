"""The ``ingest`` flow's ``columns`` parameter (issue 25): an export's own names mapped through Prefect's
parameter validation, the other columns kept as attributes; a bad mapping fails the run, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fetch

from db.schema import Image
from xray_core.data.synthetic import write_dataset
from xray_core.errors import ManifestError
from xray_core.settings import load_settings


def test_the_ingest_flow_maps_an_exports_columns(xray_env, prefect_server, tmp_path: Path) -> None:
    from flows.ingest import ingest

    batch = tmp_path / "export"
    records = write_dataset(batch, patients_per_label=2, images_per_patient=1, size=48, seed=8)
    lines = ["filename,finding,patientid,licence"] + [
        f"{r.path.relative_to(batch)},{r.label},{r.patient_id},CC BY 4.0" for r in records]
    (batch / "export.csv").write_text("\n".join(lines) + "\n")

    state = ingest(str(batch), str(batch / "export.csv"), columns={"file": "filename", "label": "finding"},
                   check_drift=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(ManifestError, match="column 'patientid' looks like 'patient_id'"):
        state.result()
    assert fetch(load_settings(), Image) == []

    summary = ingest(str(batch), str(batch / "export.csv"), check_drift=False,
                     columns={"file": "filename", "label": "finding", "patient_id": "patientid"})

    assert summary["added"] == 4 and summary["attributes"]["columns"] == ["licence"]
    images = fetch(load_settings(), Image)
    assert {(i.patient_id, i.label) for i in images} == {(r.patient_id, r.label) for r in records}
    assert {i.attributes["licence"] for i in images} == {"CC BY 4.0"}
