"""Compile-on-first-use for the C++ CPU kernels (one place for flags, cache folder and logging)."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

import torch

from openlora.config import cache_dir

logger = logging.getLogger("openlora.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"


@functools.lru_cache(maxsize=None)
def cpu_tag() -> str:
    """Hash of torch version, machine and CPU flags: the binaries are built with -march=native."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{torch.__version__}|{platform.machine()}|{flags}".encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def build_extension(stem: str, source: str, label: str, extra_cflags: tuple[str, ...] = (),
                    includes: tuple[str, ...] = ()) -> ModuleType:
    """Compile `csrc/<source>` (first use only; cached under cache_dir()/torch_extensions; rebuilt
    when the source changes) and load it. Raises whatever the compiler or loader raised.
    `includes`: other csrc files the source #includes; their contents are part of the module name,
    since torch's rebuild check hashes only the listed sources."""
    from torch.utils import cpp_extension

    name = f"openlora_{stem}_{cpu_tag()}"
    if includes:
        h = hashlib.sha1(b"".join((CSRC / f).read_bytes() for f in includes)).hexdigest()[:8]
        name += f"_{h}"
    build_dir = cache_dir() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("loading C++ %s extension %s (compiled on first use in %s)", label, name, build_dir)
    return cpp_extension.load(
        name=name, sources=[str(CSRC / source)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags], extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir), verbose=False,
    )


def try_build(load, label: str, fallback: str) -> bool:
    """Call `load()`; on any build failure log why once and return False (the caller falls back)."""
    try:
        load()
        return True
    except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback, and say why
        msg = str(e).strip()
        logger.warning("C++ %s unavailable (%s: %s); %s", label, type(e).__name__,
                       msg.splitlines()[-1] if msg else "", fallback)
        return False
