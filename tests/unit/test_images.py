"""Decoding and validation of single image files (xray_core.data.images)."""

from __future__ import annotations

from datetime import date
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from badfiles import (
    BAD_CASES,
    CORPUS_MAX_PIXELS,
    CORPUS_MIN_SIDE,
    GOOD_CASES,
    header_bomb_png,
    make_bad_corpus,
    make_good_variants,
)
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from xray_core.data.dicom import WINDOWING_SPEC, catalogue_fields
from xray_core.data.images import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    DicomPolicy,
    decode_image,
    hamming,
    load_grayscale,
    perceptual_hash,
    sniff_format,
)
from xray_core.data.synthetic import make_xray, write_dicom
from xray_core.errors import ImageRejected, SettingsError
from xray_core.settings import Settings, load_settings

REASONS = {
    "empty_file", "not_an_image", "unsupported_format", "truncated", "decompression_bomb",
    "too_small", "constant_image", "blank_image", "unreadable_dicom", "dicom_no_pixels",
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    make_bad_corpus(root)
    return root / "normal"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good")
    make_good_variants(root, "normal")
    return root / "normal"


def _decode(data: bytes) -> DecodedImage:
    return decode_image(data, min_side=CORPUS_MIN_SIDE, max_pixels=CORPUS_MAX_PIXELS)


# ---- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file_is_rejected_with_its_reason(bad_dir: Path, name: str) -> None:
    with pytest.raises(ImageRejected) as info:
        _decode((bad_dir / name).read_bytes())
    assert info.value.reason == BAD_CASES[name], info.value.detail
    assert len(info.value.detail) > 20  # a sentence, not a bare code


def test_corpus_covers_every_reason_code() -> None:
    assert set(BAD_CASES.values()) == REASONS


def test_unsupported_format_says_what_is_allowed(bad_dir: Path) -> None:
    with pytest.raises(ImageRejected) as info:
        _decode((bad_dir / "image.gif").read_bytes())
    assert "GIF" in info.value.detail and "PNG, JPEG and DICOM" in info.value.detail


def test_bomb_is_refused_from_the_header_alone() -> None:
    # Declared 5000x5000 but only a few bytes of data: refused without decoding (no 'truncated').
    with pytest.raises(ImageRejected) as info:
        decode_image(header_bomb_png(5000, 5000), min_side=32, max_pixels=1_000_000)
    assert info.value.reason == "decompression_bomb"
    assert "5000x5000" in info.value.detail


def test_too_small_and_bomb_limits_are_the_callers(bad_dir: Path) -> None:
    tiny = (bad_dir / "tiny.png").read_bytes()
    assert decode_image(tiny, min_side=8, max_pixels=100).width == 8
    with pytest.raises(ImageRejected) as info:
        decode_image(tiny, min_side=8, max_pixels=63)
    assert info.value.reason == "decompression_bomb"
    real = (bad_dir / "bomb_real.jpeg").read_bytes()
    assert decode_image(real, min_side=32, max_pixels=5_000_000).width == 2100


def test_decoding_leaves_pil_globals_alone(bad_dir: Path, good_dir: Path) -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    for path in [*bad_dir.iterdir(), *good_dir.iterdir()]:
        try:
            _decode(path.read_bytes())
        except ImageRejected:
            pass
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before


# ---- good variants -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOOD_CASES))
def test_good_variant_decodes(good_dir: Path, name: str) -> None:
    image = _decode((good_dir / name).read_bytes())
    expected = GOOD_CASES[name]
    got = {"width": image.width, "height": image.height, "bit_depth": image.bit_depth, "format": image.format}
    assert got == expected
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (image.height, image.width)
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0


def test_exif_orientation_rotates_clockwise(good_dir: Path) -> None:
    data = (good_dir / "exif6.jpeg").read_bytes()
    stored = np.asarray(Image.open(BytesIO(data)).convert("L"), dtype=np.float32) / 255.0
    assert stored.shape == (64, 96)
    image = _decode(data)
    np.testing.assert_allclose(image.pixels, np.rot90(stored, k=-1), atol=1e-6)


def test_16bit_png_keeps_full_precision(good_dir: Path) -> None:
    data = (good_dir / "l16.png").read_bytes()
    raw = np.asarray(Image.open(BytesIO(data)))
    assert raw.dtype == np.uint16
    image = _decode(data)
    np.testing.assert_array_equal(np.rint(image.pixels * 65535.0).astype(np.uint16), raw)
    assert len(np.unique(image.pixels)) > 256  # more levels than 8 bits could hold


def test_monochrome1_is_inverted_and_rescale_keeps_range(good_dir: Path) -> None:
    mono1 = _decode((good_dir / "mono1.dcm").read_bytes())  # slope 2, intercept -1024
    mono2 = _decode((good_dir / "mono2.dcm").read_bytes())
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    assert mono1.pixels.min() == 0.0 and mono1.pixels.max() == 1.0


def test_dicom_metadata(good_dir: Path) -> None:
    image = _decode((good_dir / "mono1.dcm").read_bytes())
    assert (image.dicom_patient_id, image.view) == ("PAT-MONO1", "AP")
    no_view = _decode((good_dir / "mono2_16bit.dcm").read_bytes())
    assert no_view.view is None
    png = _decode((good_dir / "l8.png").read_bytes())
    assert (png.dicom_patient_id, png.view) == (None, None)


def test_multiframe_dicom_uses_the_first_frame(tmp_path: Path) -> None:
    frame0 = make_xray("normal", size=64, rng=np.random.default_rng(1)).astype(np.uint16) * 16
    frame1 = np.zeros_like(frame0)
    path = write_dicom(tmp_path / "multi.dcm", frame0, patient_id="P", bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = np.concatenate([frame0, frame1]).astype("<u2").tobytes()
    ds.save_as(path)
    image = _decode(path.read_bytes())
    single = _decode(write_dicom(tmp_path / "single.dcm", frame0, patient_id="P",
                                 bits_stored=12).read_bytes())
    np.testing.assert_allclose(image.pixels, single.pixels)


def test_dicom_with_wrong_pixel_length_is_unreadable(tmp_path: Path) -> None:
    frame = make_xray("normal", size=64, rng=np.random.default_rng(2)).astype(np.uint16)
    path = write_dicom(tmp_path / "short.dcm", frame, patient_id="P")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)
    with pytest.raises(ImageRejected) as info:
        _decode(path.read_bytes())
    assert info.value.reason == "unreadable_dicom"


def test_dicom_with_bad_element_length_is_unreadable(tmp_path: Path) -> None:
    # Rows (US, 2 bytes) declared 3 bytes long: pydicom raises BytesLengthException, found by fuzzing.
    frame = make_xray("normal", size=64, rng=np.random.default_rng(2)).astype(np.uint16)
    data = write_dicom(tmp_path / "x.dcm", frame, patient_id="P").read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00"
    assert data.count(rows) == 1
    with pytest.raises(ImageRejected) as info:
        _decode(data.replace(rows, b"\x28\x00\x10\x00US\x03\x00"))
    assert info.value.reason == "unreadable_dicom"


def test_load_grayscale_matches_decode_and_skips_min_side(good_dir: Path, bad_dir: Path) -> None:
    path = good_dir / "rgb.jpeg"
    np.testing.assert_array_equal(load_grayscale(path), _decode(path.read_bytes()).pixels)
    assert load_grayscale(bad_dir / "tiny.png").shape == (8, 8)
    with pytest.raises(ImageRejected):
        load_grayscale(bad_dir / "bomb_real.png", max_pixels=CORPUS_MAX_PIXELS)


def test_default_max_pixels_follows_settings() -> None:
    assert DEFAULT_MAX_PIXELS == load_settings({}).max_pixels


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(8), "png"),
        (b"\xff\xd8\xff\xe0" + bytes(8), "jpeg"),
        (bytes(128) + b"DICM" + bytes(8), "dicom"),
        (b"II*\x00" + bytes(124) + b"DICM", "dicom"),  # dual-personality TIFF/DICOM is DICOM
        (b"GIF89a" + bytes(8), "gif"),
        (b"BM" + bytes(12) + b"\x28\x00\x00\x00", "bmp"),
        (b"BMW is a car, not a bitmap", None),
        (b"II*\x00" + bytes(8), "tiff"),
        (b"MM\x00*" + bytes(8), "tiff"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
        (b"hello world", None),
        (b"", None),
        (b"\x89PNG", None),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


# ---- robustness: malformed bytes only ever raise ImageRejected -----------------------------------


def _good_bytes() -> dict[str, bytes]:
    pixels = make_xray("pneumonia", size=48, rng=np.random.default_rng(3))
    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        out[fmt.lower()] = buf.getvalue()
    return out


_GOOD = _good_bytes()
_MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", bytes(128) + b"DICM"]


def _decode_or_reject(data: bytes) -> None:
    try:
        image = decode_image(data, min_side=16, max_pixels=1_000_000)
    except ImageRejected as exc:
        assert exc.reason in REASONS
    else:
        assert 0.0 <= image.pixels.min() <= image.pixels.max() <= 1.0


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each garbage element
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(magic=st.sampled_from(_MAGICS), tail=st.binary(max_size=600))
def test_garbage_after_magic_is_rejected_not_crashed(magic: bytes, tail: bytes) -> None:
    _decode_or_reject(magic + tail)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each garbage element
@hsettings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(sorted(_GOOD)), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.integers(0, 10**6), max_size=4))
def test_cut_or_bit_flipped_files_are_rejected_not_crashed(fmt: str, cut: float, flips: list[int]) -> None:
    data = bytearray(_GOOD[fmt][: max(1, int(len(_GOOD[fmt]) * cut))])
    for pos in flips:
        data[pos % len(data)] ^= 0x5A
    _decode_or_reject(bytes(data))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each garbage element
@hsettings(max_examples=40, deadline=None)
@given(cut=st.integers(132, 4000), flips=st.lists(st.integers(132, 10**6), max_size=3))
def test_cut_or_bit_flipped_dicom_is_rejected_not_crashed(tmp_path_factory, cut: int,
                                                          flips: list[int]) -> None:
    data = bytearray(_dicom_bytes(tmp_path_factory)[:cut])
    for pos in flips:
        data[pos % len(data)] ^= 0x5A
    _decode_or_reject(bytes(data))


_DICOM_CACHE: dict[str, bytes] = {}


def _dicom_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if "d" not in _DICOM_CACHE:
        pixels = make_xray("normal", size=40, rng=np.random.default_rng(4)).astype(np.uint16) * 16
        path = write_dicom(tmp_path_factory.mktemp("dcm") / "x.dcm", pixels, patient_id="P", bits_stored=12)
        _DICOM_CACHE["d"] = path.read_bytes()
    return _DICOM_CACHE["d"]


# ---- DICOM: modality, body part, windowing, facts (xray_core.data.dicom) -------------------------


def _film(tmp_path: Path, name: str = "f.dcm", **kwargs) -> bytes:
    pixels = make_xray("normal", size=64, rng=np.random.default_rng(11)).astype(np.uint16) * 16
    return write_dicom(tmp_path / name, pixels, patient_id="P", bits_stored=12, **kwargs).read_bytes()


@pytest.mark.parametrize(("modality", "policy", "reason"), [
    ("CT", DicomPolicy(), "wrong_modality"),
    ("MR", DicomPolicy(("CR", "DX", "MG")), "wrong_modality"),
    ("DX", DicomPolicy(), None),
    ("CT", DicomPolicy(()), None),  # XRAY_ALLOWED_MODALITIES=any
    ("CT", None, None),  # decode_stored / predict: no policy
])
def test_modality_policy(tmp_path: Path, modality: str, policy: DicomPolicy | None,
                         reason: str | None) -> None:
    data = _film(tmp_path, modality=modality)
    if reason is None:
        assert decode_image(data, min_side=32, max_pixels=10**6, policy=policy).dicom.modality == modality
    else:
        with pytest.raises(ImageRejected) as info:
            decode_image(data, min_side=32, max_pixels=10**6, policy=policy)
        assert info.value.reason == reason and modality in info.value.detail
        assert "XRAY_ALLOWED_MODALITIES" in info.value.detail


@pytest.mark.parametrize("body_part", ["ABDOMEN", None])
def test_require_chest_refuses_other_or_missing_body_parts(tmp_path: Path, body_part: str | None) -> None:
    data = _film(tmp_path, body_part=body_part)
    assert decode_image(data, min_side=32, max_pixels=10**6,
                        policy=DicomPolicy()).dicom.body_part == body_part
    with pytest.raises(ImageRejected) as info:
        decode_image(data, min_side=32, max_pixels=10**6, policy=DicomPolicy(require_chest=True))
    assert info.value.reason == "not_chest" and "XRAY_REQUIRE_CHEST" in info.value.detail


def _pixels(data: bytes) -> tuple[np.ndarray, str]:
    image = decode_image(data, min_side=32, max_pixels=10**6)
    return image.pixels, image.dicom.windowing


def test_window_centre_width_is_applied(tmp_path: Path) -> None:
    plain, method = _pixels(_film(tmp_path, "a.dcm"))
    assert method == "percentile"
    raw = make_xray("normal", size=64, rng=np.random.default_rng(11)).astype(np.float64) * 16
    centre, width = 1600.0, 1200.0
    windowed, method = _pixels(_film(tmp_path, "b.dcm", window=(centre, width)))
    assert method == "window"
    # PS3.3 C.11.2.1.2.1 linear function, then stretched to [0, 1] by decode's own min..max.
    expected = np.clip((raw - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(windowed, expected, atol=1e-3)
    assert not np.allclose(windowed, plain, atol=1e-2)


def test_voi_lut_sequence_wins_and_is_applied(tmp_path: Path) -> None:
    plain, _ = _pixels(_film(tmp_path, "a.dcm"))
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # an inverting LUT: visible in the result
    via_lut, method = _pixels(_film(tmp_path, "b.dcm", voi_lut=lut, window=(2000, 4000)))
    assert method == "voi_lut"
    assert np.corrcoef(via_lut.ravel(), plain.ravel())[0, 1] < -0.99


@pytest.mark.parametrize(("photometric", "shape"), [
    ("MONOCHROME2", "INVERSE"), ("MONOCHROME1", None), ("MONOCHROME1", "INVERSE"),
])
def test_monochrome1_and_inverse_invert_once(tmp_path: Path, photometric: str, shape: str | None) -> None:
    plain, _ = _pixels(_film(tmp_path, "a.dcm"))
    inverted, method = _pixels(_film(tmp_path, "b.dcm", photometric=photometric,
                                     presentation_lut_shape=shape))
    assert method == "percentile+invert"
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def test_percentile_window_ignores_a_few_saturated_pixels(tmp_path: Path) -> None:
    pixels = make_xray("normal", size=64, rng=np.random.default_rng(11)).astype(np.uint16) * 16
    burned = pixels.copy()
    burned[0, :5] = 4095  # burned-in text / collimator edge: 5 of 4096 pixels
    a, _ = _pixels(write_dicom(tmp_path / "a.dcm", pixels, patient_id="P", bits_stored=12).read_bytes())
    b, _ = _pixels(write_dicom(tmp_path / "b.dcm", burned, patient_id="P", bits_stored=12).read_bytes())
    # A min-max window would squash the film into the lower part of the range; percentiles do not.
    assert abs(float(np.median(a[1:])) - float(np.median(b[1:]))) < 0.02


def test_facts_and_catalogue_fields(tmp_path: Path) -> None:
    data = _film(tmp_path, tags={"PatientSex": "M", "PatientAge": "006M", "StudyDate": "20240229",
                                 "Manufacturer": "ACME", "InstitutionName": "Clinic", "Laterality": "L",
                                 "ImagerPixelSpacing": ["0.2", "0.2"]})
    facts = decode_image(data, min_side=32, max_pixels=10**6).dicom
    assert (facts.sex, facts.age_years, facts.study_date) == ("M", 0.5, date(2024, 2, 29))
    assert (facts.laterality, facts.pixel_spacing, facts.institution) == ("L", 0.2, "Clinic")
    hashed = catalogue_fields(facts, salt="a", site_mode="hash")
    assert (hashed["device"] == "ACME" and hashed["site"].startswith("site-")
            and "Clinic" not in hashed["site"])
    assert hashed["study_hash"] != catalogue_fields(facts, salt="b", site_mode="hash")["study_hash"]
    assert catalogue_fields(facts, salt="a", site_mode="name")["site"] == "Clinic"
    assert catalogue_fields(facts, salt="a", site_mode="off")["site"] is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # writing the malformed '45' on purpose
@pytest.mark.parametrize(("raw", "years"),
                         [("045Y", 45.0), ("006M", 0.5), ("052W", 0.997), ("", None), ("45", None)])
def test_dicom_age_strings(tmp_path: Path, raw: str, years: float | None) -> None:
    data = _film(tmp_path, tags={"PatientAge": raw} if raw else None)
    assert decode_image(data, min_side=32, max_pixels=10**6).dicom.age_years == years


@pytest.mark.parametrize(("env", "field", "value"), [
    ({}, "allowed_modalities", ("CR", "DX")),
    ({"XRAY_ALLOWED_MODALITIES": "any"}, "allowed_modalities", ()),
    ({"XRAY_ALLOWED_MODALITIES": "dx, mg"}, "allowed_modalities", ("DX", "MG")),
    ({"XRAY_REQUIRE_CHEST": "yes"}, "require_chest", True),
    ({}, "dicom_store", "deidentified"),
    ({}, "site_from_dicom", "hash"),
])
def test_dicom_settings(tmp_path: Path, env: dict, field: str, value: object) -> None:
    assert getattr(load_settings({"XRAY_HOME": str(tmp_path), **env}), field) == value


@pytest.mark.parametrize(("var", "raw", "allowed"), [
    ("XRAY_ALLOWED_MODALITIES", "CR;DX", "must be any, or comma-separated DICOM Modality codes"),
    ("XRAY_SITE_FROM_DICOM", "clear", "must be one of hash, name, off"),
    ("XRAY_DICOM_STORE", "raw", "must be one of deidentified, original"),
])
def test_bad_dicom_settings_say_what_is_allowed(tmp_path: Path, var: str, raw: str, allowed: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"XRAY_HOME": str(tmp_path), var: raw})
    assert var in str(info.value) and allowed in str(info.value)


def test_windowing_is_in_the_preprocessing_fingerprint() -> None:
    from xray_core.model.preprocess import spec_dict

    assert spec_dict(Settings(**_PATHS))["dicom_windowing"] == WINDOWING_SPEC


_PATHS = {k: Path("/x")
          for k in ("home", "store_dir", "features_dir", "models_dir", "reports_dir", "quarantine_dir")}
_PATHS.update(database_url="sqlite://", incoming_dir=None)


# ---- perceptual hash -----------------------------------------------------------------------------


def test_phash_is_a_signed_int64_and_deterministic() -> None:
    pixels = make_xray("normal", size=64, rng=np.random.default_rng(0)) / 255.0
    h = perceptual_hash(pixels)
    assert isinstance(h, int) and -(2**63) <= h < 2**63
    assert perceptual_hash(pixels) == h


def test_phash_tolerates_noise_and_resizing_but_tells_patients_apart() -> None:
    rng = np.random.default_rng(7)
    images = [
        make_xray(label, size=64, rng=np.random.default_rng(seed), patient_seed=seed)
        for seed, label in enumerate(["normal", "pneumonia", "normal", "covid", "pneumonia", "normal"])
    ]
    hashes = [perceptual_hash(img / 255.0) for img in images]
    for img, h in zip(images, hashes):
        noisy = np.clip(img / 255.0 + rng.normal(0, 0.02, img.shape), 0, 1)
        small = Image.fromarray(np.uint8(noisy * 255)).resize((48, 48), Image.Resampling.BILINEAR)
        resized = np.asarray(small)
        assert hamming(h, perceptual_hash(resized / 255.0)) <= 10
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert hamming(hashes[i], hashes[j]) > 10


def test_phash_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        perceptual_hash(np.zeros((4, 4, 3)))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(0, 0, 0), (-1, 0, 64), (-1, -1, 0), (-(2**63), 0, 1),
     (2**63 - 1, -(2**63), 64), (-2, -1, 1), (5, 3, 2)],
)
def test_hamming(a: int, b: int, expected: int) -> None:
    assert hamming(a, b) == expected == hamming(b, a)


@given(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
def test_hamming_counts_differing_bits_of_the_64_bit_pattern(a: int, b: int) -> None:
    ua, ub = a % 2**64, b % 2**64
    assert hamming(a, b) == sum(((ua >> i) & 1) != ((ub >> i) & 1) for i in range(64))
