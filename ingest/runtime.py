"""Running a command's coroutine: uvloop, and clean one-line errors instead of tracebacks."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

import asyncpg

from ingest.errors import ConfigError, IngestError


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
        return 2
    except IngestError as exc:
        print(f"das-ingest: {exc}", file=sys.stderr)
        return 1
    except asyncpg.InsufficientPrivilegeError as exc:
        # The least-privilege roles at work: say which privilege is missing, not a traceback.
        print(
            f"das-ingest: permission denied in the warehouse: {exc} (run this command as a role "
            "that may; see docs/operations.md, 'The warehouse: owner, ingest and analyst')",
            file=sys.stderr,
        )
        return 2
