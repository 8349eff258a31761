"""Fuzz ``ccmem serve`` from its own OpenAPI schema: hundreds of generated requests, valid and invalid, and not
one may get a 5xx; every response must match the schema's status codes, content types and bodies."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ccmem.serve.server import create_app
from tests.unit.test_server import MODEL, make_engine

EXAMPLES = 40  # per operation and mode, at most (hypothesis stops early on small input spaces)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    engine = make_engine(tmp_path_factory.mktemp("fuzz"), max_sessions=50)
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(engine))
    engine.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(schema, mode):
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/sessions", "GET /v1/models"}
    sent = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def call(case):
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # else nearly every valid request stops at "model not served"
            sent.append(case.call_and_validate(checks=CHECKS).status_code)

        try:
            call()
        except Unsatisfiable:  # an operation without inputs (GET /health) has no invalid form
            assert mode is GenerationMode.NEGATIVE and not operation.body
    print(f"{mode.value}: {len(sent)} requests, statuses {sorted(set(sent))}")
    assert len(sent) >= 100  # hundreds over both modes; hypothesis stops early only for tiny input spaces
