"""Aurora MySQL MAIN/AUX correlation: which stored records ``das.statements`` must merge (pure).

One MySQL statement produces a MAIN event (substatementId 1) and zero or more AUX events
(substatementId 2) sharing a statementId. They arrive in any order, possibly in different
records and batches. statementId restarts when the instance restarts and session ids repeat, so
the key is (cluster, instance, pid, session, statementId). Connection events (CONNECT,
DISCONNECT, FAILED_CONNECT: class MAIN, statementId 0) are not statements.

The warehouse does the correlation itself, from the events it stores: after a unit's events are
COPY'd, ``das.merge_statements(stream, shard, first, last)`` (a SECURITY DEFINER function, see
migrations/0005) merges the statement events of those records into ``das.statements``. So the
ingest role needs no privilege on that table, and nothing but stored events can shape it. The
decoder only says which records hold MySQL events: :class:`StatementRange`. Which of their
events are statements is decided by ``das.is_statement_event`` alone; the candidates here
(class MAIN or AUX) are a superset, so a record is never left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.decode.model import DecodedRecord


@dataclass(frozen=True, slots=True)
class StatementRange:
    """The records of shard ``shard_id`` with sequence numbers ``first``..``last`` hold MySQL
    statement events to merge into ``das.statements``."""

    shard_id: str
    first: str
    last: str


def has_statement_candidates(record: DecodedRecord) -> bool:
    """Whether the record holds any MySQL MAIN or AUX event."""
    return any(event.class_ in ("MAIN", "AUX") for event in record.events)


class StatementRangeBuilder:
    """Collects, over a batch of one shard, the records that hold MySQL events."""

    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self._first: int | None = None
        self._last: int | None = None
        self.records = 0

    def add(self, record: DecodedRecord, sequence_number: str) -> None:
        if not has_statement_candidates(record):
            return
        # Kinesis sequence numbers are decimal strings of up to 128 digits: compare as ints.
        number = int(sequence_number)
        if self._first is None or number < self._first:
            self._first = number
        if self._last is None or number > self._last:
            self._last = number
        self.records += 1

    def build(self) -> StatementRange | None:
        if self._first is None or self._last is None:
            return None
        return StatementRange(self.shard_id, str(self._first), str(self._last))
