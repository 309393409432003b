"""Structured JSON logs on stderr.

What we log are events about the pipeline (shards, leases, counts, error classes and stages);
never SQL text, bind parameters or key material. Only the ``extra`` fields below are emitted, so
an accidental ``extra={"sql": ...}`` cannot leak.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

ALLOWED_EXTRA = frozenset(
    {
        "shard",
        "shards",
        "stream",
        "worker",
        "checkpoint",
        "target",
        "error",
        "delay",
        "reason",
        "count",
        "from",
        "events",
        "records",
        "dead_letters",
        "stage",
        "port",
        "processes",
        "lag_ms",
        "held",
        "elapsed",
        "resource_id",
        "kms_calls",
        "kms_hits",
        "lease_changes",
        "counter",
        "dependency",
        "reasons",
        "routine",
        "sequence",
        "likely_cause",
        "key_digest",
        "encryption_context",
        "remembered_seconds",
        "rule",
        "severity",
        "alert_id",
        "notifier",
        "attempts",
        "frozen_objects",
    }
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ALLOWED_EXTRA:
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            # The exception class only: tracebacks can carry values from frames.
            entry["exception"] = record.exc_info[0].__name__
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """One line for people at a terminal: time, level, message, then the same allow-listed
    fields as the JSON lines, as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.gmtime(record.created))
        fields = " ".join(
            f"{key}={record.__dict__[key]}"
            for key in sorted(ALLOWED_EXTRA)
            if key in record.__dict__
        )
        line = f"{stamp} {record.levelname.lower():<7} {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            fields = f"{fields} exception={record.exc_info[0].__name__}".strip()
        return f"{line}  {fields}" if fields else line


#: --log-format choices; "auto" is text when stderr is a terminal, else JSON.
LOG_FORMATS = ("auto", "text", "json")


def setup_logging(level: str = "info", fmt: str = "json", *, stream: object = None) -> None:
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(out, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(out)  # type: ignore[arg-type]
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (botocore credential lookups, aiohttp) stays out unless asked for.
    # aws_encryption_sdk logs encryption contexts at INFO: keep key-related chatter out.
    for noisy in ("botocore", "aiobotocore", "aiohttp", "asyncio", "urllib3", "aws_encryption_sdk"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
