"""A tiny catalogue with trained model versions, for prediction and report tests (module-scoped).

Synthetic 64 px images (by default 10 patients per label, one image each), the conftest's small settings (32
px input, random-init backbone, 2 views), then the retrain steps: split -> embed -> train -> evaluate.
Takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ENV


@dataclass
class TinyHome:
    env: dict[str, str]
    settings: Any
    data: Any  # SplitData of the catalogue
    versions: list[int]  # trained versions, oldest first
    evaluations: dict[int, dict[str, Any]]  # version -> evaluate_step result
    source: Path  # the ingested folder


@contextlib.contextmanager
def tiny_home(root: Path, *, models: int = 1, patients_per_label: int = 10,
              extra_env: dict[str, str] | None = None) -> Iterator[TinyHome]:
    """Yield a TinyHome with ``models`` trained versions (each with another train seed); the env is
    set for the duration and restored afterwards."""
    from db import dispose_engines
    from xray_core.data.ingest import ingest_source
    from xray_core.data.snapshot import load_split_data
    from xray_core.data.synthetic import write_dataset
    from xray_core.pipeline.embed import embed_step
    from xray_core.pipeline.steps import evaluate_step, train_step
    from xray_core.settings import load_settings, reset_settings

    env = {"XRAY_HOME": str(root / "home"), **TEST_ENV, **(extra_env or {})}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_settings()
        dispose_engines()
        try:
            settings = load_settings()
            source = root / "incoming"
            write_dataset(source, patients_per_label=patients_per_label, images_per_patient=1, size=64)
            ingest_source(source, settings=settings)
            data = load_split_data(settings)
            embed_step(settings, data)
            versions, evaluations = [], {}
            for k in range(models):
                run_settings = settings.with_overrides(train_seed=k)
                version = train_step(run_settings, data)["version"]
                versions.append(version)
                evaluations[version] = evaluate_step(settings, version, data)
            yield TinyHome(env=env, settings=settings, data=data, versions=versions, evaluations=evaluations,
                           source=source)
        finally:
            reset_settings()
            dispose_engines()
