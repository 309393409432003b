"""Decrypt a DAS payload without the Encryption SDK: the same checks, a fraction of the cost.

Aurora seals each payload as an AWS Encryption SDK message, format version 1, whose one encrypted
data key is wrapped by a raw AES-256-GCM keyring (provider "BC", key "DataKey") under the KMS
data key. :class:`LeanDecryptor` parses that message with ``struct`` over one buffer and does the
cryptography with ``cryptography`` directly; it exists because the SDK spends most of its ~2 ms
per message on pure-Python public-key loading and per-message objects, not on cryptography.
:class:`ingest.decode.esdk.EsdkDecryptor` stays the reference: the tests hold this module to
identical plaintext and identical rejections.

Wire layout (big-endian; spec: https://github.com/awslabs/aws-encryption-sdk-specification,
``data-format/message-header.md``, ``message-body.md``, ``message-body-aad.md``,
``message-footer.md``, ``framework/algorithm-suites.md``, ``framework/raw-aes-keyring.md``)::

    header body   version=01 | type=80 | suite id u16 | message id [16]
                  | context: length u16, then (if length > 0) count u16, count x
                    (key length u16, key, value length u16, value), sorted by key bytes
                  | EDK count u16, count x (provider id length u16, provider id,
                    provider info length u16, provider info, EDK length u16, EDK)
                  | content type (01 non-framed, 02 framed) | reserved 00000000
                  | IV length u8 (12) | frame length u32 (0 when non-framed)
    header auth   IV [12] | tag [16]       AES-GCM, empty plaintext, AAD = header body
    body framed   regular: sequence u32 | IV [12] | content [frame length] | tag [16]
                  final:   FFFFFFFF | sequence u32 | IV [12] | length u32 | content | tag [16]
    body single   IV [12] | length u64 | content | tag [16]
    footer        signature length u16 | DER ECDSA signature   (signed suites only)

    body AAD      message id | "AWSKMSEncryptionClient Frame" / "... Final Frame" /
                  "... Single Block" | sequence u32 (1 when non-framed) | content length u64
    raw AES EDK   provider id "BC"; provider info = key name | tag bits u32 (128)
                  | IV length u32 (12) | IV [12]; EDK = wrapped key | tag [16];
                  wrap AAD = the serialized context (count and entries, keys sorted)
    data key      HKDF(hash of the suite, salt none, IKM = unwrapped key,
                  info = suite id u16 | message id) for the HKDF suites, else the unwrapped key
    signature     ECDSA over every byte before the footer, the curve's hash prehashed; the
                  public key is the context entry "aws-crypto-public-key", base64 of the
                  SEC 1 compressed point

Decisions, where the spec and the Python SDK leave room:

- Only format version 1. Version 2 (the key-committing suites 0x0478/0x0578) is rejected with
  a clear error: Aurora does not write it, and a second header layout is attack surface this
  hot path does not need. ``EsdkDecryptor`` still opens such messages.
- Stricter than the SDK where the spec says MUST: bytes after the end of the message
  (decrypt.md: "there are available bytes which have not been processed ... MUST fail"; the SDK
  ignores them), a context whose count is 0, a framed message whose frame length is 0, a
  non-framed length above 2^36 - 32, a malformed public key or signature length.
- As lenient as the SDK where rejecting would gain nothing: IVs are taken as serialized, not
  required to equal the deterministic sequence-number IVs current SDKs write (AES-GCM
  authenticates the IV either way, and SDKs before deterministic IVs wrote random ones); context
  entries need not be sorted (the header tag covers them; like the SDK we re-sort them for the
  key-wrap AAD); signatures need not have the SDK's padded fixed length.
- ``verify_signatures=False`` skips the ECDSA verify and with it loading the curve point (the
  public key's base64 and length are still checked). Header and every frame are still
  authenticated and the footer must still be there and end the message, so the signature bytes
  are the only bytes that may change unnoticed. Verifying does not stop whoever can decrypt
  the record's data key with KMS from forging: the message key is wrapped under that data key,
  so they can make a new key pair and sign a message of their own (README, "Performance"). It
  only stops someone who has one message's derived key, but not the data key, from re-signing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ingest.errors import DecryptError

__all__ = ["MAX_ENCRYPTED_DATA_KEYS", "LeanDecryptor"]

PROVIDER_ID = b"BC"
KEY_NAME = b"DataKey"
#: Aurora writes one encrypted data key per message; the same cap as ``EsdkDecryptor``.
MAX_ENCRYPTED_DATA_KEYS = 4

# Every format-version-1 suite uses a 12-byte IV and a 16-byte tag, as does the raw AES keyring.
_IV_LEN = 12
_TAG_LEN = 16
_KEY_INFO_PREFIX = KEY_NAME + struct.pack(">II", _TAG_LEN * 8, _IV_LEN)
_KEY_INFO_LEN = len(_KEY_INFO_PREFIX) + _IV_LEN
_PUBLIC_KEY_ENTRY = b"aws-crypto-public-key"

_VERSION_1 = 0x01
_VERSION_2 = 0x02
_TYPE_CUSTOMER_AE_DATA = 0x80
_NON_FRAMED = 0x01
_FRAMED = 0x02
_FINAL_FRAME_MARKER = 0xFFFFFFFF
_MAX_FRAME_LENGTH = 2**31 - 1  # the SDK's MAX_FRAME_SIZE
_MAX_NON_FRAMED_LENGTH = 2**36 - 32  # message-body.md: the GCM limit
_MIN_DER_SIGNATURE_LEN = 8  # SEQUENCE { INTEGER 1 byte, INTEGER 1 byte }

_FRAME_AAD = b"AWSKMSEncryptionClient Frame"
_FINAL_FRAME_AAD = b"AWSKMSEncryptionClient Final Frame"
_SINGLE_BLOCK_AAD = b"AWSKMSEncryptionClient Single Block"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEADER_START = struct.Struct(">BBH16sH")  # version, type, suite id, message id, context length
_HEADER_TAIL = struct.Struct(">BIBI")  # content type, reserved, IV length, frame length
_AAD_TAIL = struct.Struct(">IQ")  # sequence number, content length
_SINGLE_BLOCK_LENGTH = struct.Struct(">Q")

_HINT_KEY = (
    "the data key does not open this message: the record's key and payload do not belong "
    "together, or the message header was altered"
)
_HINT_NOT_ESDK = "not an Encryption SDK message, or not one written by Aurora"
_HINT_TRUNCATED = "the payload was truncated or is not an Encryption SDK message"
_HINT_ALTERED = "the message was altered after it was written"
# Where a length-prefixed field sits, for the error when its length overruns: past the end of
# the message is truncation, past the end of the context's own length is a malformed context.
_IN_EDKS = ("the encrypted data keys", _HINT_TRUNCATED)
_IN_CONTEXT = ("an encryption context entry", _HINT_NOT_ESDK)


@dataclass(frozen=True, slots=True)
class _Signing:
    """The ECDSA half of a signed suite (framework/algorithm-suites.md#ecdsa)."""

    curve: ec.EllipticCurve
    ecdsa: ec.ECDSA
    digest: Callable[[memoryview], bytes]
    #: SEC 1 compressed point: one prefix byte (02 or 03), then x.
    point_len: int
    #: DER ECDSA-Sig-Value: SEQUENCE of two INTEGERs, each up to one 0x00 byte longer than n.
    max_signature_len: int


def _signing(
    curve: ec.EllipticCurve, hash_alg: hashes.HashAlgorithm, digest: Callable[[memoryview], bytes]
) -> _Signing:
    field = (curve.key_size + 7) // 8
    return _Signing(
        curve=curve,
        ecdsa=ec.ECDSA(Prehashed(hash_alg)),
        digest=digest,
        point_len=1 + field,
        max_signature_len=2 + 2 * (2 + field + 1),
    )


@dataclass(frozen=True, slots=True)
class _Suite:
    """What one format-version-1 algorithm suite needs from us."""

    name: str
    key_len: int
    kdf_hash: hashes.HashAlgorithm | None  # None: the identity KDF
    signing: _Signing | None = None


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _sha384(data: memoryview) -> bytes:
    return hashlib.sha384(data).digest()


_P256 = _signing(ec.SECP256R1(), hashes.SHA256(), _sha256)
_P384 = _signing(ec.SECP384R1(), hashes.SHA384(), _sha384)
_SUITES: dict[int, _Suite] = {
    0x0014: _Suite("AES_128_GCM_IV12_TAG16", 16, None),
    0x0046: _Suite("AES_192_GCM_IV12_TAG16", 24, None),
    0x0078: _Suite("AES_256_GCM_IV12_TAG16", 32, None),
    0x0114: _Suite("AES_128_GCM_IV12_TAG16_HKDF_SHA256", 16, hashes.SHA256()),
    0x0146: _Suite("AES_192_GCM_IV12_TAG16_HKDF_SHA256", 24, hashes.SHA256()),
    0x0178: _Suite("AES_256_GCM_IV12_TAG16_HKDF_SHA256", 32, hashes.SHA256()),
    0x0214: _Suite("AES_128_GCM_IV12_TAG16_HKDF_SHA256_ECDSA_P256", 16, hashes.SHA256(), _P256),
    0x0346: _Suite("AES_192_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384", 24, hashes.SHA384(), _P384),
    0x0378: _Suite("AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384", 32, hashes.SHA384(), _P384),
}


class LeanDecryptor:
    """Opens Aurora's Encryption SDK messages with ``cryptography``; no SDK objects per message.

    Same contract as :class:`ingest.decode.esdk.EsdkDecryptor`: returns the plaintext or raises
    :class:`~ingest.errors.DecryptError`, whose text never holds plaintext or key bytes.
    """

    name = "lean"

    def __init__(self, *, verify_signatures: bool = True) -> None:
        self.verify_signatures = verify_signatures

    def decrypt(self, message: bytes, data_key: bytes) -> bytes:
        if len(data_key) != 32:
            raise DecryptError(f"data key is {len(data_key)} bytes, expected 32 (AES-256)")
        # bytes() of a bytes object is that object; anything else becomes one copy.
        return _open(bytes(message), data_key, verify=self.verify_signatures)


def _open(message: bytes, data_key: bytes, *, verify: bool) -> bytes:
    """Parse, authenticate and decrypt one message; every check fails with DecryptError."""
    view = memoryview(message)
    end = len(message)

    # --- header body -------------------------------------------------------------------------
    if end and message[0] != _VERSION_1:
        raise _not_version_1(message[0])
    if end < _HEADER_START.size:
        raise _truncated("the header")
    _, msg_type, suite_id, message_id, context_len = _HEADER_START.unpack_from(message)
    if msg_type != _TYPE_CUSTOMER_AE_DATA:
        raise DecryptError(f"unknown message type {msg_type:#04x}", hint=_HINT_NOT_ESDK)
    suite = _SUITES.get(suite_id)
    if suite is None:
        raise DecryptError(
            f"algorithm suite {suite_id:#06x} is not a format-version-1 suite",
            hint=_HINT_NOT_ESDK,
        )
    pos = _HEADER_START.size + context_len
    if pos > end:
        raise _truncated("the encryption context")
    wrap_aad, public_key_b64 = _parse_context(message[_HEADER_START.size : pos])

    if pos + 2 > end:
        raise _truncated("the encrypted data keys")
    (edk_count,) = _U16.unpack_from(message, pos)
    pos += 2
    if edk_count == 0:
        raise DecryptError("the message has no encrypted data key", hint=_HINT_NOT_ESDK)
    if edk_count > MAX_ENCRYPTED_DATA_KEYS:
        raise DecryptError(
            f"the message has {edk_count} encrypted data keys, more than "
            f"{MAX_ENCRYPTED_DATA_KEYS} (Aurora writes one)",
            hint=_HINT_NOT_ESDK,
        )
    edks: list[tuple[bytes, bytes, bytes]] = []
    for _ in range(edk_count):
        provider_id, pos = _length_prefixed(message, pos, end, _IN_EDKS)
        provider_info, pos = _length_prefixed(message, pos, end, _IN_EDKS)
        wrapped_key, pos = _length_prefixed(message, pos, end, _IN_EDKS)
        edks.append((provider_id, provider_info, wrapped_key))

    if pos + _HEADER_TAIL.size > end:
        raise _truncated("the header")
    content_type, reserved, iv_len, frame_len = _HEADER_TAIL.unpack_from(message, pos)
    header_end = pos + _HEADER_TAIL.size
    if content_type not in (_FRAMED, _NON_FRAMED):
        raise DecryptError(f"unknown content type {content_type:#04x}", hint=_HINT_NOT_ESDK)
    if reserved != 0:
        raise DecryptError("the reserved header field is not zero", hint=_HINT_NOT_ESDK)
    if iv_len != _IV_LEN:
        raise DecryptError(f"IV length is {iv_len}, the suite needs {_IV_LEN}", hint=_HINT_NOT_ESDK)
    if content_type == _FRAMED and not 0 < frame_len <= _MAX_FRAME_LENGTH:
        raise DecryptError(f"frame length {frame_len} is out of range", hint=_HINT_NOT_ESDK)
    if content_type == _NON_FRAMED and frame_len != 0:
        raise DecryptError("a non-framed message has a non-zero frame length")

    # The public key travels in the context: signed suites must carry one, others must not
    # (the SDK's default CMM rejects both mismatches).
    signing = suite.signing
    point = b""
    if signing is not None:
        if public_key_b64 is None:
            raise DecryptError(f"{suite.name} is signed but the message carries no public key")
        point = _decode_point(public_key_b64, signing)
    elif public_key_b64 is not None:
        raise DecryptError(f"{suite.name} is unsigned but the message carries a public key")

    # --- data key: unwrap (raw AES keyring), derive, check the header tag ---------------------
    if header_end + _IV_LEN + _TAG_LEN > end:
        raise _truncated("the header authentication")
    source_key = _unwrap(edks, wrap_aad, data_key, suite)
    if suite.kdf_hash is None:
        content_key = source_key
    else:
        info = message[2:4] + message_id  # suite id (as serialized) then message id
        content_key = HKDF(suite.kdf_hash, suite.key_len, None, info).derive(source_key)
    aead = AESGCM(content_key)
    pos = header_end + _IV_LEN
    try:
        aead.decrypt(message[header_end:pos], view[pos : pos + _TAG_LEN], view[:header_end])
    except InvalidTag:
        raise DecryptError("the header does not authenticate", hint=_HINT_ALTERED) from None
    pos += _TAG_LEN

    # --- body ---------------------------------------------------------------------------------
    if content_type == _FRAMED:
        plaintext, pos = _open_frames(aead, message, view, pos, message_id, frame_len)
    else:
        plaintext, pos = _open_single_block(aead, message, view, pos, message_id)

    # --- footer -------------------------------------------------------------------------------
    if signing is None:
        if pos != end:
            raise _trailing(end - pos)
        return plaintext
    if pos + 2 > end:
        raise _truncated("the footer")
    (sig_len,) = _U16.unpack_from(message, pos)
    sig_start = pos + 2
    sig_end = sig_start + sig_len
    if sig_end > end:
        raise _truncated("the signature")
    if sig_end != end:
        raise _trailing(end - sig_end)
    if not _MIN_DER_SIGNATURE_LEN <= sig_len <= signing.max_signature_len:
        raise DecryptError(f"signature length {sig_len} is impossible for {suite.name}")
    if verify:
        _verify_signature(signing, point, message[sig_start:sig_end], view[:pos])
    return plaintext


def _parse_context(context: bytes) -> tuple[bytes, bytes | None]:
    """Check the serialized encryption context; return the key-wrap AAD and the public key.

    The SDK decodes every entry as UTF-8 and refuses duplicate keys and leftover bytes; so do
    we. The spec says a present context has at least one entry; the SDK does not check that.
    """
    if not context:
        return b"", None
    end = len(context)
    if end < 2:
        raise DecryptError("the encryption context is too short to count its entries")
    (count,) = _U16.unpack_from(context)
    if count == 0:
        raise DecryptError("the encryption context is present but has no entries")
    pos = 2
    entries: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        key, pos = _length_prefixed(context, pos, end, _IN_CONTEXT)
        value, pos = _length_prefixed(context, pos, end, _IN_CONTEXT)
        entries.append((key, value))
    if pos != end:
        raise DecryptError(f"{end - pos} stray bytes after the encryption context entries")
    try:
        for key, value in entries:
            key.decode()
            value.decode()
    except UnicodeDecodeError:
        raise DecryptError(
            "an encryption context entry is not UTF-8", hint=_HINT_NOT_ESDK
        ) from None
    keys = [key for key, _ in entries]
    if len(set(keys)) != count:
        raise DecryptError("the encryption context repeats a key", hint=_HINT_NOT_ESDK)
    public_key = next((value for key, value in entries if key == _PUBLIC_KEY_ENTRY), None)
    if all(a < b for a, b in pairwise(keys)):
        return context, public_key
    # The keyring wraps under the canonical (sorted) serialization, whatever the header order.
    canonical = [_U16.pack(count)]
    for key, value in sorted(entries):
        canonical += (_U16.pack(len(key)), key, _U16.pack(len(value)), value)
    return b"".join(canonical), public_key


def _unwrap(
    edks: list[tuple[bytes, bytes, bytes]], wrap_aad: bytes, data_key: bytes, suite: _Suite
) -> bytes:
    """Unwrap the first EDK of provider "BC", key "DataKey" that opens with ``data_key``.

    Like the SDK's raw master key: an EDK is ours only if its provider info is exactly the key
    name, tag bits 128, IV length 12 and a 12-byte IV; ours that fail to open are skipped.
    """
    wrapper: AESGCM | None = None
    ours = 0
    for provider_id, provider_info, wrapped_key in edks:
        try:
            provider_id.decode()
        except UnicodeDecodeError:
            raise DecryptError("a key provider id is not UTF-8", hint=_HINT_NOT_ESDK) from None
        if (
            provider_id != PROVIDER_ID
            or len(provider_info) != _KEY_INFO_LEN
            or not provider_info.startswith(_KEY_INFO_PREFIX)
        ):
            continue
        ours += 1
        # GCM ciphertext is as long as the key it wraps, which the suite fixes.
        if len(wrapped_key) != suite.key_len + _TAG_LEN:
            continue
        if wrapper is None:
            wrapper = AESGCM(data_key)
        try:
            return wrapper.decrypt(provider_info[-_IV_LEN:], wrapped_key, wrap_aad)
        except InvalidTag:
            continue
    if ours == 0:
        found = ", ".join(
            f"{_show(provider_id)}/{_show(_key_name(provider_info))}"
            for provider_id, provider_info, _ in edks
        )
        raise DecryptError(
            f"no encrypted data key for provider {PROVIDER_ID.decode()}, "
            f"key {KEY_NAME.decode()} (found {found})",
            hint="the message was not written by Aurora's raw AES keyring (BC/DataKey)",
        )
    raise DecryptError("the encrypted data key does not unwrap", hint=_HINT_KEY)


def _open_frames(
    aead: AESGCM, message: bytes, view: memoryview, pos: int, message_id: bytes, frame_len: int
) -> tuple[bytes, int]:
    """Decrypt regular frames then the final frame; return the plaintext and the end offset."""
    end = len(message)
    chunks: list[bytes] = []
    expected = 1
    while True:
        if pos + 4 > end:
            raise _truncated(f"frame {expected}")
        (sequence,) = _U32.unpack_from(message, pos)
        final = sequence == _FINAL_FRAME_MARKER
        if final:
            if pos + 8 + _IV_LEN + 4 > end:
                raise _truncated("the final frame")
            (sequence,) = _U32.unpack_from(message, pos + 4)
            iv_start = pos + 8
            (length,) = _U32.unpack_from(message, iv_start + _IV_LEN)
            content = iv_start + _IV_LEN + 4
            if length > frame_len:
                raise DecryptError(
                    f"final frame holds {length} bytes, more than the frame length {frame_len}",
                    hint=_HINT_ALTERED,
                )
            label = _FINAL_FRAME_AAD
        else:
            iv_start = pos + 4
            length = frame_len
            content = iv_start + _IV_LEN
            label = _FRAME_AAD
        if sequence != expected:
            raise DecryptError(
                f"frame sequence number {sequence} where {expected} was due", hint=_HINT_ALTERED
            )
        pos = content + length + _TAG_LEN
        if pos > end:
            raise _truncated(f"frame {expected}")
        aad = message_id + label + _AAD_TAIL.pack(sequence, length)
        try:
            chunks.append(
                aead.decrypt(message[iv_start : iv_start + _IV_LEN], view[content:pos], aad)
            )
        except InvalidTag:
            raise DecryptError(
                f"frame {sequence} does not authenticate", hint=_HINT_ALTERED
            ) from None
        if final:
            return b"".join(chunks), pos
        expected += 1


def _open_single_block(
    aead: AESGCM, message: bytes, view: memoryview, pos: int, message_id: bytes
) -> tuple[bytes, int]:
    """Decrypt a non-framed body; return the plaintext and the end offset."""
    content = pos + _IV_LEN + _SINGLE_BLOCK_LENGTH.size
    if content > len(message):
        raise _truncated("the body")
    (length,) = _SINGLE_BLOCK_LENGTH.unpack_from(message, pos + _IV_LEN)
    if length > _MAX_NON_FRAMED_LENGTH:
        raise DecryptError(f"non-framed body length {length} exceeds 2^36 - 32")
    body_end = content + length + _TAG_LEN
    if body_end > len(message):
        raise _truncated("the body")
    aad = message_id + _SINGLE_BLOCK_AAD + _AAD_TAIL.pack(1, length)
    try:
        plaintext = aead.decrypt(message[pos : pos + _IV_LEN], view[content:body_end], aad)
    except InvalidTag:
        raise DecryptError("the body does not authenticate", hint=_HINT_ALTERED) from None
    return plaintext, body_end


def _decode_point(encoded: bytes, signing: _Signing) -> bytes:
    """Base64-decode the public key and check its shape; the curve check waits for verify."""
    try:
        point = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise DecryptError("the public key in the encryption context is not base64") from None
    if len(point) != signing.point_len or point[0] not in (0x02, 0x03):
        raise DecryptError(f"the public key is not a compressed {signing.curve.name} point")
    return point


def _verify_signature(
    signing: _Signing, point: bytes, signature: bytes, signed: memoryview
) -> None:
    try:
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(signing.curve, point)
    except ValueError:
        raise DecryptError(f"the public key is not a point on {signing.curve.name}") from None
    try:
        public_key.verify(signature, signing.digest(signed), signing.ecdsa)
    except InvalidSignature:
        raise DecryptError("the message signature does not verify", hint=_HINT_ALTERED) from None


def _length_prefixed(buf: bytes, pos: int, end: int, where: tuple[str, str]) -> tuple[bytes, int]:
    """Read a u16 length and that many bytes at ``pos``; return them and the next offset."""
    stop = pos + 2
    if stop <= end:
        stop += _U16.unpack_from(buf, pos)[0]
        if stop <= end:
            return buf[pos + 2 : stop], stop
    name, hint = where
    raise DecryptError(f"{name} runs past its end", hint=hint)


def _not_version_1(version: int) -> DecryptError:
    if version == _VERSION_2:
        return DecryptError(
            "message format version 2 (key-committing suites) is not supported by the lean "
            "decryptor: Aurora writes version 1",
            hint="decrypt it with the esdk decryptor",
        )
    return DecryptError(f"unknown message format version {version:#04x}", hint=_HINT_NOT_ESDK)


def _truncated(where: str) -> DecryptError:
    return DecryptError(f"the message ends inside {where}", hint=_HINT_TRUNCATED)


def _trailing(count: int) -> DecryptError:
    return DecryptError(
        f"{count} bytes follow the end of the message",
        hint="two payloads were concatenated, or bytes were appended",
    )


def _key_name(provider_info: bytes) -> bytes:
    """The key name of raw AES keyring provider info: all but tag bits, IV length and IV."""
    suffix = 8 + _IV_LEN
    return provider_info[:-suffix] if len(provider_info) >= suffix else provider_info


def _show(raw: bytes) -> str:
    """A provider id or key name for an error message: printable, short, never key material."""
    text = raw[:32].decode("ascii", "replace")
    return "".join(ch if ch.isprintable() and ch != "\ufffd" else "?" for ch in text) or "''"
