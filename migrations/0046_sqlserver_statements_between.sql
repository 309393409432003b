-- RDS for SQL Server statements of a time window, as das.sqlserver_statements (0007) gives them.
-- The view reassembles every split audit record of every partition before a filter on its
-- log_time (an aggregate) can apply, so the README's question read the whole table. This
-- function takes the window first, so only its partitions are read: each statement with parts
-- logged in [since, until), reassembled from those parts (a statement whose parts straddle a
-- bound has only the parts inside the window here). Inlined by the planner (one SELECT,
-- STABLE), so the window prunes partitions, as das.sessions_between (0021) does.
CREATE FUNCTION das.sqlserver_statements_between(since timestamptz, until timestamptz)
RETURNS TABLE (
    instance_id text, session_id text, statement_id text, log_time timestamptz,
    db_user_name text, database_name text, remote_host text, class text, command text,
    object_type text, object_name text, command_text text, parts bigint, failed boolean,
    transaction_id text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT
    instance_id,
    session_id,
    statement_id_text,
    min(log_time),
    max(db_user_name),
    max(database_name),
    max(remote_host),
    max(class),
    max(command),
    max(object_type),
    max(object_name),
    string_agg(command_text, '' ORDER BY substatement_id),
    count(*),
    bool_or(das.event_failed(record_version, error_message, exit_code)),
    max(transaction_id)
FROM (
    SELECT DISTINCT ON (instance_id, session_id, statement_id_text, substatement_id) *
    FROM das.activity_events
    WHERE record_version = '1.4' AND statement_id_text IS NOT NULL
      AND log_time >= since AND log_time < until
    ORDER BY instance_id, session_id, statement_id_text, substatement_id, log_time,
             sequence_number, event_index
) part
GROUP BY instance_id, session_id, statement_id_text
$$;

COMMENT ON FUNCTION das.sqlserver_statements_between(timestamptz, timestamptz) IS
    'RDS for SQL Server statements with parts logged in [since, until), reassembled as das.sqlserver_statements does; reads only the window''s partitions.';
