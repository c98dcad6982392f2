"""Property-based fuzzing of the served OpenAPI schema: no input makes the server answer 500 or die."""

from __future__ import annotations

import httpx
import pytest
from conftest import API_KEY
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

# Bounded so the whole run stays well under two minutes on a loaded 2-core machine.
MAX_EXAMPLES = 20


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_no_server_errors(schema, server):
    """Every operation, `MAX_EXAMPLES` generated cases each (plus explicit examples), checked with
    not_a_server_error. The API key is sent (so requests reach the handlers); the admin routes see a
    non-admin key and must answer 401, never 500."""
    failures, calls = [], []
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            calls.append(case.operation.label)
            case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, checks=[not_a_server_error],
                                   timeout=60)

        test = op.as_strategy()
        from hypothesis import given

        try:
            given(test)(run)()
        except Exception as e:  # collect, then report all operations at once
            failures.append(f"{op.label}: {e}")
    assert httpx.get(server.url + "/health").status_code == 200
    assert not failures, "\n\n".join(failures)
    assert len(set(calls)) >= 7 and len(calls) >= 7 * 5, calls  # every operation really was exercised
