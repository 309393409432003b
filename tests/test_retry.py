"""The one retry policy (ingest.retry), the warehouse's error adapter, and the supervised-loop
helper of the worker's background routines (consumer.loops). No servers."""

from __future__ import annotations

import asyncio
import itertools
import time

import asyncpg
import pytest

from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.loops import RoutineFailedError, run_loop, supervise
from ingest.errors import ConfigError, IngestError, KmsError, KmsUnavailableError
from ingest.kinesis import IteratorExpiredError, KinesisUnavailableError
from ingest.retry import Backoff, RetryStopped, is_retriable, retry
from ingest.warehouse.db import (
    WarehousePermissionError,
    WarehouseUnavailableError,
    warehouse_call,
)

FAST = Backoff(base=0.001, cap=0.005)


class Flaky:
    """Fails with ``errors`` in turn, then returns ``"done"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


# -- the policy -------------------------------------------------------------------------------


def test_the_class_decides() -> None:
    assert is_retriable(KinesisUnavailableError("throttled"))
    assert is_retriable(KmsUnavailableError("throttled"))
    assert is_retriable(WarehouseUnavailableError("reset"))
    assert not is_retriable(KmsError("refused"))
    assert not is_retriable(IteratorExpiredError("expired"))  # renewed, not retried as is
    assert not is_retriable(ConfigError("bad"))
    # A library error is not retried until an adapter says what it means.
    assert not is_retriable(ConnectionResetError())
    assert not is_retriable(asyncpg.SerializationError("could not serialize"))


async def test_retriable_errors_are_retried_with_backoff_until_it_works() -> None:
    op = Flaky(KinesisUnavailableError("a"), WarehouseUnavailableError("b"))
    seen: list[tuple[str, int, float]] = []
    result = await retry(op, backoff=FAST, on_retry=lambda e, n, d: seen.append((str(e), n, d)))
    assert result == "done"
    assert op.calls == 3
    assert [(e, n) for e, n, _ in seen] == [("a", 0), ("b", 1)]
    assert all(0.0 <= d <= 0.005 for _, _, d in seen)


@pytest.mark.parametrize(
    "error", [KmsError("refused"), ConfigError("bad"), ConnectionResetError(), ValueError("bug")]
)
async def test_other_errors_propagate_at_once(error: Exception) -> None:
    op = Flaky(error)
    with pytest.raises(type(error)):
        await retry(op, backoff=FAST, on_retry=lambda *_: pytest.fail("retried"))
    assert op.calls == 1


async def test_max_attempts_bounds_the_retries() -> None:
    op = Flaky(*[KmsUnavailableError("x")] * 5)
    with pytest.raises(KmsUnavailableError):
        await retry(op, backoff=FAST, max_attempts=3)
    assert op.calls == 3


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (4, 1.0), (60, 1.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the range, not a constant
        assert len(set(delays)) > 100


async def test_the_call_is_outstanding_for_health_from_first_to_last_attempt() -> None:
    now = [0.0]
    health = DependencyHealth(unready_after=5.0, clock=lambda: now[0])
    during: list[list[str]] = []

    async def op() -> str:
        now[0] += 3.0  # each attempt takes 3 s
        during.append(health.unhealthy())
        if len(during) < 3:
            raise KmsUnavailableError("throttled")
        return "done"

    assert await retry(op, backoff=FAST, dependency="kms", health=health) == "done"
    # Unhealthy once the one call has been outstanding for more than 5 s, across attempts.
    assert during == [[], ["kms"], ["kms"]]
    assert health.unhealthy() == []
    assert health.oldest("kms") is None


async def test_a_stop_wakes_the_backoff() -> None:
    stop = asyncio.Event()
    op = Flaky(*[KinesisUnavailableError("throttled")] * 100)
    task = asyncio.ensure_future(retry(op, backoff=Backoff(base=30.0, cap=30.0), stop=stop))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    stop.set()
    with pytest.raises(RetryStopped):
        await asyncio.wait_for(task, 2)
    assert time.monotonic() - started < 1.0
    assert op.calls == 1


async def test_a_stop_set_before_leaves_after_the_first_failure() -> None:
    stop = asyncio.Event()
    stop.set()
    op = Flaky(KinesisUnavailableError("throttled"))
    with pytest.raises(RetryStopped):
        await retry(op, backoff=Backoff(base=30.0, cap=30.0), stop=stop)
    assert op.calls == 1
    # ...but a call that works is not refused because of a stop.
    assert await retry(Flaky(), stop=stop) == "done"


async def test_cancellation_is_not_retried() -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    task = asyncio.ensure_future(retry(slow, backoff=FAST))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- the warehouse adapter ---------------------------------------------------------------------


@warehouse_call
async def raising(error: BaseException) -> None:
    raise error


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.InterfaceError("connection is closed"),
    ],
)
async def test_transient_database_errors_leave_the_adapter_retriable(error: Exception) -> None:
    with pytest.raises(WarehouseUnavailableError) as info:
        await raising(error)
    assert info.value.retriable
    assert info.value.__cause__ is error
    assert type(error).__name__ in str(info.value)


async def test_a_refused_row_passes_unchanged_and_is_not_retried() -> None:
    refused = asyncpg.CharacterNotInRepertoireError("invalid byte sequence: 'secret'")
    with pytest.raises(asyncpg.CharacterNotInRepertoireError):
        await raising(refused)


async def test_transient_errors_are_described_without_the_values_they_quote() -> None:
    error = asyncpg.SerializationError("could not serialize 'secret-value'")
    with pytest.raises(WarehouseUnavailableError) as info:
        await raising(error)
    assert "secret" not in str(info.value)
    assert "SQLSTATE 40001" in str(info.value)


async def test_a_missing_privilege_is_a_configuration_error() -> None:
    with pytest.raises(WarehousePermissionError) as info:
        await raising(asyncpg.InsufficientPrivilegeError("permission denied for table leases"))
    assert isinstance(info.value, ConfigError)
    assert "permission denied in the warehouse" in str(info.value)


# -- supervised loops --------------------------------------------------------------------------


async def test_a_loop_runs_its_step_until_stopped() -> None:
    stop = asyncio.Event()
    turns = []

    async def step() -> None:
        turns.append(time.monotonic())
        if len(turns) == 4:
            stop.set()

    await asyncio.wait_for(run_loop("test", step, every=0.01, stop=stop), 2)
    assert len(turns) == 4
    assert all(b - a >= 0.009 for a, b in itertools.pairwise(turns))


async def test_a_loop_retries_retriable_failures_after_a_backoff() -> None:
    stop = asyncio.Event()
    failures: list[tuple[str, float]] = []
    outcomes: list[BaseException | None] = [
        WarehouseUnavailableError("down"),
        KinesisUnavailableError("throttled"),
        None,
    ]

    async def step() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        stop.set()

    await asyncio.wait_for(
        run_loop(
            "test",
            step,
            every=30.0,  # the period does not delay a retry: the backoff does
            stop=stop,
            backoff=FAST,
            on_error=lambda e, d: failures.append((str(e), d)),
        ),
        2,
    )
    assert [e for e, _ in failures] == ["down", "throttled"]
    assert all(d <= 0.005 for _, d in failures)


async def test_a_loop_ends_with_an_ingest_error_as_it_is() -> None:
    async def step() -> None:
        raise ConfigError("stream not found")

    with pytest.raises(ConfigError, match="stream not found"):
        await run_loop("test", step, every=0.01)


async def test_a_loop_wraps_an_unexpected_error() -> None:
    async def step() -> None:
        raise KeyError("bug")

    with pytest.raises(RoutineFailedError, match="the coordinator failed: KeyError") as info:
        await run_loop("coordinator", step, every=0.01)
    assert isinstance(info.value, IngestError)
    assert isinstance(info.value.__cause__, KeyError)


async def test_a_loop_lets_cancellation_through() -> None:
    async def step() -> None:
        await asyncio.sleep(10)

    task = asyncio.ensure_future(run_loop("test", step, every=0.01))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _forever() -> None:
    await asyncio.sleep(3600)


async def test_the_supervisor_returns_when_the_main_routine_finishes() -> None:
    async def main() -> None:
        await asyncio.sleep(0.01)

    background = asyncio.ensure_future(_forever())
    try:
        assert (
            await supervise(("main", asyncio.ensure_future(main())), {"bg": background}) == "main"
        )
        assert not background.done()  # left to the caller to cancel
    finally:
        background.cancel()


async def test_the_supervisor_surfaces_a_crashed_background_routine() -> None:
    async def crash() -> None:
        await asyncio.sleep(0.01)
        raise RoutineFailedError("renewer", KeyError("bug"))

    main = asyncio.ensure_future(_forever())
    try:
        with pytest.raises(RoutineFailedError, match="renewer"):
            await asyncio.wait_for(
                supervise(("main", main), {"renewer": asyncio.ensure_future(crash())}), 2
            )
    finally:
        main.cancel()


async def test_the_supervisor_treats_a_background_routine_that_returns_as_failed() -> None:
    async def quits() -> None:
        return None

    main = asyncio.ensure_future(_forever())
    try:
        with pytest.raises(RuntimeError, match="the watch ended by itself"):
            await supervise(("main", main), {"watch": asyncio.ensure_future(quits())})
    finally:
        main.cancel()


async def test_the_supervisor_raises_the_main_routines_failure() -> None:
    async def main() -> None:
        raise ConfigError("stream not found")

    background = asyncio.ensure_future(_forever())
    try:
        with pytest.raises(ConfigError):
            await supervise(("main", asyncio.ensure_future(main())), {"bg": background})
    finally:
        background.cancel()
