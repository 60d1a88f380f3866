"""The layering the README promises, checked on the source (every import, lazy ones included).

``xray_cli → flows → xray_core → db``; inside ``xray_core`` each stage package imports only the
packages below it (see each package's ``__init__`` docstring); no two files import each other, even
through a chain or a lazy import inside a function (strongly connected components of the module
import graph); nobody imports another module's private (``_name``) names; modules stay small enough
to read.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx  # already installed as a dependency of torch
import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("xray_cli", "flows", "xray_core", "db")

# What each xray_core package (or top-level module) may import from xray_core.
ALLOWED = {
    "errors": set(),
    "faults": set(),
    "rules": {"data"},  # data.labels: what a label name may be
    "settings": {"errors", "data", "rules"},  # data.labels: label normalisation for XRAY_LABELS
    "io": {"errors", "faults", "settings"},
    "data": {"errors", "faults", "io", "settings"},
    "model": {"errors", "faults", "io", "data", "settings"},
    "evaluate": {"errors", "settings"},
    "registry": {"errors", "faults", "io", "data", "model", "settings"},
    "monitor": {"errors", "faults", "io", "data", "model", "evaluate", "registry", "settings"},
    # not pipeline: the pipeline calls the report (imports go pipeline → report, never back)
    # the typed values of one retrain (RunResult ...): below both the pipeline that builds them and the report
    "results": {"data", "evaluate"},
    "report": {"errors", "faults", "io", "data", "model", "evaluate", "registry", "settings", "monitor",
               "results"},
    "pipeline": {"errors", "faults", "io", "data", "model", "evaluate", "registry", "report", "settings",
                 "monitor", "results"},
}
# Import cycles still present while issue 24 is being worked on in parallel branches. The "recipe"
# branch removes the two in report/ (report/ renders a RunResult and no longer imports pipeline/;
# shared formatting moves to report/format.py); its merge deletes those two entries. An entry that
# no longer exists fails test_known_cycles_still_exist, so the sets can only shrink. Add nothing here.
KNOWN_FILE_CYCLES: set[frozenset[str]] = set()
KNOWN_PACKAGE_CYCLES: set[frozenset[str]] = {
    # Not a file cycle: settings and rules import data.labels (what a label name may be) while data
    # imports io and settings. Left for the settings rewrite (issue 24 item 2), which owns both files;
    # moving labels out of data/ (or settings no longer normalising labels) removes it.
    frozenset({"xray_core.data", "xray_core.io", "xray_core.rules", "xray_core.settings"}),
}
MAX_LINES = 420
TOO_LONG_FOR_NOW: set[str] = set()
# Modules that are one declaration, read as a table, with their own, higher limit: every setting is
# declared once, in one class (issue 24), one field a few lines; splitting the class across modules
# would scatter the one list a reader looks a setting up in.
DECLARATIONS = {"xray_core/settings.py": 520}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement in the file, however deeply nested."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def import_graph(root: Path, packages: tuple[str, ...] = LAYERS) -> nx.DiGraph:
    """Module → module it imports, for every ``.py`` under ``root/<package>`` (dotted names; a package
    is its ``__init__``). ``from pkg import sub`` points at the submodule ``pkg.sub`` when there is one,
    else at ``pkg``; imports of anything outside ``packages`` are left out."""
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for package in packages for p in sorted((root / package).rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for target, names in _imports(path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            wanted = subs + ([target] if len(subs) < len(names) or not names else [])
            graph.add_edges_from((module, t) for t in wanted if t in files and t != module)
    return graph


def package_graph(graph: nx.DiGraph, prefix: str = "xray_core") -> nx.DiGraph:
    """The module graph collapsed to ``prefix``'s first-level packages and modules (``xray_core.report``)."""
    depth = prefix.count(".") + 2
    top = {m: ".".join(m.split(".")[:depth]) for m in graph if m.startswith(prefix + ".")}
    collapsed = nx.DiGraph()
    collapsed.add_nodes_from(set(top.values()))
    collapsed.add_edges_from((top[a], top[b]) for a, b in graph.edges
                             if a in top and b in top and top[a] != top[b])
    return collapsed


def cycles(graph: nx.DiGraph) -> set[frozenset[str]]:
    """Every set of nodes that import each other, directly or through a chain."""
    return {frozenset(c) for c in nx.strongly_connected_components(graph) if len(c) > 1}


def _describe(found: set[frozenset[str]]) -> str:
    return "\n".join(" <-> ".join(sorted(c)) for c in sorted(found, key=sorted))


def test_no_two_files_import_each_other() -> None:
    new = cycles(import_graph(ROOT)) - KNOWN_FILE_CYCLES
    assert not new, "files that import each other (move the shared piece where it belongs):\n" + _describe(
        new)


def test_no_two_xray_core_packages_import_each_other() -> None:
    new = cycles(package_graph(import_graph(ROOT))) - KNOWN_PACKAGE_CYCLES
    assert not new, "packages that import each other:\n" + _describe(new)


def test_known_cycles_still_exist() -> None:
    """A cycle that is gone must leave the known lists, so they cannot hide a new one later."""
    graph = import_graph(ROOT)
    gone = (KNOWN_FILE_CYCLES - cycles(graph)) | (KNOWN_PACKAGE_CYCLES - cycles(package_graph(graph)))
    assert not gone, "remove from KNOWN_*_CYCLES in this file:\n" + _describe(gone)


def test_cycle_check_catches_an_injected_cycle(tmp_path: Path) -> None:
    """A lazy import back, a chain of three and ``from package import module`` are all cycles."""
    pkg = tmp_path / "app"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from app.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from app import a  # lazy, inside a function\n    return a\n")
    (pkg / "c.py").write_text("import app.sub.d\n")
    (pkg / "sub" / "d.py").write_text("from app.sub.e import g\n")
    (pkg / "sub" / "e.py").write_text("from app import c\ng = c\n")
    (pkg / "leaf.py").write_text("import os\nfrom app.a import f\n")
    assert cycles(import_graph(tmp_path, ("app",))) == {
        frozenset({"app.a", "app.b"}), frozenset({"app.c", "app.sub.d", "app.sub.e"})}
    assert cycles(package_graph(import_graph(tmp_path, ("app",)), "app")) == {
        frozenset({"app.a", "app.b"}), frozenset({"app.c", "app.sub"})}


def test_cycle_check_catches_a_lazy_import_back_in_the_project() -> None:
    graph = import_graph(ROOT)
    assert graph.has_edge("xray_core.data.facts", "xray_core.data.catalogue")
    graph.add_edge("xray_core.data.catalogue", "xray_core.data.facts")  # what catalogue.py once did
    assert frozenset({"xray_core.data.catalogue", "xray_core.data.facts"}) in cycles(graph)


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    below = LAYERS[LAYERS.index(layer):]
    forbidden = {name for name in LAYERS if name not in below}
    if layer in ("xray_core", "db"):
        forbidden.add("prefect")  # the logic is testable and importable without Prefect
    bad = [f"{p.relative_to(ROOT)} imports {mod}" for p in _modules(layer) for mod, _ in _imports(p)
           if mod.split(".")[0] in forbidden]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT / "xray_core").parts
    return rel[0].removesuffix(".py")


def test_xray_core_packages_import_only_what_their_docstring_allows() -> None:
    bad = []
    for p in _modules("xray_core"):
        own = _package_of(p)
        if own == "__init__":
            continue
        for mod, names in _imports(p):
            parts = mod.split(".")
            if parts[0] != "xray_core":
                continue
            targets = [parts[1]] if len(parts) > 1 else names
            bad += [f"{p.relative_to(ROOT)} ({own}) imports xray_core.{t}" for t in targets
                    if t != own and t not in ALLOWED[own]]
    assert not bad, "\n".join(bad)


def test_every_stage_package_says_what_lives_there() -> None:
    for pkg in (ROOT / "xray_core").iterdir():
        if pkg.is_dir() and (pkg / "__init__.py").exists():
            doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()))
            assert doc and "import" in doc, \
                f"{pkg.name}/__init__.py needs a docstring saying what it may import"


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [f"{p.relative_to(ROOT)}: from {mod} import {name}"
           for layer in LAYERS for p in _modules(layer) for mod, names in _imports(p)
           if mod.split(".")[0] in LAYERS
           for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_modules_stay_readable() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for layer in LAYERS for p in _modules(layer)
            if (n := len(p.read_text().splitlines())) > DECLARATIONS.get(str(p.relative_to(ROOT)), MAX_LINES)
            and str(p.relative_to(ROOT)) not in TOO_LONG_FOR_NOW]
    assert not long, f"split these modules (limit {MAX_LINES} lines):\n" + "\n".join(long)
