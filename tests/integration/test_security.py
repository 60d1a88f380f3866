"""Security promises (SECURITY.md), each checked here.

- Nothing read from disk is unpickled: a static check of the package source, a checkpoint whose head
  is swapped for a malicious pickle, and a malicious pickle given as XRAY_BACKBONE_WEIGHTS (whose
  payload provably runs under a plain ``torch.load``) never run their payload.
- Model cards and manifests are validated before use.
- ``make serve`` binds the Prefect server to 127.0.0.1.
- DICOM patient identifiers appear nowhere in clear: not in a whole retrain's report, result,
  lineage, models list or logs; store and quarantine folders are private to their owner.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT, TEST_ENV
from sqlalchemy import update

from db import dispose_engines, session_scope
from db.schema import Model
from xray_core.data.catalogue import open_catalogue
from xray_core.data.ingest import ingest_source
from xray_core.data.scan import validate_manifest
from xray_core.data.synthetic import make_xray, write_dicom
from xray_core.errors import BackboneWeightsError, CheckpointError, ManifestError, SourceError
from xray_core.io.fsutil import sha256_file
from xray_core.model.backbone import load_backbone
from xray_core.model.train import build_head
from xray_core.registry import versions as registry
from xray_core.registry.versions import load_model, save_model, validate_card
from xray_core.settings import Settings, load_settings

PACKAGES = ("xray_core", "flows", "db", "xray_cli")

# --------------------------------------------------------------------------- no unpickling, statically

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant)
               and k.value.value is value for k in call.keywords)


def unpickling_sites(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that could unpickle: pickle-family imports, ``torch.load`` without
    ``weights_only=True``, ``np.load``/``numpy.load`` with ``allow_pickle=True``, ``pd.read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{filename}:{node.lineno} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{filename}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" or name.endswith(".torch.load"):
                if not _kw_is(node, "weights_only", True):
                    found.append(f"{filename}:{node.lineno} {name}( without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw_is(node, "allow_pickle", True):
                found.append(f"{filename}:{node.lineno} {name}(allow_pickle=True)")
            elif (name.endswith("read_pickle") or name.endswith("pickle.load")
                  or name.endswith("pickle.loads")):
                found.append(f"{filename}:{node.lineno} {name}(")
    return found


def test_the_static_check_finds_what_it_looks_for() -> None:
    bad = ("import pickle\nfrom dill import load\nimport torch, numpy as np\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
           "pd.read_pickle(p)\nx = pickle.loads(b)\n")
    assert len(unpickling_sites(bad)) == 7
    good = "import torch, numpy as np\ntorch.load(p, weights_only=True, map_location='cpu')\nnp.load(p)\n"
    assert unpickling_sites(good) == []


def test_the_package_source_never_unpickles() -> None:
    files = [p for pkg in PACKAGES for p in sorted((PROJECT / pkg).rglob("*.py"))]
    assert len(files) > 20
    sites = [site for p in files for site in unpickling_sites(p.read_text(), str(p.relative_to(PROJECT)))]
    assert sites == []
    # Not hidden behind another name either.
    text = "\n".join(p.read_text() for p in files)
    assert not re.search(r"\b(pickle|dill|cloudpickle|joblib)\b\s*\.\s*loads?\s*\(", text)


# --------------------------------------------------------------------------- malicious pickles


class _Payload:
    """Unpickling this runs ``exec``: it writes ``marker``. Only a loader that unpickles arbitrary
    objects runs it; ``torch.load(weights_only=True)`` refuses the global ``builtins.exec``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious_pth(path: Path, marker: Path) -> Path:
    torch.save({"features.conv0.weight": _Payload(marker)}, path)
    return path


def test_the_malicious_pickle_really_runs_its_payload_when_unpickled(tmp_path: Path) -> None:
    """Positive control, in a separate process: a plain torch.load(weights_only=False) runs it."""
    marker = tmp_path / "control-marker"
    pth = malicious_pth(tmp_path / "control.pth", marker)
    code = f"import torch; torch.load({str(pth)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_a_malicious_pickle_as_backbone_weights_is_refused_without_running(
        tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "marker"
    weights = malicious_pth(tmp_path / f"evil{suffix}", marker)
    settings = load_settings({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home"),
                              "XRAY_BACKBONE_WEIGHTS": str(weights)})
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone(settings)
    assert str(weights) in str(err.value)
    assert not marker.exists(), "the pickle's payload ran"


IN_DIM, HIDDEN = 8, (4,)


def make_card(**changes) -> dict:
    card = {"labels": ["normal", "pneumonia"], "threshold": 0.4, "input_size": 32,
            "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "backbone_fingerprint": "b" * 64, "backbone_weights": "random",
            "head": {"in_dim": IN_DIM, "hidden": list(HIDDEN), "dropout": 0.0},
            "training_set_fingerprint": "t" * 64}
    card.update(changes)
    return card


def saved_version(settings: Settings) -> int:
    state = build_head(IN_DIM, 2, hidden=HIDDEN, dropout=0.0).state_dict()
    return save_model(settings, state_dict=state, card=make_card(), train_image_ids=[], val_image_ids=[])


def test_a_checkpoint_whose_head_is_replaced_by_a_pickle_is_refused(
        settings: Settings, tmp_path: Path) -> None:
    version = saved_version(settings)
    head = settings.models_dir / str(version) / "head.safetensors"
    marker = tmp_path / "marker"
    malicious_pth(head, marker)  # same name, pickle content
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(settings, version)
    with pytest.raises(CheckpointError):
        registry.promote_manually(settings, version, reason="tampered")
    # An attacker who can also write the catalogue makes the sha256 match: still never unpickled.
    with session_scope(open_catalogue(settings)) as s:
        s.execute(update(Model).where(Model.id == version).values(checkpoint_sha256=sha256_file(head)))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(settings, version)
    assert not marker.exists(), "the pickle's payload ran"


# --------------------------------------------------------------------------- model cards


BAD_CARDS = {
    "not an object": ["labels"],
    "schema missing": {"schema": None},
    "schema true": {"schema": True},
    "labels a string": {"labels": "normal,pneumonia"},
    "labels one": {"labels": ["normal"]},
    "labels repeated": {"labels": ["normal", "normal"]},
    "label a path": {"labels": ["normal", "../../etc"]},
    "label a formula": {"labels": ["normal", "=cmd|' /C calc'!A0"]},
    "threshold a string": {"threshold": "0.5"},
    "threshold above 1": {"threshold": 1.5},
    "threshold nan": {"threshold": float("nan")},
    "input_size negative": {"input_size": -32},
    "input_size a float": {"input_size": 32.0},
    "head without in_dim": {"head": {"hidden": [4], "dropout": 0.0}},
    "head hidden strings": {"head": {"in_dim": 8, "hidden": ["4"], "dropout": 0.0}},
    "head dropout 1": {"head": {"in_dim": 8, "hidden": [4], "dropout": 1.0}},
    "normalisation a list": {"normalisation": [0.5]},
    "fingerprint a number": {"backbone_fingerprint": 123},
    "weights missing": {"backbone_weights": None},
    "training set fingerprint missing": {"training_set_fingerprint": None},
}


@pytest.mark.parametrize("case", list(BAD_CARDS))
def test_a_card_with_wrong_types_or_missing_fields_is_refused(case: str) -> None:
    changes = BAD_CARDS[case]
    if isinstance(changes, list):
        card = changes
    else:
        card = {"schema": registry.CARD_SCHEMA_VERSION, **make_card(), **changes}
        card = {k: v for k, v in card.items() if v is not None}
    with pytest.raises(CheckpointError):
        validate_card(card)
    validate_card({"schema": registry.CARD_SCHEMA_VERSION, **make_card()})  # the untouched card is fine


def test_a_tampered_card_on_disk_is_refused_even_with_a_matching_sha(settings: Settings) -> None:
    version = saved_version(settings)
    card_path = settings.models_dir / str(version) / "card.json"
    card = json.loads(card_path.read_text())
    card["head"] = {"in_dim": "8; rm -rf /", "hidden": [4], "dropout": 0.0}
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(settings, version)
    with session_scope(open_catalogue(settings)) as s:
        s.execute(update(Model).where(Model.id == version).values(card_sha256=sha256_file(card_path)))
    with pytest.raises(CheckpointError, match="head"):
        load_model(settings, version)


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("content, message", [
    (b"path,label\na.png,normal\n", "lacks column(s) file"),
    (b"file,label\na.png,normal,extra\n", "more cells than header"),
    (b"file,label\n\xff\xfe.png,normal\n", "not valid UTF-8"),
    (b"", "lacks column(s) file, label"),
])
def test_a_manifest_is_validated_before_use(tmp_path: Path, content: bytes, message: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate_manifest(manifest)


def test_a_manifest_that_is_not_a_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        validate_manifest(tmp_path)
    (tmp_path / "ok.csv").write_bytes(b"\xef\xbb\xbffile,Label\n")  # a BOM and any case are fine
    assert validate_manifest(tmp_path / "ok.csv") == 0


# --------------------------------------------------------------------------- the Prefect server


def test_make_serve_binds_the_prefect_server_to_localhost() -> None:
    makefile = (PROJECT / "Makefile").read_text()
    serve_env = re.search(r"^SERVE_ENV\s*:=(.*?)(?<!\\)$", makefile, re.M | re.S).group(1)
    assert "PREFECT_SERVER_API_HOST=127.0.0.1" in serve_env
    assert "PREFECT_API_URL=$(SERVE_URL)/api" in serve_env
    assert re.search(r"^SERVE_URL\s*:=\s*http://127\.0\.0\.1:\$\(SERVE_PORT\)$", makefile, re.M)
    starts = [line for line in makefile.splitlines() if "prefect server start" in line]
    assert starts and all("--host 127.0.0.1" in line and "$(SERVE_ENV)" in line for line in starts)
    for path in (PROJECT / "Makefile", PROJECT / "prefect.yaml", *sorted((PROJECT / "flows").glob("*.py"))):
        assert "0.0.0.0" not in path.read_text(), f"{path.name} binds to every interface"


# --------------------------------------------------------------------------- DICOM identifiers in artifacts

POLICY_ENV = {"XRAY_VIEWS": "1", "XRAY_EPOCHS": "3", "XRAY_BOOTSTRAP_SAMPLES": "50",
              "XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0.0",
              "XRAY_FLOOR_SENSITIVITY": "0.0", "XRAY_PATIENT_REGEX": ""}


def raw_id(label_index: int, patient: int) -> str:
    return f"Doe^John-{label_index}{patient:04d}"


def test_no_report_artifact_or_log_holds_a_dicom_patient_id(tmp_path: Path, caplog) -> None:
    """A whole retrain (the flow's steps, without Prefect) on a DICOM dataset whose PatientIDs look
    like "Doe^John-00003": the markdown report, the result dict, the ingest summary, the model list,
    lineage and audit trail, and every log record carry hashed ids only."""
    from xray_core.data.catalogue import catalogue_summary
    from xray_core.data.snapshot import load_split_data
    from xray_core.pipeline.embed import embed_step
    from xray_core.pipeline.steps import decide_step, evaluate_step, promote_step, train_step
    from xray_core.pipeline.unchanged import current_champion
    from xray_core.registry.listing import history, list_models, model_lineage
    from xray_core.report.markdown import retrain_markdown
    from xray_core.results import RunResult

    settings = load_settings({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home"), **POLICY_ENV})
    dispose_engines()
    src = tmp_path / "incoming"
    for li, label in enumerate(("normal", "pneumonia")):
        for j in range(6):
            pixels = make_xray(label, size=64, rng=np.random.default_rng(10 * li + j),
                               patient_seed=10 * li + j)
            (src / label).mkdir(parents=True, exist_ok=True)
            write_dicom(src / label / f"img{j}.dcm", pixels.astype(np.uint16) * 16, patient_id=raw_id(li, j),
                        bits_stored=12)
    caplog.set_level(logging.DEBUG)

    result: dict = {"run_name": "privacy", "backbone_weights": settings.backbone_weights, "ingests": []}
    result["ingests"].append(ingest_source(src, settings=settings).as_dict())
    data = load_split_data(settings)
    result["split_counts"] = data.counts()
    result["near_duplicates"] = catalogue_summary(settings)["near_duplicates"]
    result["embed"] = embed_step(settings, data)
    trained = train_step(settings, data)
    result["train"] = trained
    challenger = evaluate_step(settings, trained["version"], data)
    champion_version = current_champion(settings)
    champion = evaluate_step(settings, champion_version, data) if champion_version else None
    result["challenger_eval"], result["champion_eval"] = challenger, champion
    decision = decide_step(settings, challenger, champion, data)
    result["decision"] = {k: decision[k] for k in ("decision", "promote", "rationale", "checks")}
    audit = promote_step(settings, challenger=trained["version"], decision=decision, trigger="manual",
                         champion_eval=champion, challenger_eval=challenger)
    result["champion_after"], result["status"] = audit["champion_after"], "completed"

    markdown = retrain_markdown(RunResult.from_dict(result))
    assert "## Decision" in markdown and "| source |" in markdown
    lineage = model_lineage(settings, trained["version"])
    hashed = {img["patient_id"] for role in ("train", "val") for img in lineage["images"][role]}
    assert hashed and all(p.startswith("dcm-") for p in hashed)
    texts = {"markdown report": markdown, "result": json.dumps(result, default=str),
             "lineage": json.dumps(lineage, default=str),
             "models": json.dumps(list_models(settings), default=str),
             "history": json.dumps(history(settings), default=str),
             "logs": caplog.text + " ".join(str(r.args) for r in caplog.records),
             "home file names": " ".join(str(p) for p in settings.home.rglob("*"))}
    db_bytes = b"".join(p.read_bytes() for p in settings.home.glob("catalogue.db*"))
    for li in range(2):
        for j in range(6):
            raw = raw_id(li, j)
            assert raw.encode() not in db_bytes
            for where, text in texts.items():
                assert raw not in text, f"raw PatientID {raw} in the {where}"
    assert "Doe^John" not in "".join(texts.values())
    dispose_engines()


# --------------------------------------------------------------------------- file permissions


def test_store_quarantine_and_salt_are_private_to_their_owner(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a common default; restored below
    try:
        settings = load_settings({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home"), "XRAY_PATIENT_SALT": ""})
        src = tmp_path / "src"
        write_dicom(src / "normal" / "a.dcm",
                    (np.add.outer(np.arange(64), np.arange(64)) * 30).astype(np.uint16),
                    patient_id="Doe^John-1")
        (src / "normal" / "bad.png").write_bytes(b"")
        summary = ingest_source(src, settings=settings)
        assert (summary.added, summary.rejected) == (1, 1)
    finally:
        os.umask(old)
    for name in ("store", "quarantine"):
        assert stat.S_IMODE((settings.home / name).stat().st_mode) == 0o700, name
    assert stat.S_IMODE((settings.home / ".patient_salt").stat().st_mode) == 0o600
    dispose_engines()
