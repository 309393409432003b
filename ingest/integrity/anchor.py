"""Anchoring chain heads with a KMS key the warehouse's administrators do not hold.

An anchor is a MAC (KMS GenerateMac with an HMAC key) or a signature (KMS Sign with an
asymmetric key) over the anchor message of docs/integrity.md: stream, shard, link number, link
hash and time. Whoever can rewrite the warehouse but cannot use that key cannot forge one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingest.aws import error_code
from ingest.errors import ConfigError, IngestError
from ingest.integrity.canonical import anchor_message
from ingest.warehouse.db import Conn

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

    def message(self) -> bytes:
        return anchor_message(
            self.stream_name, self.shard_id, self.link_no, self.link_hash, self.anchored_at
        )

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
        }


class AnchorKey:
    """A KMS key used to anchor: HMAC (GenerateMac/VerifyMac) or asymmetric (Sign/Verify)."""

    def __init__(self, kms: Any, key_id: str) -> None:
        self._kms = kms
        self.key_id = key_id
        self._algorithm: str | None = None
        self._mac = True

    async def _describe(self) -> str:
        if self._algorithm is not None:
            return self._algorithm
        try:
            meta = (await self._kms.describe_key(KeyId=self.key_id))["KeyMetadata"]
        except Exception as exc:  # noqa: BLE001 - classified here
            raise ConfigError(
                f"cannot use anchor key {self.key_id!r}: {error_code(exc) or type(exc).__name__}"
            ) from None
        spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or ""
        if spec in HMAC_ALGORITHMS:
            self._algorithm, self._mac = HMAC_ALGORITHMS[spec], True
        elif spec in SIGNING_ALGORITHMS and meta.get("KeyUsage") == "SIGN_VERIFY":
            self._algorithm, self._mac = SIGNING_ALGORITHMS[spec], False
        else:
            raise ConfigError(
                f"anchor key {self.key_id!r} is a {spec or 'unknown'} key: use an HMAC key "
                "(GENERATE_VERIFY_MAC) or an asymmetric SIGN_VERIFY key"
            )
        return self._algorithm

    async def sign(self, message: bytes) -> tuple[str, bytes]:
        algorithm = await self._describe()
        try:
            if self._mac:
                response = await self._kms.generate_mac(
                    KeyId=self.key_id, MacAlgorithm=algorithm, Message=message
                )
                return algorithm, bytes(response["Mac"])
            response = await self._kms.sign(
                KeyId=self.key_id,
                SigningAlgorithm=algorithm,
                Message=message,
                MessageType="RAW",
            )
            return algorithm, bytes(response["Signature"])
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
        done = await conn.fetchval(
            "SELECT 1 FROM das.chain_anchors WHERE stream_name = $1 AND shard_id = $2 "
            "AND link_no = $3 AND link_hash = $4",
            stream,
            head["shard_id"],
            head["link_no"],
            head["link_hash"],
        )
        if done:
            continue
        # Microsecond precision: what the database stores and the message carries.
        now = datetime.now(UTC)
        unsigned = Anchor(
            stream,
            head["shard_id"],
            head["link_no"],
            bytes(head["link_hash"]),
            now,
            key.key_id,
            "",
            b"",
        )
        algorithm, signature = await key.sign(unsigned.message())
        anchor = Anchor(
            unsigned.stream_name,
            unsigned.shard_id,
            unsigned.link_no,
            unsigned.link_hash,
            now,
            key.key_id,
            algorithm,
            signature,
        )
        await conn.execute(
            """
            INSERT INTO das.chain_anchors (stream_name, shard_id, link_no, link_hash,
                                           anchored_at, key_id, algorithm, signature)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            anchor.stream_name,
            anchor.shard_id,
            anchor.link_no,
            anchor.link_hash,
            anchor.anchored_at,
            anchor.key_id,
            anchor.algorithm,
            anchor.signature,
        )
        made.append(anchor)
    return made


async def load_anchors(conn: Conn, stream: str | None = None) -> list[Anchor]:
    rows = await conn.fetch(
        """
        SELECT stream_name, shard_id, link_no, link_hash, anchored_at, key_id, algorithm,
               signature
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
        )
        for r in rows
    ]
