"""Hostile input through a real ingest: every kind is one test case of :data:`KINDS`.

Each case starts from a catalogue that already holds one image, writes one kind of hostile input
next to two good images (folder layout, or a manifest naming them), runs ``ingest_source`` and checks:
the hostile files get rejection rows with the right reason (or, for a malformed manifest, a clean
ManifestError and nothing written at all), the good files of the same batch are catalogued, the
earlier image and every stored original are intact (sha256 re-checked), every path the catalogue
stores is printable text, and nothing was read that must not be (links out of the source root).

Separate tests cover what does not fit a table row: the million-row manifest (streamed), DICOM patient
identifiers (never in clear in the catalogue, status, summary, quarantine names or logs) and CSV
injection in prediction output.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from badfiles import blank_film, header_bomb_png, make_bad_corpus
from conftest import PROJECT, TEST_ENV, sha, snapshot
from conftest import fetch as rows
from PIL import Image as PILImage
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRBigEndian, JPEGLSLossless

from db import dispose_engines
from db.schema import Image, Rejection, Source
from xray_cli.main import main
from xray_core.data.ingest import ingest_source
from xray_core.data.synthetic import make_xray, write_dicom
from xray_core.errors import ManifestError, UsageError
from xray_core.settings import Settings, load_settings, reset_settings

# --------------------------------------------------------------------------- helpers


def png_bytes(seed: int, size: int = 64) -> bytes:
    arr = make_xray("normal", size=size, rng=np.random.default_rng(seed), patient_seed=seed)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    arr = make_xray("normal", size=64, rng=np.random.default_rng(seed), patient_seed=seed)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def put(path: Path | bytes, data: bytes) -> bytes:
    """Write ``data`` at ``path`` (a str path or a bytes path for non-UTF-8 names); return it."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return data


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare ``width`` x ``height``."""
    data = bytearray(jpeg_bytes(7))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG with a valid-CRC IHDR declaring ``width`` x ``height`` (up to 2**31 - 1 each)."""
    return header_bomb_png(width, height)


def png_with_text_bomb() -> bytes:
    """A valid small PNG carrying a zTXt chunk that inflates to 64 MB of text."""
    good = png_bytes(8)
    text = b"Comment\x00\x00" + zlib.compress(b"A" * (64 * 1024 * 1024), 9)
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    iend = good.rindex(b"IEND") - 4
    return good[:iend] + chunk + good[iend:]


def dicom_bytes(patient_id: str, *, patient_name: str | None = None, **changes) -> bytes:
    """An uncompressed 64x64 DICOM (Explicit VR Little Endian) with header fields changed."""
    arr = (np.add.outer(np.arange(64), np.arange(64)) * 30).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        ds = pydicom.dcmread(write_dicom(Path(tmp) / "x.dcm", arr, patient_id=patient_id, bits_stored=16))
    if patient_name is not None:
        ds.PatientName = patient_name
    for key, value in changes.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def dicom_big_endian() -> bytes:
    """The same kind of image in Explicit VR Big Endian (retired, but files with it exist)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("BE-1")))
    arr = (np.add.outer(np.arange(64), np.arange(64)) * 30).astype(">u2")
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = arr.tobytes()
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    return out.getvalue()


def dicom_jpeg_ls() -> bytes:
    """A DICOM in JPEG-LS whose stream is garbage: the decoder is installed (issue 17) and refuses it."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("JLS-1")))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(100)])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_manifest(root: Path, table: list[list[str]], header: tuple[str, ...] = ("file", "label")) -> Path:
    manifest = root / "manifest.csv"
    root.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([list(header), *table])
    return manifest


GOOD = ("normal/good0.png", "normal/good1.png")  # written by every case, distinct bytes


# --------------------------------------------------------------------------- the table


@dataclass
class Ctx:
    """What a case's builder gets and leaves behind."""

    src: Path  # the source folder (folder layout, or the manifest's folder)
    outside: Path  # a folder beside the source, for things that must never be read
    manifest: Path | None = None
    never_read: list[Path] = field(default_factory=list)  # files whose bytes ingest must not read
    facts: dict = field(default_factory=dict)  # anything a check needs later


@dataclass
class Kind:
    build: Callable[[Ctx], None]
    rejected: dict[str, str] = field(default_factory=dict)  # printable path suffix -> reason
    added: int = 0  # images the hostile part adds besides the two good ones
    manifest_error: str | None = None  # the ManifestError message fragment, when the whole ingest fails
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Ctx, Settings, object], None] | None = None


def _badfile(name: str) -> Callable[[Ctx], None]:
    """One file of the shared bad corpus (tests/badfiles.py), moved into the source's label folder."""

    def build(ctx: Ctx) -> None:
        corpus = ctx.outside / "corpus"
        make_bad_corpus(corpus, label="normal")
        put(ctx.src / "normal" / name, (corpus / "normal" / name).read_bytes())

    return build


def _file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Ctx], None]:
    def build(ctx: Ctx) -> None:
        put(ctx.src / name, data() if callable(data) else data)

    return build


def _manifest_rows(*table: list[str], header: tuple[str, ...] = ("file", "label")) -> Callable[[Ctx], None]:
    """A manifest naming the two good files, then ``table``'s rows (``{outside}`` is substituted)."""

    def build(ctx: Ctx) -> None:
        cells = [[c.replace("{outside}", str(ctx.outside)) for c in row] for row in table]
        good = [[g, "normal"] + [""] * (len(header) - 2) for g in GOOD]
        ctx.manifest = write_manifest(ctx.src, [*good, *cells], header)

    return build


def _symlink_outside(ctx: Ctx) -> None:
    secret = put(ctx.outside / "secret.png", png_bytes(50))
    put(ctx.outside / "nested" / "deep.png", png_bytes(51))
    (ctx.src / "normal" / "link_out.png").symlink_to(ctx.outside / "secret.png")
    (ctx.src / "normal" / "linked_dir").symlink_to(ctx.outside / "nested", target_is_directory=True)
    ctx.never_read += [ctx.outside / "secret.png", ctx.outside / "nested" / "deep.png"]
    ctx.facts["secret_sha"] = sha(secret)


def _check_secret_absent(ctx: Ctx, settings: Settings, summary) -> None:
    shas = {i.sha256 for i in rows(settings, Image)} | {r.sha256 for r in rows(settings, Rejection)}
    assert ctx.facts["secret_sha"] not in shas
    (rej,) = [r for r in rows(settings, Rejection) if r.path.endswith("link_out.png")]
    assert rej.sha256 is None and rej.quarantine_path is None  # never read, never copied


def _cyclic_links(ctx: Ctx) -> None:
    (ctx.src / "normal" / "up").symlink_to(ctx.src, target_is_directory=True)  # a folder linking to its root
    (ctx.src / "normal" / "sub").mkdir()
    (ctx.src / "normal" / "sub" / "parent").symlink_to("..", target_is_directory=True)
    (ctx.src / "normal" / "self.png").symlink_to(ctx.src / "normal" / "self.png")  # a file linking to itself
    (ctx.src / "normal" / "ping.png").symlink_to(ctx.src / "normal" / "pong.png")
    (ctx.src / "normal" / "pong.png").symlink_to(ctx.src / "normal" / "ping.png")


def _deep_link_chain(ctx: Ctx) -> None:
    """Chains of links to a good file: 5 deep resolves (a duplicate), 60 deep is past the OS's limit."""
    for name, depth in (("short", 5), ("long", 60)):
        previous = ctx.src / GOOD[0]
        for i in range(depth):
            link = ctx.src / "normal" / f"{name}{i:02d}.png"
            link.symlink_to(previous)
            previous = link
        ctx.facts[name] = previous.name


def _deep_folders(ctx: Ctx) -> None:
    folder = ctx.src / "normal"
    for i in range(100):
        folder = folder / f"d{i}"
    put(folder / "deep.png", png_bytes(60))


def _non_utf8_name(ctx: Ctx) -> None:
    label = os.fsencode(ctx.src / "normal")
    put(os.path.join(label, b"\xff\xfe.png"), png_bytes(61))  # a good image with a Latin-1-ish name
    put(os.path.join(label, b"caf\xe9.png"), b"")  # a bad one, so its path lands in a rejection row


def _check_non_utf8(ctx: Ctx, settings: Settings, summary) -> None:
    names = {i.original_name for i in rows(settings, Image)}
    assert "normal/\\xff\\xfe.png" in names
    (rej,) = rows(settings, Rejection)
    assert rej.path.endswith("normal/caf\\xe9.png")
    quarantined = settings.home / rej.quarantine_path
    assert quarantined.is_file() and quarantined.name.isascii()
    json.dumps(summary.as_dict(), ensure_ascii=False).encode("utf-8")  # the summary prints too


def _non_utf8_label(ctx: Ctx) -> None:
    put(os.path.join(os.fsencode(ctx.src), b"norm\xe4l", b"a.png"), png_bytes(62))


def _long_names(ctx: Ctx) -> None:
    good_name = "g" * 251 + ".png"  # 255 bytes, the longest name Linux allows
    bad_name = "b" * 251 + ".png"
    put(ctx.src / "normal" / good_name, png_bytes(63))
    put(ctx.src / "normal" / bad_name, b"not an image, but a long name")
    ctx.facts["names"] = (good_name, bad_name)


def _check_long_names(ctx: Ctx, settings: Settings, summary) -> None:
    good_name, bad_name = ctx.facts["names"]
    assert f"normal/{good_name}" in {i.original_name for i in rows(settings, Image)}
    (rej,) = rows(settings, Rejection)
    assert (len(Path(rej.quarantine_path).name.encode()) <= 255
            and (settings.home / rej.quarantine_path).is_file())


def _control_chars(ctx: Ctx) -> None:
    put(ctx.src / "normal" / "new\nline\x1b[31m.png", png_bytes(64))


def _check_control_chars(ctx: Ctx, settings: Settings, summary) -> None:
    names = {i.original_name for i in rows(settings, Image)}
    assert "normal/new\\x0aline\\x1b[31m.png" in names  # escaped: nothing for a terminal to act on


def _check_no_label_path(ctx: Ctx, settings: Settings, summary) -> None:
    """A label is never used as a path: no file or folder under XRAY_HOME is named after one."""
    names = {p.name for p in settings.home.rglob("*")}
    assert not names & {"a", "b", "x\\y", "calc'!A0"}
    assert not (settings.home.parent / "b").exists()


def _fifo(ctx: Ctx) -> None:
    os.mkfifo(ctx.src / "normal" / "pipe.png")  # reading it would block forever


def _sql_name(ctx: Ctx) -> None:
    put(ctx.src / "normal" / "x'); DROP TABLE images;--.png", png_bytes(65))


def _conflict(ctx: Ctx) -> None:
    put(ctx.src / "pneumonia" / "again.png", (ctx.src / GOOD[1]).read_bytes())


def _dicom_with_identifiers(ctx: Ctx) -> None:
    put(ctx.src / "normal" / "scan1.dcm", dicom_bytes("Doe^John-12345", patient_name="Doe^John"))


def _check_dicom_hashed(ctx: Ctx, settings: Settings, summary) -> None:
    (img,) = [i for i in rows(settings, Image) if i.format == "dicom"]
    assert img.patient_id.startswith("dcm-") and "12345" not in img.patient_id


def _big_endian(ctx: Ctx) -> None:
    put(ctx.src / "normal" / "be.dcm", dicom_big_endian())


def _check_big_endian(ctx: Ctx, settings: Settings, summary) -> None:
    (img,) = [i for i in rows(settings, Image) if i.format == "dicom"]
    assert (img.width, img.height) == (64, 64)


def _check_dangling_link_heals(ctx: Ctx, settings: Settings, summary) -> None:
    """Recorded as missing, not as a bad file: once its target exists, the next ingest takes it."""
    target = put(ctx.src / "nowhere.png", png_bytes(66))
    again = ingest_source(ctx.src, settings=settings)
    assert again.added == 1 and sha(target) in {i.sha256 for i in rows(settings, Image)}


def _check_fifo(ctx: Ctx, settings: Settings, summary) -> None:
    (rej,) = rows(settings, Rejection)
    assert "regular file" in rej.detail and rej.quarantine_path is None


KINDS: dict[str, Kind] = {
    # ---- the foundation list
    "empty_file": Kind(_badfile("empty.png"), {"empty.png": "empty_file"}),
    "truncated_png": Kind(_badfile("truncated.png"), {"truncated.png": "truncated"}),
    "truncated_jpeg": Kind(_badfile("truncated.jpeg"), {"truncated.jpeg": "truncated"}),
    "not_an_image": Kind(_badfile("text.png"), {"text.png": "not_an_image"}),
    "unsupported_format": Kind(
        lambda ctx: [_badfile(n)(ctx) for n in ("image.gif", "image.bmp", "image.tiff", "image.webp")],
        {n: "unsupported_format" for n in ("image.gif", "image.bmp", "image.tiff", "image.webp")}),
    "too_small": Kind(_badfile("tiny.png"), {"tiny.png": "too_small"}),
    "constant_image": Kind(_badfile("constant.png"), {"constant.png": "constant_image"}),
    "decompression_bomb_real_pixels": Kind(
        lambda ctx: [_badfile(n)(ctx) for n in ("bomb_real.png", "bomb_real.jpeg")],
        {"bomb_real.png": "decompression_bomb", "bomb_real.jpeg": "decompression_bomb"},
        env={"XRAY_MAX_PIXELS": "4000000"}),
    "unreadable_dicom": Kind(_badfile("garbage.dcm"), {"garbage.dcm": "unreadable_dicom"}),
    "dicom_without_pixel_data": Kind(_badfile("nopixels.dcm"), {"nopixels.dcm": "dicom_no_pixels"}),
    "unknown_label": Kind(_file("covid/a.png", png_bytes(70)), {"covid/a.png": "unknown_label"},
                          env={"XRAY_LABELS": "normal,pneumonia"}),
    "label_conflict": Kind(_conflict, {"pneumonia/again.png": "label_conflict"}),
    "manifest_missing_file": Kind(_manifest_rows(["img/missing.png", "normal"]),
                                  {"img/missing.png": "missing_file"}),
    "manifest_malformed_ragged_row": Kind(
        _manifest_rows(["normal/good0.png", "normal", "extra cell"]),
        manifest_error="more cells than header"),
    "manifest_not_utf8": Kind(
        lambda ctx: (_manifest_rows()(ctx),
                     ctx.manifest.write_bytes(ctx.manifest.read_bytes() + b"n\xe9w.png,normal\n")),
        manifest_error="not valid UTF-8"),
    "manifest_missing_columns": Kind(
        lambda ctx: setattr(ctx, "manifest", write_manifest(ctx.src, [["normal/good0.png"]], ("path",))),
        manifest_error="lacks column(s) file, label"),
    # ---- decompression bombs by declared size
    "png_declared_bomb_100000x100000": Kind(_file("normal/bomb.png", header_bomb_png()),
                                            {"bomb.png": "decompression_bomb"}),
    "png_declared_2pow31_minus_1_squared": Kind(
        _file("normal/huge.png", png_declaring(2**31 - 1, 2**31 - 1)), {"huge.png": "decompression_bomb"}),
    "jpeg_declared_bomb_65535x65535": Kind(
        _file("normal/bomb.jpeg", jpeg_declaring(65535, 65535)), {"bomb.jpeg": "decompression_bomb"}),
    "jpeg_declared_above_xray_max_pixels": Kind(
        _file("normal/big.jpeg", jpeg_declaring(15000, 10000)), {"big.jpeg": "decompression_bomb"},
        env={"XRAY_MAX_PIXELS": "4000000"}),
    "dicom_declared_bomb_rows_columns": Kind(
        _file("normal/bomb.dcm", lambda: dicom_bytes("BOMB-1", Rows=65535, Columns=65535)),
        {"bomb.dcm": "decompression_bomb"}),
    "png_ztxt_text_bomb": Kind(_file("normal/text_bomb.png", png_with_text_bomb),
                               {"text_bomb.png": "decompression_bomb"}),
    "file_over_xray_max_file_bytes": Kind(_file("normal/large.png", png_bytes(71, size=512)),
                                          {"large.png": "file_too_large"},
                                          env={"XRAY_MAX_FILE_BYTES": "100000"}),
    # ---- links and names
    "symlink_outside_root": Kind(_symlink_outside, {"link_out.png": "outside_root",
                                                    "linked_dir": "outside_root"},  # a linked folder
                                 check=_check_secret_absent),
    "cyclic_symlinks": Kind(_cyclic_links, {"self.png": "missing_file", "ping.png": "missing_file",
                                            "pong.png": "missing_file"}),
    "deeply_nested_symlink_chain": Kind(_deep_link_chain, {"long59.png": "missing_file", **{
        f"long{i:02d}.png": "missing_file" for i in range(40, 59)}}),
    "deeply_nested_folders": Kind(_deep_folders, added=1),
    "dangling_symlink": Kind(lambda c: (c.src / "normal" / "gone.png").symlink_to(c.src / "nowhere.png"),
                             {"gone.png": "missing_file"}, check=_check_dangling_link_heals),
    "named_pipe": Kind(_fifo, {"pipe.png": "not_an_image"}, check=_check_fifo),
    "non_utf8_file_name": Kind(_non_utf8_name, {"caf\\xe9.png": "empty_file"},
                               added=1, check=_check_non_utf8),
    "non_utf8_label_folder": Kind(_non_utf8_label, {"norm\\xe4l/a.png": "unknown_label"}),
    "file_name_255_bytes": Kind(_long_names, {"b" * 251 + ".png": "not_an_image"}, added=1,
                                check=_check_long_names),
    "control_characters_in_name": Kind(_control_chars, added=1, check=_check_control_chars),
    "sql_in_file_name": Kind(_sql_name, added=1),
    "homoglyph_label_folder": Kind(_file("n\u043ermal/a.png", png_bytes(72)),
                                   {"n\u043ermal/a.png": "unknown_label"}),
    # ---- manifests
    "manifest_dotdot_traversal": Kind(_manifest_rows(["../outside/secret.png", "normal"],
                                                     ["img/../../outside/secret.png", "normal"]),
                                      {"../outside/secret.png": "outside_root"}),
    "manifest_absolute_path": Kind(_manifest_rows(["{outside}/secret.png", "normal"],
                                                  ["/etc/passwd", "normal"]),
                                   {"outside/secret.png": "outside_root", "/etc/passwd": "outside_root"}),
    "manifest_link_inside_pointing_outside": Kind(
        lambda ctx: (_manifest_rows(["normal/link.png", "normal"])(ctx),
                     (ctx.src / "normal" / "link.png").symlink_to(ctx.outside / "secret.png")),
        {"normal/link.png": "outside_root"}),
    "manifest_hostile_cells": Kind(
        _manifest_rows(["img/x\x00y.png", "normal"], ["a" * 5000 + ".png", "normal"], ["normal", "normal"],
                       ["normal/self.png", "normal"]),
        {"x\\x00y.png": "missing_file", "a" * 100 + ".png": "missing_file", "/normal": "missing_file",
         "normal/self.png": "missing_file"}),
    "csv_injection_label": Kind(_manifest_rows(["normal/good0.png", "=cmd|' /C calc'!A0"],
                                               ["normal/good1.png", "@SUM(1+1)*cmd|' /C calc'!A0"]),
                                {"good0.png": "unknown_label", "good1.png": "unknown_label"},
                                check=_check_no_label_path),
    "label_with_path_separators": Kind(
        _manifest_rows(["normal/good0.png", "a/b"], ["normal/good0.png", ".."], ["normal/good1.png", "x\\y"],
                       ["normal/good1.png", "../../b"]),
        {"good0.png": "unknown_label", "good1.png": "unknown_label"}, check=_check_no_label_path),
    # ---- DICOM
    "dicom_unsupported_compressed_syntax": Kind(
        lambda ctx: (_badfile("mpeg2.dcm")(ctx), put(ctx.src / "normal" / "jpegls.dcm", dicom_jpeg_ls())),
        {"mpeg2.dcm": "unsupported_format", "jpegls.dcm": "unreadable_dicom"}),
    "dicom_explicit_big_endian": Kind(_big_endian, added=1, check=_check_big_endian),
    "dicom_with_patient_name_and_id": Kind(_dicom_with_identifiers, added=1, check=_check_dicom_hashed),
}

# Manifest cases whose rows name the same file several times count it once per row.
_ROW_COUNTS = {"manifest_dotdot_traversal": {"outside_root": 2},
               "manifest_link_inside_pointing_outside": {"outside_root": 1},
               "csv_injection_label": {"unknown_label": 2},
               "label_with_path_separators": {"unknown_label": 4}}


# --------------------------------------------------------------------------- round two (issue 15)
# Ingest kinds that go through the table above, then attacks on the other commands, each a test of
# its own (ATTACKS). Together with KINDS they cover every attack of the adversarial pass.


def _long_path_folder(ctx: Ctx) -> None:
    """A folder whose full path is longer than PATH_MAX (4096): os.walk cannot list it. Built with
    dir_fd so that no call sees the whole path."""
    fd = os.open(ctx.src / "normal", os.O_RDONLY)
    try:
        for i in range(18):
            name = f"{i:02d}" + "x" * 248
            os.mkdir(name, dir_fd=fd)
            new = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
        with open(os.open("lost.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(png_bytes(80))
    finally:
        os.close(fd)


def _link_across_labels(ctx: Ctx) -> None:
    put(ctx.src / "pneumonia" / "b.png", png_bytes(81))
    (ctx.src / "normal" / "l.png").symlink_to(Path("..") / "pneumonia" / "b.png")
    ctx.facts["real"] = sha((ctx.src / "pneumonia" / "b.png").read_bytes())


def _check_link_across_labels(ctx: Ctx, settings: Settings, summary) -> None:
    (img,) = [i for i in rows(settings, Image) if i.sha256 == ctx.facts["real"]]
    # the real file keeps its folder's label; nothing quarantined as a conflict
    assert img.label == "pneumonia"
    assert "label_conflict" not in {r.reason for r in rows(settings, Rejection)}


def _check_long_path(ctx: Ctx, settings: Settings, summary) -> None:
    (rej,) = rows(settings, Rejection)
    assert "cannot be listed" in rej.detail and rej.quarantine_path is None


KINDS.update({
    "manifest_duplicate_file_column": Kind(
        _manifest_rows(["pneumonia/p.png", "pneumonia", "normal/good0.png"],
                       header=("file", "label", "file")),
        manifest_error="duplicate column(s) 'file'"),
    "manifest_duplicate_label_column": Kind(
        _manifest_rows(["normal/good0.png", "pneumonia", "normal"], header=("file", "label", "label")),
        manifest_error="duplicate column(s) 'label'"),
    "manifest_duplicate_column_other_case": Kind(
        _manifest_rows(["normal/good0.png", "normal", "P1"], header=("file", "label", "File")),
        manifest_error="duplicate column(s) 'file'"),
    "manifest_near_miss_column": Kind(  # a misspelt patient_id must not pass silently (issue 25)
        _manifest_rows(["normal/good0.png", "normal", "P1"], header=("file", "label", "patientid")),
        manifest_error="column 'patientid' looks like 'patient_id': rename it or map it with --columns"),
    "path_longer_than_path_max": Kind(_long_path_folder, {"xxxx": "unreadable_path"}, check=_check_long_path),
    "symlink_into_another_label_folder": Kind(_link_across_labels, {"normal/l.png": "link_across_labels"},
                                              added=1, check=_check_link_across_labels),
})

# ---- manifests as exported (issue 25): other columns are kept as attributes, within bounds


def _check_attribute_escaped(ctx: Ctx, settings: Settings, summary) -> None:
    (img,) = [i for i in rows(settings, Image) if i.original_name == "normal/esc.png"]
    assert img.attributes == {"notes": "a\\x1b[2Jb"}  # the terminal escape stored as visible text


KINDS.update({
    "manifest_65_attribute_columns": Kind(
        _manifest_rows(header=("file", "label", *(f"c{i}" for i in range(65)))),
        manifest_error="has 65 columns besides the known ones; at most 64 are kept as attributes"),
    "manifest_column_name_with_terminal_escape": Kind(
        _manifest_rows(header=("file", "label", "notes\x1b[2J")), manifest_error="holds control characters"),
    "manifest_attribute_value_of_5000_characters": Kind(
        lambda ctx: (put(ctx.src / "normal" / "long.png", png_bytes(120)),
                     _manifest_rows(["normal/long.png", "normal", "n" * 5000],
                                    header=("file", "label", "notes"))(ctx)),
        {"long.png": "bad_metadata"}),
    "manifest_attribute_value_with_terminal_escape": Kind(
        lambda ctx: (put(ctx.src / "normal" / "esc.png", png_bytes(121)),
                     _manifest_rows(["normal/esc.png", "normal", "a\x1b[2Jb"],
                                    header=("file", "label", "notes"))(ctx)),
        added=1, check=_check_attribute_escaped),
})

# ---- round three: quarantine (table rows; issue 23 items 2 and 7)


def _linked_label_folder_outside(ctx: Ctx) -> None:
    """A whole label folder that is a link to a folder outside the source root."""
    put(ctx.outside / "films" / "x.png", png_bytes(110))
    (ctx.src / "covid").symlink_to(ctx.outside / "films", target_is_directory=True)
    ctx.never_read.append(ctx.outside / "films" / "x.png")


def _check_linked_label_folder(ctx: Ctx, settings: Settings, summary) -> None:
    (rej,) = rows(settings, Rejection)
    assert rej.path.endswith("/covid") and "folder outside the source folder" in rej.detail
    assert rej.sha256 is None and rej.quarantine_path is None  # nothing under it listed, read or copied
    assert sha(png_bytes(110)) not in {i.sha256 for i in rows(settings, Image)}


def _same_bytes_two_patients(ctx: Ctx) -> None:
    """One film under two patient ids (XRAY_PATIENT_REGEX reads person7 and person8 from the names)."""
    data = put(ctx.src / "normal" / "person7_a.png", png_bytes(111))
    put(ctx.src / "normal" / "person8_b.png", data)
    put(ctx.src / "normal" / "person7_c.png", data)  # the same patient again: a plain duplicate


def _check_same_bytes_two_patients(ctx: Ctx, settings: Settings, summary) -> None:
    (img,) = [i for i in rows(settings, Image) if i.sha256 == sha(png_bytes(111))]
    assert img.patient_id == "person7" and summary.duplicates == 1
    (rej,) = rows(settings, Rejection)
    assert "patient person8" in rej.detail and "patient person7" in rej.detail
    assert rej.quarantine_path is None and "Not copied to quarantine" in rej.detail
    assert not any((settings.home / "quarantine").rglob("*.png"))


def _dicom_twice(ctx: Ctx) -> None:
    data = dicom_bytes("Doe^John-12345", patient_name="Doe^John", Modality="CT")
    put(ctx.src / "normal" / "a.dcm", data)
    put(ctx.src / "normal" / "sub" / "b.dcm", data)


def _check_dicom_twice(ctx: Ctx, settings: Settings, summary) -> None:
    a, b = rows(settings, Rejection)
    assert a.quarantine_path == b.quarantine_path  # one copy for both rows
    copy = (settings.home / a.quarantine_path).read_bytes()
    assert a.quarantine_path == f"quarantine/{sha(copy)[:2]}/{sha(copy)}.dcm"  # named by what was written
    assert sha(copy) != a.sha256 and b"Doe^John" not in copy  # the de-identified copy, not the original
    assert pydicom.dcmread(io.BytesIO(copy)).PatientIdentityRemoved == "YES"
    files = [p for p in (settings.home / "quarantine").rglob("*") if p.is_file()]
    assert files == [settings.home / a.quarantine_path]
    assert summary.quarantine["copies_written"] == 1 and summary.quarantine["rows_sharing_a_copy"] == 1


def _same_bad_bytes_three_times(ctx: Ctx) -> None:
    for name in ("normal/x.png", "normal/y.png", "normal/sub/z.png"):
        put(ctx.src / name, b"the same broken bytes")


def _check_one_shared_copy(ctx: Ctx, settings: Settings, summary) -> None:
    (key,) = {r.quarantine_path for r in rows(settings, Rejection)}
    assert key == f"quarantine/{sha(b'the same broken bytes')[:2]}/{sha(b'the same broken bytes')}"
    assert [p for p in (settings.home / "quarantine").rglob("*") if p.is_file()] == [settings.home / key]
    assert {r.path.rsplit("/", 1)[1] for r in rows(settings, Rejection)} == {"x.png", "y.png", "z.png"}


def _two_bad_files(ctx: Ctx) -> None:
    put(ctx.src / "normal" / "a_small.png", b"not an image" * 10)  # 120 bytes: fits the cap below
    put(ctx.src / "normal" / "b_large.png", b"not an image" * 1000)  # 12,000 bytes: does not


def _check_cap(ctx: Ctx, settings: Settings, summary) -> None:
    from xray_core.report.terminal import render_ingest

    small, large = sorted(rows(settings, Rejection), key=lambda r: r.path)
    assert (settings.home / small.quarantine_path).read_bytes() == b"not an image" * 10
    assert large.quarantine_path is None and "XRAY_QUARANTINE_MAX_BYTES=1,000" in large.detail
    assert large.sha256 == sha(b"not an image" * 1000)  # the row is whole: only the copy is missing
    q = summary.quarantine
    assert (q["copies_written"], q["copies_skipped"]) == (1, 1)
    assert "XRAY_QUARANTINE_MAX_BYTES" in q["skipped_because"]
    assert ("1 copies skipped: each would take quarantine/ (120 bytes) past XRAY_QUARANTINE_MAX_BYTES=1,000"
            in render_ingest(summary.as_dict()))
    assert json.loads(json.dumps(summary.as_dict()))["quarantine"]["copies_skipped"] == 1


def _check_cap_zero(ctx: Ctx, settings: Settings, summary) -> None:
    assert all(r.quarantine_path is None and "not copied to quarantine" in r.detail
               for r in rows(settings, Rejection))
    assert not (settings.home / "quarantine").exists() or not any(
        p.is_file() for p in (settings.home / "quarantine").rglob("*"))
    assert summary.quarantine["copies_skipped"] == 2


KINDS.update({
    "linked_label_folder_outside_root": Kind(_linked_label_folder_outside, {"covid": "outside_root"},
                                             check=_check_linked_label_folder),
    "same_bytes_under_another_patient_id": Kind(_same_bytes_two_patients,
                                                {"person8_b.png": "duplicate_other_patient"}, added=1,
                                                check=_check_same_bytes_two_patients),
    "identical_bad_files_share_one_copy": Kind(
        _same_bad_bytes_three_times, {name: "not_an_image" for name in ("x.png", "y.png", "z.png")},
        check=_check_one_shared_copy),
    "dicom_quarantined_twice": Kind(_dicom_twice, {"a.dcm": "wrong_modality", "b.dcm": "wrong_modality"},
                                    check=_check_dicom_twice),
    "quarantine_at_its_cap": Kind(
        _two_bad_files, {"a_small.png": "not_an_image", "b_large.png": "not_an_image"},
        env={"XRAY_QUARANTINE_MAX_BYTES": "1000"}, check=_check_cap),
    "quarantine_cap_zero_copies_nothing": Kind(
        _two_bad_files, {"a_small.png": "not_an_image", "b_large.png": "not_an_image"},
        env={"XRAY_QUARANTINE_MAX_BYTES": "0"}, check=_check_cap_zero),
})



# ---- round three: decode (issue 23, items 4, 5 and 8)
# Files Pillow decodes without an error although their pixel data ends early, blank films, metadata-chunk
# bombs and Pillow's warnings. The decoder's own tests: tests/unit/test_decode_checks.py.


def _jpeg(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _film(seed: int, size: int = 256) -> np.ndarray:
    return make_xray("normal", size=size, rng=np.random.default_rng(seed), patient_seed=seed)


def jpeg_cut_with_end_marker(seed: int = 110) -> bytes:
    """A baseline JPEG cut at 60% with an end-of-image marker added: libjpeg fills the rest, only warning."""
    whole = _jpeg(_film(seed), quality=90)
    return whole[: len(whole) * 6 // 10] + b"\xff\xd9"


def progressive_jpeg_cut(seed: int, *, in_first_scan: bool) -> bytes:
    whole = _jpeg(_film(seed), quality=90, progressive=True)
    if in_first_scan:  # 200 bytes into the first (DC) scan, then an end marker: the rest is fill
        return whole[: whole.index(b"\xff\xda") + 200] + b"\xff\xd9"
    return whole[: len(whole) * 6 // 10]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, raw: bytes, *, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG (valid CRCs) whose IDAT is one complete zlib stream of ``raw`` scanline bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def png_short_idat(seed: int = 111) -> bytes:
    """A PNG whose zlib stream is complete but holds half the rows its header declares (Pillow: black)."""
    arr = _film(seed, 128)
    return png_raw(128, 128, b"".join(b"\x00" + row.tobytes() for row in arr[:64]))


def png_16bit_rgba(seed: int = 112) -> bytes:
    grey = _film(seed, 64).astype(np.uint16) * 257
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 65535)]).astype(">u2").reshape(64, -1)
    return png_raw(64, 64, b"".join(b"\x00" + row.tobytes() for row in rgba), depth=16, colour=6)


_BOMB_TEXT = zlib.compress(b"A" * (16 * 1024 * 1024), 9)  # inflates to 16 MB; PIL allows 1 MB per chunk


def png_chunk_bomb(kind: bytes, payload: bytes, *, before_idat: bool, seed: int) -> bytes:
    good = png_bytes(seed)
    at = good.index(b"IDAT") - 4 if before_idat else good.rindex(b"IEND") - 4
    return good[:at] + _chunk(kind, payload) + good[at:]


def _check_16bit_rgba(ctx: Ctx, settings: Settings, summary) -> None:
    (img,) = [i for i in rows(settings, Image) if i.original_name.endswith("rgba16.png")]
    assert (img.width, img.height, img.format) == (64, 64, "png")


def _check_detail_names_the_fill(ctx: Ctx, settings: Settings, summary) -> None:
    (rej,) = rows(settings, Rejection)
    assert "ends early" in rej.detail and "flat grey fill" in rej.detail, rej.detail


def _blank_jpeg() -> bytes:
    return _jpeg(blank_film(256, 0.995), quality=100)


KINDS.update({
    "jpeg_header_7000x7000_over_64x64_data": Kind(
        _file("normal/corrupt.jpeg", lambda: jpeg_declaring(7000, 7000)), {"corrupt.jpeg": "truncated"},
        check=_check_detail_names_the_fill),
    "jpeg_cut_with_end_marker": Kind(_file("normal/cut_eoi.jpeg", jpeg_cut_with_end_marker),
                                     {"cut_eoi.jpeg": "truncated"}, check=_check_detail_names_the_fill),
    "progressive_jpeg_cut_in_its_first_scan": Kind(
        _file("normal/prog_dc.jpeg", lambda: progressive_jpeg_cut(113, in_first_scan=True)),
        {"prog_dc.jpeg": "truncated"}),
    "progressive_jpeg_cut": Kind(
        _file("normal/prog.jpeg", lambda: progressive_jpeg_cut(114, in_first_scan=False)),
        {"prog.jpeg": "truncated"}),
    "png_idat_stream_ends_early": Kind(_file("normal/short.png", png_short_idat), {"short.png": "truncated"}),
    "blank_film_99_5_percent": Kind(_badfile("blank.png"), {"blank.png": "blank_image"}),
    "blank_jpeg_99_5_percent": Kind(_file("normal/blank.jpeg", _blank_jpeg), {"blank.jpeg": "blank_image"}),
    "png_itxt_text_bomb": Kind(
        _file("normal/itxt.png", lambda: png_chunk_bomb(b"iTXt", b"Comment\x00\x01\x00\x00\x00" + _BOMB_TEXT,
                                                        before_idat=False, seed=115)),
        {"itxt.png": "decompression_bomb"}),
    "png_iccp_bomb": Kind(
        _file("normal/iccp.png",
              lambda: png_chunk_bomb(b"iCCP", b"icc\x00\x00" + _BOMB_TEXT, before_idat=True, seed=116)),
        {"iccp.png": "decompression_bomb"}),
    "png_ztxt_bomb_before_pixel_data": Kind(
        _file("normal/ztxt_first.png", lambda: png_chunk_bomb(b"zTXt", b"Comment\x00\x00" + _BOMB_TEXT,
                                                              before_idat=True, seed=117)),
        {"ztxt_first.png": "decompression_bomb"}),
    "jpeg_header_between_pil_warning_and_xray_max_pixels": Kind(
        _file("normal/warn.jpeg", lambda: jpeg_declaring(9500, 9500)), {"warn.jpeg": "truncated"},
        env={"XRAY_MAX_PIXELS": "100000000"}),
    "png_16bit_rgba_film": Kind(_file("normal/rgba16.png", png_16bit_rgba), added=1, check=_check_16bit_rgba),
})



def test_every_kind_says_what_becomes_of_its_hostile_input() -> None:
    """A kind that expects nothing would pass on an ingest that silently dropped its file: each names its
    rejection reasons, the images it adds, its manifest error, or a check of its own. (How many kinds
    there are is round three's count, test_round_three_covers_at_least_90_kinds.)"""
    silent = [name for name, kind in KINDS.items()
              if not (kind.rejected or kind.added or kind.manifest_error or kind.check)]
    assert KINDS and silent == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own; we reject it anyway
@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_kind_is_rejected_cleanly_and_the_batch_goes_on(kind: str,
                                                                tmp_path: Path, monkeypatch) -> None:
    spec = KINDS[kind]
    settings = load_settings({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home"), **spec.env})
    dispose_engines()

    # Something stored before: it must survive whatever follows.
    earlier = tmp_path / "earlier"
    before_bytes = put(earlier / "normal" / "before.png", png_bytes(99))
    ingest_source(earlier, settings=settings)
    (before,) = rows(settings, Image)

    ctx = Ctx(src=tmp_path / "src", outside=tmp_path / "outside")
    good = {name: put(ctx.src / name, png_bytes(i + 1)) for i, name in enumerate(GOOD)}
    put(ctx.outside / "secret.png", png_bytes(98))
    ctx.never_read.append(ctx.outside / "secret.png")
    spec.build(ctx)

    read: list[str] = []
    real_read_bytes = Path.read_bytes

    def spy(self: Path) -> bytes:
        read.append(os.path.realpath(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", spy)

    if spec.manifest_error:
        snap = snapshot(settings)
        with pytest.raises(ManifestError) as err:
            ingest_source(ctx.src, manifest=ctx.manifest, settings=settings)
        assert spec.manifest_error in str(err.value) and str(ctx.manifest) in str(err.value)
        assert snapshot(settings) == snap
        return

    summary = ingest_source(ctx.src, manifest=ctx.manifest, settings=settings)

    # The good files of the batch are catalogued.
    images = {i.sha256: i for i in rows(settings, Image)}
    assert {sha(d) for d in good.values()} <= set(images), "a good file of the hostile batch was lost"
    assert summary.added == len(good) + spec.added
    # Each hostile file: a rejection row with the right reason, and no other reasons.
    rejections = rows(settings, Rejection)
    for suffix, reason in spec.rejected.items():
        hits = [r for r in rejections if r.path.endswith(suffix)]
        assert hits, \
            f"no rejection row for {suffix!r}; rows: {[(r.path[-60:], r.reason) for r in rejections]}"
        assert {r.reason for r in hits} == {reason}, [(r.path[-60:], r.reason, r.detail) for r in hits]
        assert all(len(r.detail) > 10 for r in hits)
    expected = _ROW_COUNTS.get(kind) or dict(Counter(spec.rejected.values()))
    assert summary.rejected_by_reason == expected
    # Nothing stored is lost: the earlier image's row is unchanged, every original is intact.
    cols = [c.key for c in Image.__table__.columns]
    assert [getattr(images[before.sha256], c) for c in cols] == [getattr(before, c) for c in cols]
    assert (settings.home / before.stored_path).read_bytes() == before_bytes
    for img in images.values():
        stored = (settings.home / img.stored_path).read_bytes()
        # DICOM is stored de-identified, under the original's sha256 (XRAY_DICOM_STORE, issue 17).
        assert sha(stored) == img.sha256 or (
            img.format == "dicom" and pydicom.dcmread(io.BytesIO(stored)).PatientIdentityRemoved == "YES")
    # Every stored path and name is printable text; the source finished.
    for text in [*(i.original_name for i in images.values()), *(r.path for r in rejections),
                 *(r.detail for r in rejections), *(r.quarantine_path or "" for r in rejections)]:
        assert text.isprintable() and "\\udc" not in ascii(text), repr(text)
    assert [s.status for s in rows(settings, Source)] == ["done", "done"]
    # Links and rows that lead outside the source were never read.
    for path in ctx.never_read:
        assert os.path.realpath(path) not in read, f"{path} was read"
    if spec.check:
        spec.check(ctx, settings, summary)
    dispose_engines()


# --------------------------------------------------------------------------- the million-row manifest

_MEASURE = """
import resource, sys, time
from pathlib import Path
from xray_core.data.scan import validate_manifest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
rows = validate_manifest(Path(sys.argv[1]))
print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.perf_counter() - start)
"""


def test_a_million_row_manifest_is_validated_streaming(tmp_path: Path) -> None:
    """validate_manifest reads a 1,000,000-row (21 MB) manifest in constant memory.

    Measured in a fresh process (peak RSS growth while validating): holding the rows as dicts would
    take about 330 MB; streaming stays near 0. The limit is 50 MB.
    """
    manifest = tmp_path / "million.csv"
    with open(manifest, "w") as fh:
        fh.write("file,label,patient_id\n")
        fh.write("img/p0.png,normal,P0\n" * 1_000_000)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(manifest)], capture_output=True, text=True,
                         cwd=PROJECT, timeout=120, check=True).stdout.split()
    n_rows, growth_kb, seconds = int(out[0]), int(out[1]), float(out[2])
    assert n_rows == 1_000_000
    assert growth_kb < 50 * 1024, f"validating grew the peak memory by {growth_kb / 1024:.0f} MB"
    assert seconds < 20


def test_a_manifest_of_many_duplicate_rows_ingests_each_file_once(settings: Settings, tmp_path: Path) -> None:
    """1,500 rows naming three files: three images, the rest duplicates, in a few seconds."""
    root = tmp_path / "batch"
    data = [put(root / "img" / f"p{i}.png", png_bytes(200 + i)) for i in range(3)]
    manifest = write_manifest(root, [[f"img/p{i % 3}.png", "normal", f"P{i % 3}"] for i in range(1500)],
                              ("file", "label", "patient_id"))
    summary = ingest_source(root, manifest=manifest, settings=settings)
    assert (summary.files, summary.added, summary.duplicates, summary.rejected) == (1500, 3, 1497, 0)
    assert {i.sha256 for i in rows(settings, Image)} == {sha(d) for d in data}


# --------------------------------------------------------------------------- DICOM identifiers

RAW_IDS = ("Doe^John-12345", "Doe^John", "Roe^Jane-67890", "Roe^Jane")


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # writing the over-long test PatientID
def test_dicom_patient_identifiers_never_appear_in_clear(xray_env, tmp_path: Path, monkeypatch, capsys,
                                                         caplog) -> None:
    """PatientID and PatientName: not in the catalogue (+WAL), status --json, the ingest summary,
    quarantine file names, nor in any log record or warning emitted while ingesting."""
    monkeypatch.setenv("XRAY_NEAR_COPY_DISTANCE", "-1")  # the two films share their synthetic pixels
    settings = load_settings()
    src = tmp_path / "src"
    put(src / "normal" / "scan1.dcm", dicom_bytes("Doe^John-12345", patient_name="Doe^John"))
    put(src / "pneumonia" / "scan2.dcm",
        dicom_bytes("Roe^Jane-67890", patient_name="Roe^Jane", PatientSex="F",
                                                     ViewPosition="AP"))
    # Rejected DICOMs carrying identifiers: a header-only file and an over-long, odd PatientID.
    write_dicom(src / "normal" / "header_only.dcm", np.zeros((64, 64), np.uint16),
                patient_id="Doe^John-12345", with_pixels=False)
    put(src / "normal" / "constant.dcm", dicom_bytes("Roe^Jane-67890" * 10, patient_name="Roe^Jane",
                                                     PixelData=np.full((64, 64), 7, np.uint16).tobytes()))

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = ingest_source(src, settings=settings)
    assert (summary.added, summary.rejected_by_reason) == (2, {"dicom_no_pixels": 1, "constant_image": 1})

    reset_settings()
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    status_out = capsys.readouterr().out
    db_bytes = b"".join(p.read_bytes() for p in settings.home.glob("catalogue.db*"))
    names = " ".join(str(p.relative_to(settings.home)) for p in settings.home.rglob("*"))
    logs = (caplog.text + " ".join(str(r.args) for r in caplog.records)
            + " ".join(str(w.message) for w in caught))
    summary_text = json.dumps(summary.as_dict())
    for raw in RAW_IDS:
        assert raw.encode() not in db_bytes, f"{raw} in the catalogue"
        for where, text in (("status --json", status_out), ("file names", names), ("logs", logs),
                            ("summary", summary_text)):
            assert raw not in text, f"{raw} in {where}"
    ids = {i.patient_id for i in rows(settings, Image)}
    assert len(ids) == 2 and all(p.startswith("dcm-") for p in ids)
    # Store and quarantine hold de-identified copies by default (XRAY_DICOM_STORE, SECURITY.md).
    stored = b"".join((settings.home / i.stored_path).read_bytes() for i in rows(settings, Image))
    quarantined = b"".join((settings.home / r.quarantine_path).read_bytes()
                           for r in rows(settings, Rejection))
    assert len(quarantined) > 0
    for raw in RAW_IDS:
        assert raw.encode() not in stored + quarantined, f"{raw} in the store or quarantine"


# --------------------------------------------------------------------------- CSV injection in output


@pytest.mark.parametrize("cell, safe", [
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
    ("+1+1", "'+1+1"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"),
    ("normal/a.png", "normal/a.png"),
    (0.25, 0.25),
])
def test_prediction_csv_cells_that_start_a_formula_are_neutralised(cell, safe) -> None:
    from xray_core.pipeline.predict import _csv_safe

    assert _csv_safe(cell) == safe


# ---- attacks on the other commands (and on ingest where a table row cannot express them)

ATTACKS: dict[str, Callable] = {}


def attack(fn: Callable) -> Callable:
    ATTACKS[fn.__name__] = fn
    return fn


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``xray argv``; return (exit code, stderr). Settings are re-read from the environment."""
    reset_settings()
    dispose_engines()
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr().err


def _real_home(settings: Settings, tmp_path: Path) -> bytes:
    """A catalogue with one image, as a real XRAY_HOME would hold; returns the image's bytes."""
    data = put(tmp_path / "src" / "normal" / "a.png", png_bytes(90))
    ingest_source(tmp_path / "src", settings=settings)
    return data


@attack
def demo_fresh_on_a_real_home_is_refused(xray_env, tmp_path, capsys, monkeypatch) -> None:
    settings = load_settings()
    _real_home(settings, tmp_path)
    (settings.home / "my-notes.txt").write_text("keep me")
    dispose_engines()  # SQLite's -wal/-shm files go with the connection
    before = sorted(p.relative_to(settings.home) for p in settings.home.rglob("*"))
    code, err = _cli(capsys, "demo", "--fresh")
    assert code == 2 and "not created by `xray demo`" in err and "Traceback" not in err
    assert sorted(p.relative_to(settings.home) for p in settings.home.rglob("*")) == before


@attack
def demo_fresh_removes_only_a_marked_home(tmp_path, monkeypatch) -> None:
    from flows.demo import DEMO_MARKER, prepare_demo_home

    home = tmp_path / "demo"
    prepare_demo_home(home, fresh=True)  # created by the demo: marked
    assert (home / DEMO_MARKER).is_file()
    (home / "catalogue.db").write_bytes(b"demo state")
    prepare_demo_home(home, fresh=True)
    assert not (home / "catalogue.db").exists() and (home / DEMO_MARKER).is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        prepare_demo_home(tmp_path / "afile", fresh=True)
    assert (tmp_path / "afile").read_text() == "x"


@attack
def predict_out_device_node_is_refused(xray_env, tmp_path, capsys) -> None:
    code, err = _cli(capsys, "predict", str(tmp_path), "--out", "/dev/null")
    assert code == 2 and "not a regular file" in err
    assert Path("/dev/null").is_char_device()


@attack
def predict_out_catalogue_is_refused(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    _real_home(settings, tmp_path)
    db_file = settings.home / "catalogue.db"
    dispose_engines()  # checkpoint the WAL: the file's bytes are final
    before = db_file.read_bytes()
    code, err = _cli(capsys, "predict", str(tmp_path / "src"), "--out", str(db_file))
    assert code == 2 and "catalogue database" in err and db_file.read_bytes() == before


@attack
def predict_out_inside_the_store_is_refused(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    _real_home(settings, tmp_path)
    (img,) = rows(settings, Image)
    code, err = _cli(capsys, "predict", str(tmp_path / "src"), "--out", str(settings.home / img.stored_path))
    assert code == 2 and "system's own files" in err
    assert sha((settings.home / img.stored_path).read_bytes()) == img.sha256


@attack
def predict_out_folder_or_symlink_is_refused(xray_env, tmp_path, capsys) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "target.csv").write_text("keep")
    (tmp_path / "link.csv").symlink_to(tmp_path / "target.csv")
    for out, says in (("folder", "is a folder"), ("link.csv", "symbolic link")):
        code, err = _cli(capsys, "predict", str(tmp_path), "--out", str(tmp_path / out))
        assert code == 2 and says in err and "Traceback" not in err
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "target.csv").read_text() == "keep"


@attack
def predict_manifest_rows_outside_its_folder_are_never_read(tmp_path, monkeypatch) -> None:
    from xray_core.pipeline.predict import _decoded, list_files

    root = tmp_path / "batch"
    put(root / "normal" / "good.png", png_bytes(91))
    secret = put(tmp_path / "secret" / "x.png", png_bytes(92))
    manifest = write_manifest(root, [["normal/good.png", "normal"], ["/etc/passwd", "normal"],
                                     ["/proc/self/environ", "normal"], ["../secret/x.png", "normal"]])
    read: list[str] = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (read.append(os.path.realpath(self)), real(self))[1])
    settings = load_settings({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home")})
    out = {f.rel: (sha_, err) for f, sha_, _, err in _decoded(list_files(root, manifest), settings)}
    assert out["normal/good.png"][1] is None
    for rel in ("/etc/passwd", "/proc/self/environ", "../secret/x.png"):
        assert out[rel][0] is None and out[rel][1].startswith("outside_root"), out[rel]
    assert not {"/etc/passwd", "/proc/self/environ",
                os.path.realpath(tmp_path / "secret" / "x.png")} & set(read)
    assert sha(secret) not in {s for s, _ in out.values()}


@attack
def predict_folder_walk_errors_become_rows(tmp_path, monkeypatch) -> None:
    from xray_core.pipeline.predict import list_files

    put(tmp_path / "batch" / "normal" / "a.png", png_bytes(93))
    put(tmp_path / "batch" / "locked" / "b.png", png_bytes(94))
    _refuse_listing(monkeypatch, tmp_path / "batch" / "locked")
    files = {f.rel: f.problem for f in list_files(tmp_path / "batch")}
    assert files["normal/a.png"] is None
    assert files["locked"][0] == "unreadable_path" and "Permission denied" in files["locked"][1]


def _refuse_listing(monkeypatch, folder: Path) -> None:
    """os.scandir fails on ``folder`` as it does for a folder without read permission (tests run as
    root, which chmod 000 does not stop)."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@attack
def ingest_unreadable_subfolder_is_a_rejection_row(xray_env, tmp_path, monkeypatch) -> None:
    settings = load_settings()
    put(tmp_path / "src" / "normal" / "a.png", png_bytes(95))
    put(tmp_path / "src" / "normal" / "locked" / "b.png", png_bytes(96))
    _refuse_listing(monkeypatch, tmp_path / "src" / "normal" / "locked")
    summary = ingest_source(tmp_path / "src", settings=settings)
    assert (summary.added, summary.rejected_by_reason) == (1, {"unreadable_path": 1})
    (rej,) = rows(settings, Rejection)
    assert rej.path.endswith("normal/locked") and "Permission denied" in rej.detail
    monkeypatch.undo()  # permissions fixed: the next ingest takes the folder (not skipped as "seen")
    assert ingest_source(tmp_path / "src", settings=settings).added == 1


@attack
def ingest_growing_file_is_retried_not_stored_twice(xray_env, tmp_path, monkeypatch) -> None:
    settings = load_settings()
    full = jpeg_bytes(97)
    target = tmp_path / "src" / "normal" / "growing.jpeg"
    put(target, full[: len(full) // 2])
    real = Path.read_bytes

    def read_then_grow(self: Path) -> bytes:
        data = real(self)
        if self == target and len(data) < len(full):
            self.write_bytes(full)  # the copy goes on while ingest reads
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_grow)
    first = ingest_source(tmp_path / "src", settings=settings)
    assert (first.added, first.rejected_by_reason) == (0, {"file_changing": 1})
    second = ingest_source(tmp_path / "src", settings=settings)
    assert second.added == 1
    assert [i.sha256 for i in rows(settings, Image)] == [sha(full)]


@attack
def manual_promotion_during_a_decision_makes_it_stale(xray_env, tmp_path) -> None:
    from xray_core.registry.versions import promote_manually, record_decision

    settings = load_settings()
    versions = [_save_model(settings, seed) for seed in range(3)]
    promote_manually(settings, versions[0], reason="first")
    # The retrain evaluated v3 against v1; meanwhile someone promoted v2 by hand.
    promote_manually(settings, versions[1], reason="by hand, during the retrain")
    row = record_decision(settings, challenger=versions[2], decision="promote", rationale="v3 beat v1",
                          metrics={}, trigger="test", promote=True, record_stale_unless_champion=versions[0])
    assert row["decision"] == "stale" and row["champion_after"] == versions[1]
    stale = f"champion changed from v{versions[0]} to v{versions[1]} since evaluation; nothing promoted"
    assert stale in row["rationale"]
    from xray_core.registry.listing import registry_summary

    assert registry_summary(settings)["champion"] == versions[1]
    ok = record_decision(settings, challenger=versions[2], decision="promote", rationale="v3 beat v2",
                         metrics={}, trigger="test", promote=True, record_stale_unless_champion=versions[1])
    assert ok["decision"] == "promote" and registry_summary(settings)["champion"] == versions[2]


def _save_model(settings: Settings, seed: int) -> int:
    import torch

    from xray_core.model.train import build_head
    from xray_core.registry.versions import save_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_head(8, 2, hidden=(), dropout=0.0).state_dict()
    card = {"labels": ["normal", "pneumonia"], "threshold": 0.5, "input_size": 32,
            "normalisation": {"mean": [0.5] * 3, "std": [0.25] * 3}, "backbone_fingerprint": "b" * 64,
            "backbone_weights": "random", "head": {"in_dim": 8, "hidden": [], "dropout": 0.0},
            "training_set_fingerprint": "t" * 64}
    return save_model(settings, state_dict=state, card=card, train_image_ids=[], val_image_ids=[])


@attack
def replaced_store_bytes_are_refused_and_named(xray_env, tmp_path) -> None:
    from xray_core.model.backbone import load_backbone
    from xray_core.model.features import EmbedItem, FeatureCache, StoreIntegrityError

    settings = load_settings()
    put(tmp_path / "src" / "normal" / "a.png", png_bytes(100))
    put(tmp_path / "src" / "pneumonia" / "b.png", png_bytes(101))
    ingest_source(tmp_path / "src", settings=settings)
    a, b = sorted(rows(settings, Image), key=lambda i: i.original_name)
    (settings.home / a.stored_path).write_bytes((settings.home / b.stored_path).read_bytes())
    cache = FeatureCache(load_backbone(settings), settings)
    items = [EmbedItem(i.sha256, settings.home / i.stored_path, i.stored_path) for i in (a, b)]
    with pytest.raises(StoreIntegrityError) as err:
        cache.ensure(items, views=[0])
    assert a.stored_path in str(err.value)
    assert not cache.path_for(a.sha256).exists()  # nothing filed under a's sha from b's pixels
    assert cache.path_for(b.sha256).exists()  # the good image was still embedded
    assert list((settings.home / "quarantine" / "store-mismatch").glob(f"{a.sha256}-*"))


@attack
def heatmap_name_of_a_long_path_fits_the_file_system(tmp_path) -> None:
    from xray_core.pipeline.predict import heatmap_name

    rel = "/".join(["d" * 200] * 3) + "/film.jpeg"
    name = heatmap_name(rel)
    assert len(name.encode()) <= 255 and name.endswith(".png")
    (tmp_path / name).write_bytes(b"")  # the OS accepts it
    assert heatmap_name(rel.replace("film", "other")) != name


@attack
def killed_ingest_shows_as_interrupted_and_is_closed(xray_env, tmp_path, capsys) -> None:
    from db import session_scope
    from xray_core.data.catalogue import open_catalogue
    from xray_core.report.status import status_report

    settings = load_settings()
    _real_home(settings, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    with session_scope(open_catalogue(settings)) as s:
        src = s.get(Source, 1)
        src.status, src.counts = "running", {"owner": {"host": os.uname().nodename, "pid": int(dead.stdout)}}
    report = status_report(settings)
    assert [i["source_id"] for i in report["interrupted"]["ingests"]] == [1]
    ingest_source(tmp_path / "src", settings=settings)
    assert [s.status for s in rows(settings, Source)] == ["interrupted", "done"]


@attack
def killed_retrain_candidate_shows_in_status(xray_env, tmp_path) -> None:
    from xray_core.report.status import status_report

    settings = load_settings()
    version = _save_model(settings, 0)
    assert status_report(settings)["interrupted"]["undecided_candidates"] == [version]


@attack
def wait_nan_is_bad_usage(xray_env, capsys) -> None:
    for value in ("nan", "inf", "-1"):
        code, err = _cli(capsys, "retrain", "--local", "--wait", value)
        assert code == 2 and "finite number of seconds" in err


@attack
def xray_home_that_is_a_file(xray_env, tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("XRAY_HOME", str(tmp_path / "afile"))
    code, err = _cli(capsys, "status")
    assert code == 2 and "not a file" in err and "XRAY_HOME" in err and "Traceback" not in err


@attack
def read_only_xray_home(xray_env, capsys, monkeypatch) -> None:
    home = Path(xray_env["XRAY_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == home else real(p, mode, **kw))
    code, err = _cli(capsys, "status")
    assert code == 2 and "not writable" in err


@attack
def garbage_database_url(xray_env, capsys, monkeypatch) -> None:
    for url in ("garbage", "nosuchdb://x/y"):
        monkeypatch.setenv("XRAY_DATABASE_URL", url)
        code, err = _cli(capsys, "status")
        assert code == 2 and "XRAY_DATABASE_URL" in err and "Traceback" not in err


@attack
def bogus_storage_url(xray_env, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XRAY_STORAGE_URL", "bogus://")
    code, err = _cli(capsys, "status")
    assert code == 2 and "XRAY_STORAGE_URL" in err


@attack
def unreachable_prefect_api_url(xray_env, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # the discard port: nobody answers
    code, err = _cli(capsys, "ingest", str(tmp_path))
    assert code == 2 and "PREFECT_API_URL" in err and "make serve" in err


@attack
def zero_byte_catalogue_is_not_replaced(xray_env, capsys) -> None:
    db_file = Path(xray_env["XRAY_HOME"]) / "catalogue.db"
    db_file.parent.mkdir(parents=True, exist_ok=True)
    db_file.write_bytes(b"")
    code, err = _cli(capsys, "status")
    assert code == 2 and "empty (0 bytes)" in err and db_file.stat().st_size == 0


@attack
def truncated_catalogue_is_named(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    _real_home(settings, tmp_path)
    dispose_engines()
    db_file = settings.home / "catalogue.db"
    for wal in settings.home.glob("catalogue.db-*"):
        wal.unlink()
    data = db_file.read_bytes()
    db_file.write_bytes(data[: len(data) // 2 + 100])
    code, err = _cli(capsys, "status")
    assert code == 2 and "truncated" in err and "Traceback" not in err


@attack
def unexpected_error_is_one_line_and_debug_shows_the_traceback(xray_env, capsys, monkeypatch) -> None:
    import sqlite3

    import xray_core.report.status as status

    def boom(settings):  # what SQLite raises on a full disk
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(status, "status_report", boom)
    code, err = _cli(capsys, "status")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "disk is full" in err and "--debug" in err
    code, err = _cli(capsys, "status", "--debug")
    assert code == 1 and "Traceback" in err


# ---- round three: flow parameters confined to allowed roots (issue 23, item 5)
# Each case is what a Prefect "Run" form could send to a flow; the flows call confine_parameters first
# (tests/flows/test_allowed_roots.py runs them under the Prefect harness).


def _roots(tmp_path: Path, **env: str) -> Settings:
    """Settings with XRAY_ALLOWED_ROOTS=<tmp>/allowed (created, with a folder ``src``) unless ``env`` says."""
    (tmp_path / "allowed" / "src").mkdir(parents=True, exist_ok=True)
    return load_settings({"XRAY_HOME": str(tmp_path / "home"),
                          "XRAY_ALLOWED_ROOTS": str(tmp_path / "allowed"), **env})


def _refused(settings: Settings, *words: str, **params) -> str:
    """The one line ``confine_parameters`` refuses ``params`` with (``out``/``heatmaps`` are outputs)."""
    from xray_core.errors import PathRefusedError
    from xray_core.io.allowed_roots import confine_parameters

    write = {k: params.pop(k) for k in ("out", "heatmaps") if k in params}
    with pytest.raises(PathRefusedError) as err:
        confine_parameters(settings, read=params, write=write)
    message = str(err.value)
    assert isinstance(err.value, UsageError) and "\n" not in message and len(message) < 1000, message
    assert all(w in message for w in words), message
    return message


@attack
def flow_sources_etc_is_refused(tmp_path) -> None:
    _refused(_roots(tmp_path), "sources[0]=/etc is outside the allowed roots", str(tmp_path / "allowed"),
             sources=["/etc"])


@attack
def flow_reading_xray_home_inside_a_root_is_refused(tmp_path) -> None:
    """XRAY_HOME=/data/xray beside XRAY_INCOMING=/data/incoming: the home lies in the default root /data,
    but a form must not ingest the system's own files (overlays it had predict write there) as films."""
    from xray_core.io.allowed_roots import caller_paths, confine_parameters

    home = tmp_path / "allowed" / "xray"
    settings = _roots(tmp_path, XRAY_HOME=str(home), XRAY_INCOMING=str(tmp_path / "allowed" / "incoming"))
    (home / "predictions" / "pneumonia").mkdir(parents=True)
    _refused(settings, "is inside XRAY_HOME", path=str(home / "predictions"))
    _refused(settings, "sources[0]=", "is inside XRAY_HOME", sources=[str(home)])
    # Outputs still go there, the rest of the root is still readable, and the caller's own path passes.
    assert confine_parameters(settings, write={"heatmaps": str(home / "predictions" / "pneumonia")})
    assert confine_parameters(settings, read={"path": str(tmp_path / "allowed" / "src")})
    with caller_paths(str(home / "predictions")):
        assert confine_parameters(settings, read={"path": str(home / "predictions")})


@attack
def flow_path_dotdot_out_of_the_root_is_refused(tmp_path) -> None:
    _refused(_roots(tmp_path), f"resolves to {tmp_path / 'elsewhere'}",
             path=f"{tmp_path}/allowed/src/../../elsewhere")


@attack
def flow_path_relative_is_refused(tmp_path, monkeypatch) -> None:
    settings = _roots(tmp_path)
    monkeypatch.chdir(tmp_path / "allowed")  # even where "src" would land inside the root
    _refused(settings, "path=src is a relative path", "worker's working folder", path="src")


@attack
def flow_path_link_out_of_the_root_is_refused(tmp_path) -> None:
    settings = _roots(tmp_path)
    (tmp_path / "allowed" / "etc").symlink_to("/etc")
    _refused(settings, "resolves to /etc", path=str(tmp_path / "allowed" / "etc"))


@attack
def flow_path_link_loop_is_refused(tmp_path) -> None:
    settings = _roots(tmp_path)
    (tmp_path / "allowed" / "loop").symlink_to(tmp_path / "allowed" / "loop")
    _refused(settings, "symbolic link loop", path=str(tmp_path / "allowed" / "loop"))


@attack
def flow_path_sibling_sharing_the_roots_prefix_is_refused(tmp_path) -> None:
    _refused(_roots(tmp_path), "outside the allowed roots", path=str(tmp_path / "allowed-evil"))


@attack
def flow_path_with_a_nul_byte_is_refused(tmp_path) -> None:
    _refused(_roots(tmp_path), "cannot be resolved", path=f"{tmp_path}/allowed/src\0/etc")


@attack
def flow_path_of_10000_characters_is_one_short_line(tmp_path) -> None:
    message = _refused(_roots(tmp_path), "[10,005 characters]", "outside the allowed roots",
                       path="/" + "a" * 10004)
    assert len(message) < 800


@attack
def flow_path_with_a_newline_and_escape_stays_one_line(tmp_path) -> None:
    message = _refused(_roots(tmp_path), "\\x0a", "\\x1b", path="/etc/\n\x1b[31mok")
    assert "\x1b" not in message


@attack
def flow_path_that_is_not_text_is_refused(tmp_path) -> None:
    _refused(_roots(tmp_path), "is not a path", sources=[{"path": "/etc"}])


@attack
def flow_predict_out_outside_predictions_is_refused(tmp_path) -> None:
    _refused(_roots(tmp_path), "out=/etc/cron.d/x.csv", "XRAY_HOME/predictions", out="/etc/cron.d/x.csv")


@attack
def flow_predict_overlays_into_an_ingested_folder_are_refused(tmp_path) -> None:
    # Overlay PNGs written into an allowed (read) root would be ingested as films by the next run.
    _refused(_roots(tmp_path), "heatmaps=", "XRAY_HOME/predictions",
             heatmaps=str(tmp_path / "allowed" / "src"))


@attack
def flow_incoming_at_the_file_system_root_does_not_allow_everything(tmp_path) -> None:
    settings = _roots(tmp_path, XRAY_ALLOWED_ROOTS="", XRAY_INCOMING="/incoming-xray-test")
    assert settings.allowed_roots == (Path("/incoming-xray-test"),)
    _refused(settings, "sources[0]=/etc", sources=["/etc"])


@attack
def flow_cli_exemption_ends_with_its_call(tmp_path, monkeypatch) -> None:
    from xray_core.io.allowed_roots import caller_paths, confine_parameters

    settings = _roots(tmp_path)
    monkeypatch.chdir(tmp_path)
    with caller_paths(str(tmp_path / "typed"), "rel"):  # a relative one as typed in the user's shell
        assert confine_parameters(settings, read={"path": str(tmp_path / "typed"), "sources": ["rel"]}) == {
            "path": str(tmp_path / "typed"), "sources": [str(tmp_path / "rel")]}
    _refused(settings, "outside the allowed roots", path=str(tmp_path / "typed"))
    _refused(settings, "sources[0]=rel is a relative path", sources=["rel"])


@attack
def flow_embed_snapshot_outside_reports_is_refused(tmp_path) -> None:
    from xray_core.errors import PathRefusedError
    from xray_core.io.allowed_roots import confine_to

    settings = _roots(tmp_path)
    with pytest.raises(PathRefusedError, match=r"^snapshot=/etc/passwd is outside the allowed roots"):
        confine_to(settings, "/etc/passwd", settings.reports_dir, name="snapshot")


@attack
def allowed_roots_setting_that_is_relative_exits_2(xray_env, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XRAY_ALLOWED_ROOTS", "data/incoming")
    code, err = _cli(capsys, "status")
    assert code == 2 and "XRAY_ALLOWED_ROOTS=data/incoming: must be comma-separated absolute folder" in err


# ---- round three: doctor (issue 23 item 1: a full disk never becomes catalogue loss; xray doctor)


def _doctor(capsys, *flags: str) -> tuple[int, dict]:
    """``xray doctor --json flags``: (exit code, report); never a traceback."""
    reset_settings()
    dispose_engines()
    capsys.readouterr()
    code = main(["doctor", "--json", *flags])
    out, err = capsys.readouterr()
    dispose_engines()
    assert "Traceback" not in err, err
    return code, json.loads(out)


def _sqlite_file_only() -> None:
    """These attacks write the SQLite file itself; the PostgreSQL lane has none to write."""
    from conftest import POSTGRES_URL

    if POSTGRES_URL:
        pytest.skip("attacks the SQLite catalogue file; the PostgreSQL lane has none")


def _open_codes(report: dict) -> set[str]:
    return {f["code"] for f in report["findings"] if f["open"]}


def _data_files(root: Path) -> dict[str, bytes]:
    """Every file that holds data (the -shm index and an empty -wal are SQLite's to recreate)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.endswith("-shm") and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


@attack
def wal_only_catalogue_after_a_full_disk_keeps_every_row(xray_env, tmp_path, capsys) -> None:
    _sqlite_file_only()
    from catalogue_faults import catalogue_with_wal_only

    settings = load_settings()
    n = catalogue_with_wal_only(settings, tmp_path / "src")
    code, err = _cli(capsys, "status")
    assert code == 0 and "truncated" not in err, err
    assert len(rows(settings, Image)) == n


@attack
def header_short_main_file_with_wal_takes_new_rows(xray_env, tmp_path, capsys) -> None:
    _sqlite_file_only()
    from catalogue_faults import catalogue_with_wal_only, write_films

    settings = load_settings()
    n = catalogue_with_wal_only(settings, tmp_path / "src")
    write_films(tmp_path / "more", range(100, 104))
    code, err = _cli(capsys, "ingest", str(tmp_path / "more"))
    assert code == 0, err
    assert len(rows(settings, Image)) == n + 4


def _cut_catalogue(tmp_path: Path, wal: bytes) -> tuple[Settings, Path]:
    """A real home whose catalogue.db is cut to half (plus 100 bytes), with ``wal`` as its -wal."""
    _sqlite_file_only()
    settings = load_settings()
    _real_home(settings, tmp_path)
    dispose_engines()
    db_file = settings.home / "catalogue.db"
    data = db_file.read_bytes()
    db_file.write_bytes(data[: len(data) // 2 + 100])
    Path(f"{db_file}-wal").write_bytes(wal)
    return settings, db_file


@attack
def damaged_catalogue_advice_never_moves_the_main_file_alone(xray_env, tmp_path, capsys) -> None:
    _, db_file = _cut_catalogue(tmp_path, b"")  # an empty WAL cannot hold the missing pages
    Path(f"{db_file}-shm").write_bytes(bytes(32768))
    code, err = _cli(capsys, "status")
    assert code == 2 and "truncated" in err and "xray doctor" in err
    assert (f"mv {db_file} {db_file}-wal {db_file}-shm " in err
            and f"mv {db_file} {db_file}.damaged" not in err)


@attack
def garbage_wal_beside_truncated_main_is_damaged_and_untouched(xray_env, tmp_path, capsys) -> None:
    settings, _ = _cut_catalogue(tmp_path, b"not a WAL " * 500)
    before = _data_files(settings.home)
    code, err = _cli(capsys, "status")
    assert code == 2 and "damaged" in err and "SQLite cannot read it" in err and "Traceback" not in err
    assert _data_files(settings.home) == before, "a damaged catalogue is left exactly as it was"


@attack
def zero_byte_catalogue_is_damaged_for_doctor(xray_env, capsys) -> None:
    _sqlite_file_only()
    db_file = Path(xray_env["XRAY_HOME"]) / "catalogue.db"
    db_file.parent.mkdir(parents=True, exist_ok=True)
    db_file.write_bytes(b"")
    code, report = _doctor(capsys, "--repair")
    assert code == 1 and _open_codes(report) == {"catalogue_damaged"}
    assert "empty (0 bytes)" in report["findings"][0]["detail"]
    assert db_file.stat().st_size == 0


@attack
def orphaned_store_file_is_moved_aside_not_deleted(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    _real_home(settings, tmp_path)
    orphan = settings.home / "store" / "00" / "stray.png"
    put(orphan, b"stray bytes")
    code, report = _doctor(capsys)
    assert code == 1 and _open_codes(report) == {"store_orphan"} and orphan.exists()
    code, report = _doctor(capsys, "--repair")
    assert code == 0 and not orphan.exists()
    assert (Path(report["backup"]) / "orphans" / "store" / "00" / "stray.png").read_bytes() == b"stray bytes"


@attack
def missing_store_file_is_reported_never_deleted(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    _real_home(settings, tmp_path)
    (image,) = rows(settings, Image)
    (settings.home / image.stored_path).unlink()
    code, report = _doctor(capsys, "--repair")
    assert code == 1 and _open_codes(report) == {"store_missing"}
    assert [i.sha256 for i in rows(settings, Image)] == [image.sha256]


@attack
def quarantine_copy_and_rejection_row_out_of_step(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    put(tmp_path / "src" / "normal" / "text.png", b"not an image at all")
    put(tmp_path / "src" / "normal" / "ok.png", png_bytes(91))
    ingest_source(tmp_path / "src", settings=settings)
    (rejection,) = rows(settings, Rejection)
    (settings.home / rejection.quarantine_path).unlink()
    put(settings.home / "quarantine" / "no-row.png", b"stray")
    code, report = _doctor(capsys)
    assert code == 1 and _open_codes(report) == {"quarantine_missing", "quarantine_orphan"}


@attack
def model_checkpoint_file_missing_is_reported(xray_env, tmp_path, capsys) -> None:
    settings = load_settings()
    version = _save_model(settings, 3)
    (settings.home / "models" / str(version) / "head.safetensors").unlink()
    code, report = _doctor(capsys, "--repair")
    assert code == 1 and _open_codes(report) == {"model_file_missing"}
    assert report["backup"] is None, "nothing --repair may fix: no backup, no change"


@attack
def doctor_repair_without_space_for_a_backup_changes_nothing(xray_env, tmp_path, capsys, monkeypatch) -> None:
    _sqlite_file_only()
    import errno
    import shutil

    settings = load_settings()
    _real_home(settings, tmp_path)
    put(settings.home / "store" / "00" / "stray.png", b"stray bytes")
    dispose_engines()
    before = _data_files(settings.home)

    def full(*args, **kwargs):  # what copying onto a full disk raises
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copy2", full)
    code, err = _cli(capsys, "doctor", "--repair")
    assert code == 1 and "no space to keep a copy" in err and "Traceback" not in err
    assert _data_files(settings.home) == before and not any((settings.home / "doctor").iterdir())


@attack
def doctor_moves_no_orphan_while_an_ingest_runs(xray_env, tmp_path, capsys) -> None:
    from db import session_scope
    from xray_core.data.catalogue import open_catalogue
    from xray_core.data.sources import ingest_owner

    settings = load_settings()
    _real_home(settings, tmp_path)
    with session_scope(open_catalogue(settings)) as s:  # a running ingest (this live process owns it)
        s.add(Source(kind="folder", path=str(tmp_path), status="running", counts={"owner": ingest_owner()}))
    orphan = settings.home / "store" / "00" / "new.png"
    put(orphan, b"written before its row")
    code, report = _doctor(capsys, "--repair")
    assert code == 1 and _open_codes(report) == {"store_orphan"} and orphan.exists()
    assert any("ingest is running" in note for note in report["notes"])


# ---- round three: quarantine (issue 23 items 2 and 7)


def _one_film_many_rows(root: Path, n_rows: int) -> tuple[bytes, Path]:
    """One film and a manifest naming it ``n_rows`` times with alternating labels (every second row a
    label_conflict), as the hostile pass's million-row export did."""
    film = put(root / "img" / "film.png", png_bytes(120))
    labels = ("normal", "pneumonia")
    return film, write_manifest(root, [["img/film.png", labels[i % 2]] for i in range(n_rows)])


def _quarantine_files(settings: Settings) -> list[Path]:
    folder = settings.home / "quarantine"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@attack
def ten_thousand_conflicting_rows_to_one_file_add_one_quarantine_copy(settings, tmp_path) -> None:
    film, manifest = _one_film_many_rows(tmp_path / "batch", 10_000)
    summary = ingest_source(tmp_path / "batch", manifest=manifest, settings=settings)
    assert (summary.added, summary.duplicates) == (1, 4_999)
    assert summary.rejected_by_reason == {"label_conflict": 5_000}
    (copy,) = _quarantine_files(settings)
    assert copy.read_bytes() == film and copy.name == f"{sha(film)}.png"
    assert {r.quarantine_path for r in rows(settings, Rejection)} == {str(copy.relative_to(settings.home))}
    q = summary.quarantine
    assert (q["copies_written"], q["bytes_written"], q["rows_sharing_a_copy"]) == (1, len(film), 4_999)
    # The next export of the same rows (a touched manifest, new row paths) still adds no copy.
    again = write_manifest(tmp_path / "batch2", [["film.png", "pneumonia"]] * 3)
    put(tmp_path / "batch2" / "film.png", film)
    second = ingest_source(tmp_path / "batch2", manifest=again, settings=settings)
    assert second.rejected_by_reason == {"label_conflict": 3} and second.quarantine["copies_written"] == 0
    assert _quarantine_files(settings) == [copy]


@attack
def conflicting_rows_at_the_quarantine_cap_are_rows_without_copies(xray_env, tmp_path, capsys,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("XRAY_QUARANTINE_MAX_BYTES", "1000")  # below the film's size
    film, manifest = _one_film_many_rows(tmp_path / "batch", 200)
    code = main(["ingest", str(tmp_path / "batch"), "--manifest", str(manifest), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["rejected_by_reason"] == {"label_conflict": 100}
    assert out["quarantine"]["copies_skipped"] == 100 and out["quarantine"]["copies_written"] == 0
    assert "past XRAY_QUARANTINE_MAX_BYTES=1,000" in out["quarantine"]["skipped_because"]
    settings = load_settings()
    rejections = rows(settings, Rejection)
    assert len(rejections) == 100
    assert all(r.quarantine_path is None and r.sha256 == sha(film) for r in rejections)
    assert all("XRAY_QUARANTINE_MAX_BYTES" in r.detail for r in rejections)
    assert _quarantine_files(settings) == []


@attack
def quarantine_cap_counts_older_copies_and_leaves_their_names(settings, tmp_path) -> None:
    """A quarantine written by an older version (``<sha16>-<random>-<name>`` files, rows naming them):
    nothing is renamed or lost, and its bytes count towards the cap."""
    from db import session_scope
    from xray_core.data.catalogue import open_catalogue

    old = settings.home / "quarantine" / "0123456789abcdef-1a2b3c4d-old.png"
    put(old, b"old quarantined bytes" * 40)  # 840 bytes
    with session_scope(open_catalogue(settings)) as s:
        s.add(Source(kind="folder", path="/old", status="done"))
        s.flush()
        s.add(Rejection(source_id=1, path="/old/normal/old.png", reason="not_an_image", detail="old row",
                        quarantine_path="quarantine/0123456789abcdef-1a2b3c4d-old.png"))
    capped = settings.with_overrides(quarantine_max_bytes=1000)
    put(tmp_path / "src" / "normal" / "a.png", b"x" * 100)  # fits beside the old copy
    put(tmp_path / "src" / "normal" / "b.png", b"y" * 100)  # would pass 1,000 bytes
    summary = ingest_source(tmp_path / "src", settings=capped)
    assert summary.quarantine["copies_written"] == 1 and summary.quarantine["copies_skipped"] == 1
    by_path = {r.path: r for r in rows(settings, Rejection)}
    assert by_path["/old/normal/old.png"].quarantine_path == "quarantine/0123456789abcdef-1a2b3c4d-old.png"
    assert old.read_bytes() == b"old quarantined bytes" * 40
    a = next(r for p, r in by_path.items() if p.endswith("a.png"))
    b = next(r for p, r in by_path.items() if p.endswith("b.png"))
    # Named by the bytes' sha256; no suffix, as no image format was recognised.
    assert a.quarantine_path == f"quarantine/{sha(b'x' * 100)[:2]}/{sha(b'x' * 100)}"
    assert b.quarantine_path is None and "quarantine/ (940 bytes)" in b.detail  # 840 old + 100 new


@attack
def damaged_quarantine_copy_is_replaced_not_shared(settings, tmp_path) -> None:
    bad = put(tmp_path / "src" / "normal" / "a.png", b"not an image at all")
    key = f"quarantine/{sha(bad)[:2]}/{sha(bad)}"
    put(settings.home / key, b"not an image at aXX")  # same name and size, other bytes
    ingest_source(tmp_path / "src", settings=settings)
    (rej,) = rows(settings, Rejection)
    assert rej.quarantine_path == key and (settings.home / key).read_bytes() == bad


@attack
def exact_copy_under_another_manifest_patient_is_recorded_and_counted(xray_env, tmp_path, capsys,
                                                                       monkeypatch) -> None:
    """Known bytes (catalogued by an earlier ingest, so not decoded again) under another manifest
    patient: a row naming both, counted by status; the same patient again stays a duplicate. Both in
    this process and through the worker pool (which decodes, then learns the bytes are known)."""
    from xray_core.report.status import status_report

    film = put(tmp_path / "first" / "img" / "f.png", png_bytes(121))
    header = ("file", "label", "patient_id")
    ingest_source(tmp_path / "first", settings=load_settings(),
                  manifest=write_manifest(tmp_path / "first", [["img/f.png", "normal", "P1"]], header))
    for workers in ("1", "2"):
        monkeypatch.setenv("XRAY_INGEST_WORKERS", workers)
        root = tmp_path / f"again{workers}"
        put(root / "img" / "f.png", film)
        manifest = write_manifest(root, [["img/f.png", "normal", "P1"],
                                         ["img/f.png", "normal", f"P{workers}9"]], header)
        summary = ingest_source(root, manifest=manifest, settings=load_settings())
        assert summary.duplicates == 1, workers
        assert summary.rejected_by_reason == {"duplicate_other_patient": 1}, workers
    settings = load_settings()
    assert [i.patient_id for i in rows(settings, Image)] == ["P1"]
    details = sorted(r.detail for r in rows(settings, Rejection))
    assert len(details) == 2 and all("(patient P1)" in d for d in details)
    assert "(patient P19)" in details[0] and "(patient P29)" in details[1]
    assert all(r.quarantine_path is None for r in rows(settings, Rejection))
    catalogue = status_report(settings)["catalogue"]
    assert catalogue["rejections"]["by_reason"] == {"duplicate_other_patient": 2}
    assert any("duplicate_other_patient" in note for note in catalogue["notes"])
    code, _ = _cli(capsys, "status")
    assert code == 0


@attack
def exact_copy_of_a_dicom_film_never_shows_its_raw_patient_id(xray_env, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XRAY_NEAR_COPY_DISTANCE", "-1")
    settings = load_settings()
    data = put(tmp_path / "first" / "normal" / "scan.dcm",
               dicom_bytes("Doe^John-12345", patient_name="Doe^John"))
    ingest_source(tmp_path / "first", settings=settings)
    (img,) = rows(settings, Image)
    assert img.patient_id.startswith("dcm-")  # the DICOM's own PatientID, salted
    root = tmp_path / "again"
    put(root / "img" / "scan.dcm", data)
    put(root / "img" / "scan-same.dcm", data)
    manifest = write_manifest(root, [["img/scan.dcm", "normal", "P7"], ["img/scan-same.dcm", "normal", ""]],
                              ("file", "label", "patient_id"))
    summary = ingest_source(root, manifest=manifest, settings=settings)
    # The manifest's P7 and the film's own (salted) DICOM PatientID are ids of two schemes (a pseudonymised
    # export names every patient otherwise): no contradiction, both rows are plain duplicates.
    assert (summary.duplicates, summary.rejected_by_reason) == (2, {})
    # Two manifests that name two patients for the same bytes do contradict each other: the row names
    # both as the catalogue stores them, and the raw DICOM PatientID nowhere.
    film = put(tmp_path / "one" / "a.dcm", dicom_bytes("Roe^Jane-777", patient_name="Roe^Jane"))
    put(tmp_path / "two" / "b.dcm", film)
    first = write_manifest(tmp_path / "one", [["a.dcm", "normal", "P1"]], ("file", "label", "patient_id"))
    ingest_source(tmp_path / "one", manifest=first, settings=settings)
    second = write_manifest(tmp_path / "two", [["b.dcm", "normal", "P2"]], ("file", "label", "patient_id"))
    summary = ingest_source(tmp_path / "two", manifest=second, settings=settings)
    assert summary.rejected_by_reason == {"duplicate_other_patient": 1}
    (rej,) = rows(settings, Rejection)
    assert "(patient P1)" in rej.detail and "(patient P2)" in rej.detail
    assert not any(secret in rej.detail for secret in ("Doe^John", "12345", "Roe^Jane", "777"))


@attack
def a_folder_ingested_with_its_manifest_then_by_file_names_is_duplicates_only(xray_env, tmp_path) -> None:
    """The same patients under two id schemes (the manifest's "kermany-person3", the file name's
    "person3") are not copies under another patient: re-ingesting the folder is plain duplicates."""
    settings = load_settings()
    root = tmp_path / "sample"
    table = []
    for seed in range(4):
        label = ("normal", "pneumonia")[seed % 2]
        put(root / label / f"person{seed}_x.png", png_bytes(100 + seed))
        table.append([f"{label}/person{seed}_x.png", label, f"kermany-person{seed}"])
    manifest = write_manifest(root, table, ("file", "label", "patient_id"))
    assert ingest_source(root, manifest=manifest, settings=settings).added == 4
    manifest.unlink()
    again = ingest_source(root, settings=settings)
    assert (again.duplicates, again.rejected, again.added) == (4, 0, 0)
    assert rows(settings, Rejection) == []


# ---- round three: decode (issue 23, items 4, 5 and 8): predict refuses what ingest quarantines, per film;
# Pillow's warnings never reach stderr.


@pytest.fixture(scope="module")
def decode_champion(tmp_path_factory):
    """A tiny catalogue with a champion (tests/tinymodel.py), for the predict attacks below."""
    from tinymodel import tiny_home

    from xray_core.registry.versions import promote_manually

    with tiny_home(tmp_path_factory.mktemp("decode-champion")) as home:
        promote_manually(home.settings, home.versions[0], reason="test champion")
        yield home


def _predict_rows(home, files: dict[str, bytes], tmp_path: Path) -> dict[str, dict]:
    """Predict a folder of ``files`` (plus one good film) with the champion; the CSV's rows by file."""
    from xray_core.pipeline.predict import predict_folder

    root = tmp_path / "films"
    for name, data in {"good.png": png_bytes(130), **files}.items():
        put(root / name, data)
    result = predict_folder(home.settings, root, out=tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as fh:
        by_file = {r["file"]: r for r in csv.DictReader(fh)}
    assert result["files"] == len(files) + 1 and by_file["good.png"]["status"] == "ok"
    return by_file


@attack
def predict_refuses_a_blank_film(decode_champion, tmp_path) -> None:
    out = _predict_rows(decode_champion, {"blank.png": _png_of(blank_film(128, 0.995))}, tmp_path)
    assert out["blank.png"]["status"] == "rejected" and out["blank.png"]["error"].startswith("blank_image: ")
    assert out["blank.png"]["predicted_label"] == ""


@attack
def predict_refuses_the_7000x7000_jpeg_over_64x64_data(decode_champion, tmp_path) -> None:
    out = _predict_rows(decode_champion, {"corrupt.jpeg": jpeg_declaring(7000, 7000)}, tmp_path)
    row = out["corrupt.jpeg"]
    assert row["status"] == "rejected" and row["error"].startswith("truncated: ")
    assert "ends early" in row["error"]


@attack
def predict_refuses_a_jpeg_cut_with_an_end_marker(decode_champion, tmp_path) -> None:
    out = _predict_rows(decode_champion, {"cut.jpeg": jpeg_cut_with_end_marker(131)}, tmp_path)
    assert out["cut.jpeg"]["status"] == "rejected" and out["cut.jpeg"]["error"].startswith("truncated: ")


@attack
def predict_refuses_a_png_whose_pixel_data_ends_early(decode_champion, tmp_path) -> None:
    out = _predict_rows(decode_champion, {"short.png": png_short_idat(132)}, tmp_path)
    assert out["short.png"]["status"] == "rejected" and out["short.png"]["error"].startswith("truncated: ")


@attack
def predict_embeds_before_holding_many_large_films(decode_champion, tmp_path, monkeypatch) -> None:
    """With the held-pixel budget below one film, every film is embedded on its own (the path large
    films take), and the probabilities are the ones a single full batch gives."""
    import xray_core.pipeline.predict as predict
    from xray_core.model import train

    films = {f"f{i}.png": png_bytes(140 + i) for i in range(3)}
    together = _predict_rows(decode_champion, films, tmp_path / "together")
    calls: list[int] = []
    real = train.predict_proba
    monkeypatch.setattr(train, "predict_proba",
                        lambda head, feats: (calls.append(len(feats)), real(head, feats))[1])
    monkeypatch.setattr(predict, "HELD_PIXELS", 64 * 64)
    alone = _predict_rows(decode_champion, films, tmp_path / "alone")
    assert calls == [1, 1, 1, 1]  # good.png and the three films, one at a time
    for name in films:
        assert alone[name]["p_normal"] == together[name]["p_normal"]


def _png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@attack
def pil_decompression_bomb_warning_never_reaches_stderr(tmp_path) -> None:
    """A real 9500 x 9500 film (90 M pixels: above PIL's warning limit, below XRAY_MAX_PIXELS=100 M) is
    ingested by the CLI in a fresh process, where Python's default filters would print the warning."""
    side = 9500
    gradient = np.add.outer(np.arange(side) % 251, np.arange(side) % 241).astype(np.uint8)
    put(tmp_path / "src" / "normal" / "big.jpeg", _jpeg(gradient, quality=50))
    del gradient
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XRAY_", "PREFECT_API_URL", "PYTHONWARNINGS"))}
    env.update({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home"), "XRAY_MAX_PIXELS": "100000000",
                "PYTHONPATH": str(PROJECT)})
    done = subprocess.run([sys.executable, "-m", "xray_cli.main", "ingest", str(tmp_path / "src"), "--json"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=PROJECT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["added"] == 1
    assert "Warning" not in done.stderr and "decompression bomb" not in done.stderr.lower(), done.stderr


# ---- round three: paths (issue 23 items 3 and 6: bytes-safe paths, clear failures)
# A home whose folder name holds the byte 0xff (Python sees a lone surrogate "\udcff"), a 10,000-character
# path, a read-only store, an unreadable manifest, user errors through the retrain flow, and SIGTERM.

_POLICY_FIRST_CHAMPION = {"XRAY_MIN_TEST_PER_CLASS": "1", "XRAY_FLOOR_MACRO_AUROC": "0.0",
                          "XRAY_FLOOR_SENSITIVITY": "0.0"}  # a tiny synthetic set still gets a first champion


def _non_utf8_dir(tmp_path: Path) -> Path:
    """``tmp_path/r\\xff`` (a folder name that is not UTF-8), as the str Python gives for it."""
    folder = os.path.join(os.fsencode(tmp_path), b"r\xff")
    os.makedirs(folder)
    return Path(os.fsdecode(folder))


def _strict_json(text: str) -> object:
    """Parse as a strict consumer would: UTF-8 bytes, then JSON with no lone surrogate in any string
    (Python's json.loads alone accepts a ``"\\udcff"`` escape, which Go, Rust and browsers refuse)."""
    data = json.loads(text.encode("utf-8").decode("utf-8", "strict"))
    for s in _strings(data):
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in s), repr(s)
    return data


def _strings(value: object):
    """Every string in a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _twelve_films_for_a_first_champion(monkeypatch, src: Path, home: Path) -> None:
    """12 synthetic films in ``src``, XRAY_HOME=``home`` and the policy that lets them make v1 champion."""
    from xray_core.data.synthetic import write_dataset

    write_dataset(src, patients_per_label=6, images_per_patient=1, size=64, seed=1)
    monkeypatch.setenv("XRAY_HOME", str(home))
    for key, value in _POLICY_FIRST_CHAMPION.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    dispose_engines()


def _retrain_local_under(monkeypatch, capsys, base: Path) -> tuple[int, str, str]:
    """A first retrain (--local) of 12 synthetic films with XRAY_HOME=base/home: (exit, stdout, stderr)."""
    _twelve_films_for_a_first_champion(monkeypatch, base / "src", base / "home")
    capsys.readouterr()
    code = main(["retrain", "--local", "--no-incoming", "--source", str(base / "src"), "--json"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _decision_rows(settings: Settings) -> list[tuple[str, int | None]]:
    from db.schema import Promotion

    return [(p.decision, p.champion_after) for p in sorted(rows(settings, Promotion), key=lambda p: p.id)]


@attack
def non_utf8_home_retrain_local_writes_every_report(xray_env, tmp_path, capsys, monkeypatch) -> None:
    """Promoted, then every report written: report.md, report.html, result.json, card.json valid UTF-8
    and strict JSON (it used to promote, then die on report.html with exit 1 and no result.json)."""
    base = _non_utf8_dir(tmp_path)
    code, out, err = _retrain_local_under(monkeypatch, capsys, base)
    assert code == 0, err
    result = _strict_json(out)
    assert result["state"] == "Promoted" and "\\xff" in result["report"], result
    settings = load_settings()
    assert _decision_rows(settings) == [("promote", 1)]
    (run,) = (settings.home / "reports").iterdir()
    for name in ("report.md", "report.html", "result.json"):
        (run / name).read_bytes().decode("utf-8")  # strict: no raw 0xff byte, no encoded surrogate
    assert _strict_json((run / "result.json").read_text())["state"] == "Promoted"
    assert "r\\xff" in (run / "report.html").read_text()
    cards = list(settings.home.rglob("card.json"))
    assert cards and all(_strict_json(c.read_text()) for c in cards)


@attack
def non_utf8_home_predict_heatmaps_writes_the_csv(xray_env, tmp_path, capsys, monkeypatch) -> None:
    """--out and --heatmaps under a 0xff folder: overlays and the CSV written (the CSV used to be lost)."""
    base = _non_utf8_dir(tmp_path)
    code, _, err = _retrain_local_under(monkeypatch, capsys, base)
    assert code == 0, err
    out, heatmaps = base / "out.csv", base / "heatmaps"
    code, err = _cli(capsys, "predict", str(base / "src"), "--out", str(out), "--heatmaps", str(heatmaps))
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8"))))
    assert len(table) == 12 and all(r["status"] == "ok" for r in table)
    assert all("r\\xff" in r["heatmap"] for r in table)  # shown escaped, the file itself is there
    assert len(list(heatmaps.glob("*.png"))) == 12


@attack
def non_utf8_home_status_json_has_no_lone_surrogate(xray_env, tmp_path, capsys, monkeypatch) -> None:
    base = _non_utf8_dir(tmp_path)
    monkeypatch.setenv("XRAY_HOME", str(base / "home"))
    put(base / "src" / "normal" / "a.png", png_bytes(110))
    code, err = _cli(capsys, "ingest", str(base / "src"))
    assert code == 0, err
    reset_settings()
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    text = capsys.readouterr().out
    assert "\\udc" not in text  # not even as a JSON escape
    status = _strict_json(text)
    assert any("r\\xff" in s for s in _strings(status))  # the home is shown, escaped
    assert main(["status"]) == 0  # the text rendering writes to a UTF-8 stdout too
    assert "r\\xff" in capsys.readouterr().out


@attack
def non_utf8_home_predict_flow_artifacts_reach_the_server_escaped(xray_env, tmp_path, capsys, monkeypatch,
                                                                  prefect_server) -> None:
    """The predict flow's default CSV path lies under the home: its artifacts (the CSV path in the
    description, heatmap paths in the table) go to the Prefect server as JSON, escaped; the run
    completes (httpx used to refuse the lone surrogate after the CSV was written)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.predict import predict
    from xray_core.data.synthetic import write_dataset

    base = _non_utf8_dir(tmp_path)
    code, _, err = _retrain_local_under(monkeypatch, capsys, base)
    assert code == 0, err
    films = tmp_path / "films"  # a UTF-8 folder: flow parameters themselves must be UTF-8 (next attack)
    write_dataset(films, patients_per_label=2, images_per_patient=1, size=64, seed=5, patient_offset=90)
    state = predict(str(films), return_state=True)
    assert state.is_completed(), state.message
    assert (base / "home" / "predictions" / "films.csv").is_file()

    async def artifacts():
        async with get_client() as client:
            only = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            return await client.read_artifacts(artifact_filter=only)

    found = {a.key: a for a in asyncio.run(artifacts())}
    assert "r\\xff" in found["predict-summary"].data and "\\udc" not in found["predict-summary"].data


@attack
def non_utf8_home_retrain_flow_is_promoted_with_its_reports(xray_env, tmp_path, monkeypatch,
                                                            prefect_server) -> None:
    """The retrain flow under a non-UTF-8 home: Promoted, report files and artifacts written (the
    report path under the home reaches the server escaped)."""
    from flows.retrain import retrain

    base = _non_utf8_dir(tmp_path)
    _twelve_films_for_a_first_champion(monkeypatch, tmp_path / "src", base / "home")
    state = retrain(sources=[str(tmp_path / "src")], use_incoming=False, trigger="test", return_state=True)
    assert state.name == "Promoted", state.message
    result = state.result()
    assert Path(result["report"]).is_file()  # the flow's own return value keeps the real path
    (run,) = (base / "home" / "reports").iterdir()
    assert _strict_json((run / "result.json").read_text())["state"] == "Promoted"


@attack
def non_utf8_path_for_a_flow_is_refused_before_the_run(xray_env, tmp_path, capsys, monkeypatch) -> None:
    """With PREFECT_API_URL set, a path argument that is not UTF-8 cannot become a flow parameter (JSON):
    exit 2 naming it and the way out, before any server is asked (it used to fail creating the run)."""
    base = _non_utf8_dir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached: refused before
    code, err = _cli(capsys, "predict", str(base))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "r\\xff is not valid UTF-8" in err and "--local" in err and "PREFECT_API_URL=" not in err


_LONG = "/".join(["d" * 200] * 50)  # 10,049 characters: more than PATH_MAX (4,096)


def _assert_one_line_path_error(code: int, err: str, *, says: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "unexpected" not in err, err
    assert says in err and len(err) < 700, err  # the path is cut to ~200 characters, not 10,000
    assert "characters]" in err  # the cut says how long the path was


@attack
def long_path_ingest_is_one_line_exit_2(xray_env, tmp_path, capsys) -> None:
    code, err = _cli(capsys, "ingest", str(tmp_path / _LONG))
    _assert_one_line_path_error(code, err, says="ENAMETOOLONG")


@attack
def long_path_predict_out_is_one_line_exit_2(xray_env, tmp_path, capsys) -> None:
    code, err = _cli(capsys, "predict", str(tmp_path), "--out", str(tmp_path / _LONG / "p.csv"))
    _assert_one_line_path_error(code, err, says="ENAMETOOLONG")


@attack
def long_path_retrain_source_is_one_line_exit_2(xray_env, tmp_path, capsys) -> None:
    from db.schema import Promotion

    code, err = _cli(capsys, "retrain", "--local", "--no-incoming", "--source", str(tmp_path / _LONG))
    _assert_one_line_path_error(code, err, says="ENAMETOOLONG")
    (row,) = rows(load_settings(), Promotion)  # the audit row names the error the same short way
    assert row.decision == "failed" and "ENAMETOOLONG" in row.rationale and len(row.rationale) < 700


def _refuse_writes_under(monkeypatch, folder: Path, err: int) -> None:
    """mkdir and mkstemp below ``folder`` fail with ``err``, as on a read-only mount (the tests run as
    root, whom chmod does not stop)."""
    import tempfile as tempfile_module

    real_mkdir, real_mkstemp = os.mkdir, tempfile_module.mkstemp

    def below(path) -> bool:
        return path is not None and os.fspath(path).startswith(os.fspath(folder))

    def mkdir(path, *args, **kwargs):
        if below(path):
            raise OSError(err, os.strerror(err), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if below(dir):
            raise OSError(err, os.strerror(err), os.fspath(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(tempfile_module, "mkstemp", mkstemp)


@attack
def read_only_store_is_one_line_exit_2(xray_env, tmp_path, capsys, monkeypatch) -> None:
    import errno

    settings = load_settings()
    before = _real_home(settings, tmp_path)
    put(tmp_path / "more" / "normal" / "b.png", png_bytes(111))
    _refuse_writes_under(monkeypatch, settings.home / "store", errno.EROFS)
    code, err = _cli(capsys, "ingest", str(tmp_path / "more"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unexpected" not in err, err
    assert "Read-only file system (EROFS)" in err and str(settings.home / "store") in err
    monkeypatch.undo()  # writable again: nothing was lost, the next ingest takes the new film
    (img,) = rows(settings, Image)
    assert (settings.home / img.stored_path).read_bytes() == before
    assert ingest_source(tmp_path / "more", settings=settings).added == 1


@attack
def unreadable_manifest_is_one_line_exit_2(xray_env, tmp_path, capsys, monkeypatch) -> None:
    import builtins

    manifest = write_manifest(tmp_path / "src", [["normal/a.png", "normal"]])
    real_open = builtins.open

    def refuse(file, *args, **kwargs):  # EACCES, as for another user's file
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(manifest):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    code, err = _cli(capsys, "ingest", str(manifest))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unexpected" not in err, err
    assert f"cannot use {manifest}: Permission denied (EACCES)" in err


@attack
def user_oserrors_are_never_retried_as_transient(tmp_path) -> None:
    import errno
    from types import SimpleNamespace

    from flows.common import transient_io

    def retried(exc: BaseException) -> bool:
        return transient_io(None, None, SimpleNamespace(result=lambda raise_on_failure: exc))

    for code in (errno.ENAMETOOLONG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                 errno.ELOOP, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EINVAL):
        assert not retried(OSError(code, os.strerror(code), "/x")), errno.errorcode[code]
    for code in (errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET, errno.EAGAIN):
        assert retried(OSError(code, os.strerror(code), "/x")), errno.errorcode[code]
    assert retried(TimeoutError()) and not retried(ValueError("bad data"))


def _flow_task_runs(flow_run_id) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            return await client.read_task_runs(flow_run_filter=flow_runs)

    return asyncio.run(read())


@attack
def long_path_in_the_retrain_flow_fails_once_with_one_line(xray_env, tmp_path, prefect_server) -> None:
    """ENAMETOOLONG is the user's to fix: the ingest task is not retried, and the run ends Failed
    with the CLI's one line (it used to be retried as transient, then fail with a traceback)."""
    from flows.retrain import retrain

    reset_settings()
    state = retrain(sources=[str(tmp_path / _LONG)], use_incoming=False, trigger="test", return_state=True)
    assert state.is_failed()
    assert state.message.startswith("cannot use ") and "ENAMETOOLONG" in state.message, state.message
    assert len(state.message) < 700 and "\n" not in state.message
    runs = [r for r in _flow_task_runs(state.state_details.flow_run_id) if r.name.startswith("ingest")]
    assert [r.run_count for r in runs] == [1], [(r.name, r.run_count) for r in runs]


@attack
def not_enough_data_as_a_flow_fails_with_the_cli_line(xray_env, tmp_path, capsys, prefect_server) -> None:
    """The same one line as ``xray retrain --local`` (exit 2), as the Failed state's message; called as
    a function, the flow still raises the NotEnoughDataError itself (so the CLI exits 2 either way)."""
    from flows.retrain import retrain
    from xray_core.data.synthetic import write_dataset
    from xray_core.errors import NotEnoughDataError

    write_dataset(tmp_path / "few", patients_per_label=2, images_per_patient=1, size=64, seed=1)
    reset_settings()
    state = retrain(sources=[str(tmp_path / "few")], use_incoming=False, trigger="test", return_state=True)
    assert state.is_failed() and state.message.startswith("training needs images in the train and val"), state
    with pytest.raises(NotEnoughDataError) as raised:
        state.result()
    assert str(raised.value) == state.message
    dispose_engines()
    code, err = _cli(capsys, "retrain", "--local", "--no-incoming")  # same catalogue, same shortage
    assert code == 2 and err == f"xray retrain: {state.message}\n"


@attack
def report_that_cannot_be_written_after_promotion_keeps_the_decision(xray_env, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    """The champion changed, then report writing failed: the run stays Promoted (exit 0) and says the
    report is missing, never "failed" beside a new champion."""
    import errno

    import xray_core.report.files as files

    def refuse(settings, result, run_dir):
        raise OSError(errno.EROFS, "Read-only file system", str(run_dir / "report.html"))

    monkeypatch.setattr(files, "write_run_reports", refuse)
    code, out, err = _retrain_local_under(monkeypatch, capsys, tmp_path / "run")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "completed" and result["state"] == "Promoted", result
    assert "the report could not be written" in result["state_message"] and "EROFS" in result["report_error"]
    assert _decision_rows(load_settings()) == [("promote", 1)]  # no "failed" row beside the promotion


@attack
def sigterm_during_a_local_retrain_prints_what_the_audit_row_says(tmp_path) -> None:
    from xray_core.data.synthetic import write_dataset

    write_dataset(tmp_path / "src", patients_per_label=6, images_per_patient=1, size=64, seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_")}
    env.update(TEST_ENV, **_POLICY_FIRST_CHAMPION, XRAY_HOME=str(tmp_path / "home"),
               XRAY_FAULT_KILL_AT="retrain.after_train:1:TERM")
    done = subprocess.run([sys.executable, "-m", "xray_cli.main", "retrain", "--local", "--no-incoming",
                           "--source", str(tmp_path / "src")], env=env, cwd=PROJECT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    settings = load_settings({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home")})
    from db.schema import Promotion

    (row,) = rows(settings, Promotion)
    assert row.decision == "failed" and "terminated by a signal (SIGTERM)" in row.rationale
    assert done.stderr == ("xray retrain: terminated; the audit row says: run cancelled before a decision "
                           "(terminated by a signal (SIGTERM)); champion unchanged\n")
    dispose_engines()


@attack
def sigterm_during_an_ingest_prints_one_line_and_records_it_failed(tmp_path) -> None:
    from xray_core.data.synthetic import write_dataset

    write_dataset(tmp_path / "src", patients_per_label=20, images_per_patient=1, size=64, seed=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_")}
    env.update(TEST_ENV, XRAY_HOME=str(tmp_path / "home"), XRAY_FAULT_KILL_AT="ingest.group_committed:1:TERM")
    done = subprocess.run([sys.executable, "-m", "xray_cli.main", "ingest", str(tmp_path / "src")], env=env,
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr == ("xray ingest: terminated (SIGTERM); what was committed before stays, the "
                           "transaction in progress was rolled back and this ingest is recorded as failed; "
                           "the next ingest takes up the rest\n")
    settings = load_settings({**TEST_ENV, "XRAY_HOME": str(tmp_path / "home")})
    (source,) = rows(settings, Source)
    assert source.status == "failed" and len(rows(settings, Image)) == 32  # the first group of 32 stands
    dispose_engines()


def test_round_three_covers_at_least_90_kinds() -> None:
    assert len(KINDS) + len(ATTACKS) >= 90, (len(KINDS), len(ATTACKS))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_or_recorded(name: str, request: pytest.FixtureRequest) -> None:
    fn = ATTACKS[name]
    import inspect

    kwargs = {p: request.getfixturevalue(p) for p in inspect.signature(fn).parameters}
    fn(**kwargs)
