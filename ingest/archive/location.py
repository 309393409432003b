"""Where an archive's objects live: ``s3://BUCKET/PREFIX`` and its deterministic keys (pure).

Layout (Hive style, so Athena, Trino, Spark and DuckDB see ``stream`` and ``day`` as partition
columns)::

    PREFIX/stream=<name>/day=<YYYY-MM-DD>/part-0000.parquet
    PREFIX/stream=<name>/day=<YYYY-MM-DD>/_manifest.json

The manifest starts with an underscore: Hive, Athena and Trino skip such files when they read
a partition's data, so it may sit beside the Parquet files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

MANIFEST = "_manifest.json"
_PART = re.compile(r"^part-(\d{4,})\.parquet$")
_DAY_DIR = re.compile(r"stream=([^/]+)/day=(\d{4}-\d{2}-\d{2})/" + re.escape(MANIFEST) + "$")
#: What S3 allows in a bucket name (the archive does not support dotted legacy names).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: Stream names as Kinesis allows them; they become a path segment.
_STREAM = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class ArchiveLocation:
    bucket: str
    prefix: str  # without leading or trailing slash; may be empty

    @classmethod
    def parse(cls, url: str) -> ArchiveLocation:
        """``s3://BUCKET/PREFIX`` (PREFIX optional); ValueError naming what is wrong."""
        if not url.startswith("s3://"):
            raise ValueError(f"{url!r} is not an s3://BUCKET/PREFIX URL")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{url!r}: {bucket!r} is not an S3 bucket name")
        prefix = prefix.strip("/")
        if "//" in prefix:
            raise ValueError(f"{url!r}: the prefix has an empty path segment")
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, rest: str) -> str:
        return f"{self.prefix}/{rest}" if self.prefix else rest

    def day_dir(self, stream: str, day: date) -> str:
        """The key prefix of one stream's day (ends with a slash)."""
        if not _STREAM.match(stream):
            raise ValueError(f"stream name {stream!r} cannot be an archive path segment")
        return self._key(f"stream={stream}/day={day.isoformat()}/")

    def part_key(self, stream: str, day: date, number: int) -> str:
        return self.day_dir(stream, day) + f"part-{number:04d}.parquet"

    def manifest_key(self, stream: str, day: date) -> str:
        return self.day_dir(stream, day) + MANIFEST

    def manifest_url(self, stream: str, day: date) -> str:
        return f"s3://{self.bucket}/{self.manifest_key(stream, day)}"

    def stream_prefix(self, stream: str | None) -> str:
        """The listing prefix for every day (of ``stream``, or of every stream)."""
        return self._key(f"stream={stream}/" if stream else "")

    def parse_manifest_key(self, key: str) -> tuple[str, date] | None:
        """(stream, day) of a manifest's key under this location, else None."""
        match = _DAY_DIR.search(key)
        if match is None or key[: match.start()] != (f"{self.prefix}/" if self.prefix else ""):
            return None
        return match[1], date.fromisoformat(match[2])


def part_number(name: str) -> int | None:
    """The number of a ``part-NNNN.parquet`` file name, else None."""
    match = _PART.match(name)
    return int(match[1]) if match else None
