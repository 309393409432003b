"""Anchoring chain heads with a KMS key the warehouse's administrators do not hold.

An anchor is a MAC (KMS GenerateMac with an HMAC key) or a signature (KMS Sign with an
asymmetric key) over the anchor message of docs/integrity.md: stream, shard, link number, link
hash, time, and (version 2) the key's ARN and the algorithm. Whoever can rewrite the warehouse
but cannot use that key cannot forge one. Checking anchors (VerifyMac/Verify, the auditor's
calls) is ``verify``'s: :class:`ingest.integrity.verify.AnchorChecker`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from ingest.aws import error_code
from ingest.conn import Conn
from ingest.errors import ConfigError, IngestError, KmsUnavailableError
from ingest.integrity.alerts import ANCHOR_SHARD, ANCHOR_STREAM
from ingest.integrity.canonical import CHAIN_VERSION, anchor_message
from ingest.kms import classify as classify_kms_error

#: KMS algorithms we use, by key spec family.
HMAC_ALGORITHMS = {
    "HMAC_224": "HMAC_SHA_224",
    "HMAC_256": "HMAC_SHA_256",
    "HMAC_384": "HMAC_SHA_384",
    "HMAC_512": "HMAC_SHA_512",
}
SIGNING_ALGORITHMS = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
    "RSA_2048": "RSASSA_PSS_SHA_256",
    "RSA_3072": "RSASSA_PSS_SHA_256",
    "RSA_4096": "RSASSA_PSS_SHA_256",
}


class AnchorError(IngestError):
    """KMS could not produce or check an anchor (unreachable, throttled, refused)."""

    retriable = True


@dataclass(frozen=True)
class Anchor:
    stream_name: str
    shard_id: str
    link_no: int
    link_hash: bytes
    anchored_at: datetime
    key_id: str
    algorithm: str
    signature: bytes
    version: int = CHAIN_VERSION

    def message(self) -> bytes:
        return anchor_message(
            self.stream_name,
            self.shard_id,
            self.link_no,
            self.link_hash,
            self.anchored_at,
            key_id=self.key_id,
            algorithm=self.algorithm,
            version=self.version,
        )

    @property
    def identity(self) -> tuple[str, str, int, bytes, bytes]:
        """Two anchors are the same anchor when these agree (the signature covers the rest)."""
        return (self.stream_name, self.shard_id, self.link_no, self.link_hash, self.signature)

    def as_json(self) -> dict[str, Any]:
        return {
            "stream_name": self.stream_name,
            "shard_id": self.shard_id,
            "link_no": self.link_no,
            "link_hash": self.link_hash.hex(),
            "anchored_at": self.anchored_at.isoformat(),
            "key_id": self.key_id,
            "algorithm": self.algorithm,
            "signature": self.signature.hex(),
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Anchor:
        """An anchor as ``as_json`` (``das-ingest anchor --export``) wrote it."""
        try:
            anchored_at = datetime.fromisoformat(str(data["anchored_at"]).replace("Z", "+00:00"))
            anchor = cls(
                str(data["stream_name"]),
                str(data["shard_id"]),
                int(data["link_no"]),
                bytes.fromhex(data["link_hash"]),
                anchored_at,
                str(data["key_id"]),
                str(data["algorithm"]),
                bytes.fromhex(data["signature"]),
                int(data.get("version", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an exported anchor: {type(exc).__name__}: {exc}") from None
        if anchored_at.tzinfo is None:
            raise ValueError("not an exported anchor: anchored_at has no time zone")
        return anchor


def read_exported_anchors(path: str) -> list[Anchor]:
    """The anchors of a ``das-ingest anchor --export`` file (JSON lines). A line that is not
    an anchor is a ConfigError naming the line: a damaged safe copy must not pass silently."""
    anchors = []
    try:
        with open(path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    anchors.append(Anchor.from_json(orjson.loads(line)))
                except (orjson.JSONDecodeError, ValueError) as exc:
                    raise ConfigError(f"{path}, line {number}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the exported anchors {path}: {exc.strerror}") from None
    return anchors


@dataclass(frozen=True)
class KeyInfo:
    arn: str
    algorithm: str
    mac: bool


async def describe_anchor_key(kms: Any, key_id: str) -> KeyInfo:
    """The key's ARN and the algorithm das-ingest uses with it. AnchorError (retriable) if KMS
    is unreachable or throttling; ConfigError if it refuses or the key cannot anchor."""
    try:
        meta = (await kms.describe_key(KeyId=key_id))["KeyMetadata"]
    except Exception as exc:  # noqa: BLE001 - classified here
        error = classify_kms_error(exc)
        if isinstance(error, KmsUnavailableError):
            raise AnchorError(f"anchor key {key_id!r}: {error}") from None
        raise ConfigError(
            f"cannot use anchor key {key_id!r}: {error_code(exc) or type(exc).__name__}"
        ) from None
    spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or ""
    arn = str(meta.get("Arn") or key_id)
    if spec in HMAC_ALGORITHMS:
        return KeyInfo(arn, HMAC_ALGORITHMS[spec], True)
    if spec in SIGNING_ALGORITHMS and meta.get("KeyUsage") == "SIGN_VERIFY":
        return KeyInfo(arn, SIGNING_ALGORITHMS[spec], False)
    raise ConfigError(
        f"anchor key {key_id!r} is a {spec or 'unknown'} key: use an HMAC key "
        "(GENERATE_VERIFY_MAC) or an asymmetric SIGN_VERIFY key"
    )


class AnchorKey:
    """A KMS key used to anchor: HMAC (GenerateMac/VerifyMac) or asymmetric (Sign/Verify)."""

    def __init__(self, kms: Any, key_id: str) -> None:
        self._kms = kms
        self.key_id = key_id
        self._info: KeyInfo | None = None

    async def info(self) -> KeyInfo:
        if self._info is None:
            self._info = await describe_anchor_key(self._kms, self.key_id)
        return self._info

    async def sign(self, message: bytes) -> bytes:
        info = await self.info()
        try:
            if info.mac:
                response = await self._kms.generate_mac(
                    KeyId=info.arn, MacAlgorithm=info.algorithm, Message=message
                )
                return bytes(response["Mac"])
            response = await self._kms.sign(
                KeyId=info.arn,
                SigningAlgorithm=info.algorithm,
                Message=message,
                MessageType="RAW",
            )
            return bytes(response["Signature"])
        except Exception as exc:  # noqa: BLE001 - classified here
            raise AnchorError(
                f"KMS could not anchor: {error_code(exc) or type(exc).__name__}"
            ) from None


async def anchor_heads(
    conn: Conn, key: AnchorKey, stream: str, shards: list[str] | None = None
) -> list[Anchor]:
    """Anchor the current head of each shard chain (all of the stream's, or ``shards``),
    unless that head is anchored already."""
    heads = await conn.fetch(
        """
        SELECT DISTINCT ON (shard_id) shard_id, link_no, link_hash FROM das.chain_links
        WHERE stream_name = $1 AND ($2::text[] IS NULL OR shard_id = ANY ($2))
        ORDER BY shard_id, link_no DESC
        """,
        stream,
        shards,
    )
    made: list[Anchor] = []
    for head in heads:
        anchor = await _anchor_head(
            conn, key, stream, head["shard_id"], head["link_no"], bytes(head["link_hash"])
        )
        if anchor is not None:
            made.append(anchor)
    return made


async def anchor_alert_head(conn: Conn, key: AnchorKey) -> Anchor | None:
    """Anchor the newest alert (its id and ``alert_hash``: the alert chain's head), unless it is
    anchored already or there is no alert. Returns the new anchor."""
    head = await conn.fetchrow("SELECT id, alert_hash FROM das.alerts ORDER BY id DESC LIMIT 1")
    if head is None:
        return None
    return await _anchor_head(
        conn, key, ANCHOR_STREAM, ANCHOR_SHARD, head["id"], bytes(head["alert_hash"])
    )


async def _anchor_head(
    conn: Conn, key: AnchorKey, stream: str, shard: str, link_no: int, link_hash: bytes
) -> Anchor | None:
    """MAC or sign one chain head and store the anchor; None when it is anchored already."""
    done = await conn.fetchval(
        "SELECT 1 FROM das.chain_anchors WHERE stream_name = $1 AND shard_id = $2 "
        "AND link_no = $3 AND link_hash = $4",
        stream,
        shard,
        link_no,
        link_hash,
    )
    if done:
        return None
    info = await key.info()
    # Microsecond precision: what the database stores and the message carries.
    unsigned = Anchor(
        stream, shard, link_no, link_hash, datetime.now(UTC), info.arn, info.algorithm, b""
    )
    anchor = replace(unsigned, signature=await key.sign(unsigned.message()))
    await conn.execute(
        """
        INSERT INTO das.chain_anchors (stream_name, shard_id, link_no, link_hash,
                                       anchored_at, key_id, algorithm, signature, version)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        """,
        anchor.stream_name,
        anchor.shard_id,
        anchor.link_no,
        anchor.link_hash,
        anchor.anchored_at,
        anchor.key_id,
        anchor.algorithm,
        anchor.signature,
        anchor.version,
    )
    return anchor


async def load_anchors(conn: Conn, stream: str | None = None) -> list[Anchor]:
    rows = await conn.fetch(
        """
        SELECT stream_name, shard_id, link_no, link_hash, anchored_at, key_id, algorithm,
               signature, version
        FROM das.chain_anchors WHERE $1::text IS NULL OR stream_name = $1
        ORDER BY stream_name, shard_id, link_no, id
        """,
        stream,
    )
    return [
        Anchor(
            r["stream_name"],
            r["shard_id"],
            r["link_no"],
            bytes(r["link_hash"]),
            r["anchored_at"],
            r["key_id"],
            r["algorithm"],
            bytes(r["signature"]),
            r["version"],
        )
        for r in rows
    ]
