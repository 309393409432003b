"""Wiring for ``das-ingest run``: AWS clients, the database pool, signals, health.

Its settings are frozen dataclasses (:class:`ServeSettings`) that ``ingest.commands.run`` builds
from the command line; nothing in ``ingest.consumer`` sees an argparse Namespace.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from ingest.aws import aws_client
from ingest.aws import session as aws_session
from ingest.consumer.pool import DecodePool
from ingest.consumer.worker import Worker, WorkerSettings
from ingest.discovery import discover_cluster, discover_instance
from ingest.errors import ConfigError
from ingest.health import HealthServer
from ingest.kinesis import check_stream
from ingest.kms import resource_id_from_stream
from ingest.metrics import Metrics
from ingest.retry import Backoff, RetryStopped, retry
from ingest.runtime import freeze_startup_heap
from ingest.warehouse.db import close_pool, create_pool, redact, resolve_dsn
from ingest.warehouse.gauges import WarehouseGauges
from ingest.warehouse.migrate import require_current_schema
from ingest.warehouse.sink import init_connection

log = logging.getLogger("ingest")
T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``das-ingest run`` needs besides the environment (AWS, PG* variables)."""

    #: the worker's settings; its stream_name and resource_id are those given, or empty when
    #: ``cluster`` or ``instance`` is given (then they are discovered)
    worker: WorkerSettings
    #: an Aurora cluster whose stream and resource id are discovered (None: worker.stream_name)
    cluster: str | None = None
    #: an RDS for Oracle or SQL Server DB instance whose stream and resource id are discovered
    instance: str | None = None
    #: the encryption context's resource id when given explicitly (None: from the stream)
    resource_id: str | None = None
    dsn: str | None = None
    db_pool_size: int = 16
    #: seconds a warehouse statement or connection attempt may take (None: no limit)
    db_command_timeout: float | None = 20.0
    metrics_port: int | None = None


class _Startup:
    """What the health endpoints and signal handlers see before and after the worker exists."""

    def __init__(self, lease_seconds: float) -> None:
        self.worker: Worker | None = None
        self.stop = asyncio.Event()
        self.turned = time.monotonic()
        self._grace = max(30.0, 3 * lease_seconds)

    def alive(self) -> bool:
        # Alive while the loops turn: retrying an unreachable database is alive (and not
        # ready); a wedged event loop is not. Restarting a worker cannot fix an outage.
        last = self.worker.last_turn if self.worker is not None else self.turned
        return time.monotonic() - last < self._grace

    def ready(self) -> bool:
        return self.worker is not None and self.worker.ready

    def request_stop(self, reason: str) -> None:
        self.stop.set()
        if self.worker is not None:
            self.worker.request_stop(reason)


async def serve(serve_settings: ServeSettings, *, pool: DecodePool | None = None) -> int:
    """Run the worker until stopped. ``pool``: the decode pool, already started (see
    ``ingest.commands.run``); closed here in any case."""
    try:
        return await _serve(serve_settings, pool)
    finally:
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.close)


async def _serve(serve_settings: ServeSettings, pool: DecodePool | None) -> int:
    if serve_settings.cluster:
        stream, discovered_id = await discover_cluster(serve_settings.cluster)
    elif serve_settings.instance:
        stream, discovered_id = await discover_instance(serve_settings.instance)
    else:
        stream = serve_settings.worker.stream_name
        discovered_id = resource_id_from_stream(stream)
    resource_id = serve_settings.resource_id or discovered_id
    settings = replace(serve_settings.worker, stream_name=stream, resource_id=resource_id)
    # Fail fast on a bad decryptor choice, before touching anything (without loading one
    # here: the decode processes do).
    from ingest.decode.decryptors import check_decryptor

    decoder = settings.shard.commit.decoder
    check_decryptor(decoder.decryptor, verify_signatures=decoder.verify_signatures)
    dsn = resolve_dsn(serve_settings.dsn)
    metrics = Metrics(stream)
    startup = _Startup(settings.lease_seconds)
    _install_signals(startup)
    health: HealthServer | None = None
    port = serve_settings.metrics_port
    if port is not None:
        health = HealthServer(metrics, alive=startup.alive, ready=startup.ready)
        try:
            await health.start(port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /metrics on port {port}: {exc.strerror or exc}"
            ) from None
        log.info("serving /metrics, /healthz, /readyz", extra={"port": health.port})
    started = time.monotonic()
    try:
        db = await _until_reachable(
            startup,
            "warehouse",
            lambda: create_pool(
                dsn,
                min_size=2,
                max_size=serve_settings.db_pool_size,
                init=init_connection,
                command_timeout=serve_settings.db_command_timeout,
            ),
        )
        if db is None:
            return 0
        if health is not None:
            health.before_scrape = WarehouseGauges(db, metrics).refresh
        try:
            async with db.acquire() as conn:
                await require_current_schema(conn)
            pool_size = 8 + 2 * serve_settings.db_pool_size
            shared = aws_session()
            async with (
                aws_client("kinesis", session=shared) as kinesis,
                # The shard consumers' client: botocore's own retries would bypass the pacing of
                # GetRecords (5 calls per second per shard); the consumers retry every attempt.
                aws_client(
                    "kinesis",
                    max_pool_connections=pool_size,
                    retries=False,
                    fast_records=True,
                    session=shared,
                ) as records,
                aws_client("kms", session=shared) as kms,
            ):
                if not await _until_reachable(
                    startup, "kinesis", lambda: check_stream(kinesis, stream)
                ):
                    return 0
                worker = Worker(
                    settings,
                    db=db,
                    kinesis_client=kinesis,
                    records_client=records,
                    kms_client=kms,
                    metrics=metrics,
                    pool=pool,
                )
                # A key that cannot anchor (unknown, refused, not an HMAC or signing key) is a
                # configuration error now, not a warning every --anchor-seconds. The key keeps
                # what it learnt, so anchoring asks KMS nothing more.
                anchor_key = worker.anchor_key
                if anchor_key is not None and not await _until_reachable(
                    startup, "kms", anchor_key.info
                ):
                    return 0
                startup.worker = worker
                if startup.stop.is_set():
                    return 0
                log.info(
                    "worker started",
                    extra={
                        "stream": stream,
                        "worker": settings.worker_id,
                        "resource_id": resource_id,
                        "processes": settings.processes,
                    },
                )
                log.debug("warehouse", extra={"target": redact(dsn)})
                frozen = freeze_startup_heap()
                log.debug("startup heap frozen", extra={"frozen_objects": frozen})
                await worker.run()
                log.info(
                    "worker stopped",
                    extra={
                        "reason": worker.exit_reason or "done",
                        "events": _sample(metrics, "das_events_ingested_total"),
                        "records": _sample(metrics, "das_records_ingested_total"),
                        "kms_calls": worker.keys.stats.calls,
                        "kms_hits": worker.keys.stats.hits,
                        "lease_changes": metrics.lease_change_counts(),
                        "elapsed": round(time.monotonic() - started, 3),
                    },
                )
        finally:
            await close_pool(db, serve_settings.db_command_timeout or 30.0)
    finally:
        if health is not None:
            await health.stop()
    return 0


def _sample(metrics: Metrics, name: str) -> int:
    return int(metrics.registry.get_sample_value(name) or 0)


async def _until_reachable(
    startup: _Startup, what: str, attempt: Callable[[], Awaitable[T]]
) -> T | None:
    """Retry ``attempt`` while it fails transiently (unreachable, restarting); None if stopped
    meanwhile. Configuration errors (refused login, unknown stream) propagate at once."""

    def on_retry(error: BaseException, _attempt: int, delay: float) -> None:
        startup.turned = time.monotonic()
        log.warning(
            f"{what} unreachable at startup; retrying",
            extra={"error": str(error)[:200], "delay": round(delay, 3)},
        )

    if startup.stop.is_set():
        return None
    startup.turned = time.monotonic()
    try:
        return await retry(
            attempt, backoff=Backoff(base=0.5, cap=15.0), stop=startup.stop, on_retry=on_retry
        )
    except RetryStopped:
        return None


def _install_signals(startup: _Startup) -> None:
    loop = asyncio.get_running_loop()
    count = {"n": 0}

    def on_signal(signame: str) -> None:
        count["n"] += 1
        if count["n"] == 1:
            startup.request_stop(signame)
        else:
            log.warning("second signal: stopping now", extra={"reason": signame})
            for task in asyncio.all_tasks(loop):
                if task is not asyncio.current_task(loop):
                    task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
