"""The compile cache's rules: module names part environments, stale build locks are cleared."""

from __future__ import annotations

import os
import time

from openlora.kernels import build


def test_a_stale_lock_is_removed_and_a_live_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    build._clear_stale_lock(tmp_path)
    assert lock.exists(), "a build in progress holds this lock"
    old = time.time() - build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    build._clear_stale_lock(tmp_path)
    assert not lock.exists()
    build._clear_stale_lock(tmp_path)  # no lock: nothing to do


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
