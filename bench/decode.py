"""Decode throughput, pure and in one process, and where the time of a message goes.

Records are built by the emulator itself (``build_records``: the AWS Encryption SDK, a fresh
signing key per message, exactly what the decode tests use). Stages are timed separately over
the same messages, each the best of ``repeat`` passes (the machine is shared: the minimum is
the least disturbed); whole-batch throughput is ``decode_batch`` (what the process pool runs),
reported as median and range over the passes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from ingest.decode import copyfmt
from ingest.decode.batch import BatchInput, DecoderConfig, KeyedRecord, decode_batch
from ingest.decode.correlate import StatementRangeBuilder
from ingest.decode.envelope import read_envelope
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.fingerprint import fingerprint, fingerprint_hash
from ingest.decode.gunzip import gunzip
from ingest.decode.lean import LeanDecryptor
from ingest.decode.model import DecodedRecord
from ingest.decode.normalize import normalize, parse_payload
from ingest.emulate.encoder import SIGNED_SUITE, UNSIGNED_SUITE
from ingest.emulate.producer import DataKey, EmulateOptions, build_records
from ingest.policy.evaluate import Policy, PolicyOutput, policy_for
from ingest.policy.hook import decode_with_policy

T = TypeVar("T")
U = TypeVar("U")

#: The stream name stored with the measured events (it is one COPY column among others).
BENCH_STREAM = "aws-rds-das-cluster-BENCH"

#: Stage columns, in pipeline order (microseconds per message).
STAGES = (
    "envelope",
    "lean verified",
    "lean unverified",
    "esdk",
    "gunzip",
    "parse",
    "normalize",
    "fingerprint",
    "policy",
    "COPY",
)
#: decode_batch configurations (events/s).
CONFIGS: dict[str, DecoderConfig] = {
    "lean verified": DecoderConfig("lean", verify_signatures=True),
    "lean unverified": DecoderConfig("lean", verify_signatures=False),
    "esdk": DecoderConfig("esdk"),
    # the others run without the rules, to compare: decode_batch alone
    "lean verified + policy pack": DecoderConfig("lean", verify_signatures=True),
}
#: Configurations decoded as the pool does by default: with the built-in rule pack.
WITH_POLICY = frozenset({"lean verified + policy pack"})


@dataclass
class DecodeResult:
    events_per_record: int
    records: int
    events: int
    #: stage -> microseconds per message (best pass)
    stage_us: dict[str, float] = field(default_factory=dict)
    #: config -> events/s of every pass
    events_per_second: dict[str, list[float]] = field(default_factory=dict)


def _best(fn: Callable[[T], U], inputs: Sequence[T], repeat: int) -> tuple[float, list[U]]:
    """Microseconds per input of the fastest of ``repeat`` passes, and the outputs."""
    best = float("inf")
    out: list[U] = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = [fn(x) for x in inputs]
        best = min(best, time.perf_counter() - started)
    return best / len(inputs) * 1e6, out


#: The Encryption SDK suites of the wild: Aurora MySQL's signed one, Aurora PostgreSQL's unsigned.
SUITES: dict[str, int] = {
    "0x0378 (signed, ECDSA P-384)": SIGNED_SUITE,
    "0x0178 (unsigned)": UNSIGNED_SUITE,
}
#: Decryptors timed per suite.
SUITE_DECRYPTORS = ("lean verified", "lean unverified", "esdk")


def measure_suites(events_per_record: int, records: int, repeat: int) -> dict[str, list[float]]:
    """Suite -> microseconds per message (best pass) of each of :data:`SUITE_DECRYPTORS`, for
    the same records sealed in each suite."""
    key = os.urandom(32)
    out: dict[str, list[float]] = {}
    for label, suite in SUITES.items():
        opts = EmulateOptions(
            stream="aws-rds-das-cluster-BENCH",
            events_per_record=events_per_record,
            count=records * events_per_record,
            rotate_every=1_000_000,
            heartbeat_every=0,
            suite=suite,
        )
        messages = [
            read_envelope(r.data).payload()
            for r in build_records(opts, lambda _n: DataKey(key, b"blob"))
        ]
        openers = (LeanDecryptor(), LeanDecryptor(verify_signatures=False), EsdkDecryptor())
        out[label] = [
            _best(lambda m, o=opener: o.decrypt(m, key), messages, repeat)[0]  # type: ignore[misc]
            for opener in openers
        ]
    return out


def measure(events_per_record: int, records: int, repeat: int) -> DecodeResult:
    """The pipeline's stages and decode_batch, on records of the signed suite 0x0378 (the
    dearer one; :func:`measure_suites` compares the two)."""
    key = os.urandom(32)
    opts = EmulateOptions(
        stream="aws-rds-das-cluster-BENCH",
        events_per_record=events_per_record,
        count=records * events_per_record,
        rotate_every=1_000_000,
        heartbeat_every=0,
        suite=SIGNED_SUITE,
    )
    built = build_records(opts, lambda _n: DataKey(key, b"blob"))
    raw = [r.data for r in built]
    result = DecodeResult(events_per_record, len(raw), sum(r.inner.record_events for r in built))
    s = result.stage_us
    s["envelope"], envelopes = _best(read_envelope, raw, repeat)
    messages = [e.payload() for e in envelopes]
    verified, unverified, esdk = (
        LeanDecryptor(),
        LeanDecryptor(verify_signatures=False),
        EsdkDecryptor(),
    )
    s["lean verified"], plaintexts = _best(lambda m: verified.decrypt(m, key), messages, repeat)
    s["lean unverified"], _ = _best(lambda m: unverified.decrypt(m, key), messages, repeat)
    s["esdk"], _ = _best(lambda m: esdk.decrypt(m, key), messages, repeat)
    s["gunzip"], inners = _best(gunzip, plaintexts, repeat)
    s["parse"], docs = _best(parse_payload, inners, repeat)
    pairs = list(zip(docs, (e.version for e in envelopes), strict=True))
    s["normalize"], decoded = _best(lambda p: normalize(*p), pairs, repeat)
    # uncached (the pool caches by text; the emulator's texts are unique anyway)
    s["fingerprint"], _ = _best(
        lambda r: [fingerprint(e.command_text) for e in r.events if e.command_text],
        decoded,
        repeat,
    )
    policy = policy_for(None)
    # the rules alone: the fingerprints (the stage before) are taken outside the timing
    prints = [(r, [_print(e.command_text) for e in r.events]) for r in decoded]
    s["policy"], _ = _best(lambda p: _evaluate(policy, *p), prints, repeat)
    s["COPY"], _ = _best(_copy_encode, decoded, repeat)

    items = [KeyedRecord(i, str(i + 1), data, key) for i, data in enumerate(raw)]
    for name, config in CONFIGS.items():
        batch = BatchInput("shardId-000000000000", items, config, stream_name=BENCH_STREAM)
        run = decode_with_policy if name in WITH_POLICY else decode_batch
        run(batch)  # warm: decryptor construction, imports, the rules
        rates = []
        for _ in range(repeat):
            started = time.perf_counter()
            out = run(batch)
            rates.append(out.event_count / (time.perf_counter() - started))
            assert not out.failures, out.failures[:1]
        result.events_per_second[name] = rates
    return result


def _print(text: str | None) -> tuple[str, int] | None:
    found = fingerprint(text) if text else ""
    return (found, fingerprint_hash(found)) if found else None


def _evaluate(
    policy: Policy, record: DecodedRecord, prints: list[tuple[str, int] | None]
) -> PolicyOutput:
    """The built-in pack on a record's events, given their fingerprints."""
    out = PolicyOutput()
    for event, found in zip(record.events, prints, strict=True):
        policy.evaluate(event, record, found, ("1", event.event_index), out)
    return out


def _copy_encode(record: DecodedRecord) -> Any:
    """COPY encoding as decode_batch does it: the events, and the MySQL statements' range."""
    triple = [(record, "shardId-000000000000", "1")]
    statements = StatementRangeBuilder("shardId-000000000000")
    statements.add(record, "1")
    return copyfmt.encode_events(triple, datetime.now(UTC), BENCH_STREAM), statements.build()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
