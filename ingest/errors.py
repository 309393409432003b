"""Error classes. Retry policy lives here, on the classes, not in scattered ``except`` blocks.

Every failure to turn a Kinesis record into rows is a :class:`DecodeError` that names its
``stage`` (json, base64, kms, decrypt, decompress, parse, normalize) and says whether it is
``retriable``. Retriable errors (throttling, network) are retried with backoff and never
dead-lettered; the others send the record to the dead-letter table and the stream moves on.

Messages never contain decrypted SQL or key material: they name fields, types, sizes and
likely causes, not values.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class Stage(StrEnum):
    """Where in the decode pipeline a record failed."""

    JSON = "json"
    BASE64 = "base64"
    KMS = "kms"
    DECRYPT = "decrypt"
    DECOMPRESS = "decompress"
    PARSE = "parse"
    NORMALIZE = "normalize"


class IngestError(Exception):
    """Base class of every error das-ingest raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(IngestError):
    """Bad or missing configuration: the operator must fix something before we can run."""


class DecodeError(IngestError):
    """A record could not be decoded. ``stage`` names where; ``hint`` names a likely cause."""

    stage: ClassVar[Stage]

    def __init__(self, reason: str, *, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.stage.value}: {self.reason}"
        return f"{text} ({self.hint})" if self.hint else text

    # Errors cross the process-pool boundary; keep them picklable with their keyword args.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.reason, self.hint))


def _rebuild(cls: type[DecodeError], reason: str, hint: str | None) -> DecodeError:
    return cls(reason, hint=hint)


class EnvelopeJsonError(DecodeError):
    """The Kinesis record is not the DAS outer JSON document."""

    stage = Stage.JSON


class Base64Error(DecodeError):
    """``databaseActivityEvents`` or ``key`` is not valid base64."""

    stage = Stage.BASE64


class KmsError(DecodeError):
    """KMS refused to decrypt the data key (wrong key, wrong encryption context, bad blob)."""

    stage = Stage.KMS


class KmsUnavailableError(KmsError):
    """KMS throttled us or could not be reached: retry, never dead-letter."""

    retriable = True


class DecryptError(DecodeError):
    """The Encryption SDK message did not decrypt or verify with the data key."""

    stage = Stage.DECRYPT


class DecompressError(DecodeError):
    """The decrypted payload is not gzip, is truncated, or exceeds the size cap."""

    stage = Stage.DECOMPRESS


class ParseError(DecodeError):
    """The decompressed payload is not the DAS inner JSON document."""

    stage = Stage.PARSE


class NormalizeError(DecodeError):
    """The inner document parsed but cannot be turned into events."""

    stage = Stage.NORMALIZE


ERRORS_BY_STAGE: dict[Stage, type[DecodeError]] = {
    Stage.JSON: EnvelopeJsonError,
    Stage.BASE64: Base64Error,
    Stage.KMS: KmsError,
    Stage.DECRYPT: DecryptError,
    Stage.DECOMPRESS: DecompressError,
    Stage.PARSE: ParseError,
    Stage.NORMALIZE: NormalizeError,
}
