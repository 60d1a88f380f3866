"""``xray gc`` from the command line: the current backbone's feature folder is found by loading the backbone
(the random-init test backbone: seconds), ``--dry-run`` lists with bytes and changes nothing, ``gc`` frees
what it listed, and a pruned version is refused with exit 2 naming it as pruned."""

from __future__ import annotations

import json

from registry_heads import BACKBONE, save

from xray_cli import main as cli
from xray_core.io.storage import get_storage
from xray_core.pipeline.retention import current_backbone
from xray_core.registry.versions import record_decision


def test_gc_cli_dry_run_then_gc_then_a_pruned_version_is_refused(settings, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XRAY_KEEP_REJECTED", "0")
    for k, decision in enumerate(("promote", "keep")):
        record_decision(settings, challenger=save(settings, seed=k), decision=decision, rationale="test",
                        metrics={}, trigger="test", promote=decision == "promote")
    features, current = get_storage(settings, "features"), current_backbone(settings)
    for fp in (BACKBONE, current, "d" * 64):
        features.write_bytes(f"{fp}/ab/{'ab' * 32}.safetensors", b"x" * 2000)

    assert cli.main(["gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove model v2's files" in out and f"would remove feature folder {'d' * 12}" in out
    assert "(dry run: nothing changed)" in out and "kept v1: the champion" in out
    assert features.folders() == sorted([BACKBONE, current, "d" * 64])

    assert cli.main(["gc", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["dry_run"] is False and done["bytes"] > 2000  # the folder and v2's files
    assert features.folders() == sorted([BACKBONE, current])  # a kept model's and the current backbone's

    assert cli.main(["promote", "2", "--reason", "after gc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xray promote: model version 2 was pruned by xray gc")
    assert len(err.splitlines()) == 1
    assert cli.main(["models"]) == 0
    assert "rejected (pruned)" in capsys.readouterr().out
    assert cli.main(["doctor"]) == 0
