"""``xray status`` after training: feature-cache coverage per backbone fingerprint and the registry."""

from __future__ import annotations

import json

from tinymodel import tiny_home

from xray_cli.main import main


def test_status_reports_cache_coverage_and_models(tmp_path, capsys):
    with tiny_home(tmp_path, models=1) as home:
        assert main(["status", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        cache = report["feature_cache"]
        assert len(cache) == 1
        row = cache[0]
        n = report["catalogue"]["images"]
        assert row["catalogued_images"] == n and row["catalogued_cached"] == n  # every image embedded
        assert row["models"] == [{"version": home.versions[0], "status": "candidate"}]
        assert report["models"]["versions"] == home.versions[0]

        # Remove one image's cache file: coverage drops by one, and the text table says so.
        sha = home.data.train[0].sha256
        (home.settings.features_dir / row["fingerprint"] / sha[:2] / f"{sha}.safetensors").unlink()
        assert main(["status"]) == 0
        text = capsys.readouterr().out
        assert f"{n - 1}/{n}" in text and f"v{home.versions[0]} candidate" in text
