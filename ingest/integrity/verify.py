"""`das-ingest verify`: recompute every digest from the stored rows, walk the chains, check the
anchors through KMS, and say precisely what was altered, deleted, inserted or reordered.

Nothing stored in the database is trusted for the recomputation: not its functions, not the
links' own digests. Only whole UTC days that a believable das.retention_log record accounts
for may legitimately vanish (see :mod:`ingest.integrity.retained`).

A *routine* run (``routine=True`` with a pinned anchor key and a verify key) starts each chain
from the point a previous run recorded in das.verify_progress, once that claim is believed
(:mod:`ingest.integrity.progress`): it recomputes the links written since, the events stored
after the verified part, and a random sample of older links. A full run recomputes everything.
Either records how far it got when a chain verified clean up to a valid anchor.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import secrets
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import asyncpg
import orjson

from ingest.aws import error_code
from ingest.conn import Conn
from ingest.errors import ConfigError
from ingest.integrity.alerts import ANCHOR_SHARD, ANCHOR_STREAM, check_rows
from ingest.integrity.anchor import (
    Anchor,
    AnchorError,
    AnchorKey,
    KeyInfo,
    describe_anchor_key,
    load_anchors,
)
from ingest.integrity.canonical import (
    CHAIN_VERSION,
    EVENT_COLUMNS,
    ZERO_HASH,
    LinkFields,
    event_day,
    event_digest,
    link_hash,
)
from ingest.integrity.progress import VerifiedPoint, load_progress, record_progress
from ingest.integrity.retained import RetentionLedger, RetentionRecord, parse_day
from ingest.progress import Progress

#: Exit codes of `das-ingest verify`.
EXIT_CLEAN, EXIT_FINDINGS, EXIT_UNCHECKED = 0, 1, 3

#: Older links a routine run recomputes per chain, besides everything new.
DEFAULT_SAMPLE = 16

REBUILD_HINT = (
    "das.statements is derived from the chained events and not chained itself: once the "
    "events are restored or repaired, rebuild it with `das-ingest rebuild-statements`."
)


#: The alert chain among the anchors (ingest/integrity/alerts.py).
ALERT_CHAIN = (ANCHOR_STREAM, ANCHOR_SHARD)


@dataclass(frozen=True)
class Finding:
    #: altered | deleted | inserted | reordered | link_altered | chain_broken | links_missing
    #: | truncated | anchor_invalid | anchor_mismatch | anchor_missing | anchor_unexpected_key
    #: | anchor_unchecked | unanchored | dead_letter_missing | dead_letter_altered
    #: | retention_invalid | progress_invalid (docs/integrity.md) | alert_altered
    #: | alert_chain_broken (docs/policies.md)
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
    #: days retention removed after archiving them: day -> the manifests its record names
    archived_days: dict[str, list[str]] = field(default_factory=dict)
    anchors_skipped: bool = False
    #: the key every anchor must be made with (its ARN), or None: not pinned
    anchor_key: str | None = None
    #: "full", or "routine" (chains with a believed progress claim start from it)
    mode: str = "full"
    #: why a routine run was not possible (then every chain was verified in full)
    full_because: str | None = None
    #: chains verified from their recorded progress, and the older links sampled in them
    routine_chains: int = 0
    sampled_links: int = 0
    sample_seed: int | None = None
    #: chains whose progress this run recorded (stream, shard, link)
    progress_recorded: list[dict[str, Any]] = field(default_factory=list)
    #: why progress could not be recorded (KMS refused the verify key's GenerateMac)
    progress_error: str | None = None
    #: alerts whose chain was checked
    alerts: int = 0

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        """0 clean; 1 on any finding; 3 when the only findings are anchors KMS could not check
        (refused, unreachable): nothing was found, but the anchors prove nothing either."""
        if not self.findings:
            return EXIT_CLEAN
        if all(f.kind == "anchor_unchecked" for f in self.findings):
            return EXIT_UNCHECKED
        return EXIT_FINDINGS

    def as_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "chains": self.chains,
            "links": self.links,
            "events": self.events,
            "anchors_checked": self.anchors_checked,
            "anchors_skipped": self.anchors_skipped,
            "anchor_key": self.anchor_key,
            "mode": self.mode,
            "full_because": self.full_because,
            "routine_chains": self.routine_chains,
            "sampled_links": self.sampled_links,
            "sample_seed": self.sample_seed,
            "progress_recorded": self.progress_recorded,
            "progress_error": self.progress_error,
            "unanchored_tail": self.unanchored,
            "retained_days": self.retained_days,
            "archived_days": self.archived_days,
            "findings": [asdict(f) for f in self.findings],
            "hint": REBUILD_HINT if self.findings else None,
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
    version: int
    dead_letters: list[dict[str, str]]
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class _Tally:
    n: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    first_seq: int | None = None
    last_seq: int | None = None


#: What KMS answers when a MAC or signature does not verify (the others are refusals).
_REFUTED = ("KMSInvalidMacException", "KMSInvalidSignatureException")


class Signed(Protocol):
    """Something MACed or signed with a KMS key: an anchor, a progress claim."""

    @property
    def key_id(self) -> str: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def signature(self) -> bytes: ...
    def message(self) -> bytes: ...


@dataclass
class AnchorChecker:
    """Checks anchors through KMS. With ``expected_key`` (``verify --anchor-key-id``) the key is
    pinned: an anchor naming another key is not accepted, and every MAC or signature is checked
    with the expected key and its algorithm, never with what a row says."""

    kms: Any
    expected_key: str | None = None
    #: after this many KMS failures in a row, stop asking (each costs botocore's retries)
    give_up_after: int = 3
    _expected: KeyInfo | None = None
    _arns: dict[str, str | None] = field(default_factory=dict)
    _failures: int = 0
    _last_error: str = ""
    #: verdicts already given, by (message, signature): a routine run asks about its
    #: starting anchor twice
    _verdicts: dict[tuple[bytes, bytes], str] = field(default_factory=dict)

    async def prepare(self) -> KeyInfo | None:
        """Describe the expected key: AnchorError if KMS refuses (nothing can be checked)."""
        if self.expected_key is None:
            return None
        try:
            self._expected = await describe_anchor_key(self.kms, self.expected_key)
        except ConfigError as exc:
            raise AnchorError(str(exc)) from None
        return self._expected

    async def check(self, anchor: Signed) -> str:
        """One of "valid", "invalid" (KMS refutes it) or "unexpected_key"; AnchorError when
        KMS could not answer (refused, unreachable)."""
        memo = (anchor.message(), anchor.signature)
        if memo not in self._verdicts:
            self._verdicts[memo] = await self._check(anchor)
        return self._verdicts[memo]

    async def _check(self, anchor: Signed) -> str:
        if self._failures >= self.give_up_after:
            raise AnchorError(f"{self._last_error}; KMS not asked again")
        key_id, algorithm = anchor.key_id, anchor.algorithm
        if self._expected is not None:
            if not await self._is_expected(anchor.key_id):
                return "unexpected_key"
            if algorithm != self._expected.algorithm:
                return "unexpected_key"
            key_id = self._expected.arn
        try:
            if algorithm.startswith("HMAC_"):
                response = await self.kms.verify_mac(
                    KeyId=key_id, MacAlgorithm=algorithm, Message=anchor.message(),
                    Mac=anchor.signature,
                )  # fmt: skip
                valid = bool(response.get("MacValid"))
            else:
                response = await self.kms.verify(
                    KeyId=key_id,
                    SigningAlgorithm=algorithm,
                    Message=anchor.message(),
                    MessageType="RAW",
                    Signature=anchor.signature,
                )
                valid = bool(response.get("SignatureValid"))
        except Exception as exc:  # noqa: BLE001 - classified here
            if error_code(exc) in _REFUTED:
                self._failures = 0
                return "invalid"
            self._failures += 1
            self._last_error = (
                f"KMS could not check an anchor: {error_code(exc) or type(exc).__name__}"
            )
            raise AnchorError(self._last_error) from None
        self._failures = 0
        return "valid" if valid else "invalid"

    async def _is_expected(self, key_id: str) -> bool:
        assert self._expected is not None
        arn = self._expected.arn
        if key_id in (arn, self.expected_key, arn.rsplit("/", 1)[-1]):
            return True
        if key_id not in self._arns:
            try:
                meta = (await self.kms.describe_key(KeyId=key_id))["KeyMetadata"]
                self._arns[key_id] = str(meta.get("Arn"))
            except Exception:  # noqa: BLE001 - a key we may not describe is not the expected one
                self._arns[key_id] = None
        return self._arns[key_id] == arn


async def verify_warehouse(
    conn: Conn,
    *,
    kms: Any | None,
    stream: str | None = None,
    shards: list[str] | None = None,
    since: datetime | None = None,
    anchor_key_id: str | None = None,
    exported_anchors: list[Anchor] | None = None,
    max_unanchored_age: timedelta | None = None,
    retention_keep: timedelta | None = None,
    routine: bool = False,
    verify_key_id: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int | None = None,
    progress: Progress | None = None,
) -> Report:
    """Verify the chains (all, or of ``stream`` / ``shards``); ``progress`` counts chains.

    ``anchor_key_id`` pins the anchor key; with it, a chain whose unanchored tail is older than
    ``max_unanchored_age`` is a finding. ``exported_anchors`` (``anchor --export``) must all
    still be in the warehouse. ``retention_keep`` is the retention policy.

    ``verify_key_id`` (a KMS key only the auditors may MAC or sign with) lets this run record
    how far each clean chain was verified; with it and the pinned anchor key, ``routine`` starts
    each chain from its recorded, believed progress and recomputes only what is new plus
    ``sample`` older links per chain (chosen with ``seed``; random when None).
    """
    report = Report()
    now: datetime = await conn.fetchval("SELECT now()")
    retention = await RetentionLedger.load(conn, policy_keep=retention_keep, now=now)
    for record in retention.rejected:
        report.findings.append(
            Finding("retention_invalid", "-", "-", f"{record.describe()} is not believed: "
                    f"{record.problem}")
        )  # fmt: skip
    exported = [
        a
        for a in exported_anchors or []
        if (stream is None or a.stream_name == stream) and (shards is None or a.shard_id in shards)
    ]
    chains = {
        (r["stream_name"], r["shard_id"])
        for r in await conn.fetch(
            """
            SELECT DISTINCT stream_name, shard_id FROM das.chain_links
            WHERE ($1::text IS NULL OR stream_name = $1)
              AND ($2::text[] IS NULL OR shard_id = ANY ($2))
            UNION
            SELECT DISTINCT stream_name, shard_id FROM das.chain_anchors
            WHERE ($1::text IS NULL OR stream_name = $1)
              AND ($2::text[] IS NULL OR shard_id = ANY ($2))
            """,
            stream,
            shards,
        )
    } | {(a.stream_name, a.shard_id) for a in exported}
    chains.discard(ALERT_CHAIN)  # the alert chain's anchors: checked with the alerts
    stored_anchors = await load_anchors(conn, stream)
    anchors: dict[tuple[str, str], list[Anchor]] = defaultdict(list)
    for anchor in _merge_anchors(report, stored_anchors, exported):
        anchors[(anchor.stream_name, anchor.shard_id)].append(anchor)
    checker = await _prepare_checker(report, kms, anchor_key_id)
    keeper = await _prepare_keeper(report, kms, checker, anchor_key_id, verify_key_id, since)
    claims: dict[tuple[str, str], VerifiedPoint] = {}
    if routine and keeper is not None:
        report.mode = "routine"
        claims = await load_progress(conn, stream, shards)
    elif routine:
        report.full_because = report.full_because or "a routine run needs --anchor-key-id"
    report.sample_seed = seed if seed is not None else secrets.randbits(32)
    # Events stored before migration 0004 that it could not attribute to a stream.
    unattributed = bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM das.activity_events WHERE stream_name = '')"
        )
    )
    retained: set[str] = set()
    if progress is not None:
        progress.set_total(len(chains))
    for s, shard in sorted(chains):
        before = len(report.findings)
        chain_anchors = anchors.get((s, shard), [])
        claim = claims.get((s, shard))
        start = None
        if claim is not None and keeper is not None and checker is not None:
            start = await _believe(conn, report, keeper, checker, claim, chain_anchors)
        if start is None:
            scope = _Scope.full(await _links(conn, s, shard), since)
        else:
            picked = sampled_link_numbers(report.sample_seed, s, shard, start.link_no, sample)
            scope = await _routine_scope(conn, s, shard, start, picked)
            report.routine_chains += 1
            report.sampled_links += len(scope.sampled)
            chain_anchors = [a for a in chain_anchors if a.link_no >= start.link_no]
        links = scope.links
        report.chains += 1
        report.links += len(links)
        _check_links(report, s, shard, scope.walked, scope.after)
        _check_link_hashes(report, s, shard, scope.sampled)
        await _check_events(conn, report, s, shard, scope, retention, retained, unattributed)
        await _check_dead_letters(conn, report, s, shard, links)
        await _check_checkpoint(conn, report, s, shard, scope.end)
        last_good = 0
        if kms is not None:
            last_good = await _check_anchors(
                report,
                checker,
                s,
                shard,
                links,
                chain_anchors,
                now,
                max_unanchored_age if anchor_key_id else None,
            )
        if keeper is not None and len(report.findings) == before:
            await _record(conn, report, keeper, s, shard, scope, start, last_good)
        if progress is not None:
            progress.update()
    report.anchors_skipped = kms is None
    if stream is None and shards is None:
        await _check_unchained(conn, report)
        await _check_alerts(
            conn,
            report,
            checker if kms is not None else None,
            anchors.get(ALERT_CHAIN, []),
            now,
            max_unanchored_age if anchor_key_id else None,
        )
    report.retained_days = sorted(retained)
    return report


@dataclass
class _Scope:
    """What one chain's check covers: the links loaded, those walked link by link from a known
    predecessor, those sampled, the sequence ranges whose events are recomputed, and the
    links those events are held to."""

    links: list[_Link]
    walked: list[_Link]
    #: (link_no, link_hash) the walk starts after; (0, ZERO_HASH) from the chain's start
    after: tuple[int, bytes]
    checked: list[_Link]
    sampled: list[_Link]
    #: [first, last] (last None: no bound) sequence ranges whose events are recomputed
    ranges: list[tuple[int, int | None]]
    #: the last sequence number the chain's batches reach
    end: int | None

    @classmethod
    def full(cls, links: list[_Link], since: datetime | None) -> _Scope:
        checked = [link for link in links if since is None or link.created_at >= since]
        ranges: list[tuple[int, int | None]] = (
            [(min(link.first for link in checked), None)] if checked else []
        )
        batches = [link for link in links if link.kind == "batch"]
        end = batches[-1].last if batches else None
        return cls(links, links, (0, ZERO_HASH), checked, [], ranges, end)


async def _prepare_keeper(
    report: Report,
    kms: Any | None,
    checker: AnchorChecker | None,
    anchor_key_id: str | None,
    verify_key_id: str | None,
    since: datetime | None,
) -> _Keeper | None:
    """The verify key, when progress can be recorded and believed: it needs KMS, the pinned
    anchor key (a claim is held to a valid anchor) and a whole run (not --since)."""
    if verify_key_id is None:
        report.full_because = "no verify key (--verify-key-id): progress is not recorded"
        return None
    if kms is None or checker is None or anchor_key_id is None:
        report.full_because = "progress needs the anchors checked with the pinned anchor key"
        return None
    if since is not None:
        report.full_because = "--since selects links by time"
        return None
    keeper = _Keeper(AnchorKey(kms, verify_key_id), AnchorChecker(kms, verify_key_id))
    try:
        await keeper.checker.prepare()
    except AnchorError as exc:
        report.full_because = f"the verify key cannot be used: {exc}"
        return None
    return keeper


@dataclass
class _Keeper:
    key: AnchorKey
    checker: AnchorChecker


async def _believe(
    conn: Conn,
    report: Report,
    keeper: _Keeper,
    checker: AnchorChecker,
    claim: VerifiedPoint,
    anchors: list[Anchor],
) -> VerifiedPoint | None:
    """The claim, if its MAC checks out with the verify key and a valid anchor still vouches for
    the link it names with the hash it names; else a finding (or, when KMS cannot answer, a
    full run) and None."""

    def invalid(detail: str) -> None:
        report.findings.append(
            Finding("progress_invalid", claim.stream_name, claim.shard_id,
                    f"the recorded verify progress (link {claim.link_no}, "
                    f"{claim.verified_at.isoformat()}) {detail}: verified in full",
                    claim.link_no)
        )  # fmt: skip

    try:
        verdict = await keeper.checker.check(claim)
        if verdict != "valid":
            invalid("is not MACed with the verify key (forged or altered)")
            return None
        stored = await conn.fetchval(
            "SELECT link_hash FROM das.chain_links "
            "WHERE stream_name = $1 AND shard_id = $2 AND link_no = $3",
            claim.stream_name,
            claim.shard_id,
            claim.link_no,
        )
        if stored is None or bytes(stored) != claim.link_hash:
            invalid(f"names link {claim.link_no} with a hash it no longer has")
            return None
        for anchor in anchors:
            if (
                anchor.link_no == claim.link_no
                and anchor.link_hash == claim.link_hash
                and await checker.check(anchor) == "valid"
            ):
                return claim
        invalid(f"names link {claim.link_no}, which no valid anchor vouches for")
    except AnchorError:
        pass  # KMS cannot answer now: the anchors' check reports it; verify in full
    return None


def sampled_link_numbers(seed: int, stream: str, shard: str, up_to: int, n: int) -> list[int]:
    """The ``n`` links among 1..``up_to`` a routine run with ``seed`` recomputes in a chain."""
    # Reproducible from the reported seed; unpredictable (secrets) unless one is given.
    rng = random.Random(f"{seed}/{stream}/{shard}")  # noqa: S311
    return sorted(rng.sample(range(1, up_to + 1), min(n, up_to)))


async def _routine_scope(
    conn: Conn, stream: str, shard: str, start: VerifiedPoint, picked: list[int]
) -> _Scope:
    """From the believed progress: the links after it, every redrive link (they cover sequence
    numbers inside batches), the batches the new redrives fall in, and the ``picked`` older
    links."""
    verified_end = int(start.last_sequence)
    newer = await _links(conn, stream, shard, after=start.link_no - 1)
    extra = await _links(conn, stream, shard, numbers=picked, redrives=True)
    new_redrives = [x for x in newer if x.kind == "redrive" and x.link_no > start.link_no]
    if new_redrives:
        extra += await _links(
            conn, stream, shard, covering=[x.first_text for x in new_redrives if
                                           x.first <= verified_end]
        )  # fmt: skip
    by_no = {x.link_no: x for x in [*extra, *newer]}
    links = [by_no[n] for n in sorted(by_no)]
    walked = [x for x in newer if x.link_no > start.link_no]
    sampled = [by_no[n] for n in picked if n in by_no]
    ranges: list[tuple[int, int | None]] = [(verified_end + 1, None)]
    ranges += [(x.first, x.last) for x in sampled]
    ranges += [(x.first, x.first) for x in new_redrives]
    batches = [x.last for x in walked if x.kind == "batch"]
    end = max([verified_end, *batches])
    checked = sorted({x.link_no: x for x in [*walked, *sampled]}.values(), key=lambda x: x.link_no)
    return _Scope(links, walked, (start.link_no, start.link_hash), checked, sampled, ranges, end)


async def _record(
    conn: Conn,
    report: Report,
    keeper: _Keeper,
    stream: str,
    shard: str,
    scope: _Scope,
    start: VerifiedPoint | None,
    last_good: int,
) -> None:
    """Record that the chain verified clean up to its newest valid anchor."""
    if last_good == 0 or (start is not None and last_good <= start.link_no):
        return
    by_no = {x.link_no: x for x in scope.links}
    link = by_no.get(last_good)
    if link is None:
        return
    lasts = [x.last for x in scope.walked if x.kind == "batch" and x.link_no <= last_good]
    if start is not None:
        lasts.append(int(start.last_sequence))
    try:
        progress = await record_progress(
            conn, keeper.key, stream, shard, last_good, link.link_hash, str(max(lasts, default=0))
        )
    except AnchorError as exc:
        report.progress_error = str(exc)
        return
    except asyncpg.InsufficientPrivilegeError:
        report.progress_error = (
            "this login may not write das.verify_progress (grant it das_verifier)"
        )
        return
    report.progress_recorded.append(
        {"stream": stream, "shard": shard, "link": progress.link_no,
         "last_sequence": progress.last_sequence}
    )  # fmt: skip


async def _check_alerts(
    conn: Conn,
    report: Report,
    checker: AnchorChecker | None,
    anchors: list[Anchor],
    now: datetime,
    max_age: timedelta | None,
) -> None:
    """The alert chain (migrations/0016, ingest/integrity/alerts.py), when the warehouse has
    one: every alert's hash and link, then its anchors (``checker`` None: KMS not asked) as a
    shard chain's, an alert being a link (its id the link number)."""
    if not await conn.fetchval("SELECT to_regclass('das.alerts') IS NOT NULL"):
        return
    rows = await conn.fetch("SELECT *, events::text AS events FROM das.alerts ORDER BY id")
    report.alerts = len(rows)
    for alert_id, kind, detail in check_rows(rows):
        report.findings.append(Finding(kind, "-", "-", f"alert {alert_id}: {detail}"))
    if checker is None:
        return
    links = [
        _Link(
            r["id"], "alert", r["id"], r["id"], str(r["id"]), str(r["id"]), 1, {},
            bytes(r["prev_hash"]), bytes(r["alert_hash"]), r["created_at"], CHAIN_VERSION, [],
        )
        for r in rows
    ]  # fmt: skip
    await _check_anchors(report, checker, *ALERT_CHAIN, links, anchors, now, max_age)


def _merge_anchors(report: Report, stored: list[Anchor], exported: list[Anchor]) -> list[Anchor]:
    """The warehouse's anchors plus exported ones it lost; each lost one is a finding."""
    have = {a.identity for a in stored}
    merged = list(stored)
    for anchor in exported:
        if anchor.identity in have:
            continue
        have.add(anchor.identity)
        merged.append(anchor)
        report.findings.append(
            Finding(
                "anchor_missing",
                anchor.stream_name,
                anchor.shard_id,
                f"the anchor of link {anchor.link_no} made at {anchor.anchored_at.isoformat()} "
                "is in the exported anchors but no longer in das.chain_anchors (deleted)",
                anchor.link_no,
            )
        )
    return sorted(merged, key=lambda a: (a.stream_name, a.shard_id, a.link_no))


async def _prepare_checker(
    report: Report, kms: Any | None, anchor_key_id: str | None
) -> AnchorChecker | None:
    if kms is None:
        return None
    checker = AnchorChecker(kms, anchor_key_id)
    try:
        info = await checker.prepare()
    except AnchorError as exc:
        report.findings.append(
            Finding("anchor_unchecked", "-", "-", f"no anchor could be checked: {exc}")
        )
        return None
    report.anchor_key = info.arn if info is not None else None
    return checker


async def _links(
    conn: Conn,
    stream: str,
    shard: str,
    *,
    after: int | None = None,
    numbers: list[int] | None = None,
    redrives: bool = False,
    covering: list[str] | None = None,
) -> list[_Link]:
    """All of the chain's links; or those after link ``after``; or those numbered ``numbers``
    (and, with ``redrives``, every redrive link); or the batches covering ``covering``."""
    where = ""
    if after is not None:
        where = "AND link_no > $3"
    elif numbers is not None:
        where = "AND (link_no = ANY ($3::bigint[]) OR ($4 AND kind = 'redrive'))"
    elif covering is not None:
        where = (
            "AND kind = 'batch' AND EXISTS (SELECT 1 FROM unnest($3::numeric[]) AS c (seq) "
            "WHERE c.seq BETWEEN first_sequence AND last_sequence)"
        )
    arguments: list[Any] = [stream, shard]
    if after is not None:
        arguments.append(after)
    elif numbers is not None:
        arguments += [numbers, redrives]
    elif covering is not None:
        arguments.append(covering)
    rows = await conn.fetch(
        f"""
        SELECT link_no, kind, first_sequence::text AS first_text, last_sequence::text AS last_text,
               event_count, days::text AS days_text, prev_hash, link_hash, created_at, version,
               dead_letters::text AS letters_text, dropped::text AS dropped_text
        FROM das.chain_links WHERE stream_name = $1 AND shard_id = $2 {where} ORDER BY link_no
        """,
        *arguments,
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
            version=r["version"],
            dead_letters=orjson.loads(r["letters_text"]),
            dropped=orjson.loads(r["dropped_text"]),
        )
        for r in rows
    ]


def _check_links(
    report: Report,
    stream: str,
    shard: str,
    links: list[_Link],
    after: tuple[int, bytes] = (0, ZERO_HASH),
) -> None:
    """The links, one after another from ``after`` (link number and hash of the link before
    the first: (0, zero hash) from the chain's start)."""
    previous_no, previous_hash = after
    last_batch: _Link | None = None
    for link in links:

        def finding(kind: str, detail: str, link: _Link = link) -> None:
            report.findings.append(
                Finding(kind, stream, shard, detail, link.link_no, link.first_text, link.last_text)
            )

        expected_no = previous_no + 1
        if link.link_no != expected_no:
            finding("links_missing", f"links {expected_no}..{link.link_no - 1} are missing")
        fields = LinkFields(
            stream=stream,
            shard=shard,
            link_no=link.link_no,
            kind=link.kind,
            first_sequence=link.first_text,
            last_sequence=link.last_text,
            event_count=link.event_count,
            days=link.days,
            created_at=link.created_at,
            dead_letters=link.dead_letters,
            dropped=link.dropped,
            version=link.version,
        )
        if link_hash(link.prev_hash, fields) != link.link_hash:
            finding("link_altered", "the link's fields do not hash to its stored link_hash")
        if link.prev_hash != previous_hash:
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
        previous_no, previous_hash = link.link_no, link.link_hash


def _check_link_hashes(report: Report, stream: str, shard: str, links: list[_Link]) -> None:
    """Sampled older links, each on its own: its fields hash to its link_hash and its days add
    up (its place in the chain was verified by the run that recorded the progress)."""
    for link in links:
        fields = LinkFields(
            stream=stream,
            shard=shard,
            link_no=link.link_no,
            kind=link.kind,
            first_sequence=link.first_text,
            last_sequence=link.last_text,
            event_count=link.event_count,
            days=link.days,
            created_at=link.created_at,
            dead_letters=link.dead_letters,
            version=link.version,
        )
        declared = sum(int(d.get("n", 0)) for d in link.days.values())
        if link_hash(link.prev_hash, fields) != link.link_hash or declared != link.event_count:
            report.findings.append(
                Finding("link_altered", stream, shard,
                        "the link's fields do not hash to its stored link_hash (sampled)",
                        link.link_no, link.first_text, link.last_text)
            )  # fmt: skip


class _Coverage:
    """Which link covers a sequence number of the shard (a redrive link before a batch)."""

    def __init__(self, links: list[_Link]) -> None:
        self.redrives = {link.first: link for link in links if link.kind == "redrive"}
        self.batches = sorted((x for x in links if x.kind == "batch"), key=lambda x: x.first)
        self._starts = [b.first for b in self.batches]

    def batch(self, seq: int) -> _Link | None:
        i = bisect.bisect_right(self._starts, seq) - 1
        found = self.batches[i] if i >= 0 else None
        return found if found is not None and found.first <= seq <= found.last else None

    def link(self, seq: int) -> _Link | None:
        return self.redrives.get(seq) or self.batch(seq)


async def _check_events(
    conn: Conn,
    report: Report,
    stream: str,
    shard: str,
    scope: _Scope,
    retention: RetentionLedger,
    retained: set[str],
    unattributed: bool,
) -> None:
    checked = scope.checked
    if not scope.ranges:
        return
    coverage = _Coverage(scope.links)
    tallies: dict[tuple[int, str], _Tally] = defaultdict(_Tally)
    outside: list[int] = []
    # One stream's events come in index order; unattributed ones ('') join them only when
    # there are any (the IN list would cost a sort of the whole chain).
    streams = "stream_name IN ($1, '')" if unattributed else "stream_name = $1"
    async with conn.transaction():
        for low, high in _merged(scope.ranges):
            cursor = conn.cursor(
                f"""
                SELECT {", ".join(EVENT_COLUMNS)}
                FROM das.activity_events
                WHERE {streams} AND shard_id = $2 AND sequence_number >= $3::numeric
                  AND ($4::numeric IS NULL OR sequence_number <= $4::numeric)
                ORDER BY sequence_number, event_index, stream_name
                """,
                stream,
                shard,
                str(low),
                None if high is None else str(high),
                prefetch=2000,
            )
            async for row in cursor:
                report.events += 1
                seq = int(row["sequence_number"])
                link = coverage.link(seq)
                if link is None:
                    outside.append(seq)
                    continue
                digest = event_digest(stored_values(row), link.version)
                tally = tallies[(link.link_no, event_day(row["log_time"]))]
                tally.n += 1
                tally.digest.update(digest)
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
    claims = _retention_claims(checked, tallies, retention)
    checked_nos = {link.link_no for link in checked}
    for link in checked:
        for day, stored in link.days.items():
            found = tallies.pop((link.link_no, day), None)
            n = int(stored.get("n", 0))
            record, doubt = claims.get((link.link_no, day), (None, None))
            if record is not None and doubt is None:
                retained.add(day)
                if record.archive is not None:
                    report.archived_days[day] = sorted(
                        {*report.archived_days.get(day, ()), *record.archived_at(day)}
                    )
                if found is not None:
                    _add(report, "inserted", stream, shard, link, day,
                         f"{found.n} events on {day}, which retention removed")  # fmt: skip
                continue
            if found is None:
                why = (
                    f"{record.describe()} does not account for them: {doubt}"
                    if record is not None
                    else "a dropped partition, or deleted rows, with no retention record"
                )
                _add(report, "deleted", stream, shard, link, day,
                     f"all {n} events of {day} are missing ({why})")  # fmt: skip
            elif found.n < n:
                _add(report, "deleted", stream, shard, link, day,
                     f"{n - found.n} of {n} events of {day} are missing")  # fmt: skip
            elif found.n > n:
                _add(report, "inserted", stream, shard, link, day,
                     f"{found.n - n} events of {day} were added")  # fmt: skip
            elif found.digest.hexdigest() != stored.get("sha256"):
                _add(report, "altered", stream, shard, link, day,
                     f"the {n} events of {day} hash differently: a stored value was changed "
                     f"(sequence numbers {found.first_seq}..{found.last_seq})")  # fmt: skip
    for (link_no, day), found in tallies.items():
        if link_no in checked_nos:
            link = next(x for x in checked if x.link_no == link_no)
            _add(report, "inserted", stream, shard, link, day,
                 f"{found.n} events of {day} that the link does not list")  # fmt: skip


def _merged(ranges: list[tuple[int, int | None]]) -> list[tuple[int, int | None]]:
    """Sequence ranges, overlapping ones joined, in order (an end of None: unbounded)."""
    merged: list[tuple[int, int | None]] = []
    for low, high in sorted(ranges):
        if merged:
            last_low, last_high = merged[-1]
            if last_high is None or low <= last_high + 1:
                if last_high is not None and (high is None or high > last_high):
                    merged[-1] = (last_low, high)
                continue
        merged.append((low, high))
    return merged


def _retention_claims(
    checked: list[_Link], tallies: dict[tuple[int, str], _Tally], retention: RetentionLedger
) -> dict[tuple[int, str], tuple[RetentionRecord, str | None]]:
    """For each (link, day) a retention record claims: the record, and why it does not
    account for the day (None: it does).

    Besides the record's own problems, retention's order: it removes a day with every older
    day. A day is not retained while an older day of the chain still has events that were
    written before the record (later ones arrived after that retention ran).
    """
    claims: dict[tuple[int, str], tuple[RetentionRecord, str | None]] = {}
    present: list[tuple[datetime, str]] = []
    for link in checked:
        for day in link.days:
            record = retention.claim(day, link.created_at)
            if record is not None:
                claims[(link.link_no, day)] = (record, record.problem)
            elif parse_day(day) is not None and (link.link_no, day) in tallies:
                present.append((link.created_at, day))
    if not claims or not present:
        return claims
    # The oldest day still present among links written up to each moment.
    present.sort()
    times = [t for t, _ in present]
    oldest: list[str] = []
    for _, day in present:
        oldest.append(day if not oldest or day < oldest[-1] else oldest[-1])
    for key, (record, problem) in claims.items():
        if problem is not None:
            continue
        i = bisect.bisect_left(times, record.removed_at)
        if i and oldest[i - 1] < key[1]:
            claims[key] = (
                record,
                f"the older day {oldest[i - 1]} still has events written before it "
                "(retention removes the oldest days first)",
            )
    return claims


async def _check_dead_letters(
    conn: Conn, report: Report, stream: str, shard: str, links: list[_Link]
) -> None:
    """Every record a (version 2) batch link lists as dead-lettered is still in das.dead_letters
    with the same bytes, or was re-driven (a redrive link names it with the same digest)."""
    if not any(link.version >= 2 for link in links):
        return
    kept: dict[str, str] = {}
    async with conn.transaction():  # a cursor: dead letters can be many, and large
        async for r in conn.cursor(
            "SELECT sequence_number::text AS seq, raw FROM das.dead_letters "
            "WHERE stream_name = $1 AND shard_id = $2",
            stream,
            shard,
            prefetch=100,
        ):
            kept[r["seq"]] = hashlib.sha256(bytes(r["raw"])).hexdigest()
    listed: dict[str, tuple[_Link, str]] = {}
    redriven: dict[str, set[str]] = defaultdict(set)
    for link in links:
        for entry in link.dead_letters:
            seq, digest = str(entry.get("sequence_number")), str(entry.get("sha256"))
            if link.kind == "batch":
                listed[seq] = (link, digest)
            else:
                redriven[seq].add(digest)

    def finding(kind: str, link: _Link, seq: str, detail: str) -> None:
        report.findings.append(Finding(kind, stream, shard, detail, link.link_no, seq, seq))

    for seq, (link, digest) in listed.items():
        if kept.get(seq) == digest or digest in redriven.get(seq, ()):
            continue
        if seq in kept:
            finding("dead_letter_altered", link, seq,
                    f"the dead letter of record {seq} no longer has the bytes the link "
                    "recorded")  # fmt: skip
        else:
            finding("dead_letter_missing", link, seq,
                    f"record {seq} was dead-lettered, but its dead letter is gone and no "
                    "re-drive stored it")  # fmt: skip
    coverage = _Coverage(links)
    for seq in kept.keys() - listed.keys():
        batch = coverage.batch(int(seq))
        if batch is not None and batch.version >= 2:
            finding("inserted", batch, seq,
                    f"a dead letter for record {seq} that its link does not list")  # fmt: skip
    for link in links:
        if link.kind != "redrive" or link.version < 2:
            continue
        batch = coverage.batch(link.first)
        if batch is None or batch.version < 2:
            continue
        was = listed.get(link.first_text)
        if was is None or was[1] not in redriven.get(link.first_text, ()):
            finding("inserted", link, link.first_text,
                    f"a re-drive of record {link.first_text}, which no batch dead-lettered with "
                    "these bytes")  # fmt: skip


_JSON_POSITIONS = tuple(
    i
    for i, column in enumerate(EVENT_COLUMNS)
    if column in ("param_list", "extra", "engine_native_audit_fields", "times_as_sent")
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
    conn: Conn, report: Report, stream: str, shard: str, end: int | None
) -> None:
    """The chain reaches what the lease says was read: the checkpoint of an open shard, the
    last sequence number of a closed one."""
    lease = await conn.fetchrow(
        "SELECT checkpoint, end_sequence::text AS end_sequence FROM das.leases "
        "WHERE stream_name = $1 AND shard_id = $2",
        stream,
        shard,
    )
    if lease is None:
        return
    checkpoint = lease["checkpoint"]
    if checkpoint == "SHARD_END":
        reached, what = lease["end_sequence"], "closed, its last record being"
    else:
        reached, what = checkpoint, "checkpointed at"
    if isinstance(reached, str) and reached.isdigit() and (end is None or int(reached) > end):
        report.findings.append(
            Finding(
                "truncated",
                stream,
                shard,
                f"the shard is {what} {reached} but its chain ends at {end}: "
                "the newest links were removed",
                first_sequence=str(end) if end is not None else None,
                last_sequence=reached,
            )
        )


async def _check_anchors(
    report: Report,
    checker: AnchorChecker | None,
    stream: str,
    shard: str,
    links: list[_Link],
    anchors: list[Anchor],
    now: datetime,
    max_age: timedelta | None,
) -> int:
    """Check the chain's anchors; returns the newest link a valid anchor vouches for (0:
    none)."""
    if checker is None:
        return 0  # KMS refused the expected key: reported once, nothing here can be checked
    by_no = {link.link_no: link for link in links}
    last_good = 0
    unchecked: list[str] = []

    def finding(kind: str, anchor: Anchor, detail: str, link: _Link | None = None) -> None:
        report.findings.append(
            Finding(kind, stream, shard, detail, anchor.link_no,
                    link.first_text if link else None, link.last_text if link else None)
        )  # fmt: skip

    for anchor in anchors:
        report.anchors_checked += 1
        try:
            verdict = await checker.check(anchor)
        except AnchorError as exc:
            unchecked.append(str(exc))
            continue
        link = by_no.get(anchor.link_no)
        if verdict == "unexpected_key":
            finding("anchor_unexpected_key", anchor,
                    f"the anchor of link {anchor.link_no} was made with an unexpected key "
                    f"({anchor.key_id}, {anchor.algorithm}), not {report.anchor_key}")  # fmt: skip
        elif verdict == "invalid":
            finding(
                "anchor_invalid",
                anchor,
                f"KMS rejects the anchor of link {anchor.link_no} (forged or altered)",
            )
        elif link is None:
            finding(
                "truncated",
                anchor,
                f"link {anchor.link_no} was anchored but is gone: the chain was truncated",
            )
        elif link.link_hash != anchor.link_hash:
            finding("anchor_mismatch", anchor,
                    f"link {anchor.link_no} no longer has the anchored hash: the chain was "
                    "rewritten", link)  # fmt: skip
        else:
            last_good = max(last_good, anchor.link_no)
    if unchecked:
        report.findings.append(
            Finding("anchor_unchecked", stream, shard,
                    f"KMS could not check {len(unchecked)} anchors ({unchecked[0]})")
        )  # fmt: skip
    tail = [link for link in links if link.link_no > last_good]
    if unchecked:
        last_good = 0  # not a point to record progress at
    if not tail:
        return last_good
    report.unanchored.append(
        {
            "stream": stream,
            "shard": shard,
            "first_link": tail[0].link_no,
            "last_link": tail[-1].link_no,
            "links": len(tail),
            "last_sequence": tail[-1].last_text,
            "since": tail[0].created_at.isoformat(),
        }
    )
    age = now - tail[0].created_at
    if max_age is not None and not unchecked and age > max_age:
        report.findings.append(
            Finding(
                "unanchored",
                stream,
                shard,
                f"links {tail[0].link_no}..{tail[-1].link_no} have not been anchored for "
                f"{age.total_seconds():.0f} s (allowed: {max_age.total_seconds():.0f} s): "
                "anchors were deleted, or anchoring stopped",
                tail[0].link_no,
                tail[0].first_text,
                tail[-1].last_text,
            )
        )
    return last_good


# The distinct (stream, shard) pairs of the events, one index probe per pair and partition (a
# skip scan of the provenance index), not a scan of the table: its cost does not grow with the
# number of events.
_PAIRS = """
WITH RECURSIVE pairs (stream_name, shard_id) AS (
    (SELECT stream_name, shard_id FROM das.activity_events
     ORDER BY stream_name, shard_id LIMIT 1)
    UNION ALL
    SELECT n.stream_name, n.shard_id FROM pairs p CROSS JOIN LATERAL (
        SELECT e.stream_name, e.shard_id FROM das.activity_events e
        WHERE (e.stream_name, e.shard_id) > (p.stream_name, p.shard_id)
        ORDER BY e.stream_name, e.shard_id LIMIT 1
    ) AS n
)
SELECT p.stream_name, p.shard_id FROM pairs p
WHERE NOT EXISTS (SELECT 1 FROM das.chain_links l
                  WHERE l.shard_id = p.shard_id
                    AND (l.stream_name = p.stream_name OR p.stream_name = ''))
"""


async def _check_unchained(conn: Conn, report: Report) -> None:
    """Events of (stream, shard) pairs that have no chain at all."""
    rows = [
        await conn.fetchrow(
            """
            SELECT stream_name, shard_id, count(*) AS n, min(sequence_number)::text AS lo,
                   max(sequence_number)::text AS hi
            FROM das.activity_events WHERE stream_name = $1 AND shard_id = $2
            GROUP BY stream_name, shard_id
            """,
            pair["stream_name"],
            pair["shard_id"],
        )
        for pair in await conn.fetch(_PAIRS)
    ]
    for r in rows:
        assert r is not None  # the pair came from these events
        report.findings.append(
            Finding(
                "inserted",
                r["stream_name"] or "?",
                r["shard_id"],
                f"{r['n']} events of a shard without any chain",
                None,
                r["lo"],
                r["hi"],
            )
        )
