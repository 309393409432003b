"""/metrics, /healthz and /readyz on one port (aiohttp, already a dependency of aiobotocore)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.metrics import Metrics


class HealthServer:
    """``alive`` says the coordinator loop is turning (retrying an outage counts: a restart
    would not help); ``ready`` that the last coordinator cycle worked and no dependency
    (Kinesis, KMS, the warehouse) has had a call failing or hanging for more than
    ``--unready-after`` (see ingest.consumer.dependencies)."""

    def __init__(
        self, metrics: Metrics, *, alive: Callable[[], bool], ready: Callable[[], bool]
    ) -> None:
        self._metrics = metrics
        self._alive = alive
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        #: awaited before each /metrics response (gauges read from the warehouse)
        self.before_scrape: Callable[[], Awaitable[None]] | None = None

    async def start(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - probes
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_view)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # the bound port when 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics_view(self, request: web.Request) -> web.Response:
        if self.before_scrape is not None:
            await self.before_scrape()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self._alive()
        return web.json_response({"alive": ok, "time": time.time()}, status=200 if ok else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ok = self._ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)
