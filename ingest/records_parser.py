"""GetRecords answers read without botocore's shape walk (the response parser of the records
client, see ``ingest.aws.aws_client(fast_records=True)``).

botocore turns a JSON answer into Python by walking the operation's output shape member by
member in Python (``json.loads``, then a handler call per field, and for a timestamp a fresh
``dateutil`` local time zone): for GetRecords that walk cost more of the worker's event loop
per record than everything else it does with the record (README "Performance"). This parser
builds the same GetRecords result with ``orjson`` and one loop over the records:

- ``Data``: the record's bytes, base64-decoded as botocore decodes blobs (by ``pybase64``,
  SIMD: ~5x binascii's speed here; Data that is not strict base64 takes botocore's path);
- ``ApproximateArrivalTimestamp``: an aware datetime of the same instant (in UTC, where
  botocore would use the local zone; epoch seconds are what Kinesis sends);
- every other member of a record or of the answer: as botocore's parser makes it.

Only the success answer of GetRecords takes this path; error answers, every other operation,
and a GetRecords body that is not a JSON object with a list of records go through botocore's
own parser unchanged (it raises or returns exactly what it would have).
"""

from __future__ import annotations

import binascii
from datetime import UTC, datetime
from typing import Any

import orjson
import pybase64
from aiobotocore.parsers import AioJSONParser, AioResponseParserFactory

OUTPUT_SHAPE = "GetRecordsOutput"


class RecordsJSONParser(AioJSONParser):  # type: ignore[misc]
    """aiobotocore's JSON parser with GetRecordsOutput read in one pass."""

    def _handle_json_body(self, raw_body: bytes, shape: Any) -> Any:
        if shape is not None and shape.name == OUTPUT_SHAPE and raw_body:
            parsed = self._get_records(raw_body, shape)
            if parsed is not None:
                return parsed
        return super()._handle_json_body(raw_body, shape)

    def _get_records(self, raw_body: bytes, shape: Any) -> dict[str, Any] | None:
        try:
            doc = orjson.loads(raw_body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict):
            return None
        records = doc.get("Records")
        if records is not None and not isinstance(records, list):
            return None
        members = shape.members
        parsed: dict[str, Any] = {}
        for name, value in doc.items():
            if name == "Records" or name not in members or value is None:
                continue
            parsed[name] = self._parse_shape(members[name], value)
        if records is not None:
            record_shape = members["Records"].member
            record = self._record
            fast = [record(r, record_shape) for r in records]
            if any(r is None for r in fast):
                return None
            parsed["Records"] = fast
        return parsed

    def _record(self, record: object, shape: Any) -> dict[str, Any] | None:
        if not isinstance(record, dict):
            return None
        out: dict[str, Any] = {}
        for name, value in record.items():
            if value is None:
                continue
            if name == "Data" and type(value) is str:
                try:
                    out[name] = pybase64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    return None
            elif name == "ApproximateArrivalTimestamp" and type(value) in _NUMBERS:
                out[name] = datetime.fromtimestamp(value, UTC)
            elif name in _STRINGS and type(value) is str:
                out[name] = value
            elif name in shape.members:
                out[name] = self._parse_shape(shape.members[name], value)
        return out


#: Members of a Record that botocore returns as sent (string shapes).
_STRINGS = frozenset({"SequenceNumber", "PartitionKey", "EncryptionType"})
_NUMBERS = (int, float)


class RecordsParserFactory(AioResponseParserFactory):  # type: ignore[misc]
    """aiobotocore's parser factory, with :class:`RecordsJSONParser` for the JSON protocol."""

    def create_parser(self, protocol_name: str) -> Any:
        if protocol_name == "json":
            return RecordsJSONParser(**self._defaults)
        return super().create_parser(protocol_name)
