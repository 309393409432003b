"""Alert delivery against real local receivers: an HTTP server (webhook, Slack payload,
Alertmanager's v2 API), a TCP and a TLS syslog listener, and SNS on moto_server (read back
through an SQS subscription)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import re
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from das_dev.devstack import LocalStack
from ingest.alerts.notifiers import (
    AlertmanagerNotifier,
    SnsNotifier,
    SyslogNotifier,
    WebhookNotifier,
    parse_notifier,
)
from ingest.alerts.outbox import Deliverer, DeliveryMetrics, DeliverySettings
from ingest.alerts.store import record_policy
from ingest.decode.model import ActivityEvent, DecodedRecord
from ingest.errors import ConfigError
from ingest.policy.evaluate import Policy, PolicyOutput
from ingest.policy.rules import load_rules
from ingest.warehouse.migrate import migrate

FAST = DeliverySettings(
    base_delay=timedelta(milliseconds=10), max_delay=timedelta(milliseconds=50), max_attempts=4
)
NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A warehouse holding two alerts (a brute force: by user and by remote host)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        policy = Policy(load_rules(None))
        out = PolicyOutput()
        for i in range(5):
            event = ActivityEvent(
                event_index=0, command="AUTH FAILURE", exit_code="28P01", db_user_name="mallory",
                remote_host="10.6.6.6", log_time=NOON + timedelta(seconds=i),
            )  # fmt: skip
            record = DecodedRecord("1.1", "cluster-A", "db-1", [event], [])
            policy.evaluate(event, record, None, (str(i), 0), out)
        async with conn.transaction():
            assert len(await record_policy(conn, out, policy.rules, "s", "shard")) == 2
    finally:
        await conn.close()
    created = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    yield created
    await created.close()


class Receiver:
    """An HTTP server on 127.0.0.1 that answers each request with the next status of
    ``statuses`` (then 200) and keeps what it got."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.path, dict(request.headers), body))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def drain(deliverer: Deliverer, rounds: int = 20) -> None:
    for _ in range(rounds):
        await deliverer.run_once()
        await asyncio.sleep(0.06)


async def outbox(pool: asyncpg.Pool) -> list[tuple[int, str, str, int]]:
    rows = await pool.fetch(
        "SELECT alert_id, notifier, state, attempts FROM das.alert_outbox ORDER BY alert_id"
    )
    return [(r["alert_id"], r["notifier"], r["state"], r["attempts"]) for r in rows]


async def test_webhook_is_retried_through_an_outage_with_one_idempotency_key(
    pool: asyncpg.Pool,
) -> None:
    async with Receiver([503, 503, 502]) as receiver:
        notifier = WebhookNotifier(receiver.url + "/hook")
        metrics = DeliveryMetrics()
        deliverer = Deliverer(pool, [notifier], FAST, metrics)
        await drain(deliverer)
        await notifier.close()
    assert [state for _, _, state, _ in await outbox(pool)] == ["delivered", "delivered"]
    assert sum(attempts for *_, attempts in await outbox(pool)) == 5  # 3 failures + 2
    keys: dict[int, set[str]] = {}
    for _, headers, body in receiver.requests:
        assert headers["Idempotency-Key"] == body["idempotency_key"]
        keys.setdefault(body["id"], set()).add(body["idempotency_key"])
    assert sorted(keys) == [1, 2]
    assert all(len(k) == 1 for k in keys.values())  # retries carry the same key
    body = receiver.requests[-1][2]
    assert {body["rule"], body["severity"]} == {"brute_force_login", "high"}
    assert body["event_count"] == 5
    assert metrics.delivered.labels(notifier.name)._value.get() == 2
    assert metrics.failures.labels(notifier.name, "false")._value.get() == 3


async def test_terminal_failures(pool: asyncpg.Pool) -> None:
    async with Receiver([400, 400] + [503] * 10) as receiver:
        rejecting = WebhookNotifier(receiver.url + "/reject")
        deliverer = Deliverer(pool, [rejecting], FAST)
        await drain(deliverer, 3)
        # a 4xx: the request is wrong, retrying cannot help: failed after one attempt
        assert [(s, a) for _, _, s, a in await outbox(pool)] == [("failed", 1), ("failed", 1)]
        down = WebhookNotifier(receiver.url + "/down")
        deliverer = Deliverer(pool, [down], FAST)
        await drain(deliverer)
        rows = [r for r in await outbox(pool) if r[1] == down.name]
        # 503s: retried with backoff, then failed after max_attempts (4)
        assert [(s, a) for _, _, s, a in rows] == [("failed", 4), ("failed", 4)]
        await rejecting.close()
        await down.close()
    last = await pool.fetchval(
        "SELECT last_error FROM das.alert_outbox WHERE notifier = $1", down.name
    )
    assert last == "HTTP 503"


async def test_an_unreachable_notifier_fails_softly(pool: asyncpg.Pool) -> None:
    notifier = WebhookNotifier("http://127.0.0.1:9/nothing-listens-here")
    deliverer = Deliverer(pool, [notifier], FAST)
    stop = asyncio.Event()
    task = asyncio.create_task(deliverer.run(stop))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 10)  # run() neither raised nor hung
    assert {s for _, _, s, _ in await outbox(pool)} <= {"pending", "failed"}


async def test_slack_and_alertmanager_payloads(pool: asyncpg.Pool) -> None:
    async with Receiver() as receiver:
        slack = parse_notifier(f"slack={receiver.url}/slack")
        manager = parse_notifier(f"alertmanager={receiver.url}")
        assert isinstance(manager, AlertmanagerNotifier)
        await drain(Deliverer(pool, [slack, manager], FAST), 2)
        await slack.close()
        await manager.close()
    by_path: dict[str, list[Any]] = {}
    for path, _, body in receiver.requests:
        by_path.setdefault(path, []).append(body)
    assert len(by_path["/slack"]) == 2
    assert by_path["/slack"][0]["text"].startswith("[HIGH] 5 failed logins for ")
    posted = [alert for body in by_path["/api/v2/alerts"] for alert in body]
    assert sorted(a["labels"]["group_key"] for a in posted) == [
        "remote_host=10.6.6.6",
        "user=mallory",
    ]
    first = posted[0]
    assert first["labels"]["alertname"] == "brute_force_login"
    assert first["labels"]["severity"] == "high"
    assert first["startsAt"].startswith("2026-11-25T12:00:00")
    assert first["annotations"]["summary"].startswith("5 failed logins")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def _read_frames(reader: asyncio.StreamReader, frames: list[str]) -> None:
    """RFC 6587 octet counting: '<length> <message>'."""
    while True:
        length = await reader.readuntil(b" ")
        frames.append((await reader.readexactly(int(length))).decode())


@pytest.mark.parametrize("tls", [False, True])
async def test_syslog_rfc5424_with_cef(pool: asyncpg.Pool, tmp_path: Path, tls: bool) -> None:
    frames: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_frames(reader, frames)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    context = None
    cafile = None
    if tls:
        cert, key = _self_signed(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        cafile = str(cert)
    server = await asyncio.start_server(
        lambda r, w: tasks.append(asyncio.create_task(client(r, w))) or None,  # type: ignore[func-returns-value]
        "127.0.0.1", 0, ssl=context,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    notifier = SyslogNotifier(f"{'tls' if tls else 'tcp'}://127.0.0.1:{port}", cafile=cafile)
    await drain(Deliverer(pool, [notifier], FAST), 2)
    await notifier.close()
    for _ in range(50):
        if len(frames) >= 2:
            break
        await asyncio.sleep(0.05)
    server.close()
    for task in tasks:
        task.cancel()
    assert len(frames) == 2
    frame = frames[0]
    # <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG; security/auth facility (10), error (3)
    assert frame.startswith("<83>1 ")
    assert ' das-ingest das-ingest - alert [das@32473 id="1" key="das-' in frame
    cef = frame[frame.index("CEF:") :]
    fields = cef.split("|")
    assert fields[:5] == ["CEF:0", "das-ingest", "das-ingest", fields[3], "brute_force_login"]
    assert fields[6] == "8"  # high
    assert "cnt=5" in fields[7]
    assert "cs1Label=group_key cs1=" in fields[7]


async def test_sns_on_moto(
    pool: asyncpg.Pool, stack: LocalStack, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert stack.kms is not None
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNS", stack.kms.endpoint)
    kwargs = {"region_name": aws_env["AWS_REGION"], "endpoint_url": stack.kms.endpoint}
    sns = boto3.client("sns", **kwargs)
    sqs = boto3.client("sqs", **kwargs)
    topic = sns.create_topic(Name="das-alerts")["TopicArn"]
    queue = sqs.create_queue(QueueName="das-alerts-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    notifier = parse_notifier(f"sns={topic}")
    assert isinstance(notifier, SnsNotifier)
    await drain(Deliverer(pool, [notifier], FAST), 2)
    await notifier.close()
    assert [s for _, _, s, _ in await outbox(pool)] == ["delivered", "delivered"]
    got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    envelopes = [json.loads(m["Body"]) for m in got["Messages"]]
    alerts = [json.loads(e["Message"]) for e in envelopes]
    assert sorted(a["group_key"] for a in alerts) == ["remote_host=10.6.6.6", "user=mallory"]
    assert envelopes[0]["Subject"] == "[HIGH] brute_force_login"
    assert envelopes[0]["MessageAttributes"]["idempotency_key"]["Value"].startswith("das-")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("webhook", "is not KIND=TARGET"),
        ("pager=https://x", "unknown notifier kind 'pager'"),
        ("webhook=ftp://x", "must be an http(s) URL"),
        ("sns=my-topic", "must be a topic ARN"),
        ("syslog=udp://siem:514", "tcp://host:port or tls://host:port"),
    ],
)
def test_notifier_specs_are_checked(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_notifier(spec)


async def test_alerts_cli_list_show_ack(pool: asyncpg.Pool, pg_dsn: str) -> None:
    from tests.cli_helpers import das_ingest

    env = {"DAS_DSN": pg_dsn}
    # the triggering events of alert 1, as the sink would have stored them
    await pool.execute(
        "INSERT INTO das.activity_events (log_time, record_version, stream_name, shard_id, "
        "sequence_number, event_index, command, db_user_name, ingested_at) "
        "SELECT $1::timestamptz + i * interval '1 second', '1.1', 's', 'shard', i, 0, "
        "'AUTH FAILURE', 'mallory', now() FROM generate_series(0, 4) AS i",
        NOON,
    )
    listed = await das_ingest("alerts", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == [2, 1]
    from ingest.commands.alerts import LIST_KEYS

    assert list(rows[0]) == list(LIST_KEYS)
    assert rows[0]["rule"] == "brute_force_login"
    assert rows[0]["acked_at"] is None
    none = await das_ingest("alerts", "list", "--json", "--rule", "mass_read", env=env)
    assert none.stdout == ""
    future = await das_ingest("alerts", "list", "--since", "2999-01-01", env=env)
    assert future.stdout == ""
    recent = await das_ingest("alerts", "list", "--since", "1h", "--json", env=env)
    assert len(recent.stdout.splitlines()) == 2
    bad = await das_ingest("alerts", "list", "--since", "yesterday", env=env)
    assert bad.returncode == 2
    assert "neither an ISO time nor an age" in bad.stderr
    shown = await das_ingest("alerts", "show", "1", env=env)
    assert shown.returncode == 0, shown.stderr
    alert = json.loads(shown.stdout)
    assert alert["events_referenced"] == 5
    assert [e["db_user_name"] for e in alert["events"]] == ["mallory"] * 5
    acked = await das_ingest("alerts", "ack", "1", "--note", "known pentest", env=env)
    assert acked.stdout.strip() == "alert 1 acknowledged"
    again = await das_ingest("alerts", "ack", "1", env=env)
    assert again.stdout.strip() == "alert 1 was acknowledged already"
    missing = await das_ingest("alerts", "ack", "99", env=env)
    assert missing.returncode == 1
    assert "no alert 99" in missing.stderr
    listed = await das_ingest("alerts", "list", "--json", env=env)
    assert json.loads(listed.stdout.splitlines()[1])["acked_at"] is not None
    # the alert itself never changed: the chain still verifies
    assert await pool.fetchval("SELECT count(*) FROM das.alert_acks") == 1
