"""Where alerts go: a generic webhook (JSON, or Slack's payload), Prometheus Alertmanager (v2
API), Amazon SNS and syslog (RFC 5424 over TCP, TLS optional, CEF payload).

A notifier sends one alert and raises :class:`DeliveryError` when it could not; ``retriable``
says whether trying again can help (a timeout, a 5xx, a throttle) or not (a 4xx: the request
itself is wrong). Every message carries the alert's idempotency key, stable across retries and
workers, so a receiver can drop the duplicates at-least-once delivery makes.

Notifiers are configured as ``KIND=TARGET`` (``--notify``, repeatable, or ``DAS_NOTIFY``, space
separated): ``webhook=https://...``, ``slack=https://hooks.slack.com/...``,
``alertmanager=http://alertmanager:9093``, ``sns=arn:aws:sns:...``,
``syslog=tcp://siem:514`` or ``syslog=tls://siem:6514``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from ingest import __version__
from ingest.errors import ConfigError, IngestError

KINDS = ("webhook", "slack", "alertmanager", "sns", "syslog")
TIMEOUT = 10.0


class DeliveryError(IngestError):
    """A notifier could not deliver; ``can_retry``: whether another attempt can help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.can_retry = retriable


@dataclass(frozen=True)
class AlertMessage:
    """What a notifier sends: the alert as stored, plus its idempotency key."""

    id: int
    rule: str
    severity: str
    title: str
    group_key: str
    window_start: datetime
    first_event_time: datetime | None
    last_event_time: datetime | None
    event_count: int
    created_at: datetime
    stream_name: str | None
    cluster_id: str | None
    instance_id: str | None
    events: list[dict[str, Any]]

    @property
    def idempotency_key(self) -> str:
        """The same for every delivery of this alert: its identity's digest."""
        identity = f"{self.rule}\n{self.group_key}\n{self.window_start.isoformat()}"
        return "das-" + hashlib.sha256(identity.encode()).hexdigest()[:32]

    def as_json(self) -> dict[str, Any]:
        def t(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": self.id,
            "rule": self.rule,
            "severity": self.severity,
            "title": self.title,
            "group_key": self.group_key,
            "window_start": t(self.window_start),
            "first_event_time": t(self.first_event_time),
            "last_event_time": t(self.last_event_time),
            "event_count": self.event_count,
            "created_at": t(self.created_at),
            "stream": self.stream_name,
            "cluster": self.cluster_id,
            "instance": self.instance_id,
            "events": self.events,
            "idempotency_key": self.idempotency_key,
        }


class Notifier(Protocol):
    #: stable name, stored in das.alert_outbox: kind and a digest of the target
    name: str

    async def send(self, alert: AlertMessage) -> None: ...

    async def close(self) -> None: ...


def _name(kind: str, target: str) -> str:
    return f"{kind}:{hashlib.sha256(target.encode()).hexdigest()[:8]}"


class _Http:
    def __init__(self, kind: str, url: str) -> None:
        self.name = _name(kind, url)
        self.url = url
        self._session: Any = None

    async def _post(self, url: str, body: Any, key: str) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        try:
            async with self._session.post(
                url,
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
            ) as response:
                if response.status < 300:
                    return
                retriable = response.status >= 500 or response.status in (408, 429)
                raise DeliveryError(f"HTTP {response.status}", retriable=retriable)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"{type(exc).__name__}", retriable=True) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class WebhookNotifier(_Http):
    """POST the alert as JSON (``slack=True``: Slack's incoming-webhook payload)."""

    def __init__(self, url: str, *, slack: bool = False) -> None:
        super().__init__("slack" if slack else "webhook", url)
        self.slack = slack

    async def send(self, alert: AlertMessage) -> None:
        body: Any = alert.as_json()
        if self.slack:
            body = {
                "text": f"[{alert.severity.upper()}] {alert.title}",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": (
                        f"*[{alert.severity.upper()}] {alert.title}*\n"
                        f"rule `{alert.rule}`, group `{alert.group_key}`, "
                        f"{alert.event_count} events, instance {alert.instance_id or '-'}, "
                        f"alert {alert.id}"
                    )}}
                ],
            }  # fmt: skip
        await self._post(self.url, body, alert.idempotency_key)


class AlertmanagerNotifier(_Http):
    """POST /api/v2/alerts: labels identify the alert (Alertmanager deduplicates by them)."""

    def __init__(self, url: str) -> None:
        super().__init__("alertmanager", url)

    async def send(self, alert: AlertMessage) -> None:
        body = [
            {
                "labels": {
                    "alertname": alert.rule,
                    "severity": alert.severity,
                    "group_key": alert.group_key,
                    "cluster": alert.cluster_id or "",
                    "instance": alert.instance_id or "",
                    "das_idempotency_key": alert.idempotency_key,
                },
                "annotations": {
                    "summary": alert.title,
                    "das_alert_id": str(alert.id),
                    "event_count": str(alert.event_count),
                },
                "startsAt": (alert.first_event_time or alert.created_at).isoformat(),
            }
        ]
        await self._post(self.url.rstrip("/") + "/api/v2/alerts", body, alert.idempotency_key)


class SnsNotifier:
    """SNS Publish (aiobotocore); a FIFO topic also deduplicates by the idempotency key."""

    def __init__(self, topic_arn: str) -> None:
        self.name = _name("sns", topic_arn)
        self.topic_arn = topic_arn
        self._client: Any = None
        self._context: Any = None

    async def send(self, alert: AlertMessage) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from ingest.aws import aws_client, error_code

        if self._client is None:
            self._context = aws_client("sns")
            self._client = await self._context.__aenter__()
        params: dict[str, Any] = {
            "TopicArn": self.topic_arn,
            "Subject": f"[{alert.severity.upper()}] {alert.rule}"[:100],
            "Message": orjson.dumps(alert.as_json()).decode(),
            "MessageAttributes": {
                "idempotency_key": {"DataType": "String", "StringValue": alert.idempotency_key},
                "severity": {"DataType": "String", "StringValue": alert.severity},
            },
        }
        if self.topic_arn.endswith(".fifo"):
            params["MessageDeduplicationId"] = alert.idempotency_key
            params["MessageGroupId"] = alert.rule
        try:
            await self._client.publish(**params)
        except ClientError as exc:
            code = error_code(exc)
            retriable = code in ("Throttling", "ThrottlingException", "InternalError",
                                 "ServiceUnavailable", "KMSThrottling")  # fmt: skip
            raise DeliveryError(f"SNS {code}", retriable=retriable) from None
        except BotoCoreError as exc:
            raise DeliveryError(f"SNS {type(exc).__name__}", retriable=True) from None

    async def close(self) -> None:
        if self._context is not None:
            await self._context.__aexit__(None, None, None)
            self._client = self._context = None


#: CEF severities (0-10) for ours.
CEF_SEVERITY = {"low": 3, "medium": 5, "high": 8, "critical": 10}
#: RFC 5424 severities: critical 2, error 3, warning 4, notice 5; facility security/auth (10).
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5}
FACILITY = 10


def _cef_escape(text: str, header: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\r", " ").replace("\n", " ")
    return text.replace("|", "\\|") if header else text.replace("=", "\\=")


def cef(alert: AlertMessage) -> str:
    """The alert as an ArcSight Common Event Format line."""
    ext = {
        "externalId": str(alert.id),
        "cs1Label": "group_key", "cs1": alert.group_key,
        "cs2Label": "idempotency_key", "cs2": alert.idempotency_key,
        "cs3Label": "cluster", "cs3": alert.cluster_id or "",
        "dvchost": alert.instance_id or "",
        "cnt": str(alert.event_count),
        "start": str(int((alert.first_event_time or alert.created_at).timestamp() * 1000)),
        "end": str(int((alert.last_event_time or alert.created_at).timestamp() * 1000)),
        "rt": str(int(alert.created_at.timestamp() * 1000)),
    }  # fmt: skip
    header = "|".join(
        _cef_escape(part, True)
        for part in ("das-ingest", "das-ingest", __version__, alert.rule, alert.title)
    )
    extension = " ".join(f"{k}={_cef_escape(v, False)}" for k, v in ext.items())
    return f"CEF:0|{header}|{CEF_SEVERITY[alert.severity]}|{extension}"


def syslog_frame(alert: AlertMessage, hostname: str = "das-ingest") -> bytes:
    """One RFC 5424 message with RFC 6587 octet-counting framing (safe over TCP and TLS)."""
    pri = FACILITY * 8 + SYSLOG_SEVERITY[alert.severity]
    stamp = alert.created_at.isoformat()
    sd = f'[das@32473 id="{alert.id}" key="{alert.idempotency_key}" rule="{alert.rule}"]'
    message = f"<{pri}>1 {stamp} {hostname} das-ingest - alert {sd} {cef(alert)}".encode()
    return str(len(message)).encode() + b" " + message


class SyslogNotifier:
    """RFC 5424 over TCP (``tcp://host:port``) or TLS (``tls://host:port``, system CAs or
    ``cafile``), one connection kept open and reopened after an error."""

    def __init__(self, target: str, *, cafile: str | None = None) -> None:
        parts = urlsplit(target)
        if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
            raise ConfigError(f"syslog target must be tcp://host:port or tls://host:port: {target}")
        self.name = _name("syslog", target)
        self.host, self.port = parts.hostname, parts.port
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "tls":
            self.tls = ssl.create_default_context(cafile=cafile)
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, alert: AlertMessage) -> None:
        try:
            writer = self._writer or await self._connect()
            writer.write(syslog_frame(alert))
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            await self.close()
            raise DeliveryError(f"syslog {type(exc).__name__}", retriable=True) from None

    async def _connect(self) -> asyncio.StreamWriter:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.tls), TIMEOUT
        )
        self._writer = writer
        return writer

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


def parse_notifier(spec: str, *, syslog_cafile: str | None = None) -> Notifier:
    """A notifier from ``KIND=TARGET``; ConfigError names what is wrong."""
    kind, sep, target = spec.partition("=")
    if not sep or not target:
        raise ConfigError(f"notifier {spec!r} is not KIND=TARGET (kinds: {', '.join(KINDS)})")
    if kind in ("webhook", "slack", "alertmanager"):
        if urlsplit(target).scheme not in ("http", "https"):
            raise ConfigError(f"{kind} target must be an http(s) URL: {target}")
        if kind == "alertmanager":
            return AlertmanagerNotifier(target)
        return WebhookNotifier(target, slack=kind == "slack")
    if kind == "sns":
        if not target.startswith("arn:"):
            raise ConfigError(f"sns target must be a topic ARN: {target}")
        return SnsNotifier(target)
    if kind == "syslog":
        return SyslogNotifier(target, cafile=syslog_cafile)
    raise ConfigError(f"unknown notifier kind {kind!r} ({', '.join(KINDS)})")
