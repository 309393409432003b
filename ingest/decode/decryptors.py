"""Choosing the decryptor: the lean built-in one (default) or the AWS Encryption SDK."""

from __future__ import annotations

from ingest.decode.pipeline import Decryptor
from ingest.errors import ConfigError


def check_decryptor(name: str, *, verify_signatures: bool = True) -> None:
    """Raise the ConfigError :func:`make_decryptor` would raise, without importing a
    decryptor (``das-ingest run``'s own process never decrypts: its pool does)."""
    if name == "esdk":
        if not verify_signatures:
            raise ConfigError(
                "--skip-signature-verification needs --decryptor lean: the Encryption SDK "
                "always verifies signatures"
            )
    elif name != "lean":
        raise ConfigError(f"unknown decryptor {name!r} (choose lean or esdk)")


def make_decryptor(name: str, *, verify_signatures: bool = True) -> Decryptor:
    check_decryptor(name, verify_signatures=verify_signatures)
    if name == "esdk":
        from ingest.decode.esdk import EsdkDecryptor

        return EsdkDecryptor()
    from ingest.decode.lean import LeanDecryptor

    return LeanDecryptor(verify_signatures=verify_signatures)
