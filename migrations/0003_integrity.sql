-- Tamper evidence: a hash chain per shard over the stored events, anchored with KMS.
-- The encoding is specified in docs/integrity.md (reference: ingest/integrity/canonical.py).
-- Links are computed by das-ingest from the values it stores, in the batch's transaction;
-- `das-ingest verify` recomputes them from the stored rows. Nothing here computes digests, so
-- nothing here needs to be trusted by the verifier.

-- One link per committed batch (kind 'batch') or re-driven dead letter (kind 'redrive').
-- A link covers the events of its shard whose sequence number lies in
-- [first_sequence, last_sequence], except those covered by a later 'redrive' link.
CREATE TABLE das.chain_links (
    stream_name     text        NOT NULL,
    shard_id        text        NOT NULL,
    link_no         bigint      NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('batch', 'redrive')),
    first_sequence  numeric     NOT NULL,
    last_sequence   numeric     NOT NULL,
    event_count     bigint      NOT NULL,
    -- {"<UTC day>": {"n": <events>, "sha256": "<hex>"}}: per-day digests so that whole days
    -- removed by retention can be told apart from rows that vanished
    days            jsonb       NOT NULL,
    prev_hash       bytea       NOT NULL,
    link_hash       bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_name, shard_id, link_no)
);

-- Chain heads authenticated with a key the warehouse's administrators do not hold.
-- message: "das-anchor-v1" "\n" stream "\n" shard "\n" link_no "\n" hex(link_hash) "\n"
-- anchored_at (canonical_time); mac: KMS GenerateMac (HMAC) or Sign (asymmetric) over it.
CREATE TABLE das.chain_anchors (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_name   text        NOT NULL,
    shard_id      text        NOT NULL,
    link_no       bigint      NOT NULL,
    link_hash     bytea       NOT NULL,
    anchored_at   timestamptz NOT NULL,
    key_id        text        NOT NULL,
    algorithm     text        NOT NULL,
    signature     bytea       NOT NULL
);
CREATE INDEX chain_anchors_head ON das.chain_anchors (stream_name, shard_id, link_no);
