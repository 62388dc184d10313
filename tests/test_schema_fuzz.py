"""Schemathesis against the service's own OpenAPI schema: every operation, about three thousand
generated requests (valid and invalid data), no 5xx, and every answer (status, content type,
headers, body) as the schema declares it. The app runs in-process (ASGI) with its lifespan and
the test models loaded.

(Schemathesis' lazy ``from_fixture`` loader does not work with pytest 9, so the operations are
listed from the app's schema at collection and driven with Hypothesis here.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.core.config import Settings
from service.main import create_app
from tests.figures import record

pytestmark = pytest.mark.slow

# Generated requests per operation: operations without inputs have one request to make; for
# the others Hypothesis generates this many (valid data, and for /segment also invalid data).
EXAMPLES = {"GET /models/{name}": 600, "POST /segment": 1200}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Only for invalid data: it must be refused with a 4xx.
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]
OPERATIONS = sorted(
    f"{method.upper()} {path}"
    for path, methods in create_app(Settings()).openapi()["paths"].items()
    for method in methods
)
# Invalid data only exists where there are constrained inputs: /segment's upload and parameters.
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    ("POST /segment", GenerationMode.NEGATIVE)
]


@pytest.fixture(scope="module")
def figures() -> Iterator[dict[str, Any]]:
    """What the whole module ran, written once at its end."""
    run: dict[str, Any] = {"calls": {}, "statuses": {}, "seconds": 0.0}
    yield run
    calls = sum(run["calls"].values())
    record(
        "schemathesis",
        {
            "operations": len({label.rsplit(" ", 1)[0] for label in run["calls"]}),
            "requests": calls,
            "per_operation_and_mode": dict(sorted(run["calls"].items())),
            "statuses": dict(sorted(run["statuses"].items())),
            "seconds": round(run["seconds"], 1),
        },
    )


@pytest.fixture
def api(model_dir: Path) -> Iterator[tuple[Any, Any]]:
    """The schema the running app serves, and the app (lifespan started, models loaded; small
    limits so that generated uploads reach them). One app per test: schemathesis' pytest plugin
    ends ASGI lifespans after every test, and a service's lifespan runs once."""
    app = create_app(
        Settings(
            model_dir=model_dir,
            default_model="toy",
            providers=["CPUExecutionProvider"],
            intra_op_threads=1,
            max_upload_bytes=256 * 1024,
            max_image_pixels=512 * 512,
        )
    )
    try:
        with asgi.get_client(app) as client:  # starts the lifespan
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "models not loaded"
                time.sleep(0.05)
        yield schemathesis.openapi.from_asgi("/openapi.json", app), app
    finally:
        asgi.shutdown_lifespans()


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{op} {m.value}" for op, m in CASES])
def test_operation_conforms_to_its_schema(
    api: tuple[Any, Any], figures: dict[str, Any], label: str, mode: GenerationMode
) -> None:
    schema, app = api
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    checks = NEGATIVE_CHECKS if mode is GenerationMode.NEGATIVE else CHECKS
    key = f"{label} {mode.value}"
    started = time.perf_counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES.get(label, 10),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call(app=app)
        case.validate_response(response, checks=checks, transport_kwargs={"app": app})
        figures["calls"][key] = figures["calls"].get(key, 0) + 1
        status = str(response.status_code)
        figures["statuses"][status] = figures["statuses"].get(status, 0) + 1

    try:
        run()
    finally:
        figures["seconds"] += time.perf_counter() - started
