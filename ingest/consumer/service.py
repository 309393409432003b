"""Wiring for ``das-ingest run``: settings, AWS clients, the database pool, signals, health."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ingest.aws import aws_client, error_code
from ingest.consumer.shard import ShardSettings
from ingest.consumer.worker import Worker, WorkerSettings
from ingest.decode.batch import DecoderConfig
from ingest.discovery import discover_cluster, discover_instance
from ingest.errors import ConfigError
from ingest.health import HealthServer
from ingest.integrity.anchor import AnchorError
from ingest.kinesis import KinesisUnavailableError, classify
from ingest.kms import resource_id_from_stream
from ingest.metrics import Metrics
from ingest.retry import Backoff
from ingest.warehouse.db import WarehouseUnavailableError, create_pool, redact, resolve_dsn
from ingest.warehouse.migrate import require_current_schema
from ingest.warehouse.sink import init_connection

log = logging.getLogger("ingest")
T = TypeVar("T")


def worker_settings(args: argparse.Namespace, stream: str, resource_id: str) -> WorkerSettings:
    processes = args.processes
    return WorkerSettings(
        stream_name=stream,
        resource_id=resource_id,
        worker_id=args.worker_id,
        initial_position=args.initial_checkpoint,
        lease_seconds=args.lease_seconds,
        shard_sync_seconds=args.shard_sync_seconds,
        anchor_key_id=args.anchor_key_id,
        anchor_seconds=args.anchor_seconds,
        chain=not args.no_integrity_chain,
        stop_when_idle=args.stop_when_idle,
        unready_after=args.unready_after,
        shutdown_deadline=args.shutdown_deadline,
        processes=processes,
        queue_batches=args.queue_batches or max(2, 2 * processes),
        queue_bytes=args.queue_mb * 1024 * 1024,
        shard=ShardSettings(
            max_records=args.max_records,
            decoder=DecoderConfig(
                decryptor=args.decryptor,
                verify_signatures=not args.skip_signature_verification,
                max_decompressed=args.max_decompressed_mb * 1024 * 1024,
                chain=not args.no_integrity_chain,
            ),
        ),
    )


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


async def serve(args: argparse.Namespace) -> int:
    if args.cluster:
        stream, discovered_id = await discover_cluster(args.cluster)
    elif getattr(args, "instance", None):
        stream, discovered_id = await discover_instance(args.instance)
    else:
        stream, discovered_id = args.stream, resource_id_from_stream(args.stream)
    resource_id = args.resource_id or discovered_id
    settings = worker_settings(args, stream, resource_id)
    # Fail fast on a bad decryptor choice, before touching anything.
    from ingest.decode.batch import decryptor_for

    decryptor_for(settings.shard.decoder)
    dsn = resolve_dsn(args.dsn)
    metrics = Metrics()
    startup = _Startup(settings.lease_seconds)
    _install_signals(startup)
    health: HealthServer | None = None
    if args.metrics_port is not None:
        health = HealthServer(metrics, alive=startup.alive, ready=startup.ready)
        try:
            await health.start(args.metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /metrics on port {args.metrics_port}: {exc.strerror or exc}"
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
                max_size=args.db_pool_size,
                init=init_connection,
                command_timeout=args.db_command_timeout or None,
            ),
        )
        if db is None:
            return 0
        try:
            async with db.acquire() as conn:
                await require_current_schema(conn)
            pool_size = 8 + 2 * args.db_pool_size
            async with (
                aws_client("kinesis") as kinesis,
                # The shard consumers' client: botocore's own retries would bypass the pacing of
                # GetRecords (5 calls per second per shard); the consumers retry every attempt.
                aws_client("kinesis", max_pool_connections=pool_size, retries=False) as records,
                aws_client("kms") as kms,
            ):
                if not await _until_reachable(
                    startup, "kinesis", lambda: _check_stream(kinesis, stream)
                ):
                    return 0
                worker = Worker(
                    settings,
                    db=db,
                    kinesis_client=kinesis,
                    records_client=records,
                    kms_client=kms,
                    metrics=metrics,
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
            await _close(db, args.db_command_timeout or 30.0)
    finally:
        if health is not None:
            await health.stop()
    return 0


async def _close(db: Any, seconds: float) -> None:
    """Close the pool gracefully, or abort its connections if the warehouse does not answer
    (a stalled connection must not keep a stopping worker alive)."""
    try:
        async with asyncio.timeout(seconds):
            await db.close()
    except (TimeoutError, OSError) as exc:
        log.warning("warehouse connections aborted at exit", extra={"error": type(exc).__name__})
        db.terminate()


def _sample(metrics: Metrics, name: str) -> int:
    return int(metrics.registry.get_sample_value(name) or 0)


async def _until_reachable(
    startup: _Startup, what: str, attempt: Callable[[], Awaitable[T]]
) -> T | None:
    """Retry ``attempt`` while it fails transiently (unreachable, restarting); None if stopped
    meanwhile. Configuration errors (refused login, unknown stream) propagate at once."""
    backoff = Backoff(base=0.5, cap=15.0)
    failures = 0
    while not startup.stop.is_set():
        startup.turned = time.monotonic()
        try:
            return await attempt()
        except (WarehouseUnavailableError, KinesisUnavailableError, AnchorError) as exc:
            delay = backoff.delay(failures)
            failures += 1
            log.warning(
                f"{what} unreachable at startup; retrying",
                extra={"error": str(exc)[:200], "delay": round(delay, 3)},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(startup.stop.wait(), delay)
    return None


async def _check_stream(kinesis: Any, stream: str) -> bool:
    try:
        await kinesis.describe_stream_summary(StreamName=stream)
    except Exception as exc:  # noqa: BLE001 - classified right here
        error = classify(exc)
        if isinstance(error, KinesisUnavailableError):
            raise error from None
        if error_code(exc) == "ResourceNotFoundException":
            raise ConfigError(f"Kinesis stream {stream!r} not found") from None
        raise ConfigError(f"cannot describe Kinesis stream {stream!r}: {error}") from None
    return True


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
