"""The model reference and the per-film OOD score: built from features, saved beside the head,
verified on load, and calibrated so about 1 - XRAY_OOD_QUANTILE of in-distribution films are flagged."""

from __future__ import annotations

import numpy as np
import pytest

from test_registry import make_card, make_state  # noqa: F401 - shared tiny-head helpers
from xray_core.errors import CheckpointError
from xray_core.monitor.ood import summary_line
from xray_core.monitor.reference import REFERENCE_FILE, Reference, build_reference, model_reference
from xray_core.registry.versions import load_model, save_model

DIM = 24


def features(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Rows that vary mostly in 3 directions (like a frozen backbone's features), plus small noise."""
    basis = np.random.default_rng(99).normal(size=(3, DIM))
    return (rng.normal(size=(n, 3)) @ basis + 0.05 * rng.normal(size=(n, DIM)) + 5.0 + shift).astype(np.float32)


def make_reference(quantile: float = 0.99) -> tuple[Reference, np.random.Generator]:
    rng = np.random.default_rng(0)
    x_train, x_val = features(rng, 300), features(rng, 300)
    probs = rng.dirichlet([1, 1], size=300)
    return build_reference(x_train, x_val, np.array([f"p{i // 2}" for i in range(300)]), probs,
                           rng.integers(0, 2, 300), mean=x_train.mean(0), std=x_train.std(0),
                           quantile=quantile), rng


def test_threshold_flags_about_the_quantile_of_validation_films_and_far_films_all():
    ref, rng = make_reference(0.95)
    assert np.mean(ref.val_scores > ref.threshold) <= 0.05
    fresh = ref.scores(features(rng, 400))
    assert np.mean(fresh > ref.threshold) < 0.12  # new films from the same distribution: rarely flagged
    off_axis = features(rng, 50)
    off_axis[:, :DIM // 2] += 1.0  # a shift outside the directions training varied in (border, scanner)
    assert np.all(ref.scores(off_axis) > ref.threshold)


def test_reference_round_trips_through_bytes():
    ref, rng = make_reference()
    back = Reference.from_bytes(ref.to_bytes())
    x = features(rng, 10)
    np.testing.assert_allclose(back.scores(x), ref.scores(x), rtol=1e-4)
    assert back.threshold == ref.threshold and back.quantile == 0.99 and len(back.sample) == 256
    assert len(set(back.sample_groups.tolist())) > 100  # patients, not rows
    assert ref.describe()["components"] == len(ref.variance)


def test_unreadable_reference_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match=REFERENCE_FILE):
        Reference.from_bytes(b"not a safetensors file")


def test_summary_line_names_the_counts():
    assert summary_line(37, 93) == "37 of 93 films look unlike this model's training data"


def test_reference_is_saved_verified_and_optional(settings):
    ref, _ = make_reference()
    v = save_model(settings, state_dict=make_state(), card=make_card(), train_image_ids=[], val_image_ids=[],
                   extra_files={REFERENCE_FILE: ref.to_bytes()})
    model = load_model(settings, v)
    assert len(model.card["files"][REFERENCE_FILE]) == 64
    assert model_reference(model).threshold == ref.threshold
    old = save_model(settings, state_dict=make_state(), card=make_card(), train_image_ids=[], val_image_ids=[])
    assert model_reference(load_model(settings, old)) is None  # older models: OOD "unknown"
    path = settings.models_dir / str(v) / REFERENCE_FILE
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="reference.safetensors sha256"):
        load_model(settings, v)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(settings, v)


def test_card_files_must_name_safetensors_with_hashes(settings):
    with pytest.raises(CheckpointError, match="files must map"):
        save_model(settings, state_dict=make_state(), card=make_card(files={"../x": "0" * 64}),
                   train_image_ids=[], val_image_ids=[])
