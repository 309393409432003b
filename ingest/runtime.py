"""Running a command's process: its coroutine on uvloop, clean one-line errors instead of
tracebacks, and a long-running process's start-up heap frozen out of the cyclic GC."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Coroutine
from typing import Any

import asyncpg

from ingest.errors import ConfigError, IngestError
from ingest.exitcodes import FAILURE, UNAVAILABLE, USAGE
from ingest.warehouse.db import WarehouseUnavailableError, is_transient


def freeze_startup_heap() -> int:
    """Take what a long-running process built while starting (imported modules, botocore's
    service models, clients, compiled rules) out of the cyclic garbage collector's sight, and
    return how many objects that was.

    They live as long as the process, but every full collection walks them again: in the
    worker's main process those walks were ~9% of its CPU at one event per record (perf).
    Frozen objects are still freed by reference counting; only cycles among them would stay.
    No collection first: at that point in the worker one found no garbage and took ~30 ms.
    """
    gc.freeze()
    return gc.get_freeze_count()


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop; a ConfigError or IngestError becomes a message and exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a core dependency; keep running without it
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(main)
    except ConfigError as exc:
        print(f"das-ingest: configuration error: {exc}", file=sys.stderr)
        return USAGE
    except WarehouseUnavailableError as exc:
        print(f"das-ingest: warehouse unavailable: {exc}", file=sys.stderr)
        return UNAVAILABLE
    except IngestError as exc:
        print(f"das-ingest: {exc}", file=sys.stderr)
        # A retriable error that reached the top (KMS, Kinesis, S3, Secrets Manager unreachable
        # or throttling after the retries): a dependency was unavailable, not a failure.
        return UNAVAILABLE if exc.retriable else FAILURE
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError) as exc:
        # A command run against a database `migrate` never set up (or an older schema).
        print(
            f"das-ingest: the warehouse schema is not migrated ({exc}): run `das-ingest migrate` "
            "as the schema owner first",
            file=sys.stderr,
        )
        return USAGE
    except asyncpg.InsufficientPrivilegeError as exc:
        # The least-privilege roles at work: say which privilege is missing, not a traceback.
        print(
            f"das-ingest: permission denied in the warehouse: {exc} (run this command as a role "
            "that may; see docs/operations.md, 'The warehouse: owner, ingest and analyst')",
            file=sys.stderr,
        )
        return USAGE
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if not is_transient(exc):
            raise
        # The warehouse went away while the command ran (restart, failover, network).
        print(f"das-ingest: warehouse unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return UNAVAILABLE
