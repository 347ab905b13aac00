"""GET /openapi.json: the OpenAPI 3 description of the data plane (``openapi.yaml`` beside this file).

The description is a data file of the package, parsed once and served as JSON, so clients and
fuzzers (tests/test_fuzz.py) generate requests from what the server documents.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import yaml
from aiohttp import web

routes = web.RouteTableDef()
PATH = "/openapi.json"


@cache
def document() -> bytes:
    """The description as JSON bytes (the YAML's anchors expanded)."""
    text = resources.files("appliance.api").joinpath("openapi.yaml").read_text(encoding="utf-8")
    return json.dumps(yaml.safe_load(text), separators=(",", ":")).encode()


@routes.get(PATH)
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=document(), content_type="application/json")
