"""Checks on adapter files before anything is allocated from them (hostile adapters: from the chain, the
hub, S3, or an admin typo).

safetensors layout: 8 bytes little-endian header length N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data; offsets
are relative to the end of the header. `check_safetensors` reads only the header and proves that every
tensor lies inside the file, has a known dtype and a byte size equal to its shape's, and that the tensors
tile the data area exactly, so the load that follows allocates at most the file's size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from openlora.errors import AdapterLoadError

MAX_HEADER_BYTES = 16 << 20  # a LoRA header lists a few hundred tensors: ~100 KiB
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # float types a LoRA can hold


def check_size(path: Path, max_bytes: int) -> int:
    """The file's size; AdapterLoadError if it is not a regular file or exceeds `max_bytes`."""
    try:
        st = path.stat()
    except OSError as e:
        raise AdapterLoadError(f"cannot read {path.name}: {e.strerror}") from e
    if not path.is_file():
        raise AdapterLoadError(f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise AdapterLoadError(f"{path.name} is {st.st_size} bytes, above the limit of {max_bytes} bytes "
                               "(--max-adapter-bytes)")
    return st.st_size


def check_safetensors(path: Path, max_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file's header without reading its data; returns {name: (dtype, shape)}."""
    size = check_size(path, max_bytes)
    name = path.name
    if size < 8:
        raise AdapterLoadError(f"{name}: {size} bytes is too short for a safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise AdapterLoadError(f"{name}: header length {n} is impossible for a {size}-byte file "
                                   f"(limit {MAX_HEADER_BYTES})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterLoadError(f"{name}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise AdapterLoadError(f"{name}: header must be a JSON object")
    data = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise AdapterLoadError(f"{name}: entry {key!r} is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise AdapterLoadError(f"{name}: tensor {key!r} has dtype {dtype!r}; expected one of "
                                   f"{', '.join(DTYPE_BYTES)}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape)):
            raise AdapterLoadError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data):
            raise AdapterLoadError(f"{name}: tensor {key!r} has data offsets {offs!r} outside the file's "
                                   f"{data} data bytes")
        if offs[1] - offs[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterLoadError(f"{name}: tensor {key!r} holds {offs[1] - offs[0]} bytes, but shape {shape} "
                                   f"of {dtype} needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
        spans.append((offs[0], offs[1], key))
        out[key] = (dtype, tuple(shape))
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterLoadError(f"{name}: __metadata__ must map names to strings")
    # The tensors tile the data area exactly, in order: no overlap, no gap, nothing after the last one
    # (what the safetensors reader itself requires).
    spans.sort()
    at = 0
    for begin, end, key in spans:
        if begin != at:
            raise AdapterLoadError(f"{name}: tensor {key!r} starts at byte {begin}, expected {at} "
                                   f"({'overlap' if begin < at else 'gap'} in the data area)")
        at = end
    if at != data:
        raise AdapterLoadError(f"{name}: {data - at} bytes after the last tensor")
    return out


def inside(path: str | os.PathLike, roots: list[Path]) -> bool:
    """Whether `path`, with every symlink resolved, lies under one of `roots` (resolved too)."""
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))
