"""The worker's background routines, all of one shape, and the supervisor that runs them.

:func:`run_loop` turns a step into a routine: run it every ``every`` seconds until the stop
event (or forever, until cancelled); a retriable failure (``IngestError.retriable``) is
reported and tried again after a backoff, or at the next turn; any other failure ends the
routine -- an IngestError as it is (its exit code means something), anything else wrapped in
:class:`RoutineFailedError`. ``CancelledError`` always passes through.

:func:`supervise` waits on the routines together (``asyncio.wait``), so one that crashes, or
ends when it should not, surfaces at once instead of leaving the worker half alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from ingest.consumer.failures import describe
from ingest.errors import IngestError
from ingest.retry import Backoff, is_retriable, sleep_or_stop

log = logging.getLogger("ingest.consumer.worker")


class RoutineFailedError(IngestError):
    """A background routine failed with an unexpected error (a bug): the worker stops."""

    def __init__(self, routine: str, cause: BaseException) -> None:
        super().__init__(f"the {routine} failed: {describe(cause)}")
        self.routine = routine


async def run_loop(
    routine: str,
    step: Callable[[], Awaitable[None]],
    *,
    every: float,
    stop: asyncio.Event | None = None,
    backoff: Backoff | None = None,
    on_error: Callable[[BaseException, float], None] | None = None,
    from_start: bool = True,
) -> None:
    """Run ``step`` every ``every`` seconds until ``stop`` is set (None: until cancelled).

    ``from_start``: the period runs from the start of a turn (a slow step does not delay the
    next), else from its end. After a retriable failure the next try comes after
    ``backoff.delay(failures)``, or when the turn's period is over without a backoff;
    ``on_error(error, delay)`` says so first.
    """
    failures = 0
    while stop is None or not stop.is_set():
        started = time.monotonic()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_retriable(exc):
                if isinstance(exc, IngestError):
                    raise
                raise RoutineFailedError(routine, exc) from exc
            delay = (
                backoff.delay(failures)
                if backoff is not None
                else max(0.0, every - (time.monotonic() - started))
            )
            failures += 1
            if on_error is not None:
                on_error(exc, delay)
            await sleep_or_stop(delay, stop)
            continue
        failures = 0
        rest = every - (time.monotonic() - started) if from_start else every
        await sleep_or_stop(max(0.0, rest), stop)


async def supervise(
    main: tuple[str, asyncio.Future[None]], background: Mapping[str, asyncio.Future[None]]
) -> str:
    """Wait until ``main`` finishes (its failure is raised) or a ``background`` routine ends:
    they run until cancelled, so one that ends has failed, and its failure is raised (a
    RuntimeError if it returned). Returns the name of what ended."""
    name, task = main
    names = {future: routine for routine, future in background.items()} | {task: name}
    done, _ = await asyncio.wait(names, return_when=asyncio.FIRST_COMPLETED)
    for future in sorted(done, key=lambda f: f is not task):  # main first
        if future.cancelled():
            raise asyncio.CancelledError
        exc = future.exception()
        if future is task and exc is None:
            return name
        log.error(
            "worker routine failed; stopping",
            extra={"routine": names[future], "error": describe(exc) if exc else "returned"},
        )
        if exc is not None:
            raise exc
        raise RuntimeError(f"the {names[future]} ended by itself")
    raise AssertionError("asyncio.wait returned nothing")  # pragma: no cover
