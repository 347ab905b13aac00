"""GET /openapi.json: the OpenAPI description of the data plane documents exactly the routes the
server has, and is a valid OpenAPI 3 document (tests/test_fuzz.py generates requests from it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import schemathesis
import yaml

from appliance.api.app import create_app
from appliance.auth import KeyStore
from appliance.config import parse
from tests.conftest import ServerThread

DOC = Path(__file__).resolve().parents[1] / "appliance" / "api" / "openapi.yaml"


def _routed(tmp_path: Path) -> set[tuple[str, str]]:
    cfg = parse({"model_repository": str(tmp_path), "data_dir": str(tmp_path / "data")}, None, env={})
    app = create_app(cfg)
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_the_description_documents_every_route_and_only_those(tmp_path: Path) -> None:
    doc = yaml.safe_load(DOC.read_text())
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert documented == _routed(tmp_path)


def test_the_server_serves_its_description_as_json(start_server: Callable[..., ServerThread]) -> None:
    srv = start_server({})
    status, body = srv.get("/openapi.json")
    assert status == 200
    assert body == yaml.safe_load(DOC.read_text())  # the package's file, anchors expanded
    assert body["openapi"].startswith("3.")
    # schemathesis reads it as a valid OpenAPI document with one operation per route.
    schema = schemathesis.openapi.from_dict(body)
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert "POST /v2/models/{model}/versions/{version}/infer" in labels
    assert len(labels) == len(body["paths"])


def test_the_description_says_which_routes_need_a_key_and_documents_their_401(
    start_server: Callable[..., ServerThread],
) -> None:
    """With keys configured, every route but the probes answers a keyless request 401 in its
    API's shape; the description says so (securitySchemes, a 401 per operation, `security: []`
    on the probes), so that a client generated from it, or a fuzzer, expects the 401 (schemathesis
    had reported 22 operations' 401 as undocumented)."""
    store = KeyStore()
    store.add("app")
    srv = start_server({}, config={"auth": {"keys": store.to_records()}})
    doc = yaml.safe_load(DOC.read_text())
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert {} in doc["security"], "keys are optional: a box without any serves without one"
    for path, item in doc["paths"].items():
        concrete = path.replace("{model}", "m").replace("{version}", "1")
        for method, op in item.items():
            status, body = srv.post(concrete, {})[:2] if method == "post" else srv.get(concrete)
            if op.get("security") == []:
                assert "401" not in op["responses"] and status != 401, (method, path)
                continue
            assert "401" in op["responses"], (method, path)
            if path == "/metrics":  # open unless auth.metrics_public is false
                assert status == 200
                continue
            assert status == 401, (method, path, status)
            shape = str if path.startswith("/v2") else dict
            assert isinstance(body["error"], shape), (method, path, body)


def test_the_description_is_parsed_before_the_server_listens_not_by_a_request(
    start_server: Callable[..., ServerThread],
) -> None:
    """Parsing openapi.yaml takes 0.1-0.3 s: done by the first GET /openapi.json, on the event
    loop, it stalled every request in flight then. It is ready when the server starts."""
    from appliance.api import openapi

    openapi.document.cache_clear()
    start_server({})
    assert openapi.document.cache_info().currsize == 1
