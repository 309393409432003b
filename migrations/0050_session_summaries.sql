-- Sessions kept as a table, merged per batch (issue 16). das.sessions (0007, 0008) aggregated
-- every event of every partition whatever the filter (a filter on an aggregate cannot be pushed
-- below it: > 20 s at 5M and 20M events), and das.sessions_between (0021) every event of its
-- window (1.6 s for one day at 20M). das.session_summaries holds one row per session, merged in
-- the transaction that stores its events, so both read an index.
--
-- Like das.statements (0005) the table is derived from das.activity_events, not chained: it is
-- exactly as trustworthy as the events, and `das-ingest rebuild-sessions` (das.rebuild_sessions
-- below) recomputes it from them. The ingest role has no privilege on it: it merges the events it
-- just stored through the SECURITY DEFINER function das.merge_sessions.
--
-- Semantics are those of 0008's view: one row per (engine, cluster, instance, session, pid);
-- events without a session id, and SQL Server's session 0 (a failed login), make no session.
-- Every column is associative over events (max, min, count), so a session whose events arrive
-- in several batches, or on several shards, sums up to what the view gave. Counts are not
-- idempotent, so each shard's merges are guarded: das.session_merges keeps how far a shard's
-- events were merged, and a range already merged is skipped (see das.merge_sessions).
--
-- The backfill at the end reads every event once (~9 s at 700,000 events on the 2-core bench
-- machine under load; a minute or a few at 20M). Workers of an older version merge no sessions:
-- stop them before migrating, or run `das-ingest rebuild-sessions` once the new ones run.

CREATE TABLE das.session_summaries (
    engine             text,
    cluster_id         text,
    instance_id        text,
    session_id         text   NOT NULL,
    pid                bigint,
    db_user_name       text,
    database_name      text,
    remote_host        text,
    client_application text,
    server_type        text,
    -- the earliest successful session start, the latest session end
    connected_at       timestamptz,
    disconnected_at    timestamptz,
    first_event_at     timestamptz,
    last_event_at      timestamptz,
    -- events that are not MySQL AUX events, and those of them that failed
    statements         bigint NOT NULL,
    failed_statements  bigint NOT NULL,
    -- NULLS NOT DISTINCT: the view's GROUP BY put sessions with no cluster, instance or pid
    -- (or an engine das.engine cannot name) in one group each; so does this key.
    CONSTRAINT session_summaries_key UNIQUE NULLS NOT DISTINCT
        (engine, cluster_id, instance_id, session_id, pid)
);

-- How far each shard's events were merged into das.session_summaries. The consumer stores a
-- shard's records in increasing sequence numbers, each range exactly once (the checkpoint's
-- compare-and-set): a range starting at or below merged_through was merged already.
CREATE TABLE das.session_merges (
    stream_name    text        NOT NULL,
    shard_id       text        NOT NULL,
    merged_through numeric     NOT NULL,
    merged_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_name, shard_id)
);

-- The sessions of the events of shard p_shard_id of stream p_stream_name with sequence numbers
-- p_first..p_last, added to das.session_summaries (no guard: das.merge_sessions and
-- das.merge_redriven_sessions decide whether the events are new). The rows are upserted in key
-- order, so workers of different shards merging the same sessions lock them in the same order
-- and never deadlock.
CREATE FUNCTION das.add_session_events(
    p_stream_name text, p_shard_id text, p_first numeric, p_last numeric)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    merged bigint;
BEGIN
    INSERT INTO das.session_summaries AS s (
        engine, cluster_id, instance_id, session_id, pid, db_user_name, database_name,
        remote_host, client_application, server_type, connected_at, disconnected_at,
        first_event_at, last_event_at, statements, failed_statements)
    SELECT
        das.engine(record_version, server_type), cluster_id, instance_id, session_id, pid,
        max(db_user_name), max(database_name), max(remote_host), max(client_application),
        max(server_type),
        min(log_time) FILTER (WHERE das.is_session_start(command)
            AND NOT das.event_failed(record_version, error_message, exit_code)),
        max(log_time) FILTER (WHERE das.is_session_end(command)),
        min(log_time),
        max(log_time),
        count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'),
        count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                           AND das.event_failed(record_version, error_message, exit_code))
    FROM das.activity_events
    WHERE stream_name = p_stream_name
      AND shard_id = p_shard_id
      AND sequence_number BETWEEN p_first AND p_last
      AND session_id IS NOT NULL
      -- SQL Server reports a failed login in session 0: no session (das.failed_logins has it)
      AND NOT (record_version = '1.4' AND session_id = '0')
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT ON CONSTRAINT session_summaries_key DO UPDATE SET
        -- greatest and least skip NULLs, as max and min do
        db_user_name = greatest(s.db_user_name, EXCLUDED.db_user_name),
        database_name = greatest(s.database_name, EXCLUDED.database_name),
        remote_host = greatest(s.remote_host, EXCLUDED.remote_host),
        client_application = greatest(s.client_application, EXCLUDED.client_application),
        server_type = greatest(s.server_type, EXCLUDED.server_type),
        connected_at = least(s.connected_at, EXCLUDED.connected_at),
        disconnected_at = greatest(s.disconnected_at, EXCLUDED.disconnected_at),
        first_event_at = least(s.first_event_at, EXCLUDED.first_event_at),
        last_event_at = greatest(s.last_event_at, EXCLUDED.last_event_at),
        statements = s.statements + EXCLUDED.statements,
        failed_statements = s.failed_statements + EXCLUDED.failed_statements;
    GET DIAGNOSTICS merged = ROW_COUNT;
    RETURN merged;
END
$$;
REVOKE ALL ON FUNCTION das.add_session_events(text, text, numeric, numeric) FROM PUBLIC;

-- Merge the events a consumer batch just stored (called in the batch's transaction, after its
-- COPY: ingest/warehouse/sink.py). The shard's guard row is written first: a range whose first
-- sequence number is not above merged_through was merged already and is skipped (returns -1),
-- so merging a range twice changes nothing. The guard row's lock also serialises the merges of
-- a shard, and its table's lock lets das.rebuild_sessions hold every merge off.
CREATE FUNCTION das.merge_sessions(
    p_stream_name text, p_shard_id text, p_first numeric, p_last numeric)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    advanced bigint;
BEGIN
    INSERT INTO das.session_merges AS g (stream_name, shard_id, merged_through)
    VALUES (p_stream_name, p_shard_id, p_last)
    ON CONFLICT (stream_name, shard_id) DO UPDATE
        SET merged_through = EXCLUDED.merged_through, merged_at = now()
        WHERE g.merged_through < p_first;
    GET DIAGNOSTICS advanced = ROW_COUNT;
    IF advanced = 0 THEN
        RETURN -1;
    END IF;
    RETURN das.add_session_events(p_stream_name, p_shard_id, p_first, p_last);
END
$$;
-- Only the ingest role may call it (migrate grants EXECUTE; role names are configurable).
REVOKE ALL ON FUNCTION das.merge_sessions(text, text, numeric, numeric) FROM PUBLIC;

-- A dead letter's record re-driven (ingest/warehouse/deadletters.py, as the schema owner): its
-- events are stored long after its shard's later records were merged, so its sequence number
-- is below merged_through, and the guard would skip them. A re-drive stores a record once (it
-- deletes the dead letter in the same transaction), so its events are added unguarded. The
-- guard row is locked all the same: a rebuild running meanwhile is waited for.
CREATE FUNCTION das.merge_redriven_sessions(
    p_stream_name text, p_shard_id text, p_sequence_number numeric)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM das.session_merges
    WHERE stream_name = p_stream_name AND shard_id = p_shard_id FOR UPDATE;
    RETURN das.add_session_events(
        p_stream_name, p_shard_id, p_sequence_number, p_sequence_number);
END
$$;
REVOKE ALL ON FUNCTION das.merge_redriven_sessions(text, text, numeric) FROM PUBLIC;

-- Recompute das.session_summaries from every stored event, in one transaction (the schema
-- owner's: `das-ingest rebuild-sessions`, and this migration). The EXCLUSIVE lock on the guards
-- holds every merge off until the commit (readers still read the old rows). A worker whose
-- batch was copied but not yet merged then finds merged_through at the last event this rebuild
-- saw of its shard, below its batch (those events were not committed, so not seen): it merges
-- them, once.
CREATE FUNCTION das.rebuild_sessions() RETURNS bigint
-- work_mem: the aggregate of every event keeps one group per session (~80k sessions a million
-- events); with the default 4MB it spills to disk.
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET work_mem = '256MB' AS $$
DECLARE
    sessions bigint;
BEGIN
    LOCK TABLE das.session_merges IN EXCLUSIVE MODE;
    DELETE FROM das.session_summaries;
    DELETE FROM das.session_merges;
    INSERT INTO das.session_summaries (
        engine, cluster_id, instance_id, session_id, pid, db_user_name, database_name,
        remote_host, client_application, server_type, connected_at, disconnected_at,
        first_event_at, last_event_at, statements, failed_statements)
    SELECT
        das.engine(record_version, server_type), cluster_id, instance_id, session_id, pid,
        max(db_user_name), max(database_name), max(remote_host), max(client_application),
        max(server_type),
        min(log_time) FILTER (WHERE das.is_session_start(command)
            AND NOT das.event_failed(record_version, error_message, exit_code)),
        max(log_time) FILTER (WHERE das.is_session_end(command)),
        min(log_time),
        max(log_time),
        count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'),
        count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                           AND das.event_failed(record_version, error_message, exit_code))
    FROM das.activity_events
    WHERE session_id IS NOT NULL
      AND NOT (record_version = '1.4' AND session_id = '0')
    GROUP BY 1, 2, 3, 4, 5;
    GET DIAGNOSTICS sessions = ROW_COUNT;
    INSERT INTO das.session_merges (stream_name, shard_id, merged_through)
    SELECT stream_name, shard_id, max(sequence_number)
    FROM das.activity_events
    GROUP BY stream_name, shard_id;
    RETURN sessions;
END
$$;
REVOKE ALL ON FUNCTION das.rebuild_sessions() FROM PUBLIC;

-- The same columns as before (README, Grafana and auditors' queries read them).
CREATE OR REPLACE VIEW das.sessions AS
SELECT
    engine, cluster_id, instance_id, session_id, pid, db_user_name, database_name,
    remote_host, client_application, server_type, connected_at, disconnected_at,
    disconnected_at - connected_at AS duration,
    first_event_at, last_event_at, statements, failed_statements
FROM das.session_summaries;

-- The sessions with any event in [since, until), with their WHOLE-session figures. Until now
-- (0021) each session was aggregated over the window's events only (a session that connected
-- before `since` had connected_at NULL, its counts were the window's); now a session that
-- connected before the window and was active in it shows when it connected, and all its
-- statements. Same signature; still inlined, so the bounds reach the index.
CREATE OR REPLACE FUNCTION das.sessions_between(since timestamptz, until timestamptz)
RETURNS TABLE (
    engine text, cluster_id text, instance_id text, session_id text, pid bigint,
    db_user_name text, database_name text, remote_host text, client_application text,
    server_type text, connected_at timestamptz, disconnected_at timestamptz, duration interval,
    first_event_at timestamptz, last_event_at timestamptz, statements bigint,
    failed_statements bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT * FROM das.sessions s
WHERE s.last_event_at >= since AND s.first_event_at < until
$$;

COMMENT ON TABLE das.session_summaries IS
    'One row per session (das.sessions reads it): derived from das.activity_events by das.merge_sessions in each batch''s transaction, not chained; das.rebuild_sessions() (das-ingest rebuild-sessions) recomputes it.';
COMMENT ON TABLE das.session_merges IS
    'How far each shard''s events were merged into das.session_summaries (a range at or below merged_through is not merged again).';

-- Every stored event, once: the guards start at each shard's last stored event.
SELECT das.rebuild_sessions();

-- The questions asked of it: the sessions that connected in a time window, newest first
-- (alone and for one user), and the sessions with events in a window (das.sessions_between
-- above; retention's delete of the sessions wholly before its cutoff). Built after the
-- backfill: faster than maintaining them row by row.
CREATE INDEX session_summaries_connected ON das.session_summaries (connected_at);
CREATE INDEX session_summaries_user_connected
    ON das.session_summaries (db_user_name, connected_at);
CREATE INDEX session_summaries_last_event ON das.session_summaries (last_event_at);
