"""The service against its own OpenAPI description (schemathesis): generated requests, valid and
not, for every operation, with a real API key, on local storage with a published release.

Whatever it sends, the answer is never a 5xx, and it is what the spec says it may be."""

from __future__ import annotations

import secrets

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from builder.service.app import ServiceSettings, create_app
from builder.config import Environment
from builder.service.setup import RELEASES_PREFIX, ServiceOptions, link_secret_of, make_issuer
from builder.storage import publish_release
from tests.support.service import RELEASE_VERSION, build_release, signers_for, enrollment_key_for

pytestmark = pytest.mark.timeout(180)

API_KEY = secrets.token_hex(24)


@pytest.fixture(scope="module")
def service(dev_keys, test_payload, tmp_path_factory):
    root = tmp_path_factory.mktemp("service-schema")
    release_dir = build_release(dev_keys, test_payload, root / "release")
    environ = {"BUILDER_STORAGE_HMAC_KEY": secrets.token_hex(32)}
    issuer = make_issuer(ServiceOptions(storage_url=(root / "store").as_uri(), state_dir=root / "state",
                                        signers=signers_for(dev_keys), ca=dev_keys.ca_cert,
                                        enrollment_key=enrollment_key_for(dev_keys)), Environment.read(environ))
    publish_release(release_dir, issuer.store, RELEASES_PREFIX, version=RELEASE_VERSION)
    app = create_app(issuer, ServiceSettings(api_keys=ServiceSettings.parse_api_keys(f"schema:{API_KEY}"),
                                             link_secret=link_secret_of(issuer), wait_s=10))
    yield app, issuer
    issuer.close()


@pytest.fixture(scope="module")
def api_schema(service):
    app, _issuer = service
    # The OpenAPI document is behind an API key like every route but /healthz.
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {API_KEY}"})


# One test per operation and generation mode. (schemathesis.pytest.from_fixture, the lazy loader
# that would parametrize from the fixture, fails under pytest 9: it reads `request.node._nodeid`.)
OPERATIONS = [("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/installers"), ("GET", "/v1/installers/{installer_id}"),
              ("GET", "/v1/releases"), ("POST", "/v1/revocations"), ("POST", "/v1/enrollments"), ("GET", "/v1/download/{installer_id}")]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# Negative cases need something to get wrong: /healthz takes no input at all.
RUNS = [(m, p, mode) for m, p in OPERATIONS for mode in GenerationMode if (mode, p) != (GenerationMode.NEGATIVE, "/healthz")]


@pytest.mark.parametrize("method, path, mode", RUNS, ids=[f"{m} {p} {mode.value}" for m, p, mode in RUNS])
def test_the_service_keeps_its_own_spec(api_schema, method, path, mode):
    operation = api_schema[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        response = case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, checks=CHECKS)
        calls.append(response.status_code)

    run()
    assert calls, "no request was generated"
    if mode is GenerationMode.NEGATIVE:
        assert any(400 <= s < 500 for s in calls)  # invalid input was sent, and refused
    if (method, path, mode) == ("POST", "/v1/installers", GenerationMode.POSITIVE):
        assert 200 in calls  # the documented rules are the real ones: valid requests get installers


def test_the_spec_covers_every_route(service, api_schema):
    """The run above is only as wide as the spec and the list: every route served is in both."""
    app, _issuer = service
    documented = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    served = {(m, r.path) for r in app.routes if getattr(r, "include_in_schema", False) for m in r.methods}
    assert served == documented == set(OPERATIONS)
