-- Incremental verification (docs/integrity.md, "Incremental verify").
--
-- `das-ingest verify` records, per chain, the anchored link up to which it recomputed every
-- event and found nothing: a routine run then recomputes only the links written since, plus a
-- random sample of older ones; `verify --full` recomputes everything again.
--
-- A row is a claim "the chain was verified up to link_no, whose hash was link_hash, covering
-- events up to last_sequence". The warehouse's administrators can write this table, so the
-- claim is only believed when
--   * its MAC (KMS GenerateMac with the *verify key*, which only the auditors running verify
--     may use: not the ingester, not the warehouse's administrators) checks out over the
--     message of docs/integrity.md, and
--   * link link_no is still anchored by a valid anchor made with the pinned anchor key and
--     still has link_hash, and the next link still names it as prev_hash.
-- Anything else is a `progress_invalid` finding and the chain is verified in full.
CREATE TABLE das.verify_progress (
    stream_name    text        NOT NULL,
    shard_id       text        NOT NULL,
    link_no        bigint      NOT NULL,
    link_hash      bytea       NOT NULL,
    -- the last sequence number of the batch links up to link_no: events after it are new
    last_sequence  numeric     NOT NULL,
    verified_at    timestamptz NOT NULL,
    key_id         text        NOT NULL,
    algorithm      text        NOT NULL,
    mac            bytea       NOT NULL,
    version        smallint    NOT NULL CHECK (version = 1),
    PRIMARY KEY (stream_name, shard_id)
);
COMMENT ON TABLE das.verify_progress IS
    'How far `das-ingest verify` verified each chain, MACed with the verify key '
    '(docs/integrity.md, "Incremental verify"). Written by the verifier role.';
