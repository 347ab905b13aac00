"""The floor for a refusal on this machine: a bare aiohttp server (uvloop, no access log, no
middleware) that reads the body and answers every POST with a small 429 JSON body and
Retry-After, as the appliance's refusal does. bench/bench_overload.py floods it beside the
appliance to put the appliance's CPU per refusal next to what aiohttp alone costs.

    python bench/bare_refusal_server.py PORT
"""

from __future__ import annotations

import sys

from aiohttp import web

BODY = b'{"error":{"message":"the queue for priority 3 is full","type":"overloaded","param":null,"code":"queue_full"}}'
HEADERS = {"Retry-After": "1", "Content-Type": "application/json"}


async def refuse(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=429, body=BODY, headers=HEADERS)


def main() -> None:
    import uvloop

    app = web.Application()
    app.router.add_post("/v1/embeddings", refuse)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
