"""GET /openapi.json: the OpenAPI description of the data plane documents exactly the routes the
server has, and is a valid OpenAPI 3 document (tests/test_fuzz.py generates requests from it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import schemathesis
import yaml

from appliance.api.app import create_app
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
