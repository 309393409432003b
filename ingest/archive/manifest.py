"""The per-day manifest (pure): what an archived day holds and the chain evidence that lets it
verify without the warehouse (docs/archive.md).

It lists the Parquet files (rows, bytes, SHA-256), the columns and their warehouse types, and
per shard the chain links from the one before the day's first link through the first anchored
link at or after its last, with that anchor. The manifest itself is not trusted by the
verifier: the links' hashes chain up to an anchor that KMS checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import orjson

from ingest.integrity.anchor import Anchor
from ingest.integrity.canonical import LinkFields, canonical_time

FORMAT = "das-archive-v1"


@dataclass(frozen=True)
class ArchivedLink:
    fields: LinkFields
    prev_hash: bytes
    link_hash: bytes

    def as_json(self) -> dict[str, Any]:
        f = self.fields
        return {
            "link_no": f.link_no,
            "kind": f.kind,
            "first_sequence": f.first_sequence,
            "last_sequence": f.last_sequence,
            "event_count": f.event_count,
            "days": dict(f.days),
            "created_at": canonical_time(f.created_at) if f.created_at else None,
            "dead_letters": list(f.dead_letters),
            "version": f.version,
            "prev_hash": self.prev_hash.hex(),
            "link_hash": self.link_hash.hex(),
        }

    @classmethod
    def from_json(cls, stream: str, shard: str, data: Mapping[str, Any]) -> ArchivedLink:
        created = data.get("created_at")
        return cls(
            LinkFields(
                stream=stream,
                shard=shard,
                link_no=int(data["link_no"]),
                kind=str(data["kind"]),
                first_sequence=str(data["first_sequence"]),
                last_sequence=str(data["last_sequence"]),
                event_count=int(data["event_count"]),
                days=dict(data["days"]),
                created_at=datetime.fromisoformat(created.replace("Z", "+00:00"))
                if created
                else None,
                dead_letters=list(data.get("dead_letters") or []),
                version=int(data["version"]),
            ),
            bytes.fromhex(data["prev_hash"]),
            bytes.fromhex(data["link_hash"]),
        )


@dataclass(frozen=True)
class ArchivedFile:
    name: str
    rows: int
    bytes: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class ShardEvidence:
    rows: int
    links: Sequence[ArchivedLink]
    anchor: Anchor | None


@dataclass
class Manifest:
    stream: str
    day: date
    created_at: datetime
    columns: list[dict[str, str]]
    files: list[ArchivedFile] = field(default_factory=list)
    shards: dict[str, ShardEvidence] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_bytes(self) -> bytes:
        document = {
            "format": FORMAT,
            "stream": self.stream,
            "day": self.day.isoformat(),
            "created_at": canonical_time(self.created_at),
            "rows": self.rows,
            "columns": self.columns,
            "files": [f.as_json() for f in self.files],
            "shards": {
                shard: {
                    "rows": ev.rows,
                    "links": [link.as_json() for link in ev.links],
                    "anchor": ev.anchor.as_json() if ev.anchor else None,
                }
                for shard, ev in sorted(self.shards.items())
            },
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """ValueError when it is not a manifest this version reads."""
        try:
            data = orjson.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown manifest format {data.get('format')!r}")
            stream = str(data["stream"])
            shards = {
                shard: ShardEvidence(
                    int(ev["rows"]),
                    [ArchivedLink.from_json(stream, shard, x) for x in ev["links"]],
                    Anchor.from_json(ev["anchor"]) if ev.get("anchor") else None,
                )
                for shard, ev in data["shards"].items()
            }
            return cls(
                stream=stream,
                day=date.fromisoformat(data["day"]),
                created_at=datetime.fromisoformat(data["created_at"].replace("Z", "+00:00")),
                columns=list(data["columns"]),
                files=[
                    ArchivedFile(str(f["name"]), int(f["rows"]), int(f["bytes"]), str(f["sha256"]))
                    for f in data["files"]
                ],
                shards=shards,
            )
        except (KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as exc:
            raise ValueError(
                f"not a das-ingest archive manifest: {type(exc).__name__}: {exc}"
            ) from None


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
