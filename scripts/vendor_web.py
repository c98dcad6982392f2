"""Vendor the browser libraries that the Open Chat web page loads.

The page is served with no build step: plain ES modules, loaded from the same
origin under a strict Content-Security-Policy (``script-src 'self'``, no eval).
This developer tool (run by hand, not in CI) downloads each pinned package from
the npm registry, checks the tarball against the registry's ``dist.integrity``
(sha512), extracts the one file we need, patches it so a browser can import it
as is (bare import specifiers rewritten to relative ones, trailing source map
comment removed) and writes it with a ``MANIFEST.json`` (sha256, version,
license) and the package's license text under ``LICENSES/``.

Served files go to ``openlora/web/static/vendor/``; test-only files (axe-core)
go to ``tests/web/vendor/``. Each folder has its own manifest.

Usage (from the repository root)::

    .venv/bin/python scripts/vendor_web.py          # download and (re)write
    .venv/bin/python scripts/vendor_web.py --check  # offline: files match manifests

To upgrade a library, edit its version in ``LIBRARIES``, run the script, and
review the diff of the vendored files and manifests.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sys
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATIC_DIR = ROOT / "openlora" / "web" / "static" / "vendor"
TESTS_DIR = ROOT / "tests" / "web" / "vendor"
REGISTRY = "https://registry.npmjs.org"
TIMEOUT_S = 60


@dataclass(frozen=True)
class Library:
    """One file taken from one npm package."""

    package: str
    version: str
    source: str  # path inside the tarball, relative to its top folder
    dest: str  # file name in the destination folder
    out_dir: Path = STATIC_DIR
    rewrite_imports: dict[str, str] = field(default_factory=dict)
    convert: str | None = None  # name of a converter below, for data turned into a module


LIBRARIES: tuple[Library, ...] = (
    Library("preact", "11.2.0", "dist/preact.mjs", "preact.mjs"),
    Library(
        "preact",
        "11.2.0",
        "hooks/dist/hooks.mjs",
        "preact-hooks.mjs",
        rewrite_imports={"preact": "./preact.mjs"},
    ),
    Library("htm", "3.1.1", "dist/htm.module.js", "htm.mjs"),
    Library("marked", "18.3.0", "lib/marked.esm.js", "marked.mjs"),
    Library("dompurify", "3.5.0", "dist/purify.es.mjs", "purify.mjs"),
    Library("ethers", "6.17.0", "dist/ethers.min.js", "ethers.mjs"),
    # Natural Earth land at 1:110m, as one SVG path (x = longitude, y = -latitude) for the node map.
    Library("world-atlas", "2.0.2", "land-110m.json", "land.mjs", convert="land_path"),
    Library("axe-core", "4.14.1", "axe.min.js", "axe.min.js", out_dir=TESTS_DIR),
)

# import ... from "x" / export ... from "x" / import "x" / import("x")
_IMPORT_RES = (
    re.compile(r"""\b(?:import|export)\b[^"'`;]*?\bfrom\s*(["'])([^"']+)\1"""),
    re.compile(r"""\bimport\s*(["'])([^"']+)\1"""),
    re.compile(r"""\bimport\s*\(\s*(["'])([^"']+)\1\s*\)"""),
)
_SOURCE_MAP_RE = re.compile(r"\n?//# sourceMappingURL=\S*\s*\Z")
_UNSAFE_RE = re.compile(r"\beval\s*\(|\bnew\s+Function\s*\(")
_LICENSE_RE = re.compile(r"^(LICEN[CS]E|COPYING)([-._].*)?$", re.IGNORECASE)


def import_specifiers(text: str) -> list[str]:
    """Module specifiers of the static and dynamic imports in ``text``."""
    return [m.group(2) for rx in _IMPORT_RES for m in rx.finditer(text)]


def is_relative(spec: str) -> bool:
    """True for specifiers a browser resolves without an import map."""
    return spec.startswith(("./", "../", "/"))


def fetch(url: str) -> bytes:
    """GET ``url`` and return the body."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 (https only)
        return resp.read()


def registry_dist(package: str, version: str) -> tuple[str, str]:
    """(tarball URL, integrity string) from the registry's version document."""
    url = f"{REGISTRY}/{urllib.parse.quote(package, safe='@')}/{version}"
    meta = json.loads(fetch(url))
    if meta.get("version") != version:
        raise SystemExit(f"{package}: registry returned version {meta.get('version')!r}")
    return meta["dist"]["tarball"], meta["dist"]["integrity"]


def verify_integrity(data: bytes, integrity: str) -> None:
    """Check ``data`` against an SRI string; only sha512 is accepted."""
    for item in integrity.split():
        algo, _, digest = item.partition("-")
        if algo == "sha512":
            if base64.b64decode(digest) != hashlib.sha512(data).digest():
                raise SystemExit(f"integrity mismatch: {integrity}")
            return
    raise SystemExit(f"no sha512 in integrity {integrity!r}")


def download(package: str, version: str) -> bytes:
    """The verified tarball of ``package@version``."""
    tarball_url, integrity = registry_dist(package, version)
    if not tarball_url.startswith(REGISTRY + "/"):
        raise SystemExit(f"{package}: unexpected tarball URL {tarball_url}")
    data = fetch(tarball_url)
    verify_integrity(data, integrity)
    return data


def tar_files(data: bytes) -> dict[str, bytes]:
    """Regular files of an npm tarball, keyed by path without the top folder."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and "/" in member.name:
                f = tar.extractfile(member)
                if f is not None:
                    out[member.name.split("/", 1)[1]] = f.read()
    return out


def license_text(files: dict[str, bytes]) -> str | None:
    """Top-level license file(s) of a package, joined; None when there are none."""
    names = sorted(n for n in files if "/" not in n and _LICENSE_RE.match(n))
    if not names:
        return None
    if len(names) == 1:
        return files[names[0]].decode("utf-8")
    return "\n".join(f"==> {n} <==\n{files[n].decode('utf-8')}" for n in names)


def land_path(topojson: str) -> str:
    """An ES module exporting LAND_PATH: the TopoJSON topology's `land` object as an SVG path.

    TopoJSON stores shared arcs, quantized and delta-encoded; a ring lists arc indices, where ~i
    means arc i reversed; consecutive arcs share their joining point."""
    topo = json.loads(topojson)
    (sx, sy), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            pts.append((x * sx + tx, y * sy + ty))
        arcs.append(pts)
    geoms = topo["objects"]["land"]["geometries"]
    polys = [p for g in geoms for p in (g["arcs"] if g["type"] == "MultiPolygon" else [g["arcs"]])]
    parts = []
    for poly in polys:
        for ring in poly:
            pts: list[tuple[float, float]] = []
            for i in ring:
                seg = arcs[i] if i >= 0 else arcs[~i][::-1]
                pts.extend(seg if not pts else seg[1:])
            # A ring that crosses the antimeridian jumps by ~360 degrees: start a new subpath there
            # (each piece is then closed along the map's edge) instead of drawing a band across the map.
            d, prev = "", None
            for lon, lat in pts:
                d += ("M" if prev is None or abs(lon - prev) > 180 else "L") + f"{lon:.1f},{-lat:.1f}"
                prev = lon
            parts.append(d + "Z")
    return ("// Generated by scripts/vendor_web.py from world-atlas land-110m.json (Natural Earth, public domain).\n"
            f"export const LAND_PATH = {json.dumps(''.join(parts))};\n")


CONVERTERS = {"land_path": land_path}


def patch(text: str, lib: Library) -> tuple[str, list[str]]:
    """Rewrite bare imports and drop a trailing source map comment."""
    notes: list[str] = []
    for bare, rel in lib.rewrite_imports.items():
        rx = re.compile(r"""(\bfrom\s*|\bimport\s*\(?\s*)(["'])""" + re.escape(bare) + r"\2")
        text, n = rx.subn(lambda m: f"{m.group(1)}{m.group(2)}{rel}{m.group(2)}", text)
        if n:
            notes.append(f"import specifier {bare} -> {rel}")
    text, n = _SOURCE_MAP_RE.subn("\n", text)
    if n:
        notes.append("removed trailing sourceMappingURL comment")
    return text, notes


def check_module(text: str, lib: Library) -> None:
    """Fail on bare imports that are left; warn on eval / new Function."""
    bare = sorted({s for s in import_specifiers(text) if not is_relative(s)})
    if bare:
        raise SystemExit(f"{lib.dest}: bare import specifiers left: {bare}")
    hits = _UNSAFE_RE.findall(text)
    if hits:
        role = "test-only" if lib.out_dir == TESTS_DIR else "SERVED"
        print(f"  warning: {lib.dest} ({role}) contains {len(hits)} eval/new Function call(s)")


def vendor_one(lib: Library, files: dict[str, bytes], meta: dict) -> dict:
    """Write one vendored file and its license; return its manifest entry."""
    if lib.source not in files:
        raise SystemExit(f"{lib.package}@{lib.version}: no {lib.source} in tarball")
    if lib.convert:
        text, notes = CONVERTERS[lib.convert](files[lib.source].decode("utf-8")), [f"converted by {lib.convert}"]
    else:
        text, notes = patch(files[lib.source].decode("utf-8"), lib)
    check_module(text, lib)
    data = text.encode("utf-8")
    lib.out_dir.mkdir(parents=True, exist_ok=True)
    (lib.out_dir / lib.dest).write_bytes(data)
    lic = license_text(files)
    if lic is not None:
        (lib.out_dir / "LICENSES").mkdir(exist_ok=True)
        (lib.out_dir / "LICENSES" / f"{lib.package}.txt").write_text(lic, encoding="utf-8")
    entry = {
        "package": lib.package,
        "version": lib.version,
        "source": lib.source,
        "sha256": hashlib.sha256(data).hexdigest(),
        "license": meta.get("license", ""),
    }
    if notes:
        entry["patched"] = "; ".join(notes)
    print(f"  {lib.dest}: {lib.package}@{lib.version} {len(data)} bytes {entry.get('patched', '')}")
    return entry


def write_manifest(out_dir: Path, entries: dict[str, dict]) -> None:
    """Write ``MANIFEST.json`` with sorted keys and 2-space indent."""
    text = json.dumps(entries, indent=2, sort_keys=True) + "\n"
    (out_dir / "MANIFEST.json").write_text(text, encoding="utf-8")


def vendor_all() -> None:
    """Download, verify, patch and write every library, then the manifests."""
    tarballs: dict[tuple[str, str], dict[str, bytes]] = {}
    manifests: dict[Path, dict[str, dict]] = {}
    for lib in LIBRARIES:
        key = (lib.package, lib.version)
        if key not in tarballs:
            print(f"{lib.package}@{lib.version}: downloading")
            tarballs[key] = tar_files(download(*key))
        files = tarballs[key]
        meta = json.loads(files["package.json"])
        manifests.setdefault(lib.out_dir, {})[lib.dest] = vendor_one(lib, files, meta)
    for out_dir, entries in manifests.items():
        write_manifest(out_dir, entries)
        print(f"wrote {out_dir.relative_to(ROOT) / 'MANIFEST.json'}")


def check_dir(out_dir: Path) -> list[str]:
    """Problems with one folder: missing, changed or unlisted files."""
    manifest_path = out_dir / "MANIFEST.json"
    if not manifest_path.is_file():
        return [f"{manifest_path.relative_to(ROOT)}: missing"]
    entries = json.loads(manifest_path.read_text(encoding="utf-8"))
    problems = []
    for dest, entry in sorted(entries.items()):
        path = out_dir / dest
        if not path.is_file():
            problems.append(f"{path.relative_to(ROOT)}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            problems.append(f"{path.relative_to(ROOT)}: sha256 differs from manifest")
    for path in sorted(out_dir.iterdir()):
        if path.is_file() and path.name != "MANIFEST.json" and path.name not in entries:
            problems.append(f"{path.relative_to(ROOT)}: not in manifest")
    return problems


def check_all() -> int:
    """Offline check of every destination folder; exit status."""
    problems = [p for d in sorted({lib.out_dir for lib in LIBRARIES}) for p in check_dir(d)]
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print("vendored files match their manifests")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify files against manifests, no network")
    args = ap.parse_args(argv)
    if args.check:
        return check_all()
    vendor_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
