"""Tiny registered model versions for the registry tests (tests/unit/test_registry.py and the racing-process
test in tests/integration/test_registry_race.py): heads of 8 -> 4 -> 2 saved straight from a state dict,
so no backbone is involved, and small readers of the catalogue's model and promotion rows.
"""

from __future__ import annotations

import torch
from sqlalchemy import func, select

from db import session_scope
from db.schema import Model
from xray_core.data.catalogue import open_catalogue
from xray_core.model.train import build_head
from xray_core.registry.versions import save_model
from xray_core.settings import Settings

IN_DIM, HIDDEN = 8, (4,)
BACKBONE = "b" * 64
REQUIRED = ("schema", "labels", "input_size", "normalisation", "backbone_fingerprint", "backbone_weights",
            "head", "training_set_fingerprint")


def make_card(**changes) -> dict:
    card = {"labels": ["normal", "pneumonia"], "threshold": 0.4, "input_size": 32,
            "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "backbone_fingerprint": BACKBONE, "backbone_weights": "random",
            "head": {"in_dim": IN_DIM, "hidden": list(HIDDEN), "dropout": 0.0},
            "training_set_fingerprint": "t" * 64}
    card.update(changes)
    return card


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build_head(IN_DIM, 2, hidden=HIDDEN, dropout=0.0).state_dict()


def save(settings: Settings, seed: int = 0, **kwargs) -> int:
    return save_model(settings, state_dict=make_state(seed), card=make_card(), train_image_ids=[],
                      val_image_ids=[], **kwargs)


def db_count(settings: Settings, what, *where) -> int:
    with session_scope(open_catalogue(settings)) as s:
        return s.scalar(select(func.count()).select_from(what).where(*where))


def champions(settings: Settings) -> list[int]:
    with session_scope(open_catalogue(settings)) as s:
        return list(s.scalars(select(Model.id).where(Model.status == "champion")))


def status_of(settings: Settings, version: int) -> str:
    with session_scope(open_catalogue(settings)) as s:
        return s.get(Model, version).status
