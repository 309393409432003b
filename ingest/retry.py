"""One retry policy: whether a failure is retried is decided by its class, nothing else.

The adapters (``kinesis.py``, ``kms.py``, ``warehouse/db.py``, ``warehouse/sink.py``,
``warehouse/leases.py``) turn the library errors that mean "try again" (throttling, 5xx,
network, a restarting database) into :class:`~ingest.errors.IngestError` subclasses whose
``retriable`` is true. Every retry loop asks :func:`is_retriable` and nothing else: no list of
library exceptions outside the adapters.

:func:`retry` runs one call until it works: full-jitter backoff, the call reported outstanding
to a dependency-health tracker from its first attempt to its last, and an optional stop event
that ends the backoff at once (:class:`RetryStopped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ingest.errors import IngestError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    base: float = 0.1
    cap: float = 20.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return random.uniform(0.0, min(self.cap, self.base * (2 ** min(attempt, 30))))  # noqa: S311


def is_retriable(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient fault: an IngestError whose class says so."""
    return isinstance(exc, IngestError) and exc.retriable


class Health(Protocol):
    """Where calls to a dependency are reported outstanding (consumer.DependencyHealth)."""

    def outstanding(self, dependency: str) -> AbstractContextManager[None]: ...


class RetryStopped(Exception):
    """The stop event was set while a call waited to be retried: the caller is stopping."""


async def sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile; True when stopped."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff = Backoff(),
    dependency: str | None = None,
    health: Health | None = None,
    stop: asyncio.Event | None = None,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    max_attempts: int | None = None,
) -> T:
    """Run ``op`` until it succeeds, retrying :func:`is_retriable` failures with backoff.

    Other failures propagate at once, as does the last one after ``max_attempts``. With
    ``health`` and ``dependency`` the call is outstanding from its first attempt to its last
    (a dependency that keeps failing, or hangs, turns unhealthy). ``on_retry(error, attempt,
    delay)`` is called before each wait (log and count there). A ``stop`` event set before or
    during a wait raises :class:`RetryStopped` instead of trying again.
    """
    tracking = (
        health.outstanding(dependency)
        if health is not None and dependency is not None
        else contextlib.nullcontext()
    )
    with tracking:
        attempt = 0
        while True:
            try:
                return await op()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                if max_attempts is not None and attempt + 1 >= max_attempts:
                    raise
                delay = backoff.delay(attempt)
                if on_retry is not None:
                    on_retry(exc, attempt, delay)
                attempt += 1
                if await sleep_or_stop(delay, stop):
                    raise RetryStopped from exc
