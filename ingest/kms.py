"""KMS Decrypt of DAS data keys, cached.

Aurora reuses one encrypted data key across many records. We cache the plaintext by a digest of
the encrypted blob and the encryption context (bounded LRU with a TTL), and concurrent misses for
one blob share a single KMS call.

Permanent refusals (wrong context, wrong or disabled key, a blob that is not a KMS ciphertext)
are remembered too, in their own bounded LRU with a TTL (``negative_ttl_seconds``): a misconfigured
stream (a wrong ``--resource-id``) costs one KMS call per distinct data key, not one per record.
The first refusal of a data key is logged once, with its likely cause; the records themselves
are still dead-lettered one by one (stage ``kms``), so nothing is lost and a re-drive after the
fix decrypts them (a new worker, or the TTL past, asks KMS again).

Plaintext keys live only in this cache and in the process pool's arguments; they are never
logged, and ``repr`` of the cache shows counts only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ingest.aws import error_code
from ingest.errors import KmsError, KmsUnavailableError

log = logging.getLogger("ingest")
#: Logged once per refused data key (and context), with the likely cause.
REFUSAL_MESSAGE = (
    "KMS refused a data key: its records are dead-lettered (stage kms) without asking KMS again "
    "for a while; fix the cause, then re-drive them"
)

#: The encryption context key RDS binds a stream's data keys to: Aurora clusters
#: (``cluster-…`` resource ids, DbClusterResourceId) and RDS DB instances (``db-…``,
#: DbiResourceId: RDS for Oracle and RDS for SQL Server).
CLUSTER_CONTEXT_KEY = "aws:rds:dbc-id"
INSTANCE_CONTEXT_KEY = "aws:rds:db-id"
#: Before instances were known, the one key; kept for callers that name it.
CONTEXT_KEY = CLUSTER_CONTEXT_KEY
STREAM_PREFIX = "aws-rds-das-"

# Error codes KMS uses for a request that may succeed if simply repeated.
TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMSInternalException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "DependencyTimeoutException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

HINTS: dict[str, str] = {
    "InvalidCiphertextException": (
        "KMS cannot decrypt this data key with this encryption context: check the resource id "
        "(--resource-id; it is the stream name without 'aws-rds-das-'; an Aurora cluster's "
        "cluster-... id goes under aws:rds:dbc-id, an RDS instance's db-... id under "
        "aws:rds:db-id) and that the record is from this cluster or instance"
    ),
    "IncorrectKeyException": "the data key was encrypted under a different KMS key",
    "AccessDeniedException": (
        "not allowed to call kms:Decrypt on the stream's KMS key: check the IAM and key policy, "
        "including any kms:EncryptionContext condition on the resource id"
    ),
    "NotFoundException": "the KMS key that encrypted the data key does not exist",
    "DisabledException": "the KMS key that encrypted the data key is disabled",
    "KMSInvalidStateException": "the KMS key is not usable (pending deletion or import?)",
}


def resource_id_from_stream(stream_name: str) -> str:
    """``aws-rds-das-cluster-ABC`` -> ``cluster-ABC`` (the encryption context value)."""
    if stream_name.startswith(STREAM_PREFIX) and len(stream_name) > len(STREAM_PREFIX):
        return stream_name[len(STREAM_PREFIX) :]
    return stream_name


def context_key(resource_id: str) -> str:
    """The encryption context key for a resource id: ``aws:rds:db-id`` for an RDS DB instance
    (``db-…``), ``aws:rds:dbc-id`` for an Aurora cluster (``cluster-…``) and anything else."""
    return INSTANCE_CONTEXT_KEY if resource_id.startswith("db-") else CLUSTER_CONTEXT_KEY


def encryption_context(resource_id: str) -> dict[str, str]:
    """``{"aws:rds:dbc-id": "cluster-…"}`` or ``{"aws:rds:db-id": "db-…"}``, as RDS encrypts
    the stream's data keys."""
    return {context_key(resource_id): resource_id}


def classify(exc: BaseException) -> KmsError:
    """Map a botocore / network exception from KMS Decrypt to our error classes."""
    code = error_code(exc)
    if code is None:
        # No AWS error code: the request never got an answer (connection refused or reset,
        # timeout, DNS). That is transient by definition.
        return KmsUnavailableError(f"KMS unreachable ({type(exc).__name__})")
    if code in TRANSIENT_CODES or _is_server_error(exc):
        return KmsUnavailableError(f"KMS {code}")
    return KmsError(f"KMS Decrypt refused: {code}", hint=HINTS.get(code))


def _is_server_error(exc: BaseException) -> bool:
    response: Any = getattr(exc, "response", None)
    status = (response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return isinstance(status, int) and status >= 500


@dataclass
class CacheStats:
    calls: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    #: KMS calls refused for good (each remembered for its data key and context)
    refused: int = 0
    #: records refused from memory, without a KMS call
    refused_cached: int = 0


class DataKeyCache:
    """Plaintext DAS data keys by digest of (encrypted blob, encryption context)."""

    def __init__(
        self,
        kms_client: Any,
        *,
        max_entries: int = 4096,
        ttl_seconds: float = 3600.0,
        max_refused: int = 1024,
        negative_ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kms = kms_client
        self._max_entries = max_entries
        self._ttl = ttl_seconds
        self._max_refused = max_refused
        self._negative_ttl = negative_ttl_seconds
        self._clock = clock
        self._keys: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._refused: OrderedDict[bytes, tuple[KmsError, float]] = OrderedDict()
        #: data keys whose refusal was logged (32-byte digests, bounded by max_entries and
        #: outliving the refusal's TTL: a key refused again later is not logged again)
        self._logged: OrderedDict[bytes, None] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return f"DataKeyCache(entries={len(self._keys)}, stats={self.stats})"

    @staticmethod
    def digest(blob: bytes, context: Mapping[str, str]) -> bytes:
        h = hashlib.sha256()
        h.update(len(blob).to_bytes(4, "big"))
        h.update(blob)
        for key in sorted(context):
            for part in (key, context[key]):
                encoded = part.encode()
                h.update(len(encoded).to_bytes(4, "big"))
                h.update(encoded)
        return h.digest()

    async def get(self, blob: bytes, context: Mapping[str, str], *, uses: int = 1) -> bytes:
        """The plaintext data key. Raises KmsError (permanent) or KmsUnavailableError.

        ``uses``: how many records the answer serves (the consumer looks a key up once for all
        of a chunk's records under it); the statistics count per record, as if each had asked:
        at most one of them is a miss, the others are hits (or refusals from memory)."""
        digest = self.digest(blob, context)
        now = self._clock()
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > now:
            self._keys.move_to_end(digest)
            self.stats.hits += uses
            return cached[0]
        refused = self._refused.get(digest)
        if refused is not None and refused[1] > now:
            self._refused.move_to_end(digest)
            self.stats.refused_cached += uses
            raise _copy(refused[0])
        pending = self._inflight.get(digest)
        if pending is not None:
            try:
                plaintext = await asyncio.shield(pending)
            except KmsError as exc:
                if not exc.retriable:  # refused for this waiter too, without a call of its own
                    self.stats.refused_cached += uses
                raise
            self.stats.hits += uses
            return plaintext
        self.stats.misses += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            plaintext = await self._decrypt(blob, context, digest)
        except asyncio.CancelledError:
            # Waiters are not cancelled themselves: give them a retriable error instead.
            future.set_exception(KmsUnavailableError("KMS request cancelled"))
            future.exception()  # mark retrieved: there may be no waiters
            raise
        except KmsError as exc:
            future.set_exception(_copy(exc))
            future.exception()
            if not exc.retriable:
                self.stats.refused_cached += uses - 1
            raise
        else:
            future.set_result(plaintext)
            self.stats.hits += uses - 1
            return plaintext
        finally:
            del self._inflight[digest]

    async def _decrypt(self, blob: bytes, context: Mapping[str, str], digest: bytes) -> bytes:
        self.stats.calls += 1
        try:
            response = await self._kms.decrypt(CiphertextBlob=blob, EncryptionContext=dict(context))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified right here, nothing is swallowed
            self.stats.errors += 1
            error = classify(exc)
            if not error.retriable:
                self.stats.refused += 1
                expires = self._clock() + self._negative_ttl
                self._remember(self._refused, digest, (error, expires), self._max_refused)
                self._log_refusal(error, context, digest)
            raise error from None
        plaintext = bytes(response["Plaintext"])
        self._refused.pop(digest, None)
        self._remember(self._keys, digest, (plaintext, self._clock() + self._ttl))
        return plaintext

    def _log_refusal(self, error: KmsError, context: Mapping[str, str], digest: bytes) -> None:
        """Once per data key and context: what KMS said and the likely cause."""
        if digest in self._logged:
            self._logged.move_to_end(digest)
            return
        self._remember(self._logged, digest, None)
        log.warning(
            REFUSAL_MESSAGE,
            extra={
                "error": error.reason,
                "likely_cause": error.hint or "see the KMS error",
                # A digest of the encrypted blob and context (never the key itself).
                "key_digest": digest.hex()[:16],
                "encryption_context": dict(context),
                "remembered_seconds": self._negative_ttl,
            },
        )

    def _remember(
        self, table: OrderedDict[bytes, Any], digest: bytes, value: Any, bound: int | None = None
    ) -> None:
        table[digest] = value
        table.move_to_end(digest)
        while len(table) > (self._max_entries if bound is None else bound):
            table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def refused_keys(self) -> int:
        """Data keys (with their context) currently remembered as refused."""
        now = self._clock()
        return sum(1 for _, expires in self._refused.values() if expires > now)


def _copy(error: KmsError) -> KmsError:
    return type(error)(error.reason, hint=error.hint)
