-- Query fingerprints (issue 13) and policy drops in the integrity chain (docs/integrity.md).
--
-- Every statement event gets its fingerprint (the statement with literals, lists and comments
-- normalized away, ingest/decode/fingerprint.py) and a 64-bit hash of it: a column group of
-- the event's encoding, encoded only when set, so events stored before (NULL here) keep their
-- encoding. Nullable, no default: adding them rewrites nothing.
ALTER TABLE das.activity_events
    ADD COLUMN fingerprint      text,
    ADD COLUMN fingerprint_hash bigint;

COMMENT ON COLUMN das.activity_events.fingerprint IS
    'The statement with literals, IN lists, VALUES rows and comments normalized away (computed before any redaction).';
COMMENT ON COLUMN das.activity_events.fingerprint_hash IS
    'Signed 64-bit BLAKE2b hash of fingerprint: what das.query_patterns groups by.';

CREATE INDEX activity_events_fingerprint ON das.activity_events (fingerprint_hash, log_time)
    WHERE fingerprint_hash IS NOT NULL;

-- Per batch link, how many events each drop rule kept out of storage (a line of the link text
-- when there were any), so verify tells dropped-by-policy from deleted and the counts are
-- queryable.
ALTER TABLE das.chain_links ADD COLUMN dropped jsonb NOT NULL DEFAULT '{}';

-- One row per query pattern: how often, by whom, first and last seen.
CREATE VIEW das.query_patterns AS
SELECT
    fingerprint_hash,
    min(fingerprint)                                  AS fingerprint,
    count(*)                                          AS executions,
    count(*) FILTER (WHERE das.is_failure(error_message, exit_code)) AS failures,
    array_agg(DISTINCT db_user_name) FILTER (WHERE db_user_name IS NOT NULL) AS users,
    array_agg(DISTINCT cluster_id) FILTER (WHERE cluster_id IS NOT NULL) AS clusters,
    sum(row_count)                                    AS rows_total,
    min(log_time)                                     AS first_seen,
    max(log_time)                                     AS last_seen
FROM das.activity_events
WHERE fingerprint_hash IS NOT NULL
GROUP BY fingerprint_hash;

COMMENT ON VIEW das.query_patterns IS
    'Statements grouped by query fingerprint: executions, failures, users, rows, first and last seen.';

-- Dropped-by-policy counts per stream, shard, rule and day of the link.
CREATE VIEW das.dropped_events AS
SELECT l.stream_name, l.shard_id, l.link_no, l.created_at, d.key AS rule,
       d.value::bigint AS events
FROM das.chain_links AS l, jsonb_each_text(l.dropped) AS d;
