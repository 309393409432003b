-- Indexes and plans for the auditors' questions at tens of millions of events (issue 16;
-- measured by `make bench-scale`, docs/performance.md). Every auditor view and README query is
-- served by partition pruning (a time bound) or an index:
--
-- * partial indexes repeat the views' own predicates (migration 0007), so the planner can prove
--   a view's WHERE implies them: failed_logins (it tests upper(command), which no index
--   served) and ddl_changes; failed_statements is served by 0006's activity_events_event_failed;
-- * activity_events_failed (0001) spelled Aurora's failure test out by hand, differently from
--   das.is_failure(), and no view reads that rule any more (they use das.event_failed): it was
--   never used, and is dropped;
-- * activity_events_time leads with log_time (time windows shorter than a partition, newest
--   first);
-- * activity_events_session and activity_events_command served no view and no README query
--   and cost every COPY (the session index was the largest of all): dropped.

DROP INDEX das.activity_events_failed;

CREATE INDEX activity_events_failed_logins ON das.activity_events (log_time)
    WHERE upper(command) IN ('FAILED_CONNECT', 'AUTH FAILURE', 'AUTHENTICATION FAILURE',
                             'LOGIN FAILED')
       OR (das.is_login_command(command)
           AND das.event_failed(record_version, error_message, exit_code));

CREATE INDEX activity_events_ddl ON das.activity_events (log_time)
    WHERE class IS DISTINCT FROM 'MAIN' AND class IS DISTINCT FROM 'AUX'
      AND (class IN ('DDL', 'ROLE') OR das.is_schema_change(command));

CREATE INDEX activity_events_anomalies ON das.activity_events (log_time)
    WHERE anomalies <> '{}';

CREATE INDEX activity_events_time ON das.activity_events (log_time);

DROP INDEX das.activity_events_session;
DROP INDEX das.activity_events_command;

-- Sessions of a time window, as das.sessions (0007, 0008) gives them. The view aggregates
-- every event of every session before a filter on its connected_at can apply (a filter on an
-- aggregate cannot be pushed below it): at 3M events the README's one-day question took 12-40 s
-- (docs/performance.md). This function takes the window first, so only its partitions are
-- read: each session with events in [since, until), aggregated over those events (a session
-- that connected before `since` has connected_at NULL here). Inlined by the planner (one
-- SELECT, STABLE), so the window prunes partitions.
CREATE FUNCTION das.sessions_between(since timestamptz, until timestamptz)
RETURNS TABLE (
    engine text, cluster_id text, instance_id text, session_id text, pid bigint,
    db_user_name text, database_name text, remote_host text, client_application text,
    server_type text, connected_at timestamptz, disconnected_at timestamptz, duration interval,
    first_event_at timestamptz, last_event_at timestamptz, statements bigint,
    failed_statements bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT
    das.engine(record_version, server_type),
    cluster_id,
    instance_id,
    session_id,
    pid,
    max(db_user_name),
    max(database_name),
    max(remote_host),
    max(client_application),
    max(server_type),
    min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)),
    max(log_time) FILTER (WHERE das.is_session_end(command)),
    max(log_time) FILTER (WHERE das.is_session_end(command))
      - min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)),
    min(log_time),
    max(log_time),
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'),
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                       AND das.event_failed(record_version, error_message, exit_code))
FROM das.activity_events
WHERE session_id IS NOT NULL AND log_time >= since AND log_time < until
  -- as das.sessions (0008): SQL Server's session 0 is a failed login, no session
  AND NOT (record_version = '1.4' AND session_id = '0')
GROUP BY das.engine(record_version, server_type), cluster_id, instance_id, session_id, pid
$$;
