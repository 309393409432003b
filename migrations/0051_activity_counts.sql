-- Activity counted per UTC day, merged per batch (issue 16). The README's "What privileged users
-- did in the last week" aggregated every event of the week (1.45 s for ~733,000 events at 20M:
-- the only README question over 1 s). das.activity_counts holds, per day, stream, shard, user
-- and command, how many events there were and the last one's time, merged in the transaction
-- that stores the events, in the same guarded calls as das.session_summaries (0050). The
-- question, das.privileged_activity_since below, reads the rollup and the raw events of at most
-- half of the window's first, partial, day: its cost is that of half a day's privileged events
-- at most, whatever the warehouse's size, and grows with the window's length by a few hundred
-- rollup rows a day.
--
-- Like das.statements (0005) and das.session_summaries (0050) the table is derived from
-- das.activity_events, not chained: it is exactly as trustworthy as the events, and
-- `das-ingest rebuild-sessions` (das.rebuild_sessions, redefined below) recomputes it with the
-- sessions. The ingest role has no privilege on it: das.merge_sessions (SECURITY DEFINER) adds
-- the batch's events to both tables under one guard, so a range merged twice counts once in
-- both.
--
-- Every user is counted, not only those of das.privileged_users: the question joins the list
-- as it is when asked, as the das.privileged_activity view does, so editing the list needs no
-- rebuild. Only what the view can show is counted: events that are not MySQL AUX events (as the
-- view), with a log_time (the question bounds it).
--
-- The key holds stream_name and shard_id on purpose: a shard is merged by the one worker that
-- holds its lease, so workers of different shards never update the same row. Counters per day,
-- user and command shared by every shard would take a row lock each commit holds to its end:
-- every worker's commit would wait for the others'. The question sums the shards' rows.
--
-- The backfill at the end reads every event once (das.rebuild_activity_counts: 4.0-5.8 s at 2M
-- events on the 2-core bench machine under load average 6-11). Workers of an older version
-- count nothing: stop them before migrating (as for 0050), or run `das-ingest rebuild-sessions`
-- once the new ones run.

CREATE TABLE das.activity_counts (
    -- the UTC day of log_time
    day          date        NOT NULL,
    stream_name  text        NOT NULL,
    shard_id     text        NOT NULL,
    db_user_name text,
    command      text,
    events       bigint      NOT NULL,
    last_seen    timestamptz NOT NULL,
    -- NULLS NOT DISTINCT: events without a user or a command count in one row each, as a
    -- GROUP BY puts them in one group.
    CONSTRAINT activity_counts_key UNIQUE NULLS NOT DISTINCT
        (day, stream_name, shard_id, db_user_name, command)
);

-- The events of shard p_shard_id of stream p_stream_name with sequence numbers
-- p_first..p_last, added to das.session_summaries (as 0050's das.add_session_events did) and to
-- das.activity_counts (no guard: das.merge_sessions and das.merge_redriven_sessions decide
-- whether the events are new); returns the sessions merged. The batch's rows are read once
-- (a MATERIALIZED CTE) for both tables: measured on 200 batches of ~1,700 events at 1M events,
-- 18.4 ms a batch, where 0050's sessions alone took 23.4 ms and sessions and counts read
-- separately 39.9 ms. Rows are upserted in key order (sessions: workers of different shards
-- merging the same session lock it in the same order; counts: each key is one shard's).
CREATE FUNCTION das.add_derived_events(
    p_stream_name text, p_shard_id text, p_first numeric, p_last numeric)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    merged bigint;
BEGIN
    WITH batch AS MATERIALIZED (
        SELECT log_time, db_user_name, command, class, record_version, server_type, cluster_id,
               instance_id, session_id, pid, database_name, remote_host, client_application,
               error_message, exit_code
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
REVOKE ALL ON FUNCTION das.add_derived_events(text, text, numeric, numeric) FROM PUBLIC;

-- 0050's functions, adding to both derived tables (same signatures: the grants and the sink's
-- and re-drive's SQL stay). One guard row covers both: a range is merged into both or neither.
CREATE OR REPLACE FUNCTION das.merge_sessions(
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
    RETURN das.add_derived_events(p_stream_name, p_shard_id, p_first, p_last);
END
$$;

CREATE OR REPLACE FUNCTION das.merge_redriven_sessions(
    p_stream_name text, p_shard_id text, p_sequence_number numeric)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM das.session_merges
    WHERE stream_name = p_stream_name AND shard_id = p_shard_id FOR UPDATE;
    RETURN das.add_derived_events(
        p_stream_name, p_shard_id, p_sequence_number, p_sequence_number);
END
$$;

-- Replaced by das.add_derived_events (nothing else called it).
DROP FUNCTION das.add_session_events(text, text, numeric, numeric);

-- Recompute das.activity_counts from every stored event (das.rebuild_sessions and this
-- migration, as the schema owner, holding the guards).
CREATE FUNCTION das.rebuild_activity_counts() RETURNS bigint
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
    RETURN counted;
END
$$;
REVOKE ALL ON FUNCTION das.rebuild_activity_counts() FROM PUBLIC;

-- 0050's rebuild, recomputing the counts too in the same transaction (its lock on the guards
-- is taken first, so both tables and the guards agree on which events were seen).
CREATE OR REPLACE FUNCTION das.rebuild_sessions() RETURNS bigint
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
    PERFORM das.rebuild_activity_counts();
    INSERT INTO das.session_merges (stream_name, shard_id, merged_through)
    SELECT stream_name, shard_id, max(sequence_number)
    FROM das.activity_events
    GROUP BY stream_name, shard_id;
    RETURN sessions;
END
$$;

-- What the users of das.privileged_users (as listed now) did after `since`: per user and
-- command, the events and the last one's time; exactly the aggregate of das.privileged_activity
-- WHERE log_time > since. The whole UTC days after since's day come from das.activity_counts.
-- Since's own day is read on its smaller side: since in the day's second half, its events after
-- since; in its first half, the day's counts less its events up to since (a group whose events
-- all came before since nets to 0 and is left out; the day's last_seen, when after since, is
-- the window's). So at most half a day of events is read, whatever the window's length. The
-- side not taken is a one-time filter: never executed. Inlined (LANGUAGE sql, STABLE), so the
-- planner sees the bounds: the events' partitions of other days are pruned.
CREATE FUNCTION das.privileged_activity_since(since timestamptz)
RETURNS TABLE (db_user_name text, command text, events bigint, last_seen timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT a.db_user_name, a.command, sum(a.events)::bigint, max(a.last_seen)
FROM (
    SELECT c.db_user_name, c.command, c.events, c.last_seen
    FROM das.activity_counts c
    JOIN das.privileged_users p ON p.db_user_name = c.db_user_name
    WHERE c.day >= (since AT TIME ZONE 'UTC')::date
        + CASE WHEN since < date_trunc('day', since, 'UTC') + interval '12 hours' THEN 0
               ELSE 1 END
    UNION ALL
    SELECT e.db_user_name, e.command, count(*), max(e.log_time)
    FROM das.privileged_activity e
    WHERE since >= date_trunc('day', since, 'UTC') + interval '12 hours'
      AND e.log_time > since
      -- the next UTC midnight (hours: interval days follow the session's time zone)
      AND e.log_time < date_trunc('day', since, 'UTC') + interval '24 hours'
    GROUP BY 1, 2
    UNION ALL
    SELECT e.db_user_name, e.command, -count(*), NULL
    FROM das.privileged_activity e
    WHERE since < date_trunc('day', since, 'UTC') + interval '12 hours'
      AND e.log_time >= date_trunc('day', since, 'UTC')
      AND e.log_time <= since
    GROUP BY 1, 2
) a
GROUP BY 1, 2
HAVING sum(a.events) > 0
$$;

COMMENT ON TABLE das.activity_counts IS
    'Events (not MySQL AUX) per UTC day, stream, shard, user and command (das.privileged_activity_since reads it): derived from das.activity_events by das.merge_sessions in each batch''s transaction, not chained; das.rebuild_sessions() (das-ingest rebuild-sessions) recomputes it.';
COMMENT ON FUNCTION das.privileged_activity_since(timestamptz) IS
    'Per user of das.privileged_users and command, the events after since and the last one''s time: das.privileged_activity''s aggregate, from das.activity_counts and at most half a day of events (since''s day, on its smaller side).';

-- Every stored event, once.
SELECT das.rebuild_activity_counts();
