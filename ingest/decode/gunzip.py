"""Gunzip with a cap on the output, so a small hostile record cannot exhaust memory."""

from __future__ import annotations

import zlib

from ingest.errors import DecompressError

#: A Kinesis record holds at most 1 MiB; DAS JSON compresses roughly 10-30x. 64 MiB is far above
#: anything Aurora produces and far below what would hurt a worker.
DEFAULT_MAX_DECOMPRESSED = 64 * 1024 * 1024

_GZIP = 16 + zlib.MAX_WBITS


def gunzip(data: bytes, max_size: int = DEFAULT_MAX_DECOMPRESSED) -> bytes:
    if data[:2] != b"\x1f\x8b":
        raise DecompressError(
            "decrypted payload is not gzip (bad magic bytes)",
            hint="the payload decrypted but is not a DAS event list",
        )
    inflater = zlib.decompressobj(_GZIP)
    try:
        out = inflater.decompress(data, max_size)
        if inflater.unconsumed_tail:
            raise DecompressError(
                f"decompressed payload exceeds the {max_size} byte cap (gzip bomb?)"
            )
        out += inflater.flush()
    except zlib.error as exc:
        raise DecompressError(f"corrupt gzip stream ({exc})") from None
    if not inflater.eof:
        raise DecompressError("truncated gzip stream")
    if len(out) > max_size:
        raise DecompressError(f"decompressed payload exceeds the {max_size} byte cap (gzip bomb?)")
    # Concatenated gzip members are legal gzip; Aurora writes one, so trailing data is an error.
    if inflater.unused_data:
        raise DecompressError(
            f"{len(inflater.unused_data)} bytes of trailing data after the gzip stream"
        )
    return out
