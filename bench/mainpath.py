"""The worker's main process per record, in process and without servers (issue #16).

``python -m bench.mainpath [--records N] [--repeat R]``

What ``das-ingest run``'s event loop does with each record besides waiting: the GetRecords
answer parsed by the records client's parser, the page's KinesisRecords, and
``ShardCommitter.commit_page`` -- envelopes read for their key blobs, data keys from the real
``DataKeyCache`` (warm after the first pass) through the real retry wrapper, chunks, and each
chunk's BatchInput pickled as the pool's ``submit`` pickles it. The pool returns an empty
output and the sink writes nothing, so decoding, COPY and commits are not in it (per chunk,
not per record). Records look like the bench's 1-event records (about 2.2 KB), a new data key
every 100. Prints CPU microseconds per record (``time.process_time``, best of ``--repeat``; CPU
time, so other work on the machine inflates it less than a wall clock), with the records
client's parser and with botocore's, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import pickle
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
from aiobotocore.parsers import AioResponseParserFactory
from botocore.session import get_session

from ingest.consumer.committer import CommitSettings, ShardCommitter
from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.fetcher import ShardStatus, with_retries
from ingest.decode.batch import BatchInput, BatchOutput
from ingest.kinesis import KinesisReader
from ingest.kms import DataKeyCache
from ingest.lease import LeaseToken
from ingest.metrics import Metrics
from ingest.records_parser import RecordsParserFactory
from ingest.retry import Backoff
from ingest.warehouse.sink import CommitResult

T = TypeVar("T")
PAGE = 1000
ROTATE_EVERY = 100


def pages(records: int, seed: int = 1) -> list[bytes]:
    """GetRecords answer bodies of up to 1,000 records each."""
    rng = random.Random(seed)
    blobs = [rng.randbytes(184) for _ in range(records // ROTATE_EVERY + 1)]
    bodies = []
    for start in range(0, records, PAGE):
        items = []
        for i in range(start, min(records, start + PAGE)):
            envelope = orjson.dumps(
                {
                    "type": "DatabaseActivityMonitoringRecords",
                    "version": "1.1",
                    "databaseActivityEvents": base64.b64encode(rng.randbytes(900)).decode(),
                    "key": base64.b64encode(blobs[i // ROTATE_EVERY]).decode(),
                }
            )
            items.append(
                {
                    "SequenceNumber": str(49_600_000_000_000_000_000_000_000 + i),
                    "ApproximateArrivalTimestamp": 1_764_768_000.125 + i / 1000,
                    "Data": base64.b64encode(envelope).decode(),
                    "PartitionKey": f"pk-{i % 7}",
                }
            )
        bodies.append(
            orjson.dumps(
                {"Records": items, "NextShardIterator": "i" * 200, "MillisBehindLatest": 0}
            )
        )
    return bodies


class _Client:
    """The records client: its parser over a canned HTTP answer (``stock``: botocore's)."""

    def __init__(self, *, stock: bool = False) -> None:
        factory = AioResponseParserFactory() if stock else RecordsParserFactory()
        self.parser = factory.create_parser("json")
        self.shape = get_session().get_service_model("kinesis").operation_model("GetRecords")
        self.body = b""

    async def get_records(self, **_: Any) -> Any:
        response = {"status_code": 200, "headers": {}, "body": self.body}
        return await self.parser.parse(response, self.shape.output_shape)


class _Kms:
    async def decrypt(self, CiphertextBlob: bytes, EncryptionContext: Mapping[str, str]) -> Any:
        return {"Plaintext": b"k" * 32}


class _Pool:
    processes = 2

    async def decode(self, batch: BatchInput, size: int) -> BatchOutput:
        pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)  # what submit() does
        return BatchOutput(event_count=len(batch.records), records_decoded=len(batch.records))

    async def decode_alone(self, batch: BatchInput) -> BatchOutput | None:
        raise AssertionError("nothing crashes here")


class _Sink:
    async def ensure_partitions(self, days: Any) -> None:
        return None

    async def commit(self, lease: LeaseToken, **_: Any) -> CommitResult:
        return CommitResult()


class _Leases:
    async def checkpoint_of(self, shard_id: str) -> str | None:
        return None


async def per_record(
    bodies: Sequence[bytes], records: int, repeat: int, *, stock: bool = False
) -> float:
    """CPU µs per record, best of ``repeat`` passes over ``bodies``."""
    client = _Client(stock=stock)
    reader = KinesisReader(client, "aws-rds-das-cluster-BENCH")
    keys = DataKeyCache(_Kms())
    health, metrics, backoff = DependencyHealth(), Metrics("bench"), Backoff()
    lease = LeaseToken("aws-rds-das-cluster-BENCH", "shardId-000000000000", "bench", 1)

    def transient(op: Callable[[], Awaitable[T]], target: str) -> Awaitable[T]:
        return with_retries(
            op,
            shard_id=lease.shard_id,
            target=target,
            backoff=backoff,
            health=health,
            metrics=metrics,
            stop=None,
        )

    best = float("inf")
    for _ in range(repeat):
        committer = ShardCommitter(
            lease=lease,
            keys=keys,
            encryption_context={"aws:rds:dbc-id": "cluster-BENCH"},
            pool=_Pool(),
            sink=_Sink(),
            leases=_Leases(),
            metrics=metrics,
            settings=CommitSettings(),
            health=health,
            status=ShardStatus(checkpoint="TRIM_HORIZON"),
            transient=transient,
            backoff=backoff,
        )
        began = time.process_time()
        for body in bodies:
            client.body = body
            page = await reader.get_records("iterator", PAGE)
            await committer.commit_page(page.records, final=False)
        best = min(best, (time.process_time() - began) / records * 1e6)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mainpath", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--records", type=int, default=4000, help="records per pass (4000)")
    parser.add_argument("--repeat", type=int, default=5, help="passes; the best counts (5)")
    args = parser.parse_args(argv)
    bodies = pages(args.records)
    for stock in (False, True, False, True):  # interleaved: both share the machine's load
        cost = asyncio.run(per_record(bodies, args.records, args.repeat, stock=stock))
        parser_name = "botocore's parser" if stock else "ingest.records_parser"
        print(f"worker main process, {parser_name}: {cost:.1f} µs CPU per record")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
