"""With OPENLORA_REQUIRE_KERNELS=1, a kernel test that skips because its extension did not build is a
failure (a skip for a CPU that lacks the instructions stays a skip)."""

from __future__ import annotations

import os

import pytest

REQUIRED = os.environ.get("OPENLORA_REQUIRE_KERNELS") == "1"
_BUILD_FAILED = ("not buildable", "does not build")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if REQUIRED and rep.skipped and isinstance(rep.longrepr, tuple):
        reason = str(rep.longrepr[2])
        if any(s in reason for s in _BUILD_FAILED):
            rep.outcome = "failed"
            rep.longrepr = f"OPENLORA_REQUIRE_KERNELS=1 and the extension did not build: {reason}"
