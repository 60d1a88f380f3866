"""Every relative link in README.md, SECURITY.md and docs/*.md resolves: the file exists and, for
``#anchor``, the target holds a heading with that anchor under GitHub's slug rules.

Why a test: the README was cut into pages under docs/, and a moved section silently breaks the links
that pointed at it. External links (http, mailto) are not fetched: tests run offline.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
# docs/settings.md is generated from the settings declaration; it is listed so that a missing page
# fails here even before any link names it.
EXPECTED_PAGES = ("architecture.md", "operations.md", "data.md", "evaluation.md", "monitoring.md",
                  "settings.md", "benchmarks.md", "testing.md")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+\1")
# [text](target) and ![alt](target); the target stops at whitespace (an optional "title" follows).
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str, *, keep_inline_code: bool = False) -> list[str]:
    """The lines outside fenced code blocks (blank inside them), with inline code removed unless
    ``keep_inline_code``: a link written in code is an example, while a heading's code is part of its
    anchor (``## Per film, in `xray predict` `` -> ``per-film-in-xray-predict``)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        lines.append("" if fenced else line if keep_inline_code else INLINE_CODE.sub("", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than ``-`` and
    ``_`` removed, each space a hyphen (``## Scaling out (several hosts)`` -> ``scaling-out-several-hosts``,
    as GitHub renders it; links between pages use these anchors)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters and digits of any script, and "_"
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8"), keep_inline_code=True):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        targets += [t for t in LINK.findall(line) if not EXTERNAL.match(t)]
    return targets


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no file {_shown(resolved)}")
        elif anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_shown(resolved)}")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert not broken_links(path), f"{path.relative_to(ROOT)}: " + "; ".join(broken_links(path))


def test_the_reference_pages_exist_and_the_readme_links_each() -> None:
    readme_targets = {t.partition("#")[0] for t in relative_links(ROOT / "README.md")}
    missing = [p for p in EXPECTED_PAGES if not (ROOT / "docs" / p).is_file()]
    unlinked = [p for p in EXPECTED_PAGES if f"docs/{p}" not in readme_targets]
    assert not missing and not unlinked, f"missing pages {missing}; not linked from the README {unlinked}"


def test_the_readme_stays_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move reference text to a page under docs/"


@pytest.mark.parametrize(("heading", "slug"), [
    ("Scaling out (several hosts)", "scaling-out-several-hosts"),
    ("Sites, views and near copies", "sites-views-and-near-copies"),
    ("After a crash or a full disk: xray doctor", "after-a-crash-or-a-full-disk-xray-doctor"),
    ("`XRAY_HOME` layout", "xray_home-layout"),
    ("Per film, in `xray predict`", "per-film-in-xray-predict"),
    ("Promotion policy, in plain words", "promotion-policy-in-plain-words"),
    ("Decisions — as states", "decisions--as-states"),
])
def test_slugs_follow_github(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_a_broken_link_and_a_broken_anchor_are_caught(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Title\n\n## Real section\n\n## Real section\n\n"
                                       "```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#real-section) [dup](other.md#real-section-1) [web](https://x.org/a)\n"
                    "[gone](missing.md) [bad anchor](other.md#no-such) [self](#nowhere)\n"
                    "[code](other.md#not-a-heading)\n"
                    "`[in code](nope.md)`\n```\n[fenced](nope.md)\n```\n")
    found = broken_links(page)
    assert [b.split(":")[0] for b in found] == ["missing.md", "other.md#no-such", "#nowhere",
                                                  "other.md#not-a-heading"], found
