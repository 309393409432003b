"""Tamper evidence: per-shard hash chains over the stored events, anchored with KMS, and the
verifier. The encoding is specified in docs/integrity.md."""
