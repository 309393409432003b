-- Provenance across streams, and tamper evidence version 2 (docs/integrity.md).
--
-- * das.activity_events.stream_name: the stream an event came from. Shard ids repeat across
--   streams ("shardId-000000000000" is in every stream), so an event is identified by stream,
--   shard, sequence number and event index; the provenance index says so now.
-- * Chain links of version 2 also cover stream_name (in every event's encoding), the records
--   of their range that were dead-lettered (sequence number and SHA-256 of the raw record),
--   and their own created_at. Links written before this migration stay version 1 and verify
--   as before.
-- * Anchors of version 2 name the key and the algorithm in the message they authenticate.
-- * das.leases.end_sequence: the last sequence number of a shard that reached SHARD_END, so
--   `verify` can tell a closed shard's chain was cut short.
-- * das.retention_log.keep: the retention period a removal ran with.

-- Existing events get the stream that the warehouse's own records attribute them to:
--  1. a warehouse that only ever knew one stream: that stream, for every event (a constant
--     default: PostgreSQL records it once, without rewriting the table);
--  2. otherwise, per event: the only stream whose leases, links or dead letters name the
--     event's shard; else the stream named after the event's cluster (Aurora names a stream
--     aws-rds-das-<cluster resource id>, and clusterId is that resource id) when that stream
--     has the shard; else the only stream whose chain links cover the event's sequence number
--     on its shard. This rewrites the events table once.
-- Events none of these attribute keep stream_name '' (a WARNING gives their number); `verify`
-- checks them against the version 1 links of every stream of their shard, so if two streams
-- share such a shard it reports them as inserted in one of the two: set their stream_name by
-- hand (UPDATE ... SET stream_name = ... WHERE stream_name = '' AND ...) once you know it.
DO $$
DECLARE
    streams text[];
    unresolved bigint;
BEGIN
    SELECT coalesce(array_agg(DISTINCT s ORDER BY s), '{}') INTO streams FROM (
        SELECT stream_name FROM das.chain_links
        UNION SELECT stream_name FROM das.leases
        UNION SELECT stream_name FROM das.dead_letters
        UNION SELECT stream_name FROM das.heartbeats
    ) AS known (s);
    IF cardinality(streams) <= 1 THEN
        EXECUTE format('ALTER TABLE das.activity_events '
                       'ADD COLUMN stream_name text NOT NULL DEFAULT %L',
                       coalesce(streams[1], ''));
        RETURN;
    END IF;
    ALTER TABLE das.activity_events ADD COLUMN stream_name text NOT NULL DEFAULT '';
    CREATE TEMP TABLE shard_streams ON COMMIT DROP AS
        SELECT DISTINCT stream_name, shard_id FROM (
            SELECT stream_name, shard_id FROM das.chain_links
            UNION SELECT stream_name, shard_id FROM das.leases
            UNION SELECT stream_name, shard_id FROM das.dead_letters
        ) AS s;
    UPDATE das.activity_events e SET stream_name = sole.stream_name
    FROM (SELECT shard_id, min(stream_name) AS stream_name FROM shard_streams
          GROUP BY shard_id HAVING count(*) = 1) AS sole
    WHERE e.stream_name = '' AND e.shard_id = sole.shard_id;
    UPDATE das.activity_events e SET stream_name = 'aws-rds-das-' || e.cluster_id
    WHERE e.stream_name = '' AND e.cluster_id IS NOT NULL
      AND EXISTS (SELECT 1 FROM shard_streams s
                  WHERE s.stream_name = 'aws-rds-das-' || e.cluster_id
                    AND s.shard_id = e.shard_id);
    UPDATE das.activity_events e SET stream_name = (
        SELECT min(l.stream_name) FROM das.chain_links l
        WHERE l.shard_id = e.shard_id
          AND e.sequence_number BETWEEN l.first_sequence AND l.last_sequence)
    WHERE e.stream_name = ''
      AND (SELECT count(DISTINCT l.stream_name) FROM das.chain_links l
           WHERE l.shard_id = e.shard_id
             AND e.sequence_number BETWEEN l.first_sequence AND l.last_sequence) = 1;
    SELECT count(*) INTO unresolved FROM das.activity_events WHERE stream_name = '';
    IF unresolved > 0 THEN
        RAISE WARNING '% existing events could not be attributed to one stream: their '
                      'stream_name is '''' (see docs/integrity.md, "Upgrading")', unresolved;
    END IF;
END
$$;
-- New rows name their stream (das-ingest's COPY always does).
ALTER TABLE das.activity_events ALTER COLUMN stream_name DROP DEFAULT;
COMMENT ON COLUMN das.activity_events.stream_name IS
    'The Kinesis stream the event was read from (shard ids repeat across streams). '
    'Empty only for events stored before migration 0004 that could not be attributed.';

-- No event is ever stored twice, per stream.
DROP INDEX das.activity_events_provenance;
CREATE UNIQUE INDEX activity_events_provenance
    ON das.activity_events (stream_name, shard_id, sequence_number, event_index, log_time)
    NULLS NOT DISTINCT;

ALTER TABLE das.chain_links
    ADD COLUMN version smallint NOT NULL DEFAULT 1 CONSTRAINT chain_links_version
        CHECK (version IN (1, 2)),
    -- [{"sequence_number": "<n>", "sha256": "<hex of the raw record>"}, ...]: in a batch link,
    -- the records of its range that were dead-lettered; in a redrive link, the dead letter
    -- it stored (version 2 links only)
    ADD COLUMN dead_letters jsonb NOT NULL DEFAULT '[]';
-- Version 2 links are written with every field named, created_at included (it is hashed).
ALTER TABLE das.chain_links
    ALTER COLUMN version DROP DEFAULT,
    ALTER COLUMN created_at DROP DEFAULT;

ALTER TABLE das.chain_anchors
    ADD COLUMN version smallint NOT NULL DEFAULT 1 CONSTRAINT chain_anchors_version
        CHECK (version IN (1, 2));
ALTER TABLE das.chain_anchors ALTER COLUMN version DROP DEFAULT;

ALTER TABLE das.leases ADD COLUMN end_sequence numeric;
COMMENT ON COLUMN das.leases.end_sequence IS
    'For a shard at SHARD_END: the sequence number of its last record (NULL: it had none, or '
    'it ended before migration 0004).';

ALTER TABLE das.retention_log ADD COLUMN keep interval;
COMMENT ON COLUMN das.retention_log.keep IS
    'The retention period the removal ran with (NULL before migration 0004).';
