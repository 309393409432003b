"""Failures as the logs may show them: never a message that can quote data.

A database error's message can quote the values of a row ("invalid input syntax for type
integer: \\"...\\""), and asyncpg's own argument errors quote the argument; the rows are
decrypted SQL. So database errors are described by class and SQLSTATE only. Our own errors
(:class:`IngestError`) are written value-free and are shown whole; network errors show an
address and an errno. Anything else is described by its class and where it was raised, which is
enough to find the bug without printing what it was looking at.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import asyncpg

from ingest.errors import IngestError


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, asyncpg.InterfaceError):
        return type(exc).__name__
    if isinstance(exc, IngestError | OSError | TimeoutError):
        text = str(exc)
        return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if frames:
        last = frames[-1]
        return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno}"
    return type(exc).__name__
