"""The archive's columns: the events' columns (EVENT_COLUMNS, in their order) typed from the
warehouse's own catalog, so a column added by a migration flows into the archive untouched.

A value goes into Parquet as the warehouse gives it and comes back as the value the chain's
canonical encoder takes (:func:`ingest.integrity.canonical.event_digest`):

| PostgreSQL            | Parquet (Arrow)                | back to the encoder          |
|-----------------------|--------------------------------|------------------------------|
| text                  | string                         | str                          |
| integer / bigint / smallint | int32 / int64 / int16    | int                          |
| numeric               | string of the decimal digits   | str (too long for decimal128) |
| timestamptz           | timestamp[us, UTC]             | datetime (UTC)               |
| jsonb                 | string: the JSON text PostgreSQL gives | the parsed JSON value |
| text[]                | list<string>                   | list[str]                    |
| boolean, double precision, date | bool, double, date32 | as is                     |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from ingest.conn import Conn
from ingest.errors import ConfigError
from ingest.integrity.canonical import EVENT_COLUMNS

_ARROW: dict[str, pa.DataType] = {
    "text": pa.string(),
    "integer": pa.int32(),
    "bigint": pa.int64(),
    "smallint": pa.int16(),
    "numeric": pa.string(),
    "timestamp with time zone": pa.timestamp("us", tz="UTC"),
    "jsonb": pa.string(),
    "text[]": pa.list_(pa.string()),
    "boolean": pa.bool_(),
    "double precision": pa.float64(),
    "date": pa.date32(),
}
#: The Athena (Hive DDL) type of each Arrow type above.
_ATHENA: dict[str, str] = {
    "text": "string",
    "integer": "int",
    "bigint": "bigint",
    "smallint": "smallint",
    "numeric": "string",
    "timestamp with time zone": "timestamp",
    "jsonb": "string",
    "text[]": "array<string>",
    "boolean": "boolean",
    "double precision": "double",
    "date": "date",
}


@dataclass(frozen=True)
class Column:
    name: str
    #: the PostgreSQL type, as format_type() writes it
    pg_type: str

    @property
    def arrow(self) -> pa.DataType:
        return _ARROW[self.pg_type]

    @property
    def athena(self) -> str:
        return _ATHENA[self.pg_type]

    @property
    def select(self) -> str:
        """The expression that reads it from das.activity_events."""
        if self.pg_type == "numeric":
            return f"{self.name}::text AS {self.name}"
        return self.name

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "type": self.pg_type}


@dataclass(frozen=True)
class Columns:
    """The archived columns, in EVENT_COLUMNS order."""

    columns: tuple[Column, ...]

    @classmethod
    async def from_warehouse(cls, conn: Conn) -> Columns:
        rows = await conn.fetch(
            """
            SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
            WHERE attrelid = 'das.activity_events'::regclass AND attnum > 0 AND NOT attisdropped
            """
        )
        types = {r["attname"]: r["type"] for r in rows}
        try:
            return cls.from_types(types)
        except ValueError as exc:
            raise ConfigError(f"{exc}: run `das-ingest migrate` (or upgrade das-ingest)") from None

    @classmethod
    def from_types(cls, types: dict[str, str]) -> Columns:
        missing = [c for c in EVENT_COLUMNS if c not in types]
        if missing:
            raise ValueError(f"das.activity_events lacks the chained columns {missing}")
        unknown = {c: types[c] for c in EVENT_COLUMNS if types[c] not in _ARROW}
        if unknown:
            raise ValueError(f"the archive cannot store these column types yet: {unknown}")
        return cls(tuple(Column(c, types[c]) for c in EVENT_COLUMNS))

    @classmethod
    def from_json(cls, data: Sequence[dict[str, str]]) -> Columns:
        """The columns a manifest lists (an archive written by another version may differ)."""
        columns = tuple(Column(str(c["name"]), str(c["type"])) for c in data)
        unknown = [c.pg_type for c in columns if c.pg_type not in _ARROW]
        if unknown:
            raise ValueError(f"unknown column types in the manifest: {unknown}")
        return cls(columns)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow) for c in self.columns])

    def record_batch(self, rows: Sequence[Sequence[Any]]) -> pa.RecordBatch:
        """Rows as read from the warehouse (in :attr:`names` order) as one Arrow batch."""
        arrays = [
            pa.array([row[i] for row in rows], type=column.arrow)
            for i, column in enumerate(self.columns)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def encoder_values(self, batch: pa.RecordBatch) -> list[list[Any]]:
        """The rows of an Arrow batch as the values the canonical encoder takes, in
        EVENT_COLUMNS order (a column this archive does not have is None)."""
        by_name = {c.name: c for c in self.columns}
        lists: list[list[Any]] = []
        for name in EVENT_COLUMNS:
            column = by_name.get(name)
            if column is None or name not in batch.schema.names:
                lists.append([None] * batch.num_rows)
                continue
            values = batch.column(name).to_pylist()
            if column.pg_type == "jsonb":
                values = [None if v is None else orjson.loads(v) for v in values]
            lists.append(values)
        return [list(row) for row in zip(*lists, strict=True)] if lists else []


def athena_ddl(columns: Columns, *, table: str = "das_archive", location: str) -> str:
    """CREATE EXTERNAL TABLE for Athena (Glue) over an archive, with partition projection:
    ``stream`` is injected (queries name it), ``day`` a date range; no crawler, no MSCK."""
    body = ",\n".join(f"  `{c.name}` {c.athena}" for c in columns.columns)
    base = location.rstrip("/")
    return f"""CREATE EXTERNAL TABLE IF NOT EXISTS {table} (
{body}
)
PARTITIONED BY (`stream` string, `day` string)
STORED AS PARQUET
LOCATION '{base}/'
TBLPROPERTIES (
  'parquet.compression' = 'ZSTD',
  'projection.enabled' = 'true',
  'projection.stream.type' = 'injected',
  'projection.day.type' = 'date',
  'projection.day.format' = 'yyyy-MM-dd',
  'projection.day.range' = '2019-01-01,NOW',
  'projection.day.interval' = '1',
  'projection.day.interval.unit' = 'DAYS',
  'storage.location.template' = '{base}/stream=${{stream}}/day=${{day}}/'
);
"""
