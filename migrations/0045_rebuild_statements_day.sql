-- `das-ingest rebuild-statements --day`: das.merge_statements restricted to the events of a time
-- window, so a rebuild of one day reads only that day's partitions (and a margin around it).
-- The body is das.merge_statements of migration 0026 with one more condition (log_time in
-- [p_since, p_until)); tests/test_rebuild_statements.py holds a day's rebuild equal to a full
-- rebuild's rows of that day. Like das.merge_statements, only the schema owner runs it (it is
-- not the ingest path: no EXECUTE is granted).

CREATE FUNCTION das.merge_statements_between(
    p_stream_name text, p_shard_id text, p_first numeric, p_last numeric,
    p_since timestamptz, p_until timestamptz)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    merged bigint;
BEGIN
    INSERT INTO das.statements AS s (
        cluster_id, instance_id, pid, session_id, statement_id, has_main, log_time,
        start_time, end_time, db_user_name, database_name, remote_host, command,
        command_text, object_type, object_name, row_count, exit_code, error_message,
        transaction_id, main_shard_id, main_sequence_number, main_event_index, aux,
        stream_name)
    SELECT
        e.cluster_id, e.instance_id, e.pid, e.session_id, e.statement_id,
        bool_or(e.class = 'MAIN'),
        max(e.log_time) FILTER (WHERE e.first_main),
        max(e.start_time) FILTER (WHERE e.first_main),
        max(e.end_time) FILTER (WHERE e.first_main),
        max(e.db_user_name) FILTER (WHERE e.first_main),
        max(e.database_name) FILTER (WHERE e.first_main),
        max(e.remote_host) FILTER (WHERE e.first_main),
        max(e.command) FILTER (WHERE e.first_main),
        max(e.command_text) FILTER (WHERE e.first_main),
        max(e.object_type) FILTER (WHERE e.first_main),
        max(e.object_name) FILTER (WHERE e.first_main),
        max(e.row_count) FILTER (WHERE e.first_main),
        max(e.exit_code) FILTER (WHERE e.first_main),
        max(e.error_message) FILTER (WHERE e.first_main),
        max(e.transaction_id) FILTER (WHERE e.first_main),
        max(e.shard_id) FILTER (WHERE e.first_main),
        max(e.sequence_number) FILTER (WHERE e.first_main),
        max(e.event_index) FILTER (WHERE e.first_main),
        coalesce(jsonb_agg(jsonb_build_object(
                     'command', e.command, 'object_type', e.object_type,
                     'object_name', e.object_name, 'command_text', e.command_text,
                     'log_time', to_char(e.log_time AT TIME ZONE 'UTC',
                                         'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
                     'shard_id', e.shard_id, 'sequence_number', e.sequence_number::text,
                     'event_index', e.event_index)
                   ORDER BY e.sequence_number, e.event_index, e.shard_id)
                 FILTER (WHERE e.class = 'AUX'), '[]'::jsonb),
        p_stream_name
    FROM (
        SELECT a.*,
               a.class = 'MAIN' AND row_number() OVER (
                   PARTITION BY a.cluster_id, a.instance_id, a.pid, a.session_id,
                                a.statement_id, a.class
                   ORDER BY a.log_time, a.sequence_number, a.event_index, a.shard_id) = 1
                   AS first_main
        FROM das.activity_events AS a
        WHERE a.stream_name = p_stream_name
          AND a.shard_id = p_shard_id
          AND a.sequence_number BETWEEN p_first AND p_last
          AND a.log_time >= p_since AND a.log_time < p_until
          AND das.is_statement_event(a.class, a.command, a.statement_id)
    ) AS e
    GROUP BY e.cluster_id, e.instance_id, e.pid, e.session_id, e.statement_id
    ON CONFLICT ON CONSTRAINT statements_key DO UPDATE SET
        (log_time, start_time, end_time, db_user_name, database_name, remote_host, command,
         command_text, object_type, object_name, row_count, exit_code, error_message,
         transaction_id, main_shard_id, main_sequence_number, main_event_index) =
        (SELECT
            CASE WHEN take THEN EXCLUDED.log_time ELSE s.log_time END,
            CASE WHEN take THEN EXCLUDED.start_time ELSE s.start_time END,
            CASE WHEN take THEN EXCLUDED.end_time ELSE s.end_time END,
            CASE WHEN take THEN EXCLUDED.db_user_name ELSE s.db_user_name END,
            CASE WHEN take THEN EXCLUDED.database_name ELSE s.database_name END,
            CASE WHEN take THEN EXCLUDED.remote_host ELSE s.remote_host END,
            CASE WHEN take THEN EXCLUDED.command ELSE s.command END,
            CASE WHEN take THEN EXCLUDED.command_text ELSE s.command_text END,
            CASE WHEN take THEN EXCLUDED.object_type ELSE s.object_type END,
            CASE WHEN take THEN EXCLUDED.object_name ELSE s.object_name END,
            CASE WHEN take THEN EXCLUDED.row_count ELSE s.row_count END,
            CASE WHEN take THEN EXCLUDED.exit_code ELSE s.exit_code END,
            CASE WHEN take THEN EXCLUDED.error_message ELSE s.error_message END,
            CASE WHEN take THEN EXCLUDED.transaction_id ELSE s.transaction_id END,
            CASE WHEN take THEN EXCLUDED.main_shard_id ELSE s.main_shard_id END,
            CASE WHEN take THEN EXCLUDED.main_sequence_number ELSE s.main_sequence_number END,
            CASE WHEN take THEN EXCLUDED.main_event_index ELSE s.main_event_index END
         FROM (SELECT EXCLUDED.has_main AND (NOT s.has_main OR
                 (coalesce(EXCLUDED.log_time, 'infinity'), EXCLUDED.main_sequence_number,
                  EXCLUDED.main_event_index, EXCLUDED.main_shard_id)
               < (coalesce(s.log_time, 'infinity'), s.main_sequence_number,
                  s.main_event_index, s.main_shard_id)) AS take) AS earliest),
        has_main = s.has_main OR EXCLUDED.has_main,
        aux = das.merge_aux(s.aux, EXCLUDED.aux),
        stream_name = coalesce(s.stream_name, EXCLUDED.stream_name),
        updated_at = now();
    GET DIAGNOSTICS merged = ROW_COUNT;
    RETURN merged;
END
$$;

REVOKE ALL ON FUNCTION das.merge_statements_between(
    text, text, numeric, numeric, timestamptz, timestamptz) FROM PUBLIC;
