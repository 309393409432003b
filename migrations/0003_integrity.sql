-- Tamper evidence: a hash chain per shard over the stored events, anchored with KMS.
-- The encoding is specified in docs/integrity.md; an independent verifier can be written from
-- that document alone. Every function here is the reference for it.

-- The canonical encoding of one stored event: every column of das.activity_events in table
-- order, each as "-" when NULL, else "+" <octets> ":" <value>, where <value> is the column's
-- canonical text (below) and <octets> the decimal length of its UTF-8 bytes.
--   text                      the text itself
--   integer, bigint, numeric  ::text (decimal, no exponent, no leading zeros)
--   timestamptz               UTC, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"' (always 6 fraction digits)
--   jsonb                     PostgreSQL's jsonb text output (keys sorted by length, then bytes)
--   text[]                    to_jsonb(value)::text (a JSON array of strings)
CREATE FUNCTION das.canonical_field(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value IS NULL THEN '-' ELSE '+' || octet_length(value) || ':' || value END
$$;

CREATE FUNCTION das.canonical_time(value timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(value AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

CREATE FUNCTION das.canonical_event(e das.activity_events) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT concat(
        das.canonical_field(das.canonical_time(e.log_time)),
        das.canonical_field(e.cluster_id),
        das.canonical_field(e.instance_id),
        das.canonical_field(e.record_version),
        das.canonical_field(e.shard_id),
        das.canonical_field(e.sequence_number::text),
        das.canonical_field(e.event_index::text),
        das.canonical_field(e.class),
        das.canonical_field(e.client_application),
        das.canonical_field(e.command),
        das.canonical_field(e.command_text),
        das.canonical_field(e.database_name),
        das.canonical_field(e.db_protocol),
        das.canonical_field(e.db_user_name),
        das.canonical_field(das.canonical_time(e.end_time)),
        das.canonical_field(e.error_message),
        das.canonical_field(e.exit_code),
        das.canonical_field(e.net_protocol),
        das.canonical_field(e.object_name),
        das.canonical_field(e.object_type),
        das.canonical_field(e.param_list::text),
        das.canonical_field(e.pid::text),
        das.canonical_field(e.remote_host),
        das.canonical_field(e.remote_port),
        das.canonical_field(e.row_count::text),
        das.canonical_field(e.server_host),
        das.canonical_field(e.server_type),
        das.canonical_field(e.server_version),
        das.canonical_field(e.service_name),
        das.canonical_field(e.session_id),
        das.canonical_field(das.canonical_time(e.start_time)),
        das.canonical_field(e.statement_id::text),
        das.canonical_field(e.substatement_id::text),
        das.canonical_field(e.transaction_id),
        das.canonical_field(e.extra::text),
        das.canonical_field(to_jsonb(e.anomalies)::text),
        das.canonical_field(das.canonical_time(e.ingested_at))
    )
$$;

-- The UTC day of an event, the unit retention removes ("none" for events without log_time).
CREATE FUNCTION das.event_day(log_time timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(to_char(log_time AT TIME ZONE 'UTC', 'YYYY-MM-DD'), 'none')
$$;

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

-- The day digests of the events a new link covers: per UTC day, the count and
-- sha256(concatenation of sha256(canonical_event) in (sequence_number, event_index) order).
-- exclude_redriven: leave out events covered by a 'redrive' link (what a batch link covers
-- once dead letters of its range were re-driven). When a link is written nothing in its range
-- has been re-driven yet, so extend_chain passes false and skips that per-event lookup.
CREATE FUNCTION das.link_days(
    stream text, shard text, first_seq numeric, last_seq numeric, exclude_redriven boolean
) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_object_agg(day, jsonb_build_object('n', n, 'sha256', encode(digest, 'hex'))),
                    '{}'::jsonb)
    FROM (
        SELECT das.event_day(e.log_time) AS day, count(*) AS n,
               sha256(string_agg(sha256(convert_to(das.canonical_event(e), 'UTF8')), ''::bytea
                                 ORDER BY e.sequence_number, e.event_index)) AS digest
        FROM das.activity_events e
        WHERE e.shard_id = shard
          AND e.sequence_number BETWEEN first_seq AND last_seq
          AND (NOT exclude_redriven OR NOT EXISTS (
                SELECT 1 FROM das.chain_links r
                WHERE r.stream_name = stream AND r.shard_id = shard AND r.kind = 'redrive'
                  AND e.sequence_number BETWEEN r.first_sequence AND r.last_sequence))
        GROUP BY 1
    ) per_day
$$;

-- link_hash = sha256(prev_hash || UTF-8 of the link text), the link text being
-- "das-chain-v1" "\n" stream "\n" shard "\n" link_no "\n" kind "\n" first "\n" last "\n"
-- event_count "\n" days::text (jsonb text output).
CREATE FUNCTION das.link_hash(
    prev bytea, stream text, shard text, link_no bigint, kind text, first_seq numeric,
    last_seq numeric, event_count bigint, days jsonb
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(prev || convert_to(concat_ws(E'\n', 'das-chain-v1', stream, shard,
        link_no::text, kind, first_seq::text, last_seq::text, event_count::text, days::text),
        'UTF8'))
$$;

-- Extends the shard's chain with a link over the events just stored, in the caller's
-- transaction. Serialized per shard by an advisory lock, so a re-drive and a worker never fork
-- the chain. Runs as the schema owner: the ingest role can neither read events nor write links
-- except through it.
CREATE FUNCTION das.extend_chain(
    stream text, shard text, first_seq numeric, last_seq numeric, link_kind text
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    prev das.chain_links;
    next_no bigint;
    prev_digest bytea;
    day_digests jsonb;
    total bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('das.chain:' || stream || ':' || shard, 0));
    SELECT * INTO prev FROM das.chain_links
    WHERE stream_name = stream AND shard_id = shard ORDER BY link_no DESC LIMIT 1;
    IF prev.link_no IS NULL THEN
        next_no := 1;
        prev_digest := '\x0000000000000000000000000000000000000000000000000000000000000000';
    ELSE
        next_no := prev.link_no + 1;
        prev_digest := prev.link_hash;
    END IF;
    day_digests := das.link_days(stream, shard, first_seq, last_seq, false);
    SELECT coalesce(sum((v->>'n')::bigint), 0) INTO total FROM jsonb_each(day_digests) AS d(k, v);
    INSERT INTO das.chain_links (stream_name, shard_id, link_no, kind, first_sequence,
                                 last_sequence, event_count, days, prev_hash, link_hash)
    VALUES (stream, shard, next_no, link_kind, first_seq, last_seq, total, day_digests,
            prev_digest, das.link_hash(prev_digest, stream, shard, next_no, link_kind,
                                       first_seq, last_seq, total, day_digests));
    RETURN next_no;
END
$$;

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
