"""Choosing the decryptor: the lean built-in one (default) or the AWS Encryption SDK."""

from __future__ import annotations

from ingest.decode.pipeline import Decryptor
from ingest.errors import ConfigError


def make_decryptor(name: str, *, verify_signatures: bool = True) -> Decryptor:
    if name == "esdk":
        if not verify_signatures:
            raise ConfigError(
                "--skip-signature-verification needs --decryptor lean: the Encryption SDK "
                "always verifies signatures"
            )
        from ingest.decode.esdk import EsdkDecryptor

        return EsdkDecryptor()
    if name == "lean":
        from ingest.decode.lean import LeanDecryptor

        return LeanDecryptor(verify_signatures=verify_signatures)
    raise ConfigError(f"unknown decryptor {name!r} (choose lean or esdk)")
