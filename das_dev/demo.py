"""`make demo`: das-ingest end to end on a local stack, no AWS account and no Docker.

1. start kinesalite (Kinesis), moto (KMS) and a throwaway PostgreSQL on loopback ports;
2. create the warehouse (`das-ingest migrate`) and a login for the append-only ingest role;
3. emulate the four engines' activity (Aurora PostgreSQL, Aurora MySQL, RDS for Oracle, RDS for
   SQL Server; one instance each, in one stream for brevity: a real stream carries one engine)
   into an activity stream, encrypted the way RDS does it (KMS data keys, the Encryption SDK's
   suites, gzip);
4. decrypt a few raw records with `das-ingest decrypt`;
5. ingest the stream with a fleet of two workers (`das-ingest run`, the same command twice);
6. show what the warehouse now knows, with the queries an auditor would run.

Everything it starts is stopped when it ends, also on failure or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STREAM = "aws-rds-das-cluster-DEMO0EXAMPLE0RESOURCE0ID"
EVENTS = int(os.environ.get("DAS_DEMO_EVENTS", "4000"))


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def das_ingest(*args: str, env: dict[str, str], capture: bool = False) -> str:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"$ das-ingest {shown}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "ingest", *args],
        env=env,
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout or ""


async def fetch(dsn: str, query: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def table(rows: list[Any], limit: int = 12) -> None:
    if not rows:
        print("  (none)")
        return
    headers = list(rows[0].keys())
    cells = [[_cell(v) for v in row.values()] for row in rows[:limit]]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if len(rows) > limit:
        print(f"  ... {len(rows) - limit} more")


def _cell(value: Any) -> str:
    text = "-" if value is None else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


QUERIES: list[tuple[str, str]] = [
    (
        "events by engine and class (das.events)",
        """SELECT engine, class, count(*) AS events, count(*) FILTER (WHERE failed) AS failed
           FROM das.events GROUP BY 1, 2 ORDER BY 1, 3 DESC""",
    ),
    (
        "sessions with the most failed statements (das.sessions)",
        """SELECT engine, db_user_name, remote_host, statements, failed_statements, duration
           FROM das.sessions ORDER BY failed_statements DESC, statements DESC LIMIT 8""",
    ),
    (
        "failed logins (das.failed_logins)",
        """SELECT engine, db_user_name, command, exit_code, count(*) AS attempts
           FROM das.failed_logins GROUP BY 1, 2, 3, 4 ORDER BY attempts DESC LIMIT 8""",
    ),
    (
        "latest failed statements (das.failed_statements)",
        """SELECT log_time, db_user_name, exit_code, error_message, command_text
           FROM das.failed_statements ORDER BY log_time DESC LIMIT 5""",
    ),
    (
        "schema changes (das.ddl_changes)",
        """SELECT DISTINCT ON (engine) engine, log_time, db_user_name, command, object_name,
                  command_text
           FROM das.ddl_changes ORDER BY engine, log_time DESC""",
    ),
    (
        "RDS for SQL Server statements split over several events, reassembled",
        """SELECT statement_id, parts, command_text FROM das.sqlserver_statements
           WHERE parts > 1 ORDER BY log_time DESC LIMIT 3""",
    ),
    (
        "Aurora MySQL statements correlated MAIN + AUX (das.statements)",
        """SELECT count(*) AS statements,
                  count(*) FILTER (WHERE has_main AND aux <> '[]') AS with_aux_events,
                  count(*) FILTER (WHERE NOT has_main) AS aux_without_main
           FROM das.statements""",
    ),
    (
        "dead letters",
        "SELECT stage, count(*) FROM das.dead_letters GROUP BY stage",
    ),
]


def main() -> int:
    from das_dev.devstack import LocalStack, install_signal_handlers

    install_signal_handlers()
    started = time.monotonic()
    say("starting a local stack: kinesalite (Kinesis), moto (KMS), PostgreSQL")
    with LocalStack() as stack:
        print(stack.summary())
        os.environ.update(stack.env())  # for this process's own clients, and the children
        env = dict(os.environ)
        owner_dsn = stack.dsn
        ingest_dsn = owner_dsn.replace("postgresql://postgres@", "postgresql://ingester@")

        say("creating the audit warehouse and its least-privilege roles")
        das_ingest("migrate", "--dsn", owner_dsn, env=env)
        asyncio.run(fetch(owner_dsn, "CREATE ROLE ingester LOGIN IN ROLE das_ingest"))
        print("created login 'ingester' in role das_ingest (INSERT only on the audit tables)")

        say(
            f"emulating {EVENTS} events of Aurora PostgreSQL, Aurora MySQL, RDS for Oracle "
            "and RDS for SQL Server activity"
        )
        das_ingest(
            "emulate",
            "--stream",
            STREAM,
            "--create-stream",
            "--shards",
            "2",
            "--engine",
            "all",
            "--instances",
            "4",
            "--events-per-record",
            "10",
            "--count",
            str(EVENTS),
            "--rotate-every",
            "50",
            "--no-progress",
            env=env,
        )

        say("decrypting three raw records as they sit in the stream (das-ingest decrypt)")
        raw = _first_records(env, 3)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "records.jsonl"
            path.write_bytes(b"\n".join(raw) + b"\n")
            out = das_ingest("decrypt", "--stream", STREAM, str(path), env=env, capture=True)
        lines = out.splitlines()
        for line in lines[:3]:
            print("  " + (line if len(line) <= 160 else line[:157] + "..."))
        print(f"  ... {len(lines)} events from 3 records")

        say("ingesting with a fleet of two workers (the same command, twice)")
        command = [
            sys.executable,
            "-m",
            "ingest",
            "run",
            "--stream",
            STREAM,
            "--dsn",
            ingest_dsn,
            "--stop-when-idle",
            "2",
            "--processes",
            "1",
            "--lease-seconds",
            "3",
            "--log-level",
            "warning",
        ]
        print("$ das-ingest " + " ".join(shlex.quote(a) for a in command[3:]) + "   # x2")
        t0 = time.monotonic()
        workers = [subprocess.Popen(command, env=env) for _ in range(2)]
        codes = [w.wait(timeout=600) for w in workers]
        if codes != [0, 0]:
            print(f"a worker failed: exit codes {codes}", file=sys.stderr)
            return 1
        print(f"both workers caught up and stopped in {time.monotonic() - t0:.1f} s")

        say("what the warehouse now knows")
        total = asyncio.run(fetch(owner_dsn, "SELECT count(*) AS n FROM das.activity_events"))
        print(f"events stored: {total[0]['n']} (emulated: {EVENTS}; each exactly once)")
        for title, query in QUERIES:
            print(f"\n-- {title}")
            table(asyncio.run(fetch(owner_dsn, query)))

        say("ingestion status (das-ingest status)")
        das_ingest("status", "--dsn", owner_dsn, "--stream", STREAM, env=env)
        if total[0]["n"] != EVENTS:
            print(f"expected {EVENTS} events, found {total[0]['n']}", file=sys.stderr)
            return 1
    say(f"done in {time.monotonic() - started:.0f} s; the local stack is stopped")
    print("next: `make test` runs the test suite; README.md explains the warehouse queries")
    return 0


def _first_records(env: dict[str, str], count: int) -> list[bytes]:
    import boto3

    kinesis = boto3.client("kinesis", endpoint_url=env["AWS_ENDPOINT_URL_KINESIS"])
    shards = kinesis.list_shards(StreamName=STREAM)["Shards"]
    iterator = kinesis.get_shard_iterator(
        StreamName=STREAM, ShardId=shards[0]["ShardId"], ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    records = kinesis.get_records(ShardIterator=iterator, Limit=count)["Records"]
    return [bytes(r["Data"]) for r in records]


if __name__ == "__main__":
    sys.exit(main())
