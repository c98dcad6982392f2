"""The vendored browser libraries match their manifests and load without a bundler.

The files are written by ``scripts/vendor_web.py``; see its docstring.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC_VENDOR = ROOT / "openlora" / "web" / "static" / "vendor"
TEST_VENDOR = ROOT / "tests" / "web" / "vendor"

# import ... from "x" / export ... from "x" / import "x" / import("x")
IMPORT_RES = (
    re.compile(r"""\b(?:import|export)\b[^"'`;]*?\bfrom\s*(["'])([^"']+)\1"""),
    re.compile(r"""\bimport\s*(["'])([^"']+)\1"""),
    re.compile(r"""\bimport\s*\(\s*(["'])([^"']+)\1\s*\)"""),
)
UNSAFE_RE = re.compile(r"\beval\s*\(|\bnew\s+Function\s*\(")


def manifest(folder: Path) -> dict[str, dict]:
    """The folder's MANIFEST.json."""
    return json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))


def entries() -> list:
    """pytest params (folder, file name, manifest entry) for both vendor folders."""
    return [
        pytest.param(d, name, e, id=name)
        for d in (STATIC_VENDOR, TEST_VENDOR)
        for name, e in manifest(d).items()
    ]


def served_modules() -> list[Path]:
    """The .mjs files the web page can import."""
    return sorted(STATIC_VENDOR.glob("*.mjs"))


def specifiers(text: str) -> list[str]:
    """Module specifiers of the static and dynamic imports in ``text``."""
    return [m.group(2) for rx in IMPORT_RES for m in rx.finditer(text)]


@pytest.mark.parametrize("folder,name,entry", entries())
def test_manifest_file_exists_and_matches(folder: Path, name: str, entry: dict) -> None:
    path = folder / name
    assert path.is_file(), f"{path} listed in manifest but missing"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert entry["package"] and entry["version"] and entry["source"] and entry["license"]
    assert (folder / "LICENSES" / f"{entry['package']}.txt").is_file()


def test_served_modules_are_all_in_manifest() -> None:
    assert served_modules(), "no vendored modules"
    assert {p.name for p in served_modules()} <= set(manifest(STATIC_VENDOR))


@pytest.mark.parametrize("path", served_modules(), ids=lambda p: p.name)
def test_module_imports_only_relative(path: Path) -> None:
    for spec in specifiers(path.read_text(encoding="utf-8")):
        assert spec.startswith(("./", "../", "/")), f"{path.name} imports bare {spec!r}"
        if spec.startswith("./"):
            assert (path.parent / spec).is_file(), f"{path.name} imports missing {spec!r}"


@pytest.mark.parametrize("path", served_modules(), ids=lambda p: p.name)
def test_no_source_map_reference(path: Path) -> None:
    assert "sourceMappingURL" not in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", served_modules(), ids=lambda p: p.name)
def test_no_eval_under_csp(path: Path) -> None:
    assert not UNSAFE_RE.search(path.read_text(encoding="utf-8"))
