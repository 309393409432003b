"""Shard checkpoints: a sequence number or one of the sentinels below (a pure leaf module).

A checkpoint is what a lease records as read and committed. Sequence numbers are decimal
strings (up to 128 bits, compared as integers); the sentinels name a position instead:
TRIM_HORIZON (the oldest record kept), LATEST (only what arrives from now on),
``AT_TIMESTAMP:<iso>`` (the first record at or after that time) and SHARD_END (a closed shard,
fully read: its children may start).
"""

from __future__ import annotations

TRIM_HORIZON = "TRIM_HORIZON"
LATEST = "LATEST"
SHARD_END = "SHARD_END"
AT_TIMESTAMP_PREFIX = "AT_TIMESTAMP:"
SENTINELS = (TRIM_HORIZON, LATEST, SHARD_END)


def is_sequence_number(checkpoint: str) -> bool:
    return checkpoint.isdigit()


def is_after(sequence_number: str, checkpoint: str) -> bool:
    """Whether a record lies after the checkpoint (sentinels: everything does)."""
    if not is_sequence_number(checkpoint):
        return True
    return int(sequence_number) > int(checkpoint)
