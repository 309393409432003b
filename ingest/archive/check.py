"""Verifying an archived day from the archive alone (``das-ingest verify --archive``).

Per day: the manifest's links must hash (each from its predecessor's hash) up to an anchor that
KMS accepts; every Parquet file must have the SHA-256 the manifest lists; and every event,
re-encoded from the Parquet values exactly as the chain encodes it, must add up per link to the
counts and digests that link recorded for the day. What differs is reported with the file and
row it was found at: ``altered``, ``deleted``, ``inserted``, ``reordered``, and the archive's own
``file_missing``, ``file_altered``, ``file_added``, ``manifest_invalid``, ``link_altered``,
``chain_broken``, ``anchor_*``.
"""

from __future__ import annotations

import bisect
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ingest.archive import s3 as s3io
from ingest.archive.columns import Columns
from ingest.archive.location import MANIFEST, ArchiveLocation
from ingest.archive.manifest import ArchivedLink, Manifest, ShardEvidence, sha256_hex
from ingest.integrity.anchor import AnchorError
from ingest.integrity.canonical import (
    CHAIN_VERSION,
    EVENT_COLUMNS,
    ZERO_HASH,
    event_day,
    event_digest,
    link_hash,
)
from ingest.progress import Progress

#: Rows read from Parquet at a time.
READ_BATCH = 8192
#: Bytes of each event digest kept in a file's row digests (``_part-NNNN.digests``): enough
#: to place a change at its row (a false match is a 1 in 2**32 chance); the chain links,
#: not these, prove what is authentic.
DIGEST_PREFIX = 4
_SHARD, _SEQUENCE, _INDEX, _LOG_TIME = (
    EVENT_COLUMNS.index(c) for c in ("shard_id", "sequence_number", "event_index", "log_time")
)


@dataclass(frozen=True)
class ArchiveFinding:
    kind: str
    stream: str
    day: str
    detail: str
    file: str | None = None
    row: int | None = None
    shard: str | None = None
    link_no: int | None = None


@dataclass
class ArchiveReport:
    findings: list[ArchiveFinding] = field(default_factory=list)
    days: int = 0
    files: int = 0
    rows: int = 0
    anchors_checked: int = 0
    anchors_skipped: bool = False
    #: per checked day: the manifest's SHA-256 (what retention records)
    manifests: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        """0 clean, 1 findings, 3 when the only findings are anchors KMS could not check."""
        if not self.findings:
            return 0
        if all(f.kind == "anchor_unchecked" for f in self.findings):
            return 3
        return 1

    def as_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "days": self.days,
            "files": self.files,
            "rows": self.rows,
            "anchors_checked": self.anchors_checked,
            "anchors_skipped": self.anchors_skipped,
            "findings": [asdict(f) for f in self.findings],
        }


@dataclass
class _Tally:
    n: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    #: file -> [first row, last row] of the link's events of the day in that file
    rows: dict[str, list[int]] = field(default_factory=dict)

    def add(self, name: str, row: int) -> None:
        span = self.rows.get(name)
        if span is None:
            self.rows[name] = [row, row]
        else:
            span[1] = row

    def where(self, files: set[str] | None = None) -> str:
        """Where the events are, limited to ``files`` when any of them holds some."""
        spans = {f: r for f, r in self.rows.items() if files is None or f in files} or self.rows
        return ", ".join(f"{f} rows {a}..{b}" for f, (a, b) in spans.items())

    def first(self, files: set[str] | None = None) -> tuple[str, int] | None:
        spans = {f: r for f, r in self.rows.items() if files is None or f in files} or self.rows
        for f, (a, _) in spans.items():
            return f, a
        return None


class _Coverage:
    """Which link of a shard's evidence covers a sequence number (a redrive before a batch)."""

    def __init__(self, links: list[ArchivedLink]) -> None:
        self.redrives = {
            int(x.fields.first_sequence): x for x in links if x.fields.kind == "redrive"
        }
        batches = sorted(
            (x for x in links if x.fields.kind == "batch"),
            key=lambda x: int(x.fields.first_sequence),
        )
        self.batches = batches
        self.starts = [int(x.fields.first_sequence) for x in batches]

    def link(self, seq: int) -> ArchivedLink | None:
        found = self.redrives.get(seq)
        if found is not None:
            return found
        i = bisect.bisect_right(self.starts, seq) - 1
        if i < 0:
            return None
        batch = self.batches[i]
        return batch if seq <= int(batch.fields.last_sequence) else None


async def verify_archive(
    s3: Any,
    location: ArchiveLocation,
    *,
    checker: Any | None,
    stream: str | None = None,
    day: date | None = None,
    progress: Progress | None = None,
) -> ArchiveReport:
    """Verify every archived day under ``location`` (or those of ``stream`` / ``day``).
    ``checker``: an :class:`ingest.integrity.verify.AnchorChecker`, or None to skip KMS."""
    report = ArchiveReport(anchors_skipped=checker is None)
    days: list[tuple[str, date]] = []
    data_dirs: set[str] = set()
    async for key in s3io.list_keys(s3, location.bucket, location.stream_prefix(stream)):
        found = location.parse_manifest_key(key)
        if found is not None:
            if day is None or found[1] == day:
                days.append(found)
        elif key.endswith(".parquet"):
            data_dirs.add(key.rsplit("/", 1)[0] + "/")
    for s, d in sorted(days):
        data_dirs.discard(location.day_dir(s, d))
        await verify_day(s3, location, s, d, report=report, checker=checker, progress=progress)
    for orphan in sorted(data_dirs):
        if day is not None and f"/day={day.isoformat()}/" not in "/" + orphan:
            continue
        report.findings.append(
            ArchiveFinding("manifest_missing", stream or "?", orphan, f"s3://{location.bucket}/"
                           f"{orphan} holds Parquet files but no {MANIFEST}: an archive run "
                           "that did not finish (run it again), or a deleted manifest")
        )  # fmt: skip
    if not days and not data_dirs:
        report.findings.append(
            ArchiveFinding("manifest_missing", stream or "-", day.isoformat() if day else "-",
                           f"no archived day found under {location.url}")
        )  # fmt: skip
    return report


async def verify_day(
    s3: Any,
    location: ArchiveLocation,
    stream: str,
    day: date,
    *,
    report: ArchiveReport,
    checker: Any | None,
    progress: Progress | None = None,
    record: s3io.WriteOptions | None = None,
) -> None:
    """Verify one day into ``report``. With ``record`` (the archive command), a day that
    verifies clean gets its files' row digests written where they are missing."""
    day_text = day.isoformat()
    start = len(report.findings)

    def finding(kind: str, detail: str, **where: Any) -> None:
        report.findings.append(ArchiveFinding(kind, stream, day_text, detail, **where))

    report.days += 1
    raw = await s3io.get_bytes(s3, location.bucket, location.manifest_key(stream, day))
    if raw is None:
        finding("manifest_missing", f"{location.manifest_url(stream, day)} is gone")
        return
    try:
        manifest = Manifest.from_bytes(raw)
        columns = Columns.from_json(manifest.columns)
    except ValueError as exc:
        finding("manifest_invalid", str(exc))
        return
    if manifest.stream != stream or manifest.day != day:
        finding("manifest_invalid", f"the manifest is of {manifest.stream} {manifest.day}, "
                "not of the directory it is in")  # fmt: skip
        return
    for shard, evidence in sorted(manifest.shards.items()):
        await _check_evidence(report, finding, shard, evidence, day_text, checker)
    coverage = {shard: _Coverage(list(ev.links)) for shard, ev in manifest.shards.items()}
    tallies: dict[tuple[str, int], _Tally] = {}
    listed = {f.name for f in manifest.files}
    present: set[str] = set()
    async for key in s3io.list_keys(s3, location.bucket, location.day_dir(stream, day)):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".parquet"):
            present.add(name)
    previous: tuple[str, int, int] | None = None
    to_record: list[tuple[str, Path]] = []
    with tempfile.TemporaryDirectory(prefix="das-archive-") as tmp:
        extra = sorted(present - listed)
        order = [(f.name, f) for f in manifest.files] + [(name, None) for name in extra]
        for name, listed_file in order:
            path = Path(tmp) / name
            key = location.day_dir(stream, day) + name
            if listed_file is None:
                finding("file_added", f"{name} is not in the manifest: its rows are read by "
                        "every query engine", file=name)  # fmt: skip
            digest = (
                await s3io.download(s3, location.bucket, key, path) if name in present else None
            )
            if digest is None:
                assert listed_file is not None
                finding("file_missing", f"{name} ({listed_file.rows} rows) was removed",
                        file=name)  # fmt: skip
                continue
            report.files += 1
            if listed_file is not None and digest != listed_file.sha256:
                finding("file_altered", f"{name} does not have the SHA-256 the manifest lists",
                        file=name)  # fmt: skip
            side_key = location.day_dir(stream, day) + digests_name(name)
            recorded = await s3io.get_bytes(s3, location.bucket, side_key)
            actual = bytearray()
            try:
                parquet = pq.ParquetFile(path)
                batches = parquet.iter_batches(batch_size=READ_BATCH)
                row = 0
                for batch in batches:
                    if progress is not None:
                        progress.update(batch.num_rows)
                    for values in columns.encoder_values(batch):
                        report.rows += 1
                        previous, event_hash = _one_row(
                            values, name, row, previous, day_text, coverage, tallies,
                            finding,
                        )  # fmt: skip
                        actual += event_hash[:DIGEST_PREFIX]
                        row += 1
                if listed_file is not None and row != listed_file.rows:
                    finding("file_altered", f"{name} has {row} rows, the manifest lists "
                            f"{listed_file.rows}", file=name)  # fmt: skip
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                finding("file_altered", f"{name} is not a readable Parquet file: {exc}", file=name)
            path.unlink(missing_ok=True)
            if recorded is not None and listed_file is not None:
                _report_rows(name, recorded, bytes(actual), finding)
            elif recorded is None and listed_file is not None and record is not None:
                spooled = Path(tmp) / digests_name(name)
                spooled.write_bytes(actual)
                to_record.append((side_key, spooled))
        altered = {f.file for f in report.findings[start:] if f.kind == "file_altered" and f.file}
        _compare(manifest, tallies, day_text, altered, finding)
        if len(report.findings) == start:
            report.manifests[(stream, day_text)] = sha256_hex(raw)
            # Proven by the links: the rows' digests, to place a later change at its row.
            for side_key, spooled in to_record:
                assert record is not None  # only then is anything spooled
                await s3io.put_bytes(
                    s3, location.bucket, side_key, spooled.read_bytes(), options=record,
                    content_type="application/octet-stream",
                )  # fmt: skip


def _one_row(
    values: list[Any],
    name: str,
    row: int,
    previous: tuple[str, int, int] | None,
    day_text: str,
    coverage: dict[str, _Coverage],
    tallies: dict[tuple[str, int], _Tally],
    finding: Callable[..., None],
) -> tuple[tuple[str, int, int], bytes]:
    """Check one event; its key and its digest (with its link's chain version)."""
    shard = str(values[_SHARD])
    seq = int(values[_SEQUENCE])
    key = (shard, seq, int(values[_INDEX]))
    log_time = values[_LOG_TIME]
    if previous is not None and key <= previous:
        kind = "inserted" if key == previous else "reordered"
        finding(kind, f"event {shard} {seq}#{key[2]} is not after the event before it "
                f"(chain order is shard, sequence number, event index)",
                file=name, row=row, shard=shard)  # fmt: skip
    if event_day(log_time) != day_text:
        finding("inserted", f"event {shard} {seq}#{key[2]} is of day {event_day(log_time)}, "
                "not of this day", file=name, row=row, shard=shard)  # fmt: skip
        return key, event_digest(values, CHAIN_VERSION)
    cover = coverage.get(shard)
    link = cover.link(seq) if cover is not None else None
    if link is None:
        finding("inserted", f"event {shard} {seq}#{key[2]} belongs to no link of the manifest",
                file=name, row=row, shard=shard)  # fmt: skip
        return key, event_digest(values, CHAIN_VERSION)
    digest = event_digest(values, link.fields.version)
    tally = tallies.setdefault((shard, link.fields.link_no), _Tally())
    tally.n += 1
    tally.digest.update(digest)
    tally.add(name, row)
    return key, digest


def digests_name(part: str) -> str:
    """The row digests of ``part-NNNN.parquet``: ``_part-NNNN.digests`` (the underscore keeps
    query engines from reading it as data)."""
    return "_" + part.removesuffix(".parquet") + ".digests"


def locate(recorded: bytes, actual: bytes, window: int = 64) -> list[tuple[str, int, int, int]]:
    """Align a file's recorded row digests (DIGEST_PREFIX bytes each) with those recomputed
    from its rows: (kind, actual row, count, recorded row) for rows ``altered``, ``deleted``
    (gone before that actual row), ``inserted`` and ``reordered`` (a row found elsewhere)."""
    width = DIGEST_PREFIX
    n, m = len(recorded) // width, len(actual) // width

    def rec(k: int) -> bytes:
        return recorded[k * width : (k + 1) * width]

    def act(k: int) -> bytes:
        return actual[k * width : (k + 1) * width]

    def find(get: Callable[[int], bytes], needle: bytes, lo: int, hi: int) -> int | None:
        return next((k for k in range(lo, hi) if get(k) == needle), None)

    out: list[tuple[str, int, int, int]] = []
    i = j = 0
    while i < n and j < m:
        if rec(i) == act(j):
            i, j = i + 1, j + 1
            continue
        k = find(rec, act(j), i + 1, min(n, i + window))
        if k is not None:
            out.append(("deleted", j, k - i, i))
            i = k
            continue
        k = find(act, rec(i), j + 1, min(m, j + window))
        if k is not None:
            out.append(("inserted", j, k - j, i))
            j = k
            continue
        out.append(("altered", j, 1, i))
        i, j = i + 1, j + 1
    if i < n:
        out.append(("deleted", j, n - i, i))
    if j < m:
        out.append(("inserted", j, m - j, i))
    # A row deleted here and inserted there, alone, was moved.
    gone = {rec(r): r for kind, _, c, r in out if kind == "deleted" and c == 1}
    came = {act(a): a for kind, a, c, _ in out if kind == "inserted" and c == 1}
    moved = gone.keys() & came.keys()
    if moved:
        out = [x for x in out if not (x[2] == 1 and (
            (x[0] == "deleted" and rec(x[3]) in moved)
            or (x[0] == "inserted" and act(x[1]) in moved)
        ))]  # fmt: skip
        out += [("reordered", came[d], 1, gone[d]) for d in moved]
    return sorted(out, key=lambda x: (x[1], x[0]))


def _report_rows(name: str, recorded: bytes, actual: bytes, finding: Callable[..., None]) -> None:
    for kind, row, count, was in locate(recorded, actual):
        if kind == "altered":
            detail = f"row {row} of {name} is not the event archived there: a value changed"
        elif kind == "deleted":
            rows = f"row {was}" if count == 1 else f"rows {was}..{was + count - 1}"
            detail = f"{count} event(s) archived as {rows} are gone"
        elif kind == "inserted":
            rows = f"row {row}" if count == 1 else f"rows {row}..{row + count - 1}"
            detail = f"{rows} of {name} were not archived"
        else:
            detail = f"row {row} of {name} was archived as row {was}"
        finding(kind, detail + " (located by the row digests)", file=name, row=row)


def _compare(
    manifest: Manifest,
    tallies: dict[tuple[str, int], _Tally],
    day_text: str,
    altered_files: set[str],
    finding: Callable[..., None],
) -> None:
    """Each link's events of the day against what the link recorded. A difference is placed
    at the link's rows, narrowed to the files whose SHA-256 changed when there are such."""
    for shard, evidence in sorted(manifest.shards.items()):
        for link in evidence.links:
            stored = link.fields.days.get(day_text)
            found = tallies.pop((shard, link.fields.link_no), None)
            if stored is None:
                continue
            n = int(stored.get("n", 0))
            span = f"link {link.fields.link_no}, sequence numbers {link.fields.first_sequence}.."
            span += link.fields.last_sequence
            at: dict[str, Any] = {"shard": shard, "link_no": link.fields.link_no}
            first = found.first(altered_files) if found is not None else None
            if first is not None:
                at.update(file=first[0], row=first[1])
            if found is None:
                finding("deleted", f"all {n} events of {span} are missing", **at)
            elif found.n < n:
                finding("deleted", f"{n - found.n} of {n} events of {span} are missing "
                        f"(among {found.where(altered_files)})", **at)  # fmt: skip
            elif found.n > n:
                finding("inserted", f"{found.n - n} events more than the {n} of {span} "
                        f"(among {found.where(altered_files)})", **at)  # fmt: skip
            elif found.digest.hexdigest() != stored.get("sha256"):
                finding("altered", f"the {n} events of {span} hash differently: a value was "
                        f"changed or rows reordered (among {found.where(altered_files)})",
                        **at)  # fmt: skip
    for (shard, link_no), found in sorted(tallies.items()):
        place = found.first() or ("?", 0)
        finding("inserted", f"{found.n} events of link {link_no}, which lists none of this day "
                f"(at {found.where()})", shard=shard, link_no=link_no, file=place[0],
                row=place[1])  # fmt: skip


async def _check_evidence(
    report: ArchiveReport,
    finding: Callable[..., None],
    shard: str,
    evidence: ShardEvidence,
    day_text: str,
    checker: Any | None,
) -> None:
    """The links hash from one to the next up to the anchor, the anchor is KMS-valid, and the
    first link is the chain's first or precedes the day (no link of the day left out)."""
    links = list(evidence.links)
    if not links:
        finding("manifest_invalid", f"no links for shard {shard}", shard=shard)
        return
    first = links[0]
    if first.fields.link_no == 1:
        if first.prev_hash != ZERO_HASH:
            finding("chain_broken", "link 1 does not start from the zero hash", shard=shard,
                    link_no=1)  # fmt: skip
    elif day_text in first.fields.days:
        finding("chain_broken", f"the manifest's links start at link {first.fields.link_no}, "
                "which has events of the day: earlier links of the day were left out",
                shard=shard, link_no=first.fields.link_no)  # fmt: skip
    before: ArchivedLink | None = None
    for link in links:
        no = link.fields.link_no
        if link_hash(link.prev_hash, link.fields) != link.link_hash:
            finding("link_altered", f"link {no} does not hash to its link_hash", shard=shard,
                    link_no=no)  # fmt: skip
        if before is not None and (
            no != before.fields.link_no + 1 or link.prev_hash != before.link_hash
        ):
            finding("chain_broken", f"link {no} does not follow link {before.fields.link_no}",
                    shard=shard, link_no=no)  # fmt: skip
        declared = sum(int(d.get("n", 0)) for d in link.fields.days.values())
        if declared != link.fields.event_count:
            finding("link_altered", f"link {no}: event_count {link.fields.event_count} but its "
                    f"days sum to {declared}", shard=shard, link_no=no)  # fmt: skip
        before = link
    anchor = evidence.anchor
    if anchor is None:
        finding("unanchored", f"no anchor covers shard {shard}'s links of the day", shard=shard)
        return
    last = links[-1]
    if (anchor.stream_name, anchor.shard_id) != (last.fields.stream, shard) or (
        anchor.link_no != last.fields.link_no or anchor.link_hash != last.link_hash
    ):
        finding("anchor_mismatch", f"the anchor names link {anchor.link_no}, not the manifest's "
                f"last link {last.fields.link_no} with its hash", shard=shard,
                link_no=anchor.link_no)  # fmt: skip
    if checker is None:
        return
    report.anchors_checked += 1
    try:
        verdict = await checker.check(anchor)
    except AnchorError as exc:
        finding("anchor_unchecked", f"KMS could not check the anchor: {exc}", shard=shard)
        return
    if verdict == "unexpected_key":
        finding("anchor_unexpected_key", f"the anchor of link {anchor.link_no} was made with "
                f"{anchor.key_id}, not the expected key", shard=shard,
                link_no=anchor.link_no)  # fmt: skip
    elif verdict != "valid":
        finding("anchor_invalid", f"KMS rejects the anchor of link {anchor.link_no}",
                shard=shard, link_no=anchor.link_no)  # fmt: skip
