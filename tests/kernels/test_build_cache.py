"""The compile cache's rules: module names part environments, stale build locks are cleared."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time

from openlora.kernels import build


def _hold_lock_in_child(build_dir) -> subprocess.Popen:
    """A child process that takes the owner lock, says so, and sleeps holding it."""
    code = ("import sys, time; from pathlib import Path; from openlora.kernels import build\n"
            "with build._owner_lock(Path(sys.argv[1]), 'test'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(build_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _try_lock(build_dir) -> bool:
    fd = os.open(build_dir / build.OWNER_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_killed_builder_leaves_no_lock_that_blocks_the_next(tmp_path):
    """torch's `lock` file outlives a killed process; ours is an flock, which the kernel drops."""
    child = _hold_lock_in_child(tmp_path)
    (tmp_path / "lock").touch()  # what torch's build leaves when its process is killed mid-build
    assert not _try_lock(tmp_path), "a live builder holds the lock"
    child.kill()
    child.wait()
    assert _try_lock(tmp_path)
    with build._owner_lock(tmp_path, "test"):
        assert not (tmp_path / "lock").exists(), "torch's lock of a dead build is removed"
        assert (tmp_path / build.OWNER_LOCK).read_text() == str(os.getpid())


def test_a_live_builder_is_waited_for(tmp_path):
    child = _hold_lock_in_child(tmp_path)
    t0 = time.monotonic()
    threading.Timer(0.5, child.kill).start()
    with build._owner_lock(tmp_path, "test"):
        waited = time.monotonic() - t0
    child.wait()
    assert waited >= 0.4


def test_a_cached_module_loads_without_the_compiler(monkeypatch):
    """Once built (the `built` mark is written), later loads import the library directly: no ninja,
    no torch lock (a server start must not depend on a build tool's state)."""
    from openlora.kernels import fused_ops

    fused_ops.load_extension()  # built here if it was not
    build.build_extension.cache_clear()

    def no_compile(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(build, "_compile", no_compile)
    try:
        assert hasattr(fused_ops.load_extension(), "has_avx512")
    finally:
        build.build_extension.cache_clear()


def test_the_module_name_depends_on_the_checkout(monkeypatch, tmp_path):
    """Two checkouts with equal sources: ninja's command names the source path, so a shared name would
    make them rebuild each other's module at every alternate start."""
    a = build.module_name("sgmv", "fused_ops_cpu.cpp", ("-O3",))
    other = tmp_path / "csrc"
    other.mkdir()
    (other / "fused_ops_cpu.cpp").write_bytes((build.CSRC / "fused_ops_cpu.cpp").read_bytes())
    monkeypatch.setattr(build, "CSRC", other)
    assert build.module_name("sgmv", "fused_ops_cpu.cpp", ("-O3",)) != a


def test_the_module_name_depends_on_flags_and_environment(monkeypatch):
    a = build.module_name("sgmv", "fused_ops_cpu.cpp", ("-O3",))
    assert a == build.module_name("sgmv", "fused_ops_cpu.cpp", ("-O3",))
    assert a != build.module_name("sgmv", "fused_ops_cpu.cpp", ("-O2",))
    build.cpu_tag.cache_clear()
    monkeypatch.setattr(build.sys, "prefix", "/another/venv")
    try:
        assert a != build.module_name("sgmv", "fused_ops_cpu.cpp", ("-O3",)), "two venvs would share one build folder"
    finally:
        monkeypatch.undo()
        build.cpu_tag.cache_clear()


def test_the_cpu_tag_follows_instruction_sets_not_the_whole_flags_line(monkeypatch):
    """A VM that moves host keeps its instruction sets but not always the rest of its flags line; only
    the instruction sets change what -march=native compiles, so only they may rename the modules."""
    line = "flags\t\t: fpu vme avx2 fma bmi2 hypervisor constant_tsc"

    def tag(flags: str) -> str:
        monkeypatch.setattr(build, "cpu_flags_line", lambda: flags)
        build.cpu_tag.cache_clear()
        return build.cpu_tag()

    try:
        a = tag(line)
        assert tag(line.replace(" hypervisor constant_tsc", " nonstop_tsc")) == a
        assert tag(line + " avx512f") != a
    finally:
        monkeypatch.undo()
        build.cpu_tag.cache_clear()
