"""`das-ingest verify`: recompute every digest from the stored rows, walk the chains, check the
anchors through KMS, and say precisely what was altered, deleted, inserted or reordered.

Nothing stored in the database is trusted for the recomputation: not its functions, not the
links' own digests. Only whole UTC days recorded in das.retention_log may legitimately vanish.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from ingest.aws import error_code
from ingest.integrity.anchor import Anchor, AnchorError, load_anchors
from ingest.integrity.canonical import (
    EVENT_COLUMNS,
    ZERO_HASH,
    event_day,
    event_digest,
    link_hash,
)
from ingest.warehouse.db import Conn


@dataclass(frozen=True)
class Finding:
    #: altered | deleted | inserted | reordered | link_altered | chain_broken | links_missing
    #: | anchor_invalid | anchor_mismatch | truncated
    kind: str
    stream: str
    shard: str
    detail: str
    link_no: int | None = None
    first_sequence: str | None = None
    last_sequence: str | None = None
    day: str | None = None


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    chains: int = 0
    links: int = 0
    events: int = 0
    anchors_checked: int = 0
    #: per chain with links after its last valid anchor: shard, first/last unanchored link
    unanchored: list[dict[str, Any]] = field(default_factory=list)
    retained_days: list[str] = field(default_factory=list)
    anchors_skipped: bool = False

    @property
    def clean(self) -> bool:
        return not self.findings

    def as_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "chains": self.chains,
            "links": self.links,
            "events": self.events,
            "anchors_checked": self.anchors_checked,
            "anchors_skipped": self.anchors_skipped,
            "unanchored_tail": self.unanchored,
            "retained_days": self.retained_days,
            "findings": [asdict(f) for f in self.findings],
        }


@dataclass
class _Link:
    link_no: int
    kind: str
    first: int
    last: int
    first_text: str
    last_text: str
    event_count: int
    days: dict[str, dict[str, Any]]
    prev_hash: bytes
    link_hash: bytes
    created_at: datetime


@dataclass
class _Tally:
    n: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    first_seq: int | None = None
    last_seq: int | None = None


class _Retention:
    """Whole UTC days legitimately removed, from das.retention_log."""

    def __init__(self, ranges: list[tuple[datetime | None, datetime | None]]) -> None:
        self._ranges = ranges

    def covers(self, day: str) -> bool:
        if day == "none":
            return False
        start = datetime.combine(date.fromisoformat(day), datetime.min.time(), tzinfo=UTC)
        end = start + timedelta(days=1)
        return any(
            (lo is None or lo <= start) and hi is not None and end <= hi for lo, hi in self._ranges
        )


async def verify_warehouse(
    conn: Conn,
    *,
    kms: Any | None,
    stream: str | None = None,
    shards: list[str] | None = None,
    since: datetime | None = None,
) -> Report:
    report = Report()
    retention = _Retention(
        [
            (r["range_start"], r["range_end"])
            for r in await conn.fetch("SELECT range_start, range_end FROM das.retention_log")
        ]
    )
    chains = await conn.fetch(
        """
        SELECT DISTINCT stream_name, shard_id FROM das.chain_links
        WHERE ($1::text IS NULL OR stream_name = $1) AND ($2::text[] IS NULL OR shard_id = ANY ($2))
        UNION
        SELECT DISTINCT stream_name, shard_id FROM das.chain_anchors
        WHERE ($1::text IS NULL OR stream_name = $1) AND ($2::text[] IS NULL OR shard_id = ANY ($2))
        ORDER BY 1, 2
        """,
        stream,
        shards,
    )
    anchors = await load_anchors(conn, stream) if kms is not None else []
    report.anchors_skipped = kms is None
    retained: set[str] = set()
    for chain in chains:
        s, shard = chain["stream_name"], chain["shard_id"]
        links = await _links(conn, s, shard)
        report.chains += 1
        report.links += len(links)
        _check_links(report, s, shard, links)
        await _check_events(conn, report, s, shard, links, retention, since, retained)
        await _check_checkpoint(conn, report, s, shard, links)
        shard_anchors = [a for a in anchors if a.stream_name == s and a.shard_id == shard]
        await _check_anchors(report, kms, s, shard, links, shard_anchors)
    if stream is None and shards is None:
        await _check_unchained(conn, report)
    report.retained_days = sorted(retained)
    return report


async def _links(conn: Conn, stream: str, shard: str) -> list[_Link]:
    rows = await conn.fetch(
        """
        SELECT link_no, kind, first_sequence::text AS first_text, last_sequence::text AS last_text,
               event_count, days::text AS days_text, prev_hash, link_hash, created_at
        FROM das.chain_links WHERE stream_name = $1 AND shard_id = $2 ORDER BY link_no
        """,
        stream,
        shard,
    )
    return [
        _Link(
            link_no=r["link_no"],
            kind=r["kind"],
            first=int(r["first_text"]),
            last=int(r["last_text"]),
            first_text=r["first_text"],
            last_text=r["last_text"],
            event_count=r["event_count"],
            days=orjson.loads(r["days_text"]),
            prev_hash=bytes(r["prev_hash"]),
            link_hash=bytes(r["link_hash"]),
            created_at=r["created_at"],
        )
        for r in rows
    ]


def _check_links(report: Report, stream: str, shard: str, links: list[_Link]) -> None:
    previous: _Link | None = None
    last_batch: _Link | None = None
    for link in links:

        def finding(kind: str, detail: str, link: _Link = link) -> None:
            report.findings.append(
                Finding(kind, stream, shard, detail, link.link_no, link.first_text, link.last_text)
            )

        expected_no = 1 if previous is None else previous.link_no + 1
        if link.link_no != expected_no:
            finding("links_missing", f"links {expected_no}..{link.link_no - 1} are missing")
        recomputed = link_hash(
            link.prev_hash,
            stream,
            shard,
            link.link_no,
            link.kind,
            link.first_text,
            link.last_text,
            link.event_count,
            link.days,
        )
        if recomputed != link.link_hash:
            finding("link_altered", "the link's fields do not hash to its stored link_hash")
        want_prev = ZERO_HASH if previous is None else previous.link_hash
        if link.prev_hash != want_prev:
            finding(
                "chain_broken",
                "prev_hash does not match the previous link: links were "
                "removed, inserted or reordered",
            )
        declared = sum(int(d.get("n", 0)) for d in link.days.values())
        if declared != link.event_count:
            finding("link_altered", f"event_count {link.event_count} but days sum to {declared}")
        if link.kind == "batch":
            if last_batch is not None and link.first <= last_batch.last:
                finding(
                    "reordered",
                    f"batch starts at or before the end of link "
                    f"{last_batch.link_no} ({last_batch.last_text})",
                )
            last_batch = link
        previous = link


async def _check_events(
    conn: Conn,
    report: Report,
    stream: str,
    shard: str,
    links: list[_Link],
    retention: _Retention,
    since: datetime | None,
    retained: set[str],
) -> None:
    checked = [link for link in links if since is None or link.created_at >= since]
    if not checked:
        return
    redrives = {link.first: link for link in links if link.kind == "redrive"}
    batches = sorted((link for link in links if link.kind == "batch"), key=lambda x: x.first)
    starts = [b.first for b in batches]
    low = min(link.first for link in checked)
    tallies: dict[tuple[int, str], _Tally] = defaultdict(_Tally)
    outside: list[int] = []
    async with conn.transaction():
        cursor = conn.cursor(
            f"""
            SELECT {", ".join(EVENT_COLUMNS)}
            FROM das.activity_events
            WHERE shard_id = $1 AND sequence_number >= $2::numeric
            ORDER BY sequence_number, event_index
            """,
            shard,
            str(low),
            prefetch=2000,
        )
        async for row in cursor:
            report.events += 1
            values = stored_values(row)
            seq = int(row["sequence_number"])
            link = redrives.get(seq)
            if link is None:
                i = bisect.bisect_right(starts, seq) - 1
                link = batches[i] if i >= 0 and batches[i].first <= seq <= batches[i].last else None
            if link is None:
                outside.append(seq)
                continue
            tally = tallies[(link.link_no, event_day(row["log_time"]))]
            tally.n += 1
            tally.digest.update(event_digest(values))
            tally.first_seq = seq if tally.first_seq is None else tally.first_seq
            tally.last_seq = seq
    if outside:
        report.findings.append(
            Finding(
                "inserted",
                stream,
                shard,
                f"{len(outside)} events belong to no link (sequence numbers "
                f"{min(outside)}..{max(outside)})",
                first_sequence=str(min(outside)),
                last_sequence=str(max(outside)),
            )
        )
    checked_nos = {link.link_no for link in checked}
    for link in checked:
        for day, stored in link.days.items():
            found = tallies.pop((link.link_no, day), None)
            n = int(stored.get("n", 0))
            if retention.covers(day):
                retained.add(day)
                if found is not None:
                    _add(
                        report,
                        "inserted",
                        stream,
                        shard,
                        link,
                        day,
                        f"{found.n} events on {day}, which retention removed",
                    )
                continue
            if found is None:
                _add(
                    report,
                    "deleted",
                    stream,
                    shard,
                    link,
                    day,
                    f"all {n} events of {day} are missing (a dropped partition, or deleted "
                    "rows, with no retention record)",
                )
            elif found.n < n:
                _add(
                    report,
                    "deleted",
                    stream,
                    shard,
                    link,
                    day,
                    f"{n - found.n} of {n} events of {day} are missing",
                )
            elif found.n > n:
                _add(
                    report,
                    "inserted",
                    stream,
                    shard,
                    link,
                    day,
                    f"{found.n - n} events of {day} were added",
                )
            elif found.digest.hexdigest() != stored.get("sha256"):
                _add(
                    report,
                    "altered",
                    stream,
                    shard,
                    link,
                    day,
                    f"the {n} events of {day} hash differently: a stored value was changed "
                    f"(sequence numbers {found.first_seq}..{found.last_seq})",
                )
    for (link_no, day), found in tallies.items():
        if link_no in checked_nos:
            link = next(x for x in checked if x.link_no == link_no)
            _add(
                report,
                "inserted",
                stream,
                shard,
                link,
                day,
                f"{found.n} events of {day} that the link does not list",
            )


async def verify_anchor(kms: Any, anchor: Anchor) -> bool:
    """True if KMS confirms the MAC or signature; False if it refutes it."""
    try:
        if anchor.algorithm.startswith("HMAC_"):
            response = await kms.verify_mac(
                KeyId=anchor.key_id,
                MacAlgorithm=anchor.algorithm,
                Message=anchor.message(),
                Mac=anchor.signature,
            )
            return bool(response.get("MacValid"))
        response = await kms.verify(
            KeyId=anchor.key_id,
            SigningAlgorithm=anchor.algorithm,
            Message=anchor.message(),
            MessageType="RAW",
            Signature=anchor.signature,
        )
        return bool(response.get("SignatureValid"))
    except Exception as exc:  # noqa: BLE001 - classified here
        if error_code(exc) in ("KMSInvalidMacException", "KMSInvalidSignatureException"):
            return False
        raise AnchorError(
            f"KMS could not check an anchor: {error_code(exc) or type(exc).__name__}"
        ) from None


_JSON_POSITIONS = tuple(
    i for i, column in enumerate(EVENT_COLUMNS) if column in ("param_list", "extra")
)


def stored_values(row: Any) -> list[Any]:
    """An activity_events row as the values the canonical encoding takes (jsonb parsed)."""
    values = list(row)
    for i in _JSON_POSITIONS:
        if values[i] is not None:
            values[i] = orjson.loads(values[i])
    return values


def _add(
    report: Report, kind: str, stream: str, shard: str, link: _Link, day: str, detail: str
) -> None:
    report.findings.append(
        Finding(kind, stream, shard, detail, link.link_no, link.first_text, link.last_text, day)
    )


async def _check_checkpoint(
    conn: Conn, report: Report, stream: str, shard: str, links: list[_Link]
) -> None:
    checkpoint = await conn.fetchval(
        "SELECT checkpoint FROM das.leases WHERE stream_name = $1 AND shard_id = $2",
        stream,
        shard,
    )
    batches = [link for link in links if link.kind == "batch"]
    end = batches[-1].last if batches else None
    if (
        isinstance(checkpoint, str)
        and checkpoint.isdigit()
        and (end is None or int(checkpoint) > end)
    ):
        report.findings.append(
            Finding(
                "truncated",
                stream,
                shard,
                f"the shard is checkpointed at {checkpoint} but its chain ends at {end}: "
                "the newest links were removed",
                first_sequence=str(end) if end is not None else None,
                last_sequence=checkpoint,
            )
        )


async def _check_anchors(
    report: Report,
    kms: Any | None,
    stream: str,
    shard: str,
    links: list[_Link],
    anchors: list[Anchor],
) -> None:
    if kms is None:
        return
    by_no = {link.link_no: link for link in links}
    last_good = 0
    for anchor in anchors:
        report.anchors_checked += 1
        if not await verify_anchor(kms, anchor):
            report.findings.append(
                Finding(
                    "anchor_invalid",
                    stream,
                    shard,
                    f"KMS rejects the anchor of link {anchor.link_no} (forged or altered)",
                    anchor.link_no,
                )
            )
            continue
        link = by_no.get(anchor.link_no)
        if link is None:
            report.findings.append(
                Finding(
                    "truncated",
                    stream,
                    shard,
                    f"link {anchor.link_no} was anchored but is gone: the chain was truncated",
                    anchor.link_no,
                )
            )
        elif link.link_hash != anchor.link_hash:
            report.findings.append(
                Finding(
                    "anchor_mismatch",
                    stream,
                    shard,
                    f"link {anchor.link_no} no longer has the anchored hash: "
                    "the chain was rewritten",
                    anchor.link_no,
                    link.first_text,
                    link.last_text,
                )
            )
        else:
            last_good = max(last_good, anchor.link_no)
    tail = [link for link in links if link.link_no > last_good]
    if tail:
        report.unanchored.append(
            {
                "stream": stream,
                "shard": shard,
                "first_link": tail[0].link_no,
                "last_link": tail[-1].link_no,
                "links": len(tail),
                "last_sequence": tail[-1].last_text,
            }
        )


async def _check_unchained(conn: Conn, report: Report) -> None:
    """Events of shards that have no chain at all."""
    rows = await conn.fetch(
        """
        SELECT e.shard_id, count(*) AS n, min(e.sequence_number)::text AS lo,
               max(e.sequence_number)::text AS hi
        FROM das.activity_events e
        WHERE NOT EXISTS (SELECT 1 FROM das.chain_links l WHERE l.shard_id = e.shard_id)
        GROUP BY e.shard_id
        """
    )
    for r in rows:
        report.findings.append(
            Finding(
                "inserted",
                "?",
                r["shard_id"],
                f"{r['n']} events of a shard without any chain",
                None,
                r["lo"],
                r["hi"],
            )
        )
