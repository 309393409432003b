"""Seeded, realistic Database Activity Streams traffic (pure: no I/O, no clock, no crypto).

The generator produces exactly the inner documents Aurora encrypts into each Kinesis record::

    {"type": "DatabaseActivityMonitoringRecord", "clusterId": "cluster-...",
     "instanceId": "db-...", "databaseActivityEventList": [{...}, ...]}

with the field names, JSON types, key order and quirks of the seed document's examples and field
tables, because the consumer must be tested against what Aurora *sends*, not against what the
tables promise:

Aurora PostgreSQL (record version 1.1, or 1.0 without ``errorMessage`` and ``startTime``)
    ``sessionId`` is ``"<backend start epoch hex>.<pid hex>"`` ("5ce73c6f.7e64" is pid 32356),
    ``pid`` an int, ``remotePort`` a string, ``statementId`` a per-session counter starting at 1
    (the CONNECT), ``substatementId`` counts statements run inside a function, ``exitCode`` is
    null or an SQLSTATE string (with ``errorMessage``), ``commandText`` is null for CONNECT,
    DISCONNECT and AUTH FAILURE, ``paramList`` is ``[]`` or a list of strings, ``rowCount`` an
    int or null.
Aurora MySQL (record version 1.2)
    ``pid`` is the server process (the same for every session of an instance), ``sessionId`` the
    connection id as a string, ``statementId`` an instance-wide counter (0 for connection
    events), ``exitCode`` and ``errorMessage`` are strings ("0"/"" when fine), ``paramList`` is
    null, quotes and backslashes in ``commandText`` are backslash-escaped. Each statement emits
    one MAIN event (substatementId 1) and 0..3 AUX events (substatementId 2, the same
    statementId) whose ``logTime`` is *earlier* than MAIN's, as in the seed's examples (the prose
    says the opposite; we follow the data). AUX events are emitted before MAIN, after it, around
    it, or only after the instance's next statement, so they also land in the next record.

RDS for Oracle (1.3) and RDS for SQL Server (1.4)
    See :mod:`ingest.emulate.rds` (``engine="oracle"``, ``"sqlserver"``; ``"all"`` alternates the
    four engines by instance).

One record carries the events of one instance, as Aurora's do. Idle instances send
heartbeat-only records (``{"type": "heartbeat", "logTime": ...}``) every ``heartbeat_every``
records of that instance.

Counting events exactly once
    Every instance has its own microsecond clock that advances at least 1 µs per event it
    generates, so ``logTime`` alone is unique per instance and :class:`EventKey` (instance, pid,
    session, statement, substatement, class, logTime) is unique across the whole traffic; it is
    also what a warehouse row carries, so tests count "every event exactly once" by comparing key
    sets (:meth:`Traffic.expected_keys`, :func:`event_key`, :func:`decoded_event_key`). SQL
    statements (PostgreSQL events with text, MySQL MAIN queries) additionally carry a marker
    comment ``/* das-emulator:<seed>:<n> */`` with a unique ``n``, which survives any pipeline
    that keeps ``commandText``. Connection events and AUX events get no marker: real Aurora
    gives them no SQL (or only an object name) to hide a comment in.

Partition key
    The instance id. A record holds one instance's events, a MySQL statement's MAIN and AUX
    events can straddle two records of that instance, and heartbeats are per instance: keying by
    instance keeps all of them on one shard in production order. A per-session key is impossible
    (a record mixes sessions); a random key would scatter a statement's parts across shards.
    The price: an instance's records go to one shard. So that a few instances still load a
    fresh stream evenly, instance ``i`` of ``n`` gets an id whose Kinesis hash key (MD5) lies in
    the ``i``-th of ``n`` equal slices of the hash range: a new stream whose shard count divides
    ``n`` then gets the same number of instances on every shard. (Aurora's ids are random, so a
    real stream can be lopsided; the ids here look just as random.)
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

# The shared machinery, re-exported: tests and the producer know these names from here.
from ingest.emulate.instance import INNER_TYPE as INNER_TYPE
from ingest.emulate.instance import MARKER_PREFIX as MARKER_PREFIX
from ingest.emulate.instance import InnerRecord as InnerRecord
from ingest.emulate.instance import _Counter, _Instance
from ingest.emulate.instance import format_time as format_time
from ingest.emulate.instance import marker as marker
from ingest.emulate.rds import OracleInstance, SqlServerInstance

Engine = Literal["postgres", "mysql", "oracle", "sqlserver", "both", "all"]
#: One engine, "both" (Aurora PostgreSQL and MySQL instances alternate) or "all" (the four
#: engines in turn: a test and demo convenience, a real stream carries one engine).
ENGINES: tuple[Engine, ...] = ("postgres", "mysql", "oracle", "sqlserver", "both", "all")
SingleEngine = Literal["postgres", "mysql", "oracle", "sqlserver"]
_MIXES: dict[str, tuple[SingleEngine, ...]] = {
    "both": ("postgres", "mysql"),
    "all": ("postgres", "mysql", "oracle", "sqlserver"),
}


def min_instances(engine: Engine) -> int:
    """Instances needed for every engine of ``engine`` to have one."""
    return len(_MIXES.get(engine, ("x",)))


PG_VERSIONS = ("1.0", "1.1")
MYSQL_VERSION = "1.2"

#: The traffic starts at a fixed instant (plus a seeded offset) so a seed always means the same
#: bytes; 2024-03-01 00:00:00 UTC.
_BASE_EPOCH_US = 1_709_251_200 * 1_000_000
_ID_ALPHABET = string.ascii_uppercase + "234567"  # Aurora resource ids are base32
#: Aurora clusters have at most 16 instances; the even hash spread costs O(n²) tries.
MAX_INSTANCES = 64


class EventKey(NamedTuple):
    """Identifies one record event; unique across everything one :class:`Traffic` generates.
    ``statement_id`` is SQL Server's hex text; times are in one form whatever the engine sent
    (no zone: UTC; a seventh fraction digit dropped, as the warehouse's column does)."""

    instance_id: str
    pid: int | None
    session_id: str
    statement_id: int | str | None
    substatement_id: int | None
    class_: str
    log_time: str


def format_datetime(stamp: datetime) -> str:
    """An aware datetime (e.g. a decoded ``log_time``) in the DAS time format, for keys."""
    return format_time(int(stamp.timestamp()) * 1_000_000 + stamp.microsecond)


def key_time(text: str) -> str:
    """A wire time in :func:`format_time`'s form: Oracle's zone-less UTC time gets "+00", SQL
    Server's seventh fraction digit goes (as the timestamptz column drops it)."""
    body, _, _zone = text.partition("+")
    head, _, fraction = body.partition(".")
    return f"{head}.{fraction[:6].ljust(6, '0')}+00"


def event_key(instance_id: str, event: Mapping[str, Any]) -> EventKey:
    """The :class:`EventKey` of a generated (wire-format) record event."""
    session = event["sessionId"]
    return EventKey(
        instance_id,
        event["pid"],
        session if isinstance(session, str) else str(session),
        event["statementId"],
        event["substatementId"],
        event["class"],
        key_time(event["logTime"]),
    )


def decoded_event_key(instance_id: str | None, event: Any) -> EventKey:
    """The :class:`EventKey` of a decoded ``ingest.decode.ActivityEvent``."""
    statement = event.statement_id
    if statement is None:
        statement = getattr(event, "statement_id_text", None)
    return EventKey(
        instance_id or "",
        event.pid,
        event.session_id,
        statement,
        event.substatement_id,
        event.class_,
        format_datetime(event.log_time),
    )


def record_keys(record: InnerRecord) -> Iterator[EventKey]:
    instance_id = record.instance_id
    for event in record.events:
        if event["type"] == "record":
            yield event_key(instance_id, event)


class Traffic:
    """Deterministic DAS traffic for one cluster: ``Traffic(seed)`` always yields the same.

    ``instances`` is the number of DB instances; with ``engine="both"`` they alternate between
    Aurora PostgreSQL and Aurora MySQL (a test convenience: a real cluster runs one engine).
    """

    def __init__(
        self,
        seed: int,
        engine: Engine = "both",
        *,
        cluster_id: str | None = None,
        instances: int = 2,
        pg_version: str = "1.1",
        heartbeat_every: int = 20,
        native_fields: bool = False,
        wall_clock: Callable[[], int] | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if pg_version not in PG_VERSIONS:
            raise ValueError(f"PostgreSQL record version must be 1.0 or 1.1, not {pg_version!r}")
        if not min_instances(engine) <= instances <= MAX_INSTANCES:
            raise ValueError(
                f"instances must be {min_instances(engine)}..{MAX_INSTANCES} for engine "
                f"{engine!r}, not {instances}"
            )
        if heartbeat_every < 0:
            raise ValueError("heartbeat_every must be >= 0 (0: no heartbeats)")
        self.seed = seed
        self.engine: Engine = engine
        self.pg_version = pg_version
        self.heartbeat_every = heartbeat_every
        #: RDS engines: engineNativeAuditFields filled (the stream was started with
        #: --engine-native-audit-fields-included), else {}.
        self.native_fields = native_fields
        #: The paced time (µs since the epoch) a record is produced at, when the caller re-times
        #: the events (ingest/emulate/scenarios.normal): the Aurora instances' schedule (deploys,
        #: nightly jobs, office hours) follows it. None: every activity at any time.
        self.wall_clock = wall_clock
        self.instance_count = instances
        rng = random.Random(f"ids:{seed}")  # noqa: S311 - reproducible, not secret
        self.cluster_id = cluster_id or "cluster-" + _resource_suffix(rng)
        self.instance_ids = [_instance_id(rng, i, instances) for i in range(instances)]

    def engine_of(self, index: int) -> SingleEngine:
        mix = _MIXES.get(self.engine)
        if mix is not None:
            return mix[index % len(mix)]
        return self.engine  # type: ignore[return-value]  # a single engine

    def records(self, events_per_record: int, count: int | None = None) -> Iterator[InnerRecord]:
        """Records of ``events_per_record`` record events (plus heartbeat-only records).

        Stops once ``count`` record events were produced (the last record may be smaller; a
        statement cut there may lack some AUX events, as when a stream is stopped); runs
        forever when ``count`` is None. Every call starts over from the seed.
        """
        if events_per_record < 1:
            raise ValueError("events_per_record must be >= 1")
        rng = random.Random(f"traffic:{self.seed}")  # noqa: S311 - reproducible
        counter = _Counter()
        start_us = _BASE_EPOCH_US + rng.randrange(86_400) * 1_000_000
        classes: dict[SingleEngine, type[_Instance]] = {
            "postgres": _PostgresInstance,
            "mysql": _MySqlInstance,
            "oracle": OracleInstance,
            "sqlserver": SqlServerInstance,
        }
        instances: list[_Instance] = []
        for index, instance_id in enumerate(self.instance_ids):
            cls = classes[self.engine_of(index)]
            instances.append(
                cls(
                    cluster_id=self.cluster_id,
                    instance_id=instance_id,
                    index=index,
                    rng=random.Random(rng.getrandbits(64)),  # noqa: S311
                    start_us=start_us + rng.randrange(1_000_000),
                    seed=self.seed,
                    counter=counter,
                    pg_version=self.pg_version,
                    # The first instance of each engine is its cluster's writer.
                    writer=index < min_instances(self.engine),
                )
            )
            instances[-1].native_fields = self.native_fields
            instances[-1].wall_clock = self.wall_clock
        emitted = 0
        while count is None or emitted < count:
            instance = rng.choice(instances)
            want = events_per_record if count is None else min(events_per_record, count - emitted)
            events = instance.take(want)
            emitted += len(events)
            yield instance.record(events)
            instance.since_heartbeat += 1
            if self.heartbeat_every and instance.since_heartbeat >= self.heartbeat_every:
                instance.since_heartbeat = 0
                yield instance.heartbeat_record()

    def expected_keys(self, events_per_record: int, count: int) -> list[EventKey]:
        """The keys of every record event :meth:`records` produces, in production order."""
        return [key for r in self.records(events_per_record, count) for key in record_keys(r)]


def _resource_suffix(rng: random.Random) -> str:
    return "".join(rng.choice(_ID_ALPHABET) for _ in range(26))


def _instance_id(rng: random.Random, index: int, of: int) -> str:
    """A random-looking instance id whose Kinesis hash key is in slice ``index`` of ``of``."""
    while True:
        candidate = "db-" + _resource_suffix(rng)
        if hash_key(candidate) * of >> 128 == index:
            return candidate


def hash_key(partition_key: str) -> int:
    """The 128-bit hash key Kinesis maps a partition key to (MD5, big-endian)."""
    digest = hashlib.md5(partition_key.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest, "big")


@dataclass(slots=True)
class _Session:
    pid: int
    session_id: str
    user: str
    database: str
    remote_host: str
    remote_port: str
    client_application: str | None
    next_statement: int = 1


# --- who works on the emulated databases (both Aurora engines) ---------------------------------
#
# The traffic is a small shop's: an OLTP application, a reporting service, an ETL account, two
# analysts, the DBA (the cluster's master user), Aurora's own rdsadmin, and a deploy account that
# runs schema migrations. Each has its own statements, row counts, client hosts and hours, so
# that what the detection rules see of "normal" is what a security team would see:
#
# - Application and service accounts never GRANT, ALTER ROLE or run DDL. Schema and privilege
#   changes come from ``deploy`` (the migration tool, from the CI runners) in one migration run
#   per weekday on each writer, inside the deploy slot (``DEPLOY_HOURS``, within the default
#   change window). The ETL account's nightly job (``NIGHTLY_HOURS``) TRUNCATEs its staging
#   table and exports the day's orders (tens of thousands of rows).
# - Row counts are skewed: OLTP statements return 0, 1 or a page (at most 50), analysts up to a
#   LIMIT of 5,000; the reporting service's dashboards a few dozen, and one query in 50 is a
#   full report (median 2,000 rows, one in eleven of them over 10,000, at most 200,000).
# - Every account connects from its own few hosts; one of the four application servers is
#   replaced every day (a new address, as autoscaling does); the analysts come in through a VPN
#   and connect (paced traffic only) on weekdays 07:00-20:00 UTC. Failed logins are people
#   mistyping and an application server with a stale password, from their own hosts.
#
# Paced traffic (``Traffic(..., wall_clock=...)``, used by ingest/emulate/scenarios.normal) runs
# the deploys, the nightly job and the office hours by that clock. The raw generator (no wall
# clock: events microseconds apart, a test of the decoder) runs every kind of activity at any
# time, the migrations and nightly jobs at random (about one group in 250 on a writer), so a
# short stretch of it still holds every statement shape.

_PRIVILEGED = ("rdsadmin", "master")
_USERS = ("app_user", "report_user", "etl", "alice", "bob")
DEPLOY_USER = "deploy"
#: The hours (UTC) a weekday's migration run starts in, and the nightly ETL job's.
DEPLOY_HOURS = (10, 16)
NIGHTLY_HOURS = (1, 4)
#: The hours (UTC, weekdays) people connect in (paced traffic).
OFFICE_HOURS = (7, 20)
#: Chance per group, on a writer of the raw generator, of a migration run or a nightly job.
RAW_JOB_CHANCE = 0.004
_APP_SERVERS = ("10.0.1.11", "10.0.1.12", "10.0.1.13")  # and one replaced daily: app_host()
_CI_RUNNERS = ("10.9.0.11", "10.9.0.12", "10.9.0.13")
_ETL_HOSTS = ("10.0.2.30", "10.0.2.31")


class _Persona(NamedTuple):
    user: str
    weight: int  # share of new sessions
    hosts: tuple[str, ...]
    apps: tuple[str | None, ...]  # PostgreSQL application_name (Aurora MySQL sends none)
    office: bool = False  # a person: connects in office hours only (paced traffic)


_PERSONAS: tuple[_Persona, ...] = (
    _Persona("app_user", 12, _APP_SERVERS, ("PostgreSQL JDBC Driver",)),
    _Persona("report_user", 1, ("10.0.2.20",), (None,)),
    _Persona("etl", 1, _ETL_HOSTS, (None,)),
    _Persona("alice", 1, ("10.8.0.21", "10.8.0.37", "10.8.0.52"),
             ("psql", "pgAdmin 4 - DB:shop"), True),
    _Persona("bob", 1, ("10.8.0.14", "10.8.0.29", "10.8.0.63"), ("psql",), True),
    _Persona("master", 1, ("10.0.0.10",), ("psql",), True),
    _Persona("rdsadmin", 3, ("172.31.3.195",), (None,)),
)  # fmt: skip
_BY_USER = {p.user: p for p in _PERSONAS}
#: Who fails to log in: people mistyping, an application server with a stale password, each from
#: its own hosts (the raw generator fails 3% of logins, paced traffic keeps one in 50 of those).
_MISTYPING = ("alice", "bob", "master", "app_user")
_DEPLOY = _Persona(DEPLOY_USER, 0, _CI_RUNNERS, ("psql",))


def app_host(day: int) -> str:
    """The address of the application server replaced on ``day`` (days since the epoch)."""
    return f"10.0.1.{100 + day % 100}"


def row_count(rng: random.Random, kind: str) -> int:
    """Rows a statement of ``kind`` returns: a skewed distribution per workload."""
    if kind == "key":  # a lookup by primary key
        return 1 if rng.random() < 0.9 else 0
    if kind == "page":  # an application's list, LIMIT 50
        return min(50, int(rng.expovariate(1 / 4)))
    if kind == "tiny":  # monitoring, catalog queries
        return rng.randint(1, 5)
    if kind == "sync":  # an incremental sync of recent changes
        return min(2_000, int(rng.lognormvariate(math.log(50), 1.0)))
    if kind == "adhoc":  # an analyst's query, LIMIT 5000
        return min(5_000, int(rng.lognormvariate(math.log(20), 1.5)))
    if kind == "report":  # dashboards (a few dozen rows); one in 50 a full report, long-tailed
        if rng.random() < 0.98:
            return min(200, int(rng.expovariate(1 / 20)))
        return min(200_000, int(rng.lognormvariate(math.log(2_000), 1.2)))
    if kind == "export":  # the nightly export of a day's orders
        return rng.randint(20_000, 80_000)
    raise ValueError(kind)


_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


class _Aurora(_Instance):
    """The schedule and the people, shared by both Aurora engines."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.jobs_run: set[tuple[str, int]] = set()

    def wall_us(self) -> int:
        return self.wall_clock() if self.wall_clock is not None else self.now_us

    def due(self, job: str, hours: tuple[int, int], weekdays: bool) -> bool:
        """Whether the writer runs ``job`` now: once a day (weekdays only if ``weekdays``) at a
        seeded time within ``hours``; at random when there is no wall clock."""
        if not self.writer:
            return False
        if self.wall_clock is None:
            return self.rng.random() < RAW_JOB_CHANCE
        day, second = divmod(self.wall_us() // 1_000_000, 86_400)
        if (job, day) in self.jobs_run or (weekdays and (day + _EPOCH_WEEKDAY) % 7 >= 5):
            return False
        spread = (hours[1] - hours[0]) * 3_600 - 1_800  # starts at least 30 min before the end
        draw = random.Random(f"{job}:{self.seed}:{self.index}:{day}")  # noqa: S311 - reproducible
        start = hours[0] * 3_600 + draw.randrange(spread)
        if not start <= second < hours[1] * 3_600:
            return False
        self.jobs_run.add((job, day))
        return True

    def office_open(self) -> bool:
        if self.wall_clock is None:
            return True
        day, second = divmod(self.wall_us() // 1_000_000, 86_400)
        weekday = (day + _EPOCH_WEEKDAY) % 7
        return weekday < 5 and OFFICE_HOURS[0] * 3_600 <= second < OFFICE_HOURS[1] * 3_600

    def persona(self) -> _Persona:
        open_now = self.office_open()
        choices = [p for p in _PERSONAS if open_now or not p.office]
        return self.rng.choices(choices, [p.weight for p in choices])[0]

    def host_of(self, persona: _Persona) -> str:
        hosts = persona.hosts
        if persona.user == "app_user":
            hosts = (*hosts, app_host(self.wall_us() // 86_400_000_000))
        return self.rng.choice(hosts)


# --- Aurora PostgreSQL -------------------------------------------------------------------------


class _PgStatement(NamedTuple):
    """A statement template; ``rows``: a :func:`row_count` kind, "zero" (DML reports 0) or None
    (null)."""

    weight: int  # within its persona's mix
    class_: str
    command: str
    object_type: str | None
    object_name: str | None
    sql: str
    params: tuple[str, ...] = ()
    rows: str | None = None
    failure: tuple[str, str] | None = None  # (SQLSTATE, message)


_T = "TABLE"
_PG_ORDERS_BY_CUSTOMER = _PgStatement(
    10, "READ", "SELECT", _T, "public.orders",
    "SELECT id, total FROM public.orders WHERE customer_id = $1", ("{customer}",), "page",
)  # fmt: skip
_PG_SET_PATH = _PgStatement(2, "MISC", "SET", None, None, "SET search_path TO public")
_PG_NO_TABLE = _PgStatement(
    1, "READ", "SELECT", _T, "public.no_such_table", "SELECT * FROM public.no_such_table",
    failure=("42P01", 'relation "public.no_such_table" does not exist'),
)  # fmt: skip
_PG_BEGIN = _PgStatement(3, "MISC", "BEGIN", None, None, "BEGIN")
_PG_COMMIT = _PgStatement(3, "MISC", "COMMIT", None, None, "COMMIT")
#: What each user runs (besides function calls, which only the application makes).
_PG_MIX: dict[str, tuple[_PgStatement, ...]] = {
    "app_user": (
        _PG_ORDERS_BY_CUSTOMER,
        _PgStatement(
            8, "READ", "SELECT", _T, "public.orders",
            "SELECT id, total, note FROM public.orders WHERE id = $1", ("{order}",), "key",
        ),
        _PgStatement(
            6, "WRITE", "INSERT", _T, "public.orders",
            "INSERT INTO public.orders (customer_id, total, note) VALUES ($1, $2, $3)",
            ("{customer}", "{amount}", "gift\twrap \\ \"fragile\" 💝"), "zero",
        ),
        _PgStatement(
            4, "WRITE", "UPDATE", _T, "public.orders",
            "UPDATE public.orders SET total = total * 1.1 WHERE id = $1", ("{order}",), "zero",
        ),
        _PG_SET_PATH, _PG_BEGIN, _PG_COMMIT,
        _PgStatement(
            1, "WRITE", "INSERT", _T, "public.orders",
            "INSERT INTO public.orders (id, customer_id, total) VALUES (1, 1, 0)",
            failure=("23505", 'duplicate key value violates unique constraint "orders_pkey"'),
        ),
    ),
    "report_user": (
        _PgStatement(
            4, "READ", "SELECT", _T, "public.orders",
            "SELECT o.id,\n\to.total,\n\to.note\nFROM public.orders o\n"
            "WHERE o.note = 'it''s \"quoted\"'\n\tAND o.total > 10;",
            rows="report",
        ),
        _PgStatement(
            3, "READ", "SELECT", _T, "public.customers",
            "SELECT * FROM public.customers WHERE name IN ('Zoë Ångström', '東京', '🚀 rocket')",
            rows="report",
        ),
        _PgStatement(
            1, "READ", "SELECT", _T, "public.orders",
            "SELECT count(*) FROM public.orders o CROSS JOIN public.orders p",
            failure=("57014", "canceling statement due to statement timeout"),
        ),
    ),
    "etl": (
        _PgStatement(
            4, "READ", "SELECT", _T, "public.orders",
            "SELECT id, customer_id, total FROM public.orders "
            "WHERE updated_at > now() - interval '5 minutes'",
            rows="sync",
        ),
        _PgStatement(
            2, "READ", "SELECT", _T, "public.files",
            "SELECT * FROM public.files WHERE path LIKE E'C:\\\\temp\\\\%' OR name LIKE 'a\\_b%'",
            rows="sync",
        ),
        _PgStatement(
            2, "WRITE", "DELETE", _T, "public.sessions",
            "DELETE FROM public.sessions WHERE expires_at < now()", rows="zero",
        ),
    ),
    "people": (
        _PgStatement(
            4, "READ", "SELECT", _T, "public.my_table", "select * from my_table;", rows="adhoc"
        ),
        _PgStatement(
            3, "READ", "SELECT", _T, "public.customers",
            "SELECT * FROM public.customers WHERE name IN ('Zoë Ångström', '東京', '🚀 rocket')",
            rows="adhoc",
        ),
        _PgStatement(
            2, "READ", "SELECT", _T, "public.files",
            "SELECT * FROM public.files WHERE path LIKE E'C:\\\\temp\\\\%' OR name LIKE 'a\\_b%'",
            rows="adhoc",
        ),
        _PG_SET_PATH,
        _PG_NO_TABLE,
        _PgStatement(
            1, "READ", "SELECT", None, None, "SELECT 1 / 0", failure=("22012", "division by zero")
        ),
    ),
    "master": (
        _PgStatement(
            3, "READ", "SELECT", _T, "pg_catalog.pg_stat_activity",
            "SELECT pid, usename, state, query FROM pg_stat_activity WHERE datname = 'shop'",
            rows="tiny",
        ),
        _PG_NO_TABLE,
    ),
    "rdsadmin": (
        _PgStatement(
            3, "READ", "SELECT", None, None, "SELECT pg_catalog.pg_is_in_recovery()", rows="tiny"
        ),
        _PgStatement(1, "MISC", "SET", None, None, "SET statement_timeout TO 60000"),
    ),
}  # fmt: skip
_PG_MIX["alice"] = _PG_MIX["bob"] = _PG_MIX.pop("people")
_PG_WEIGHTS = {user: tuple(s.weight for s in mix) for user, mix in _PG_MIX.items()}
#: A weekday's migration run by the deploy account (in one transaction).
_PG_MIGRATION: tuple[_PgStatement, ...] = (
    _PG_BEGIN,
    _PgStatement(
        1, "DDL", "CREATE TABLE", None, None,
        "create table my_table (id serial primary key, name varchar(32));",
    ),
    _PgStatement(
        1, "DDL", "ALTER TABLE", _T, "public.orders",
        "ALTER TABLE public.orders ADD COLUMN IF NOT EXISTS note text",
    ),
    _PgStatement(
        1, "DDL", "CREATE INDEX", "INDEX", "public.orders_customer_idx",
        "CREATE INDEX IF NOT EXISTS orders_customer_idx ON public.orders (customer_id)",
    ),
    _PgStatement(
        1, "ROLE", "GRANT", _T, "public.orders", "GRANT SELECT ON public.orders TO report_user"
    ),
    _PgStatement(1, "ROLE", "ALTER ROLE", None, None, "ALTER ROLE report_user CONNECTION LIMIT 20"),
    _PG_COMMIT,
)  # fmt: skip
#: The ETL account's nightly job: reload the staging table, export the day's orders.
_PG_NIGHTLY: tuple[_PgStatement, ...] = (
    _PgStatement(
        1, "DDL", "TRUNCATE TABLE", _T, "staging.orders_import",
        "TRUNCATE TABLE staging.orders_import",
    ),
    _PgStatement(
        1, "WRITE", "INSERT", _T, "staging.orders_import",
        "INSERT INTO staging.orders_import SELECT * FROM public.orders "
        "WHERE created_at >= current_date - 1", rows="zero",
    ),
    _PgStatement(
        1, "READ", "COPY", _T, "staging.orders_import",
        "COPY (SELECT * FROM staging.orders_import) TO STDOUT WITH (FORMAT csv)", rows="export",
    ),
)  # fmt: skip

# A function call and the statements it runs (substatementId 2, 3, ...).
_PG_FUNCTION_CALL = "SELECT public.refresh_totals($1)"
_PG_FUNCTION_BODY: tuple[tuple[str, str, str, str], ...] = (
    ("WRITE", "UPDATE", "public.totals", "UPDATE public.totals SET total = total + $1"),
    ("WRITE", "INSERT", "public.audit_log", "INSERT INTO public.audit_log(note) VALUES ('ok')"),
    ("READ", "SELECT", "public.totals", "SELECT sum(total) FROM public.totals"),
)


class _PostgresInstance(_Aurora):
    SERVER_VERSION = "2.3.1"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version = self.pg_version
        self.server_host = f"172.31.{self.rng.randint(0, 255)}.{self.rng.randint(2, 254)}"
        self.sessions: list[_Session] = []
        self.used_pids: set[int] = set()

    def new_pid(self) -> int:
        while True:
            pid = self.rng.randint(1_000, 65_535)
            if pid not in self.used_pids:
                self.used_pids.add(pid)
                return pid

    def next_group(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.due("migration", DEPLOY_HOURS, weekdays=True):
            return self.job(_DEPLOY, _PG_MIGRATION), []
        if self.due("nightly", NIGHTLY_HOURS, weekdays=False):
            return self.job(_BY_USER["etl"], _PG_NIGHTLY), []
        roll = self.rng.random()
        if not self.sessions or (len(self.sessions) < 4 and roll < 0.08):
            return self.connect(), []
        if roll < 0.11:
            return self.auth_failure(), []
        session = self.rng.choice(self.sessions)
        if roll < 0.16 and session.next_statement > 2:
            self.sessions.remove(session)
            return [self.event(session, "MISC", "DISCONNECT", None, None, None)], []
        if roll < 0.22 and session.user == "app_user":
            return self.function_call(session), []
        mix = _PG_MIX[session.user]
        spec = self.rng.choices(mix, _PG_WEIGHTS[session.user])[0]
        return [self.statement(session, spec)], []

    def new_session(self, user: str, persona: _Persona | None = None) -> _Session:
        pid = self.new_pid()
        epoch = self.now_us // 1_000_000
        privileged = user in _PRIVILEGED
        return _Session(
            pid=pid,
            session_id=f"{epoch:x}.{pid:x}",
            user=user,
            database="postgres" if privileged else self.rng.choice(("shop", "analytics")),
            # failed logins (typos, attackers) come from anywhere
            remote_host=self.client_ip() if persona is None else self.host_of(persona),
            remote_port=self.port(),
            client_application=self.rng.choice(
                ("psql", None, "PostgreSQL JDBC Driver") if persona is None else persona.apps
            ),
        )

    def connect(self) -> list[dict[str, Any]]:
        persona = self.persona()
        session = self.new_session(persona.user, persona)
        self.sessions.append(session)
        return [self.event(session, "MISC", "CONNECT", None, None, None)]

    def job(self, persona: _Persona, statements: tuple[_PgStatement, ...]) -> list[dict[str, Any]]:
        """A scheduled job: its own session, its statements, disconnect."""
        session = self.new_session(persona.user, persona)
        events = [self.event(session, "MISC", "CONNECT", None, None, None)]
        events.extend(self.statement(session, spec) for spec in statements)
        events.append(self.event(session, "MISC", "DISCONNECT", None, None, None))
        return events

    def auth_failure(self) -> list[dict[str, Any]]:
        persona = _BY_USER[self.rng.choice(_MISTYPING)]
        session = self.new_session(persona.user, persona)
        failure = ("28P01", f'password authentication failed for user "{session.user}"')
        return [self.event(session, "MISC", "AUTH FAILURE", None, None, None, failure=failure)]

    def statement(self, session: _Session, spec: _PgStatement) -> dict[str, Any]:
        return self.event(
            session,
            spec.class_,
            spec.command,
            spec.object_type,
            spec.object_name,
            self.marked(spec.sql),
            params=[self.fill(p) for p in spec.params],
            row_count=self.row_count(spec.rows),
            failure=spec.failure,
        )

    def function_call(self, session: _Session) -> list[dict[str, Any]]:
        amount = str(self.rng.randint(1, 500))
        statement_id = session.next_statement
        outer = self.event(
            session,
            "FUNCTION",
            "SELECT",
            "FUNCTION",
            "public.refresh_totals",
            self.marked(_PG_FUNCTION_CALL),
            params=[amount],
            row_count=1,
        )
        events = [outer]
        for sub, (class_, command, table, sql) in enumerate(
            _PG_FUNCTION_BODY[: self.rng.randint(1, len(_PG_FUNCTION_BODY))], start=2
        ):
            events.append(
                self.event(
                    session,
                    class_,
                    command,
                    "TABLE",
                    table,
                    self.marked(sql),
                    params=[amount] if "$1" in sql else [],
                    row_count=self.rng.randint(0, 3) if command == "SELECT" else 0,
                    statement_id=statement_id,
                    substatement_id=sub,
                )
            )
        return events

    def fill(self, param: str) -> str:
        if param == "{customer}":
            return str(self.rng.randint(1, 10_000))
        if param == "{order}":
            return str(self.rng.randint(1, 1_000_000))
        if param == "{amount}":
            return f"{self.rng.randint(1, 99_999) / 100:.2f}"
        return param

    def row_count(self, kind: str | None) -> int | None:
        if kind is None:
            return None
        return 0 if kind == "zero" else row_count(self.rng, kind)

    def event(
        self,
        session: _Session,
        class_: str,
        command: str,
        object_type: str | None,
        object_name: str | None,
        command_text: str | None,
        *,
        params: list[str] | None = None,
        row_count: int | None = None,
        failure: tuple[str, str] | None = None,
        statement_id: int | None = None,
        substatement_id: int = 1,
    ) -> dict[str, Any]:
        if statement_id is None:
            statement_id = session.next_statement
            session.next_statement += 1
        start = self.tick(5, 3_000)
        log = self.tick(1, 90_000)
        event: dict[str, Any] = {}
        if self.version != "1.0":
            event["startTime"] = format_time(start)
        event.update(
            {
                "logTime": format_time(log),
                "statementId": statement_id,
                "substatementId": substatement_id,
                "objectType": object_type,
                "command": command,
                "objectName": object_name,
                "databaseName": session.database,
                "dbUserName": session.user,
                "remoteHost": session.remote_host,
                "remotePort": session.remote_port,
                "sessionId": session.session_id,
                "rowCount": None if failure else row_count,
                "commandText": command_text,
                "paramList": params or [],
                "pid": session.pid,
                "clientApplication": session.client_application,
                "exitCode": failure[0] if failure else None,
                "class": class_,
                "serverVersion": self.SERVER_VERSION,
                "serverType": "PostgreSQL",
                "serviceName": "Amazon Aurora PostgreSQL-Compatible edition",
                "serverHost": self.server_host,
                "netProtocol": "TCP",
                "dbProtocol": "Postgres 3.0",
                "type": "record",
            }
        )
        if self.version != "1.0":
            event["errorMessage"] = failure[1] if failure else None
        return event


# --- Aurora MySQL ------------------------------------------------------------------------------


class _MySqlStatement(NamedTuple):
    """A statement template: the MAIN event's text and objects, and its AUX events."""

    weight: int  # within its persona's mix
    sql: str  # "{n}" is replaced by a small number
    objects: str  # MAIN objectName: comma-separated tables, "" when none
    aux: tuple[tuple[str, str], ...] = ()  # AUX (command, table), in logTime order
    rows: str | None = None  # a row_count() kind (rows returned or affected); None: 0
    write: bool = False  # gets a transaction id
    failure: tuple[str, str] | None = None  # (MySQL error code, message)


_MY_TEST1 = _MySqlStatement(
    8, "SELECT * FROM test1 WHERE id < {n}", "test1", (("READ", "test1"),), "page"
)
_MY_CUSTOMERS = _MySqlStatement(
    3, "SELECT * FROM customers WHERE city = '東京' AND note LIKE '%🚀%'",
    "customers", (("READ", "customers"),), "report",
)  # fmt: skip
_MY_SHOW = _MySqlStatement(1, "SHOW VARIABLES LIKE 'aurora\\_%'", "", rows="tiny")
_MY_NOPE = _MySqlStatement(
    1, "SELECT * FROM nope", "nope", failure=("1146", "Table 'test.nope' doesn't exist")
)
_MY_AUTOCOMMIT = _MySqlStatement(2, "SET autocommit=1", "")
_MYSQL_MIX: dict[str, tuple[_MySqlStatement, ...]] = {
    "app_user": (
        _MY_TEST1,
        _MySqlStatement(
            5,
            "INSERT INTO orders (customer_id, total, note) VALUES ({n}, 12.50, 'C:\\\\temp\\\\x')",
            "orders", (("WRITE", "orders"),), "key", True,
        ),
        _MySqlStatement(
            2, "DELETE FROM sessions WHERE expires_at < NOW()",
            "sessions", (("WRITE", "sessions"),), "page", True,
        ),
        _MY_AUTOCOMMIT,
    ),
    "report_user": (
        _MySqlStatement(
            4,
            "SELECT o.id, c.name\nFROM orders o\n\tJOIN customers c ON c.id = o.customer_id\n"
            "WHERE c.name = 'O''Brien' OR c.name = \"Zoë\"",
            "orders,customers", (("READ", "orders"), ("READ", "customers")), "report",
        ),
        _MY_CUSTOMERS,
    ),
    "etl": (
        _MySqlStatement(
            2,
            "INSERT INTO orders_archive SELECT * FROM orders "
            "WHERE created < NOW() - INTERVAL 1 YEAR",
            "orders_archive,orders", (("WRITE", "orders_archive"), ("READ", "orders")), "sync",
            True,
        ),
        _MySqlStatement(
            2,
            "UPDATE orders o JOIN customers c ON c.id = o.customer_id\n"
            "SET o.total = o.total * 0.9 WHERE c.vip = 1 AND o.status = 'open'",
            "orders,customers",
            (("READ", "customers"), ("READ", "orders"), ("WRITE", "orders")), "sync", True,
        ),
        _MY_AUTOCOMMIT,
    ),
    "people": (
        _MySqlStatement(
            4, "SELECT * FROM test1 WHERE id < {n}", "test1", (("READ", "test1"),), "adhoc"
        ),
        _MySqlStatement(
            3, "SELECT * FROM customers WHERE city = '東京' AND note LIKE '%🚀%'",
            "customers", (("READ", "customers"),), "adhoc",
        ),
        _MY_SHOW,
        _MY_NOPE,
        _MySqlStatement(
            1, "SELEC * FROM test1", "",
            failure=(
                "1064",
                "You have an error in your SQL syntax; check the manual that corresponds to your "
                "MySQL server version for the right syntax to use near 'SELEC * FROM test1' at "
                "line 1",
            ),
        ),
    ),
    "master": (_MY_SHOW, _MY_NOPE),
    "rdsadmin": (_MY_SHOW, _MY_AUTOCOMMIT),
}  # fmt: skip
_MYSQL_MIX["alice"] = _MYSQL_MIX["bob"] = _MYSQL_MIX.pop("people")
_MYSQL_WEIGHTS = {user: tuple(s.weight for s in mix) for user, mix in _MYSQL_MIX.items()}
#: A weekday's migration run by the deploy account.
_MYSQL_MIGRATION: tuple[_MySqlStatement, ...] = (
    _MySqlStatement(1, "CREATE TABLE test1 (id INT)", "test1", (("CREATE", "test1"),)),
    _MySqlStatement(1, "DROP TABLE IF EXISTS tmp_import", "tmp_import", (("DROP", "tmp_import"),)),
    _MySqlStatement(
        1, "RENAME TABLE orders_new TO orders_v2",
        "orders_new,orders_v2", (("RENAME", "orders_new"), ("CREATE", "orders_v2")),
    ),
    _MySqlStatement(1, "GRANT SELECT ON shop.orders_v2 TO 'report_user'@'%'", "orders_v2"),
)  # fmt: skip


def mysql_escape(sql: str) -> str:
    """Aurora MySQL precedes quotation marks (and the backslash itself) with a backslash."""
    return sql.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')


class _MySqlInstance(_Aurora):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version = MYSQL_VERSION
        self.pid = self.rng.randint(1_000, 30_000)
        # serverHost names the instance; the seed's example comes from the writer, "master".
        self.server_host = "master" if self.writer else f"replica-{self.index}"
        self.next_session = self.rng.randint(700_000, 800_000)
        self.next_statement = self.rng.randint(60_000_000, 70_000_000)
        self.next_transaction = self.rng.randint(1_000, 100_000)
        self.sessions: list[_Session] = []

    def next_group(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.due("migration", DEPLOY_HOURS, weekdays=True):
            return self.migration()
        roll = self.rng.random()
        if not self.sessions or (len(self.sessions) < 4 and roll < 0.08):
            return self.connect(), []
        if roll < 0.11:
            return self.failed_connect(), []
        session = self.rng.choice(self.sessions)
        if roll < 0.16:
            self.sessions.remove(session)
            return [self.connection_event(session, "DISCONNECT")], []
        mix = _MYSQL_MIX[session.user]
        return self.statement(session, self.rng.choices(mix, _MYSQL_WEIGHTS[session.user])[0])

    def new_session(self, user: str, persona: _Persona | None = None) -> _Session:
        session_id = str(self.next_session)
        self.next_session += self.rng.randint(1, 3)
        if user == "rdsadmin":
            host = "localhost"
        else:  # failed logins (typos, attackers) come from anywhere
            host = self.client_ip() if persona is None else self.host_of(persona)
        return _Session(
            pid=self.pid,
            session_id=session_id,
            user=user,
            database="" if user == "rdsadmin" else self.rng.choice(("test", "shop")),
            remote_host=host,
            remote_port=self.port(),
            client_application=None,
        )

    def connect(self) -> list[dict[str, Any]]:
        persona = self.persona()
        session = self.new_session(persona.user, persona)
        self.sessions.append(session)
        return [self.connection_event(session, "CONNECT")]

    def migration(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The deploy account's migration run: its own session, its statements, disconnect."""
        session = self.new_session(DEPLOY_USER, _DEPLOY)
        events = [self.connection_event(session, "CONNECT")]
        late: list[dict[str, Any]] = []
        for spec in _MYSQL_MIGRATION:
            now, late_now = self.statement(session, spec)
            events.extend(now)
            events.extend(late)  # a statement's late AUX events follow the next statement
            late = late_now
        events.append(self.connection_event(session, "DISCONNECT"))
        return events, late

    def failed_connect(self) -> list[dict[str, Any]]:
        persona = _BY_USER[self.rng.choice(_MISTYPING)]
        session = self.new_session(persona.user, persona)
        message = (
            f"Access denied for user '{session.user}'@'{session.remote_host}' (using password: YES)"
        )
        return [self.connection_event(session, "FAILED_CONNECT", ("1045", message))]

    def connection_event(
        self, session: _Session, command: str, failure: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        start = self.tick(5, 3_000)
        log = self.tick(2, 20)
        return self.event(
            session,
            "MAIN",
            command,
            "",
            "TABLE",
            "",
            statement_id=0,
            row_count=0,
            exit_code=failure[0] if failure else "0",
            error_message=failure[1] if failure else "",
            start=start,
            log=log,
            end=log - 1,
            transaction_id="0",
        )

    def statement(
        self, session: _Session, spec: _MySqlStatement
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        sql = spec.sql.replace("{n}", str(self.rng.randint(1, 100)))
        objects, failure = spec.objects, spec.failure
        statement_id = self.next_statement
        self.next_statement += 1
        transaction_id = "0"
        if spec.write and failure is None:
            transaction_id = str(self.next_transaction)
            self.next_transaction += 1
        start = self.tick(5, 3_000)
        object_type = "TABLE" if objects else None
        aux: list[dict[str, Any]] = []
        if failure is None:
            for command, name in spec.aux:
                at = self.tick(1, 200)
                aux.append(
                    self.event(
                        session,
                        "AUX",
                        command,
                        name,
                        "TABLE",
                        name,
                        statement_id=statement_id,
                        row_count=0,
                        exit_code="",
                        error_message="",
                        start=start,
                        log=at,
                        end=at,
                        transaction_id=transaction_id,
                    )
                )
        rows = 0
        if spec.rows and failure is None:
            rows = row_count(self.rng, spec.rows)
        # MAIN is logged after its AUX events (seed: AUX logTime earlier than MAIN's), and its
        # endTime sits a microsecond either side of logTime, as in the seed's three examples.
        log = self.tick(2, 5_000)
        main = self.event(
            session,
            "MAIN",
            "QUERY",
            mysql_escape(self.marked(sql)),
            object_type,
            objects,
            statement_id=statement_id,
            row_count=rows,
            exit_code=failure[0] if failure else "0",
            error_message=failure[1] if failure else "",
            start=start,
            log=log,
            end=log + self.rng.choice((-1, 0, 1)),
            transaction_id=transaction_id,
        )
        if not aux:
            return [main], []
        placement = self.rng.random()
        if placement < 0.35:
            return [*aux, main], []
        if placement < 0.7:
            return [main, *aux], []
        if placement < 0.85:
            split = self.rng.randint(1, len(aux))
            return [*aux[:split], main, *aux[split:]], []
        return [main], aux

    def event(
        self,
        session: _Session,
        class_: str,
        command: str,
        command_text: str,
        object_type: str | None,
        object_name: str,
        *,
        statement_id: int,
        row_count: int,
        exit_code: str,
        error_message: str,
        start: int,
        log: int,
        end: int,
        transaction_id: str,
    ) -> dict[str, Any]:
        return {
            "logTime": format_time(log),
            "type": "record",
            "clientApplication": session.client_application,
            "pid": session.pid,
            "dbUserName": session.user,
            "databaseName": session.database,
            "remoteHost": session.remote_host,
            "remotePort": session.remote_port,
            "command": command,
            "commandText": command_text,
            "paramList": None,
            "objectType": object_type,
            "objectName": object_name,
            "statementId": statement_id,
            "substatementId": 1 if class_ == "MAIN" else 2,
            "exitCode": exit_code,
            "sessionId": session.session_id,
            "rowCount": row_count,
            "serverHost": self.server_host,
            "serverType": "MySQL",
            "serviceName": "Amazon Aurora MySQL",
            "serverVersion": "MySQL 5.7.12",
            "startTime": format_time(start),
            "endTime": format_time(end),
            "transactionId": transaction_id,
            "dbProtocol": "MySQL",
            "netProtocol": "TCP",
            "errorMessage": error_message,
            "class": class_,
        }
