"""The layering the README promises, checked on the source (every import, lazy ones included).

``xray_cli → flows → xray_core → db``; inside ``xray_core`` each stage package imports only the
packages below it (see each package's ``__init__`` docstring); nobody imports another module's
private (``_name``) names; modules stay small enough to read.
"""

from __future__ import annotations

import ast
from pathlib import Path

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
MAX_LINES = 420
TOO_LONG_FOR_NOW: set[str] = set()


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
            assert doc and "import" in doc, f"{pkg.name}/__init__.py needs a docstring saying what it may import"


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [f"{p.relative_to(ROOT)}: from {mod} import {name}"
           for layer in LAYERS for p in _modules(layer) for mod, names in _imports(p)
           if mod.split(".")[0] in LAYERS for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_modules_stay_readable() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for layer in LAYERS for p in _modules(layer)
            if (n := len(p.read_text().splitlines())) > MAX_LINES
            and str(p.relative_to(ROOT)) not in TOO_LONG_FOR_NOW]
    assert not long, f"split these modules (limit {MAX_LINES} lines):\n" + "\n".join(long)
