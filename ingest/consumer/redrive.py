"""Re-driving dead letters after a fix, on the consumer's own path.

A dead letter's kept record is prepared exactly as the consumer prepares a chunk (ChunkPreparer:
the envelope parsed once, the data key from KMS with transient faults retried, the decode
layer), and its rows are stored as a commit stores them (sink.store_units), together with a
``redrive`` chain link and the removal of the dead letter, in one transaction. A record that
fails again stays, with the new stage and reason and one more attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ingest.alerts.store import PolicyRecorder
from ingest.consumer.budget import WorkBudget
from ingest.consumer.committer import ChunkPreparer, KeySource
from ingest.consumer.failures import describe
from ingest.consumer.pool import DecodePool
from ingest.decode.batch import DecoderConfig
from ingest.kinesis import KinesisRecord
from ingest.kms import encryption_context, resource_id_from_stream
from ingest.policy.rules import RuleSet
from ingest.progress import Progress
from ingest.retry import Backoff, retry
from ingest.warehouse.db import Conn
from ingest.warehouse.deadletters import (
    dead_letter_ids,
    failed_again,
    kept_record,
    store_redriven,
)
from ingest.warehouse.sink import ensure_day_partitions, init_connection

log = logging.getLogger(__name__)

T = TypeVar("T")

#: KMS throttling during a re-drive is retried this many times before the record is left for
#: a later re-drive (it is then marked failed again at stage kms).
KMS_ATTEMPTS = 5


@dataclass
class RedriveReport:
    stored: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    events: int = 0


async def _transient(op: Callable[[], Awaitable[T]], target: str) -> T:
    def on_retry(error: BaseException, _attempt: int, delay: float) -> None:
        log.warning(
            "transient fault; retrying",
            extra={"target": target, "error": describe(error), "delay": round(delay, 3)},
        )

    return await retry(
        op, backoff=Backoff(base=0.2, cap=2.0), on_retry=on_retry, max_attempts=KMS_ATTEMPTS
    )


def _counted(ids: Sequence[int], progress: Progress | None) -> Iterator[int]:
    """``ids``, each counted once the loop body for it is done (``continue`` included)."""
    for letter_id in ids:
        yield letter_id
        if progress is not None:
            progress.update()


async def redrive(
    conn: Conn,
    ids: Sequence[int] | None,
    keys: KeySource,
    *,
    decoder: DecoderConfig,
    resource_id: str | None = None,
    stage: str | None = None,
    rules: RuleSet | None = None,
    progress: Progress | None = None,
) -> RedriveReport:
    """Re-drive the dead letters ``ids`` (all, or those of ``stage``, when None);
    ``progress`` counts them."""
    await init_connection(conn)
    if ids is None:
        ids = await dead_letter_ids(conn, stage)
    # Decoded here, in this process: a re-drive is a few records, not a stream.
    pool = DecodePool(0, WorkBudget(max_batches=1, max_bytes=1 << 30))
    report = RedriveReport()
    if progress is not None:
        progress.set_total(len(ids))
    for letter_id in _counted(ids, progress):
        kept = await kept_record(conn, letter_id)
        if kept is None:
            report.failed[letter_id] = "no such dead letter"
            continue
        context = encryption_context(resource_id or resource_id_from_stream(kept.stream_name))
        preparer = ChunkPreparer(
            shard_id=kept.shard_id,
            stream_name=kept.stream_name,
            keys=keys,
            encryption_context=context,
            pool=pool,
            decoder=decoder,
            transient=_transient,
        )
        record = KinesisRecord(
            kept.sequence_number, kept.raw, kept.partition_key, kept.arrival_time
        )
        chunk = await preparer.prepare([record])
        if chunk.letters:
            (again,) = chunk.letters
            await failed_again(conn, letter_id, again.stage, again.error)
            report.failed[letter_id] = again.error
            continue
        (output,) = chunk.outputs
        await ensure_day_partitions(conn, output.days)
        await store_redriven(
            conn,
            kept,
            chunk.units,
            output.heartbeats,
            policy=PolicyRecorder(rules) if rules is not None else None,
            policy_outputs=[output.policy] if output.policy is not None else [],
        )
        report.stored.append(letter_id)
        report.events += output.event_count
    return report
