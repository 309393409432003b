"""Backoff with full jitter for transient faults. Which faults are transient is decided by the
error classes (``retriable``) and by the adapters that classify library exceptions."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    base: float = 0.1
    cap: float = 20.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return random.uniform(0.0, min(self.cap, self.base * (2 ** min(attempt, 30))))  # noqa: S311


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    is_transient: Callable[[BaseException], bool],
    backoff: Backoff = Backoff(),
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    max_attempts: int | None = None,
) -> T:
    """Run ``op`` until it succeeds, retrying transient errors with backoff.

    Non-transient errors propagate at once; ``max_attempts`` bounds the retries when given.
    """
    attempt = 0
    while True:
        try:
            return await op()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_transient(exc) or (max_attempts is not None and attempt + 1 >= max_attempts):
                raise
            delay = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            attempt += 1
            await asyncio.sleep(delay)
