"""``das-ingest decrypt``: decrypt raw DAS records and print their events as JSON lines.

The tool people reach for when "decryption doesn't work": each failure is reported with its line
number, the stage that failed and the likely cause, and the other lines still print.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from collections.abc import Iterator
from typing import IO, Any

from ingest.commands.options import add_hidden_alias, add_log_argument, env_default, env_flag

EPILOG = """\
input: one Kinesis record per line, exactly as it sits in the stream (the outer JSON document
{"type": "DatabaseActivityMonitoringRecords", ...}); a line holding that document base64-encoded
(the Data field of `aws kinesis get-records`) is accepted too. Blank lines are skipped.

output: one JSON object per event on stdout, with the warehouse's column names plus line,
cluster_id, instance_id and record_version (and file, when reading files). --raw prints each
record's decrypted document instead. Errors go to stderr as "line N: STAGE: reason (likely
cause)", or "FILE: line N: ..." when reading files (N counts the lines of that file); the exit
code is 1 if any line failed, else 0.

KMS is called with the encryption context {"aws:rds:dbc-id": RESOURCE_ID} for an Aurora cluster
(cluster-...), {"aws:rds:db-id": RESOURCE_ID} for an RDS DB instance (db-...); AWS settings come
from the usual places (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL_KMS, ...).

example:
  aws kinesis get-records --shard-iterator "$IT" --query 'Records[].Data' --output text \\
    | tr '\\t' '\\n' | das-ingest decrypt --stream aws-rds-das-cluster-ABCD123456
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "decrypt",
        help="decrypt raw DAS records (file or stdin) and print their events as JSON lines",
        description="Decrypt raw Database Activity Stream records and print the events.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="input files (default: stdin)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--resource-id",
        help="the resource id used as the KMS encryption context: an Aurora cluster's "
        "DbClusterResourceId (cluster-ABCD123456) or an RDS instance's DbiResourceId (db-...)",
    )
    who.add_argument(
        "--stream",
        help="the activity stream name (aws-rds-das-<resource id>); the resource id is derived",
    )
    parser.add_argument(
        "--include-heartbeats", action="store_true", help="print heartbeat events too"
    )
    parser.add_argument(
        "--raw", action="store_true", help="print each record's decrypted JSON document as is"
    )
    add_decryptor_arguments(parser)
    add_log_argument(parser)
    parser.set_defaults(func=run)


def add_decryptor_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that decrypts."""
    parser.add_argument(
        "--decryptor",
        choices=("lean", "esdk"),
        default=env_default("DAS_DECRYPTOR", "lean"),
        help="lean: the built-in verified decryptor; esdk: the AWS Encryption SDK "
        "(default: lean) [DAS_DECRYPTOR]",
    )
    parser.add_argument(
        "--skip-signature-verification",
        action="store_true",
        default=env_flag("DAS_SKIP_SIGNATURE_VERIFICATION"),
        help="do not verify the messages' ECDSA signatures (see README: what it protects) "
        "[DAS_SKIP_SIGNATURE_VERIFICATION]",
    )
    parser.add_argument(
        "--max-decompressed-mib",
        dest="max_decompressed_mb",
        type=int,
        default=env_default("DAS_MAX_DECOMPRESSED_MIB", 64),
        metavar="MIB",
        help="refuse payloads that decompress to more than this many MiB (default: 64) "
        "[DAS_MAX_DECOMPRESSED_MIB]",
    )
    add_hidden_alias(parser, "--max-decompressed-mb", dest="max_decompressed_mb", type=int)


def run(args: argparse.Namespace) -> int:
    from ingest.kms import resource_id_from_stream
    from ingest.runtime import run_async

    resource_id = args.resource_id or resource_id_from_stream(args.stream)
    return run_async(_decrypt_all(args, resource_id))


def _lines(files: list[str]) -> Iterator[tuple[str | None, int, bytes | OSError]]:
    """(file name or None for stdin, line number within that input, stripped line); a file
    that cannot be opened yields its OSError (line 0) and the others are still read."""
    if not files:
        yield from ((None, number, line) for number, line in _numbered(sys.stdin.buffer))
    for name in files:
        try:
            stream = open(name, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            yield name, 0, exc
            continue
        with stream:
            yield from ((name, number, line) for number, line in _numbered(stream))


def _numbered(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(stream, start=1):
        line = line.strip()
        if line:
            yield number, line


def _where(name: str | None, number: int) -> str:
    return f"line {number}" if name is None else f"{name}: line {number}"


def as_record_bytes(line: bytes) -> bytes:
    """A line is the record's JSON, or that JSON base64-encoded (as the AWS CLI prints it)."""
    if line[:1] == b"{":
        return line
    try:
        decoded = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return line
    return decoded if decoded[:1] == b"{" else line


async def _decrypt_all(args: argparse.Namespace, resource_id: str) -> int:
    import orjson

    from ingest.aws import aws_client
    from ingest.decode import decode_envelope, read_envelope
    from ingest.decode.decryptors import make_decryptor
    from ingest.errors import DecodeError
    from ingest.kms import DataKeyCache, encryption_context
    from ingest.retry import Backoff, retry

    decryptor = make_decryptor(
        args.decryptor, verify_signatures=not args.skip_signature_verification
    )
    context = encryption_context(resource_id)
    failures = 0
    out = sys.stdout.buffer
    async with aws_client("kms") as kms:
        cache = DataKeyCache(kms)
        for name, number, line in _lines(args.files):
            if isinstance(line, OSError):
                failures += 1
                print(f"{name}: cannot read: {line.strerror or line}", file=sys.stderr)
                continue
            try:
                envelope = read_envelope(as_record_bytes(line))
                blob = envelope.key_blob()
                data_key = await retry(
                    lambda blob=blob: cache.get(blob, context),  # type: ignore[misc]
                    backoff=Backoff(base=0.2, cap=2.0),
                    max_attempts=5,
                )
                if args.raw:
                    from ingest.decode.gunzip import gunzip

                    plaintext = decryptor.decrypt(envelope.payload(), data_key)
                    out.write(gunzip(plaintext, args.max_decompressed_mb << 20).rstrip() + b"\n")
                    continue
                record = decode_envelope(
                    envelope, data_key, decryptor, max_decompressed=args.max_decompressed_mb << 20
                )
            except DecodeError as exc:
                failures += 1
                print(f"{_where(name, number)}: {exc}", file=sys.stderr)
                continue
            head: dict[str, Any] = {} if name is None else {"file": name}
            head |= {
                "line": number,
                "cluster_id": record.cluster_id,
                "instance_id": record.instance_id,
                "record_version": record.record_version,
            }
            for event in record.events:
                out.write(orjson.dumps({**head, "type": "record", **event.as_dict()}) + b"\n")
            if args.include_heartbeats:
                for beat in record.heartbeats:
                    item = {**head, "type": "heartbeat", "event_index": beat.event_index}
                    out.write(
                        orjson.dumps({**item, "log_time": beat.log_time, **beat.fields}) + b"\n"
                    )
            out.flush()
    if failures:
        print(f"{failures} record(s) failed; see the messages above", file=sys.stderr)
    return 1 if failures else 0
