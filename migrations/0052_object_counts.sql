-- Activity per object counted per UTC day, merged per batch (issue 16). The README's "Who
-- touched a table in the last week, and how" grouped every event of the week that names the
-- objects: at 20M events (bench.scale, 2026-12-04) the fill's busiest table is named by
-- ~117,000 events a day, so a week aggregated ~840,000 rows, 0.94 s on the server and 1.02 s
-- at the client, over the 1 s target. das.object_counts keeps, per object, UTC day, stream,
-- shard, user and command, the events and the first and last one's times, merged with the
-- sessions and das.activity_counts (0051) in das.add_derived_events, under the same per-shard
-- guard; das.object_activity_since below reads it and one day's events of the objects at most.
--
-- Every event that names an object is counted, MySQL AUX events included: the question reads
-- das.activity_events, not a view that leaves them out. Derived, not chained, like 0051's table
-- (`das-ingest rebuild-sessions` recomputes it, with the others); the ingest role has no
-- privilege on it. Retention deletes a dropped day's rows with the day's events. As for 0050
-- and 0051: workers of an older version count nothing, so stop them before migrating, or run
-- `das-ingest rebuild-sessions` once the new ones run.

CREATE TABLE das.object_counts (
    object_name  text        NOT NULL,
    -- the UTC day of log_time
    day          date        NOT NULL,
    stream_name  text        NOT NULL,
    shard_id     text        NOT NULL,
    db_user_name text,
    command      text,
    events       bigint      NOT NULL,
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    -- Led by the object: the question names objects and a range of days. Stream and shard are
    -- in the key for 0051's reason (each row is one shard's: workers never wait on each
    -- other's counters); NULLS NOT DISTINCT as a GROUP BY groups NULLs.
    CONSTRAINT object_counts_key UNIQUE NULLS NOT DISTINCT
        (object_name, day, stream_name, shard_id, db_user_name, command)
);

-- 0051's function, adding the batch's events to das.object_counts too (same single read of the
-- batch's rows; same signature, so das.merge_sessions and das.merge_redriven_sessions, which
-- call it, stay as they are).

CREATE OR REPLACE FUNCTION das.add_derived_events(
    p_stream_name text, p_shard_id text, p_first numeric, p_last numeric)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    merged bigint;
BEGIN
    WITH batch AS MATERIALIZED (
        SELECT log_time, db_user_name, command, class, record_version, server_type, cluster_id,
               instance_id, session_id, pid, database_name, remote_host, client_application,
               error_message, exit_code, object_name
        FROM das.activity_events
        WHERE stream_name = p_stream_name
          AND shard_id = p_shard_id
          AND sequence_number BETWEEN p_first AND p_last
    ), counted AS (
        -- (a data-modifying CTE runs whether or not the statement reads what it returns)
        INSERT INTO das.activity_counts AS c (
            day, stream_name, shard_id, db_user_name, command, events, last_seen)
        SELECT (log_time AT TIME ZONE 'UTC')::date, p_stream_name, p_shard_id, db_user_name,
               command, count(*), max(log_time)
        FROM batch
        WHERE log_time IS NOT NULL
          AND class IS DISTINCT FROM 'AUX'
        GROUP BY 1, 4, 5
        ORDER BY 1, 4, 5
        ON CONFLICT ON CONSTRAINT activity_counts_key DO UPDATE SET
            events = c.events + EXCLUDED.events,
            last_seen = greatest(c.last_seen, EXCLUDED.last_seen)
        RETURNING 1
    ), objects AS (
        INSERT INTO das.object_counts AS o (
            object_name, day, stream_name, shard_id, db_user_name, command, events,
            first_seen, last_seen)
        SELECT object_name, (log_time AT TIME ZONE 'UTC')::date, p_stream_name, p_shard_id,
               db_user_name, command, count(*), min(log_time), max(log_time)
        FROM batch
        WHERE log_time IS NOT NULL
          AND object_name IS NOT NULL
        GROUP BY 1, 2, 5, 6
        ORDER BY 1, 2, 5, 6
        ON CONFLICT ON CONSTRAINT object_counts_key DO UPDATE SET
            events = o.events + EXCLUDED.events,
            first_seen = least(o.first_seen, EXCLUDED.first_seen),
            last_seen = greatest(o.last_seen, EXCLUDED.last_seen)
        RETURNING 1
    )
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
    FROM batch
    WHERE session_id IS NOT NULL
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

-- Recompute das.object_counts from every stored event (0051's das.rebuild_activity_counts
-- below, so das.rebuild_sessions, and this migration's backfill; as the schema owner, holding
-- the guards).
CREATE FUNCTION das.rebuild_object_counts() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET work_mem = '256MB' AS $$
DECLARE
    counted bigint;
BEGIN
    LOCK TABLE das.session_merges IN EXCLUSIVE MODE;
    DELETE FROM das.object_counts;
    INSERT INTO das.object_counts (
        object_name, day, stream_name, shard_id, db_user_name, command, events, first_seen,
        last_seen)
    SELECT object_name, (log_time AT TIME ZONE 'UTC')::date, stream_name, shard_id,
           db_user_name, command, count(*), min(log_time), max(log_time)
    FROM das.activity_events
    WHERE log_time IS NOT NULL
      AND object_name IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6;
    GET DIAGNOSTICS counted = ROW_COUNT;
    RETURN counted;
END
$$;
REVOKE ALL ON FUNCTION das.rebuild_object_counts() FROM PUBLIC;

-- 0051's rebuild of the counts, recomputing das.object_counts too (das.rebuild_sessions calls
-- it in its transaction, holding the guards).
CREATE OR REPLACE FUNCTION das.rebuild_activity_counts() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET work_mem = '256MB' AS $$
DECLARE
    counted bigint;
BEGIN
    LOCK TABLE das.session_merges IN EXCLUSIVE MODE;
    DELETE FROM das.activity_counts;
    INSERT INTO das.activity_counts (
        day, stream_name, shard_id, db_user_name, command, events, last_seen)
    SELECT (log_time AT TIME ZONE 'UTC')::date, stream_name, shard_id, db_user_name, command,
           count(*), max(log_time)
    FROM das.activity_events
    WHERE log_time IS NOT NULL
      AND class IS DISTINCT FROM 'AUX'
    GROUP BY 1, 2, 3, 4, 5;
    GET DIAGNOSTICS counted = ROW_COUNT;
    PERFORM das.rebuild_object_counts();
    RETURN counted;
END
$$;

-- Who did what to the objects named, after `since`: per user and command, the events and the
-- first and last one's times; exactly the aggregate of das.activity_events WHERE object_name =
-- ANY(objects) AND log_time > since. The whole UTC days after since's day come from
-- das.object_counts, since's own day (after since) from the events (through the index on
-- object_name and log_time): at most one day of the objects' events is read, whatever the
-- window's length. (0051's trick of reading a day on its smaller side does not apply: a
-- day's first_seen cannot be taken back.) Inlined (LANGUAGE sql, STABLE): the bounds reach the
-- plan, and the events' partitions of other days are pruned.
CREATE FUNCTION das.object_activity_since(objects text[], since timestamptz)
RETURNS TABLE (db_user_name text, command text, events bigint, first_seen timestamptz,
               last_seen timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT a.db_user_name, a.command, sum(a.events)::bigint, min(a.first_seen), max(a.last_seen)
FROM (
    SELECT c.db_user_name, c.command, c.events, c.first_seen, c.last_seen
    FROM das.object_counts c
    WHERE c.object_name = ANY (objects)
      AND c.day > (since AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT e.db_user_name, e.command, count(*), min(e.log_time), max(e.log_time)
    FROM das.activity_events e
    WHERE e.object_name = ANY (objects)
      AND e.log_time > since
      -- the next UTC midnight (hours: interval days follow the session's time zone)
      AND e.log_time < date_trunc('day', since, 'UTC') + interval '24 hours'
    GROUP BY 1, 2
) a
GROUP BY 1, 2
$$;

COMMENT ON TABLE das.object_counts IS
    'Events naming an object (MySQL AUX included) per object, UTC day, stream, shard, user and command (das.object_activity_since reads it): derived from das.activity_events by das.merge_sessions in each batch''s transaction, not chained; das.rebuild_sessions() (das-ingest rebuild-sessions) recomputes it.';
COMMENT ON FUNCTION das.object_activity_since(text[], timestamptz) IS
    'Per user and command, the events naming one of objects after since, with the first and last one''s time: from das.object_counts and at most one day of events.';

-- Every stored event that names an object, once (0051's counts are left as they are).
SELECT das.rebuild_object_counts();
