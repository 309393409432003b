"""A fast, bench-only Encryption SDK encryptor: Aurora's message format on ``cryptography``.

The emulator seals with the AWS Encryption SDK, which costs ~2-6 ms a record here (a fresh
ECDSA P-384 key per message, pure-Python serialization): filling a stream for a benchmark of
tens of thousands of records would take longer than the benchmark. :class:`FastEncryptor`
writes the same bytes layout the SDK writes for Aurora's suite
AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384 (0x0378), message format 1, framed (4096),
one EDK of the raw AES keyring "BC"/"DataKey", deterministic frame IVs, a signature of the
SDK's static length (103 bytes, s negated when needed, as the SDK does).

``FastEncryptor(suite=0x0178)`` writes the unsigned suite AES_256_GCM_IV12_TAG16_HKDF_SHA256
instead (as a captured Aurora PostgreSQL record has): HKDF-SHA256, an empty encryption context,
no signature.

The one shortcut: one ECDSA signing key per encryptor (the SDK makes one per message). A
decryptor cannot tell, and it costs the decryptor exactly as much: the public key travels in
every message and both decryptors load and verify it per message (neither caches keys).
``tests/test_bench.py`` holds these messages to both the SDK and the lean decryptor.

Never use this outside benchmarks and tests: it is a test fixture, not an encryption library.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SUITE_ID = 0x0378
UNSIGNED_SUITE_ID = 0x0178
FRAME_LENGTH = 4096
SIGNATURE_LENGTH = 103  # the SDK's static length for P-384 signatures
_P384_ORDER = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)
_IV_LEN = 12
_FRAME_AAD = b"AWSKMSEncryptionClient Frame"
_FINAL_FRAME_AAD = b"AWSKMSEncryptionClient Final Frame"
_PUBLIC_KEY_ENTRY = b"aws-crypto-public-key"
_KEY_NAME = b"DataKey"
_PROVIDER_ID = b"BC"
_ECDSA = ec.ECDSA(Prehashed(hashes.SHA384()))


def _u16(n: int) -> bytes:
    return struct.pack(">H", n)


class FastEncryptor:
    """Seals plaintext into a signed Encryption SDK message under a raw AES data key.

    Implements the emulator's ``Encryptor`` protocol, so ``ingest.emulate.encoder``'s
    ``encode_payload`` (gzip level 6, outer JSON) works with it unchanged.
    """

    def __init__(self, *, frame_length: int = FRAME_LENGTH, suite: int = SUITE_ID) -> None:
        if suite not in (SUITE_ID, UNSIGNED_SUITE_ID):
            raise ValueError(f"suite 0x{suite:04x} is not written here")
        self._frame_length = frame_length
        self.suite = suite
        self._signed = suite == SUITE_ID
        self._hash = hashes.SHA384() if self._signed else hashes.SHA256()
        self._signing_key = ec.generate_private_key(ec.SECP384R1())
        if not self._signed:
            # The unsigned suite: an empty encryption context (its serialized length is 0).
            self._context = b""
            return
        point = self._signing_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        public_key = base64.b64encode(point)
        # The encryption context: the public key only (Aurora passes no other entries).
        self._context = b"".join(
            (
                _u16(1),
                _u16(len(_PUBLIC_KEY_ENTRY)),
                _PUBLIC_KEY_ENTRY,
                _u16(len(public_key)),
                public_key,
            )
        )

    def encrypt(self, plaintext: bytes, data_key: bytes) -> bytes:
        if len(data_key) != 32:
            raise ValueError(f"data key is {len(data_key)} bytes, expected 32 (AES-256)")
        message_id = os.urandom(16)
        content_data_key = os.urandom(32)
        # Raw AES keyring: wrap the per-message data key under the KMS data key, the
        # serialized encryption context as AAD.
        wrap_iv = os.urandom(_IV_LEN)
        wrapped = AESGCM(data_key).encrypt(wrap_iv, content_data_key, self._context)
        provider_info = _KEY_NAME + struct.pack(">II", 128, _IV_LEN) + wrap_iv
        suite = struct.pack(">H", self.suite)
        header = b"".join(
            (
                b"\x01\x80",
                suite,
                message_id,
                _u16(len(self._context)),
                self._context,
                _u16(1),
                _u16(len(_PROVIDER_ID)),
                _PROVIDER_ID,
                _u16(len(provider_info)),
                provider_info,
                _u16(len(wrapped)),
                wrapped,
                struct.pack(">BIBI", 0x02, 0, _IV_LEN, self._frame_length),
            )
        )
        key = HKDF(self._hash, 32, None, suite + message_id).derive(content_data_key)
        aead = AESGCM(key)
        header_iv = bytes(_IV_LEN)
        parts = [header, header_iv, aead.encrypt(header_iv, b"", header)]
        view = memoryview(plaintext)
        sequence = 1
        pos = 0
        frame = self._frame_length
        while len(plaintext) - pos > frame:
            iv = sequence.to_bytes(_IV_LEN, "big")
            aad = message_id + _FRAME_AAD + struct.pack(">IQ", sequence, frame)
            parts += (
                struct.pack(">I", sequence),
                iv,
                aead.encrypt(iv, view[pos : pos + frame], aad),
            )
            pos += frame
            sequence += 1
        rest = len(plaintext) - pos
        iv = sequence.to_bytes(_IV_LEN, "big")
        aad = message_id + _FINAL_FRAME_AAD + struct.pack(">IQ", sequence, rest)
        sealed = aead.encrypt(iv, view[pos:], aad)
        parts += (struct.pack(">II", 0xFFFFFFFF, sequence), iv, struct.pack(">I", rest), sealed)
        body = b"".join(parts)
        if not self._signed:
            return body
        signature = self._sign(hashlib.sha384(body).digest())
        return body + _u16(len(signature)) + signature

    def _sign(self, digest: bytes) -> bytes:
        signature = self._signing_key.sign(digest, _ECDSA)
        if len(signature) != SIGNATURE_LENGTH:
            r, s = decode_dss_signature(signature)
            signature = encode_dss_signature(r, _P384_ORDER - s)
        if len(signature) != SIGNATURE_LENGTH:  # r itself is short: sign again, as the SDK does
            return self._sign(digest)
        return signature
