"""Bytes-safe text (``io.fsutil.utf8_safe`` / ``json_text``) and OSErrors sorted by who can fix them
(``io.oserrors``): pure functions, no files."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from xray_core.errors import NotEnoughDataError, PathError
from xray_core.io.fsutil import json_text, printable, utf8_safe
from xray_core.io.oserrors import USER_ERRNOS, cut_path, is_transient_io, path_error, user_error

NON_UTF8 = os.fsdecode(b"/data/r\xff/caf\xe9.png")  # '/data/r\udcff/caf\udce9.png'


@pytest.mark.parametrize("text, safe", [
    (NON_UTF8, "/data/r\\xff/caf\\xe9.png"),
    ("plain/ascii.png", "plain/ascii.png"),
    ("caf\u00e9 \U0001f600 line\nbreak", "caf\u00e9 \U0001f600 line\nbreak"),  # valid text is never touched
    ("\ud800 alone", "\\ud800 alone"),  # a surrogate no undecodable byte produced
])
def test_utf8_safe_escapes_only_lone_surrogates(text: str, safe: str) -> None:
    assert utf8_safe(text) == safe
    utf8_safe(text).encode("utf-8")


def test_printable_still_escapes_control_characters_too() -> None:
    assert printable(NON_UTF8 + "\n") == "/data/r\\xff/caf\\xe9.png\\x0a"


def test_json_text_has_no_lone_surrogate_in_values_keys_or_default_output() -> None:
    value = {"path": NON_UTF8, NON_UTF8: [Path(NON_UTF8), ("x", 1.5, None, True)]}
    text = json_text(value, default=str)
    assert "\\ud" not in text and json.loads(text)["path"] == "/data/r\\xff/caf\\xe9.png"
    assert json.loads(text)["/data/r\\xff/caf\\xe9.png"] == ["/data/r\\xff/caf\\xe9.png",
                                                             ["x", 1.5, None, True]]
    assert json_text({"a": [1, 2]}, sort_keys=True) == json.dumps({"a": [1, 2]}, sort_keys=True)
    with pytest.raises(TypeError):  # without default=, what JSON cannot hold is still refused
        json_text({"p": Path("x")})


def test_cut_path_keeps_both_ends_and_says_how_long() -> None:
    long = "/" + "/".join(["d" * 200] * 50) + "/film.png"
    shown = cut_path(long)
    assert len(shown) <= 210 and shown.startswith("/ddd") and shown.endswith("d/film.png")
    assert f"[{len(long):,} characters]" in shown
    assert cut_path("/short/path.png") == "/short/path.png"
    assert cut_path(os.fsencode(NON_UTF8)) == "/data/r\\xff/caf\\xe9.png"


@pytest.mark.parametrize("code", sorted(USER_ERRNOS))
def test_each_user_errno_is_one_line_naming_path_errno_and_remedy(code: int) -> None:
    err = path_error(OSError(code, os.strerror(code), "/x/" + "y" * 5000))
    assert isinstance(err, PathError) and "\n" not in str(err) and len(str(err)) < 500
    assert str(err).startswith("cannot use /x/yyy") and f"({errno.errorcode[code]});" in str(err)
    assert not is_transient_io(OSError(code, os.strerror(code)))


def test_other_errors_are_not_user_errors() -> None:
    assert path_error(OSError(errno.EIO, "I/O error", "/x")) is None
    assert path_error(ValueError("bad")) is None
    assert path_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a", "/b")) is None
    two = path_error(OSError(errno.EACCES, "Permission denied", "/a", None, "/b"))  # e.g. a rename
    assert str(two).startswith("cannot use /a -> /b: Permission denied (EACCES)")
    mine = NotEnoughDataError("too few")
    assert user_error(mine) is mine and user_error(RuntimeError("bug")) is None
