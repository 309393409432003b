-- Indexes and plans for the auditors' questions at tens of millions of events (issue 16;
-- measured by `make bench-scale`, docs/performance.md). Every auditor view and README query is
-- served by partition pruning (a time bound) or an index:
--
-- * the partial indexes below repeat the views' own predicates (das.is_failure, ...), so the
--   planner can prove a view's WHERE implies them. The old activity_events_failed spelled the
--   failure test out by hand, differently from das.is_failure(), and was never used;
-- * failed_logins tests upper(command), which no index served: its whole predicate is now a
--   partial index;
-- * activity_events_time leads with log_time (time windows shorter than a partition, newest
--   first);
-- * activity_events_session and activity_events_command served no view and no README query
--   and cost every COPY (the session index was the largest of all): dropped.

DROP INDEX das.activity_events_failed;
CREATE INDEX activity_events_failed ON das.activity_events (log_time)
    WHERE das.is_failure(error_message, exit_code);

CREATE INDEX activity_events_failed_logins ON das.activity_events (log_time)
    WHERE upper(command) IN ('FAILED_CONNECT', 'AUTH FAILURE', 'AUTHENTICATION FAILURE')
       OR (das.is_login_command(command) AND das.is_failure(error_message, exit_code));

CREATE INDEX activity_events_ddl ON das.activity_events (log_time)
    WHERE class IS DISTINCT FROM 'MAIN' AND class IS DISTINCT FROM 'AUX'
      AND (class IN ('DDL', 'ROLE')
           OR command ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE|COMMENT)\M');

CREATE INDEX activity_events_anomalies ON das.activity_events (log_time)
    WHERE anomalies <> '{}';

CREATE INDEX activity_events_time ON das.activity_events (log_time);

DROP INDEX das.activity_events_session;
DROP INDEX das.activity_events_command;

-- Sessions of a time window. The das.sessions view aggregates every event of every session
-- before a filter on its connected_at can apply (a filter on an aggregate cannot be pushed
-- below it): at 3M events the README's one-day question took ~12 s. This function takes the
-- window first, so only its partitions are read: each session with events in [since, until),
-- aggregated over those events (a session that connected before `since` has connected_at NULL
-- here). Inlined by the planner (one SELECT, STABLE), so the window prunes partitions.
CREATE FUNCTION das.sessions_between(since timestamptz, until timestamptz)
RETURNS TABLE (
    cluster_id text, instance_id text, session_id text, pid bigint, db_user_name text,
    database_name text, remote_host text, client_application text, server_type text,
    connected_at timestamptz, disconnected_at timestamptz, duration interval,
    first_event_at timestamptz, last_event_at timestamptz, statements bigint,
    failed_statements bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT
    cluster_id,
    instance_id,
    session_id,
    pid,
    max(db_user_name),
    max(database_name),
    max(remote_host),
    max(client_application),
    max(server_type),
    min(log_time) FILTER (WHERE upper(command) = 'CONNECT'),
    max(log_time) FILTER (WHERE upper(command) = 'DISCONNECT'),
    max(log_time) FILTER (WHERE upper(command) = 'DISCONNECT')
      - min(log_time) FILTER (WHERE upper(command) = 'CONNECT'),
    min(log_time),
    max(log_time),
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'),
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                       AND das.is_failure(error_message, exit_code))
FROM das.activity_events
WHERE session_id IS NOT NULL AND log_time >= since AND log_time < until
GROUP BY cluster_id, instance_id, session_id, pid
$$;
