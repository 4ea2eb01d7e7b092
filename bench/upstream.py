"""The upstream tool for the benchmark: a small aiohttp server answering a fixed JSON document.

``/<anything>/hold/...`` is held for ``--hold`` seconds first (the calls-in-flight phase);
``/_stats`` reports how many calls were held at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource

from aiohttp import web

ANSWER = json.dumps({"id": 42, "name": "Ada Lovelace", "tier": "gold", "open_tickets": 2}).encode()


class Upstream:
    def __init__(self, hold_seconds: float) -> None:
        self.hold_seconds = hold_seconds
        self.holding = 0
        self.peak_holding = 0

    async def handle(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/_stats":
            stats = {"holding": self.holding, "peak_holding": self.peak_holding}
            self.peak_holding = self.holding
            return web.json_response(stats)
        await request.read()
        if "/hold/" in request.path:
            self.holding += 1
            self.peak_holding = max(self.peak_holding, self.holding)
            try:
                await asyncio.sleep(self.hold_seconds)
            finally:
                self.holding -= 1
        return web.Response(body=ANSWER, content_type="application/json")


async def serve(port: int, hold_seconds: float) -> None:
    upstream = Upstream(hold_seconds)
    runner = web.ServerRunner(web.Server(upstream.handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096, reuse_address=True).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hold", type=float, default=2.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.port, args.hold))


if __name__ == "__main__":
    main()
