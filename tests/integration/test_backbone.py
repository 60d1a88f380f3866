"""Backbone: device choice, frozen eval-mode model, weights loading and the fingerprint contract."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from xray_core.errors import BackboneWeightsError, SettingsError
from xray_core.model.backbone import FEATURE_DIM, clear_backbone_cache, load_backbone
from xray_core.model.device import pick_device


def _batch(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- device -----------------------------------------------------------------------------------------


def test_pick_device_cpu_and_auto() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_pick_device_cuda_without_gpu_is_a_usage_error(value: str) -> None:
    with pytest.raises(SettingsError, match="no CUDA device is available; use auto or cpu"):
        pick_device(value)


@pytest.mark.parametrize("value", ["tpu", "cuda:x"])
def test_pick_device_rejects_unknown_values(value: str) -> None:
    with pytest.raises(SettingsError, match="XRAY_DEVICE"):
        pick_device(value)


# -- frozen, eval mode ------------------------------------------------------------------------------


def test_backbone_is_frozen_and_stays_in_eval_mode(settings) -> None:
    bb = load_backbone(settings)
    assert bb.random_init and bb.weights == "random" and bb.device == torch.device("cpu")
    assert not any(p.requires_grad for p in bb.features.parameters())
    bb.features.train()  # a stray train() must not switch batch norm to batch statistics
    assert not bb.features.training
    assert not any(m.training for m in bb.features.modules())
    before = {k: v.clone() for k, v in bb.features.state_dict().items()}
    calls = bb.calls
    out = bb.embed(_batch(3))
    assert bb.calls == calls + 1
    assert out.shape == (3, FEATURE_DIM) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    after = bb.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched


def test_embed_is_deterministic_and_batch_independent(settings) -> None:
    bb = load_backbone(settings)
    x = _batch(4)
    full = bb.embed(x)
    assert torch.equal(full, bb.embed(x))
    torch.testing.assert_close(bb.embed(x[:1])[0], full[0], rtol=1e-4, atol=1e-4)


# -- fingerprint ------------------------------------------------------------------------------------


def test_random_weights_are_seeded_without_touching_the_global_rng(settings) -> None:
    clear_backbone_cache()
    state = torch.random.get_rng_state()
    fp0 = load_backbone(settings).fingerprint
    assert torch.equal(state, torch.random.get_rng_state())
    clear_backbone_cache()  # rebuild from scratch: same seed must give the same weights
    assert load_backbone(settings).fingerprint == fp0
    assert load_backbone(settings.with_overrides(backbone_seed=1)).fingerprint != fp0


def test_fingerprint_follows_preprocessing_but_not_view_count(settings) -> None:
    fp = load_backbone(settings).fingerprint
    assert len(fp) == 64
    assert load_backbone(settings.with_overrides(views=7)).fingerprint == fp
    assert load_backbone(settings.with_overrides(input_size=64)).fingerprint != fp
    assert load_backbone(settings.with_overrides(aug_rotation=5.0)).fingerprint != fp


# -- weights values ---------------------------------------------------------------------------------


def test_unknown_weights_value_lists_the_allowed_ones(settings) -> None:
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone(settings.with_overrides(backbone_weights="imagenet22k"))
    msg = str(err.value)
    assert "XRAY_BACKBONE_WEIGHTS" in msg and "imagenet" in msg and "random" in msg


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.pth", "weights.txt"])
def test_broken_weights_file_is_a_clear_error(settings, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not weights" * 10)
    with pytest.raises(BackboneWeightsError, match="XRAY_BACKBONE_WEIGHTS"):
        load_backbone(settings.with_overrides(backbone_weights=str(path)))


def test_weights_with_wrong_keys_are_rejected(settings, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(BackboneWeightsError, match="XRAY_BACKBONE_WEIGHTS.*missing"):
        load_backbone(settings.with_overrides(backbone_weights=str(path)))


def test_local_weights_files_round_trip_to_the_same_fingerprint(settings, tmp_path: Path) -> None:
    """Fingerprints hash weight content: the same weights via a file share cached features."""
    from safetensors.torch import save_file

    bb = load_backbone(settings)
    state = {k: v.contiguous() for k, v in bb.features.state_dict().items()}  # "features.*" keys
    st_path = tmp_path / "w.safetensors"
    save_file(state, str(st_path))
    from_file = load_backbone(settings.with_overrides(backbone_weights=str(st_path)))
    assert from_file.fingerprint == bb.fingerprint and not from_file.random_init
    assert torch.equal(from_file.embed(_batch()), bb.embed(_batch()))

    # A .pth of a full-model state dict with the old 'norm.1' key style (as torchvision's download).
    full = {}
    for key, value in state.items():
        for old in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                key = key.replace(f".{old}{i}.", f".{old}.{i}.") if "denselayer" in key else key
        full[key] = value
    full["classifier.weight"] = torch.zeros(1000, FEATURE_DIM)
    full["classifier.bias"] = torch.zeros(1000)
    pth = tmp_path / "w.pth"
    torch.save(full, pth)
    assert load_backbone(settings.with_overrides(backbone_weights=str(pth))).fingerprint == bb.fingerprint


def test_imagenet_without_network_says_where_to_put_the_file(settings, monkeypatch) -> None:
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    clear_backbone_cache()
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone(settings.with_overrides(backbone_weights="imagenet"))
    msg = str(err.value)
    assert "XRAY_BACKBONE_WEIGHTS" in msg
    assert "densenet161-" in msg and "checkpoints" in msg  # the file name and where it goes
    assert "random" in msg


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_features_do_not_depend_on_how_images_are_batched(settings, threads, precision):
    """Byte-identical float16 features whether images are embedded alone, in pairs or all at once,
    on one thread (where every batch size gave different last bits before forwards were padded to a
    fixed size) and on two."""
    import numpy as np
    import torch

    from xray_core.model.backbone import load_backbone

    backbone = load_backbone(settings.with_overrides(embed_precision=precision))
    assert backbone.precision == precision
    # 18 images: more than one forward batch (16); on one thread a forward of 16 or more images took
    # another kernel path than smaller ones, so the whole set and its parts differed before padding
    n = 18
    x = torch.randn(n, 3, settings.input_size, settings.input_size,
                    generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = backbone.embed(x).numpy().astype(np.float16)
        for step in (1, 2, 5):
            parts = np.concatenate([backbone.embed(x[i : i + step]).numpy().astype(np.float16)
                                    for i in range(0, n, step)])
            assert np.array_equal(whole, parts), \
                f"batches of {step} changed the features on {threads} thread(s)"
    finally:
        torch.set_num_threads(before)


# -- precision --------------------------------------------------------------------------------------


def test_pick_precision_follows_the_setting_and_auto_the_hardware(monkeypatch) -> None:
    from xray_core.model import device as device_mod
    from xray_core.model.device import pick_precision

    cpu = torch.device("cpu")
    assert pick_precision("fp32", cpu) == "fp32" and pick_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(device_mod, "native_bf16", lambda d: True)
    assert pick_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(device_mod, "native_bf16", lambda d: False)
    assert pick_precision("auto", cpu) == "fp32"
    assert pick_precision("auto", torch.device("cuda")) == "fp16"  # CUDA without bf16: fp16 autocast
    with pytest.raises(SettingsError, match="XRAY_EMBED_PRECISION='fp8': use auto, fp32 or bf16"):
        pick_precision("fp8", cpu)


def test_the_setting_is_validated_at_start_up(xray_env, monkeypatch) -> None:
    from xray_core.settings import load_settings

    monkeypatch.setenv("XRAY_EMBED_PRECISION", "half")
    with pytest.raises(SettingsError, match=r"XRAY_EMBED_PRECISION=half: must be one of auto, fp32, bf16"):
        load_settings()


def test_fp32_keeps_the_fingerprint_of_before_and_bf16_gets_its_own(settings) -> None:
    """Caches and model cards from before the setting carry fp32 fingerprints computed without a
    precision field: fp32 must reproduce them, any other precision must not share them."""
    import hashlib
    import json

    from xray_core.model.backbone import ARCH, fingerprint
    from xray_core.model.preprocess import spec_dict

    fp32 = load_backbone(settings.with_overrides(embed_precision="fp32"))
    bf16 = load_backbone(settings.with_overrides(embed_precision="bf16"))
    spec = spec_dict(settings)
    before = hashlib.sha256(json.dumps({"arch": ARCH,
                                        "weights_sha256": fp32.weights_sha256, "preprocess": spec},
                                       sort_keys=True).encode()).hexdigest()
    assert fp32.fingerprint == before == fingerprint(fp32.weights_sha256, spec)
    assert fingerprint(fp32.weights_sha256, spec, "legacy", "cpu") == before  # cards without a precision
    assert fingerprint(fp32.weights_sha256, spec, "legacy", "cuda") == before  # CUDA autocast, as filed then
    assert bf16.fingerprint == fingerprint(fp32.weights_sha256, spec, "bf16") != before
    assert fingerprint(fp32.weights_sha256, spec, "bf16", "cuda") not in (before, bf16.fingerprint)
    # a true fp32 GPU forward: its own
    assert fingerprint(fp32.weights_sha256, spec, "fp32", "cuda") != before
    assert bf16.weights_sha256 == fp32.weights_sha256  # the same weights, another arithmetic
    x = _batch(4)
    a, b = fp32.embed(x), bf16.embed(x)
    assert not torch.equal(a, b)
    # bf16 keeps ~3 significant digits: the features agree to well within their own spread
    assert float((a - b).norm() / a.norm()) < 0.05
