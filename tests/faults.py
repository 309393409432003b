"""Fault-injecting proxies between the ingester and Kinesis, KMS and PostgreSQL.

A :class:`FaultProxy` listens on 127.0.0.1 and forwards to one upstream server. The test (or the
soak) turns faults on and off while worker processes talk through it:

- ``latency`` (+ ``jitter``): every chunk is delayed in a delay line, so latency adds to each
  round trip without serializing the bytes behind it;
- :meth:`FaultProxy.reset_connections`: every open connection is cut with a TCP RST, both sides;
- :meth:`FaultProxy.refuse` / :meth:`FaultProxy.accept` and :meth:`FaultProxy.outage`: the
  listening socket goes away and new connections are *refused* (ECONNREFUSED, as when a server
  is down), while the port stays ours: a bound, non-listening SO_REUSEPORT socket holds it, so
  nobody else can take it and the proxy comes back on the same address;
- :meth:`FaultProxy.stall` / :meth:`FaultProxy.unstall` and :meth:`FaultProxy.stalled`: the
  network goes silent (a partition, a hung server): connections are still accepted, but no
  byte is forwarded either way until it ends; then everything held flows on, as TCP would
  retransmit it.

In HTTP mode (``http_faults``) the proxy understands HTTP/1.1 requests of the AWS JSON
protocol: it reads each request, asks the :class:`HttpFaults` rules whether to answer it with a
real-looking AWS error (``HTTP 400 {"__type": ..., "message": ...}``, as Kinesis and KMS do) and
forwards the rest to the real server over the same keep-alive connection. It also logs every
request it read (:attr:`ProxyStats.calls`: when, which operation, which Kinesis shard, and the
error injected if any); the shard of a GetRecords call is found by following the iterators
through the GetShardIterator and GetRecords answers.

Nothing here talks to anything but the upstream given, which is on 127.0.0.1 in every use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import orjson

from tests.fleet import Fleet, WorkerProcess, wait_until

LOOPBACK = "127.0.0.1"
_CHUNK = 65536


@dataclass(frozen=True)
class AwsError:
    """An error response as the AWS JSON protocol sends it."""

    code: str
    message: str
    status: int = 400

    def response(self) -> bytes:
        body = orjson.dumps({"__type": self.code, "message": self.message})
        reason = "Bad Request" if self.status == 400 else "Error"
        head = (
            f"HTTP/1.1 {self.status} {reason}\r\n"
            f"x-amzn-RequestId: {uuid.uuid4()}\r\n"
            "Content-Type: application/x-amz-json-1.1\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
        )
        return head.encode() + body


PROVISIONED_THROUGHPUT_EXCEEDED = AwsError(
    "ProvisionedThroughputExceededException",
    "Rate exceeded for shard shardId-000000000000 in stream under account 000000000000.",
)
EXPIRED_ITERATOR = AwsError(
    "ExpiredIteratorException",
    "Iterator expired. The iterator was created at time Mon Jan 01 00:00:00 UTC 2024 while "
    "right now it is Mon Jan 01 00:05:01 UTC 2024 which is further in the future than the "
    "tolerated delay of 300000 milliseconds.",
)
KMS_THROTTLING = AwsError("ThrottlingException", "Rate exceeded")


@dataclass
class ErrorRule:
    """Answer calls of ``operation`` (the part of X-Amz-Target after the dot) with ``error``.

    With probability ``probability`` a call starts a burst: it and the next ``burst - 1`` calls
    of the operation get the error. botocore itself retries throttling errors (the ingester's
    ``max_attempts: 3`` means 3 retries, 4 attempts), so a burst of 5 or more is what reaches
    the ingester's own retry loop.
    ``limit`` caps how many errors the rule injects in all (None: no cap).
    """

    operation: str
    error: AwsError
    probability: float
    burst: int = 1
    limit: int | None = None
    injected: int = 0
    _left: int = 0

    def decide(self, rng: random.Random) -> AwsError | None:
        if self.limit is not None and self.injected >= self.limit:
            return None
        if self._left <= 0 and rng.random() < self.probability:
            self._left = self.burst
        if self._left <= 0:
            return None
        self._left -= 1
        self.injected += 1
        return self.error


@dataclass
class HttpFaults:
    rules: list[ErrorRule] = field(default_factory=list)
    enabled: bool = True

    def decide(self, target: str, rng: random.Random) -> AwsError | None:
        if not self.enabled:
            return None
        operation = target.rpartition(".")[2]
        for rule in self.rules:
            if rule.operation == operation:
                error = rule.decide(rng)
                if error is not None:
                    return error
        return None


@dataclass(frozen=True)
class Call:
    """One request the HTTP proxy read in full, at ``time`` (the event loop's clock, which is
    CLOCK_MONOTONIC like the workers' time.monotonic())."""

    time: float
    operation: str
    shard: str | None
    error: str | None


@dataclass
class ProxyStats:
    connections: int = 0
    resets: int = 0
    refused_periods: int = 0
    stalls: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    calls: list[Call] = field(default_factory=list)

    @property
    def faults(self) -> int:
        """Faults that hit a client: resets, outages and injected error responses."""
        return self.resets + self.refused_periods + sum(self.injected.values())


class _Pair:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort_with_rst(writer)
        for task in self.tasks:
            task.cancel()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A TCP (or AWS-HTTP-aware) proxy on 127.0.0.1 in front of ``upstream`` (host, port)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        name: str = "proxy",
        http_faults: HttpFaults | None = None,
        seed: int = 0,
    ) -> None:
        if upstream[0] not in (LOOPBACK, "localhost"):
            raise ValueError("fault proxies forward to loopback servers only")
        self.upstream = upstream
        self.name = name
        self.http_faults = http_faults
        self.latency = 0.0
        self.jitter = 0.0
        self.stats = ProxyStats()
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: Kinesis shard iterator -> shard id, learned from the answers forwarded
        self._iterators: dict[str, str] = {}
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._placeholder: socket.socket | None = None
        self._pairs: set[_Pair] = set()
        self._serving: set[asyncio.Task[object]] = set()
        self.port = 0

    # -- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{LOOPBACK}:{self.port}" if userinfo else f"{LOOPBACK}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @classmethod
    def for_url(
        cls, url: str, *, name: str, http_faults: HttpFaults | None = None, seed: int = 0
    ) -> FaultProxy:
        """A proxy in front of the server at ``url`` (http://host:port or postgresql://...)."""
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        return cls((parts.hostname, parts.port), name=name, http_faults=http_faults, seed=seed)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        await self._listen()
        return self

    async def close(self) -> None:
        await self._unlisten()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self.reset_connections(count=False)
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, LOOPBACK, self.port, reuse_port=True, limit=1 << 20
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # -- faults -------------------------------------------------------------------------

    def reset_connections(self, *, count: bool = True) -> int:
        """Cut every open connection with a TCP RST (client and upstream side)."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.reset()
        self._pairs.clear()
        if count and pairs:
            self.stats.resets += 1
        return len(pairs)

    async def refuse(self) -> None:
        """Stop listening (new connections get ECONNREFUSED) and cut the open ones."""
        if self._server is None:
            return
        # Hold the port first: a bound socket that does not listen answers SYN with RST.
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((LOOPBACK, self.port))
        self._placeholder = holder
        await self._unlisten()
        self.reset_connections(count=False)
        self.stats.refused_periods += 1

    async def accept(self) -> None:
        """Listen again on the same port."""
        if self._server is not None:
            return
        await self._listen()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """``async with proxy.outage():`` the server is unreachable inside the block."""
        await self.refuse()
        try:
            yield
        finally:
            await self.accept()

    @property
    def refusing(self) -> bool:
        return self._server is None

    def stall(self) -> None:
        """From now on forward nothing, either way, and connect nothing upstream."""
        if self._flowing.is_set():
            self._flowing.clear()
            self.stats.stalls += 1

    def unstall(self) -> None:
        """Let everything held flow on."""
        self._flowing.set()

    @property
    def stalling(self) -> bool:
        return not self._flowing.is_set()

    @contextlib.asynccontextmanager
    async def stalled(self) -> AsyncIterator[None]:
        """``async with proxy.stalled():`` the network is silent inside the block."""
        self.stall()
        try:
            yield
        finally:
            self.unstall()

    # -- forwarding -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pair = _Pair(writer)
        self._pairs.add(pair)
        self.stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            if self.http_faults is None:
                await self._pipe_tcp(pair, reader)
            else:
                await self._pipe_http(pair, reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            # Only close() cancels us; asyncio's stream callback must not see a cancelled task.
            pass
        finally:
            self._serving.discard(task)
            self._pairs.discard(pair)
            for w in (pair.client, pair.upstream):
                if w is not None:
                    w.transport.abort()

    async def _connect_upstream(
        self, pair: _Pair
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=1 << 20)
        pair.upstream = up_writer
        return up_reader, up_writer

    async def _pipe_tcp(self, pair: _Pair, reader: asyncio.StreamReader) -> None:
        await self._flowing.wait()
        up_reader, up_writer = await self._connect_upstream(pair)
        tasks = [
            asyncio.ensure_future(self._delay_line(reader, up_writer)),
            asyncio.ensure_future(self._delay_line(up_reader, pair.client)),
        ]
        pair.tasks = tasks
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _delay(self) -> float:
        if self.latency <= 0 and self.jitter <= 0:
            return 0.0
        return self.latency + self._rng.uniform(0, self.jitter)

    async def _delay_line(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy bytes, each chunk released ``latency`` after it arrived (pipelined)."""
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)

        async def release() -> None:
            while True:
                due, data = await line.get()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()

        releaser = asyncio.ensure_future(release())
        try:
            while True:
                data = await reader.read(_CHUNK)
                await line.put((loop.time() + self._delay(), data))
                if not data:
                    break
            await releaser
        finally:
            releaser.cancel()
            await asyncio.gather(releaser, return_exceptions=True)

    async def _pipe_http(self, pair: _Pair, reader: asyncio.StreamReader) -> None:
        assert self.http_faults is not None
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client closed its keep-alive connection
            headers = _headers(head)
            body = await _read_body(reader, headers)
            target = headers.get("x-amz-target", "")
            operation = target.rpartition(".")[2] or "?"
            self.stats.requests[operation] += 1
            request = _json(body)
            shard = self._shard_of(operation, request)
            delay = self._delay()
            if delay:
                await asyncio.sleep(delay)
            await self._flowing.wait()
            error = self.http_faults.decide(target, self._rng)
            self.stats.calls.append(
                Call(
                    asyncio.get_running_loop().time(),
                    operation,
                    shard,
                    None if error is None else error.code,
                )
            )
            if error is not None:
                self.stats.injected[f"{operation}:{error.code}"] += 1
                pair.client.write(error.response())
                await pair.client.drain()
                continue
            if upstream is None:
                upstream = await self._connect_upstream(pair)
            up_reader, up_writer = upstream
            up_writer.write(head + body)
            await up_writer.drain()
            response_head = await up_reader.readuntil(b"\r\n\r\n")
            response_headers = _headers(response_head)
            response_body = await _read_body(up_reader, response_headers, response=True)
            if shard is not None:
                self._follow_iterator(shard, _json(response_body))
            await self._flowing.wait()
            pair.client.write(response_head + response_body)
            await pair.client.drain()
            if "close" in response_headers.get("connection", "").lower():
                return

    def _shard_of(self, operation: str, request: dict[str, object]) -> str | None:
        if operation == "GetShardIterator":
            shard = request.get("ShardId")
            return shard if isinstance(shard, str) else None
        if operation == "GetRecords":
            iterator = request.get("ShardIterator")
            return self._iterators.get(iterator) if isinstance(iterator, str) else None
        return None

    def _follow_iterator(self, shard: str, response: dict[str, object]) -> None:
        for key in ("ShardIterator", "NextShardIterator"):
            iterator = response.get(key)
            if isinstance(iterator, str):
                self._iterators[iterator] = shard


def _json(body: bytes) -> dict[str, object]:
    """A JSON object body, or {} (chunked, empty, or not JSON)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    out: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], *, response: bool = False
) -> bytes:
    """The raw body bytes as they travel (chunked bodies stay chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            chunk = await reader.readexactly(size + 2)
            parts.append(chunk)
            if size == 0:
                return b"".join(parts)
    length = headers.get("content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if response:
        return await reader.read()  # delimited by the server closing the connection
    return b""


@dataclass
class Chaos:
    """Resets the connections of some proxies at random moments until stopped (seeded)."""

    proxies: list[FaultProxy]
    every: tuple[float, float] = (1.0, 3.0)
    seed: int = 0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        rng = random.Random(self.seed)
        while True:
            await asyncio.sleep(rng.uniform(*self.every))
            rng.choice(self.proxies).reset_connections()


def injected_errors(rules: list[ErrorRule]) -> dict[str, int]:
    return {f"{r.operation}:{r.error.code}": r.injected for r in rules}


def describe(proxies: list[FaultProxy]) -> str:
    return ", ".join(
        f"{p.name}: {p.stats.resets} resets, {p.stats.refused_periods} outages, "
        f"{sum(p.stats.injected.values())} injected errors, {p.stats.connections} connections"
        for p in proxies
    )


# -- worker processes with their own environment ------------------------------------------------


async def spawn_worker(
    fleet: Fleet, name: str, stream: str, dsn: str, *extra: str, env: dict[str, str]
) -> WorkerProcess:
    """``Fleet.start`` with environment overrides (the proxies' endpoints) for this worker
    only: the test process's own clients keep talking to the servers directly."""
    return await fleet.start(name, stream, dsn, *extra, env=env)


async def metrics_port(worker: WorkerProcess, deadline: float = 60) -> int:
    """The port a worker started with ``--metrics-port 0`` serves on (from its log)."""

    async def logged() -> bool:
        return bool(worker.logged("serving /metrics, /healthz, /readyz"))

    await wait_until(logged, deadline, interval=0.05)
    return int(worker.logged("serving /metrics, /healthz, /readyz")[0]["port"])


async def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, error) when nothing answers."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {LOOPBACK}\r\n\r\n".encode())
                await writer.drain()
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return 0, type(exc).__name__
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode("utf-8", "replace")


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from a Prometheus exposition: labels text -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    total = 0
    for each in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{each}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# -- crashes -------------------------------------------------------------------------------------


Starter = Callable[[str], Awaitable[WorkerProcess]]


@dataclass
class Killer:
    """SIGKILLs a random worker at random moments and starts it again (seeded: log the seed).

    ``start(name)`` starts a worker process. A restarted worker keeps its name (a container
    restarted in place) or gets a new one (a new pod), at random.
    """

    start: Starter
    slots: int
    seed: int
    every: tuple[float, float] = (1.0, 3.5)
    restart_after: tuple[float, float] = (0.0, 1.5)
    kills: int = 0
    restarts: int = 0
    live: dict[int, WorkerProcess] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _rng: random.Random = field(init=False)
    _generation: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    async def start_all(self) -> None:
        for slot in range(self.slots):
            self.live[slot] = await self.start(f"w{slot}")

    def begin(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop killing; every slot has a running worker again afterwards."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for slot, worker in list(self.live.items()):
            if worker.process.returncode is not None:
                await self._restart(slot)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._rng.uniform(*self.every))
            slot = self._rng.randrange(self.slots)
            victim = self.live[slot]
            victim.kill()
            await victim.process.wait()
            self.kills += 1
            await asyncio.sleep(self._rng.uniform(*self.restart_after))
            await self._restart(slot)

    async def _restart(self, slot: int) -> None:
        self._generation += 1
        same_name = self._rng.random() < 0.5
        name = f"w{slot}" if same_name else f"w{slot}-{self._generation}"
        self.live[slot] = await self.start(name)
        self.restarts += 1

    async def terminate_all(self, deadline: float = 60) -> list[int]:
        """SIGTERM every worker once it is up (a SIGTERM during startup, before the handlers
        are installed, ends a process the default way: nothing to drain, but not exit 0)."""
        workers = list(self.live.values())

        async def started() -> bool:
            return all(w.logged("worker started") for w in workers)

        await wait_until(started, deadline)
        for worker in workers:
            worker.terminate()
        return list(await asyncio.gather(*(w.wait(deadline) for w in workers)))
