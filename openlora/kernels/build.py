"""Compile-on-first-use for the C++ CPU kernels (one place for flags, cache folder and logging)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from openlora.config import cache_dir

logger = logging.getLogger("openlora.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"


@functools.lru_cache(maxsize=None)
def cpu_flags_line() -> str:
    """The `flags` line of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. amx_bf16). Where the file is missing, say yes: the
    kernel's own runtime check then decides."""
    line = cpu_flags_line()
    return not line or flag in line.split()


@functools.lru_cache(maxsize=None)
def cpu_tag() -> str:
    """Hash of torch version and install folder, Python, machine and CPU flags: the binaries are built
    with -march=native, and ninja's build command names torch's and Python's include folders, so two
    environments under one name would rebuild each other's module at every alternate start."""
    where = f"{Path(torch.__file__).parent}|{sys.prefix}|{sys.version}"
    return hashlib.sha1(
        f"{torch.__version__}|{where}|{platform.machine()}|{isa_flags()}".encode()).hexdigest()[:10]


# Flags that change what -march=native compiles (instruction sets). The rest of the flags line (bugs,
# power management, virtualization hints) changes when a VM moves host, and keying the cache on it
# rebuilt every kernel mid-session (measured: four names for one source within two hours).
_ISA_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c", "bmi", "adx", "sha", "aes", "vaes", "vpclmul",
                 "pclmul", "gfni", "movbe", "popcnt", "abm", "lzcnt", "vnni", "xsave", "rdrand", "rdseed")


def isa_flags() -> str:
    """The instruction-set flags of this CPU, sorted (see _ISA_PREFIXES)."""
    flags = cpu_flags_line().split(":", 1)[-1].split()
    return " ".join(sorted(f for f in flags if f.startswith(_ISA_PREFIXES)))


def module_name(stem: str, source: str, cflags: tuple[str, ...], includes: tuple[str, ...] = ()) -> str:
    """`openlora_<stem>_<key>`: the key hashes the CPU tag, the flags and the bytes of every source.

    NOTE: torch's own rebuild check keeps one build per module name and rebuilds when its ninja command
    changes, so two checkouts sharing one cache under the same name rebuilt each other's modules at every
    alternate start: with different sources, and also with equal sources, because the command names the
    source file's path. The key therefore covers the sources' folder too: each checkout and build gets
    its own module and none collide."""
    h = hashlib.sha1(f"{cpu_tag()}|{CSRC}|{' '.join(cflags)}|".encode())
    for f in (source, *includes):
        h.update(f.encode() + b"\0" + (CSRC / f).read_bytes())
    return f"openlora_{stem}_{h.hexdigest()[:12]}"


@functools.lru_cache(maxsize=None)
def build_extension(stem: str, source: str, label: str, extra_cflags: tuple[str, ...] = (),
                    includes: tuple[str, ...] = ()) -> ModuleType:
    """Compile `csrc/<source>` (once per distinct content and flags; cached under
    cache_dir()/torch_extensions) and load it. Raises whatever the compiler or loader raised.
    `includes`: other csrc files the source #includes (their contents are part of the name)."""
    cflags = ("-O3", "-march=native", "-fopenmp", *extra_cflags)
    name = module_name(stem, source, cflags, includes)
    build_dir = cache_dir() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _owner_lock(build_dir, label):
        built = build_dir / BUILT_MARK
        if built.exists():
            try:
                module = _import(name, build_dir)
                logger.info("loaded C++ %s extension %s (cached in %s)", label, name, build_dir)
                return module
            except ImportError as e:  # a library cut short (disk full, a killed link): build again
                logger.warning("cached %s did not load (%s); rebuilding", name, e)
                built.unlink()
        logger.info("compiling C++ %s extension %s in %s (once per source and CPU)", label, name, build_dir)
        t0 = time.monotonic()
        module = _compile(name, source, cflags, build_dir)
        built.write_text(name)
        logger.info("compiled %s in %.1f s", name, time.monotonic() - t0)
        return module


BUILT_MARK = "built"  # written after a build loaded: the library next to it is complete
OWNER_LOCK = "owner.lock"  # flock()ed by whoever builds or loads this module


@contextlib.contextmanager
def _owner_lock(build_dir: Path, label: str) -> Iterator[None]:
    """Hold an flock on build_dir/owner.lock while building or loading.

    NOTE: torch's own build lock is a plain file that a killed process leaves behind, and every later
    load then waits on it forever (a server stopped mid-start left one, and each server started after
    it timed out). The kernel drops an flock when its holder dies, so once we hold ours, any torch
    `lock` file in the folder was left by a dead process and goes."""
    fd = os.open(build_dir / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            logger.info("waiting for process %s, which is building the C++ %s extension", holder, label)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a build whose process died", stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the flock


def _import(name: str, build_dir: Path) -> ModuleType:
    """Import the built library without running ninja again (its name already pins its sources)."""
    path = build_dir / f"{name}.so"
    if not path.exists():
        raise ImportError(f"{path} is missing")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no loader for {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, source: str, cflags: tuple[str, ...], build_dir: Path) -> ModuleType:
    """Run torch's JIT build (ninja) for one module and load it."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name, sources=[str(CSRC / source)], extra_cflags=list(cflags), extra_ldflags=["-fopenmp"],
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


def _loaders() -> dict:
    """label -> (loader, whether this CPU can use it), longest build first."""
    from openlora.kernels import attention_cpu, cpu, decoder, fused_ops, gemm, quant_gemm

    return {"decoder loop": (decoder.load_extension, True),  # the unity build of all of them: the longest
            "SGMV": (cpu.load_extension, True), "paged attention": (attention_cpu.load_extension, True),
            "fused ops": (fused_ops.load_extension, True), "AVX-512 GEMM": (gemm.F32.load_extension, True),
            "AMX GEMM": (gemm.AMX.load_extension, gemm.AMX.cpu_supported()),
            "quantized GEMM": (quant_gemm.load_extension, True)}


def _build_one(label: str) -> bool:
    return try_build(_loaders()[label][0], label, "its fallback will be used")


def build_all(jobs: int | None = None) -> dict[str, bool]:
    """Compile every C++ kernel module this CPU can use, `jobs` at a time in separate processes
    (default: one per core; each g++ run is single-threaded, and most of each build is the torch
    headers). `make setup` runs this, so no request waits for a compiler. Returns label -> built; a
    failure is logged and leaves that kernel's fallback."""
    from concurrent.futures import ProcessPoolExecutor

    labels = [k for k, (_, usable) in _loaders().items() if usable]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return dict(zip(labels, pool.map(_build_one, labels)))


def main() -> None:
    """`python -m openlora.kernels.build`: build all kernels, print what was built and how long it took."""
    import json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.monotonic()
    built = build_all()
    print(json.dumps({"built": built, "seconds": round(time.monotonic() - t0, 1),
                      "cache": str(cache_dir() / "torch_extensions")}))


if __name__ == "__main__":
    main()
