-- das.statements is merged from the stored events by a SECURITY DEFINER function, so the ingest
-- role needs no privilege on the table at all (it had SELECT, INSERT and UPDATE): it can neither
-- rewrite a statement nor insert one that no stored event backs. das.ddl_changes reads this
-- table, and it is not covered by the integrity chain; derived only from das.activity_events
-- (append-only for the ingest role, and chained), it is exactly as trustworthy as they are.
--
-- Connection events are not statements. Aurora MySQL logs CONNECT, DISCONNECT and
-- FAILED_CONNECT as class MAIN with statementId 0 (the seed's MySQL CONNECT example; the field
-- table: the statementId counter "increments with each SQL statement entered by the client"),
-- so every connection event of a session shared one statement key and its DISCONNECT vanished
-- from this table. They stay in das.activity_events only. CHANGEUSER, which AWS documents as "a
-- state change that's part of the MySQL network protocol, not from a statement that you issue",
-- is treated alike.

CREATE FUNCTION das.is_statement_event(class text, command text, statement_id bigint)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(class IN ('MAIN', 'AUX') AND statement_id > 0, false)
       AND upper(coalesce(command, '')) NOT IN
           ('CONNECT', 'DISCONNECT', 'FAILED_CONNECT', 'CHANGEUSER')
$$;

-- The AUX entries of a statement: the union of both lists (one entry per stored event, so
-- merging a range twice changes nothing), in stream order.
CREATE FUNCTION das.merge_aux(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_agg(e ORDER BY (e->>'sequence_number')::numeric,
                                         (e->>'event_index')::integer, e->>'shard_id'),
                    '[]'::jsonb)
    FROM (SELECT DISTINCT ON (e->>'shard_id', e->>'sequence_number', e->>'event_index') e
          FROM jsonb_array_elements(old || new) AS e) AS entries
$$;

-- Merge the statement events of shard `p_shard_id` of stream `p_stream_name` with sequence
-- numbers p_first..p_last (the records a batch just stored) into das.statements. The main columns come from the earliest
-- MAIN event by (log_time, sequence_number, event_index, shard_id), NULL times last; `aux`
-- lists every AUX event. Both are associative, so the result does not depend on how events
-- were split into batches or in which order they arrived, and merging a range again is a
-- no-op: `das-ingest rebuild-statements` merges every shard's whole range into an empty table
-- and gets exactly what the incremental merges built.
CREATE FUNCTION das.merge_statements(
    p_stream_name text, p_shard_id text, p_first numeric, p_last numeric)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    merged bigint;
BEGIN
    INSERT INTO das.statements AS s (
        cluster_id, instance_id, pid, session_id, statement_id, has_main, log_time,
        start_time, end_time, db_user_name, database_name, remote_host, command,
        command_text, object_type, object_name, row_count, exit_code, error_message,
        transaction_id, main_shard_id, main_sequence_number, main_event_index, aux)
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
                 FILTER (WHERE e.class = 'AUX'), '[]'::jsonb)
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
        updated_at = now();
    GET DIAGNOSTICS merged = ROW_COUNT;
    RETURN merged;
END
$$;

-- Only the ingest role may call it (migrate grants EXECUTE; role names are configurable).
REVOKE ALL ON FUNCTION das.merge_statements(text, text, numeric, numeric) FROM PUBLIC;

-- Rows the old merge made of connection events (statementId 0): they were never statements.
-- `das-ingest rebuild-statements` recomputes the whole table by the rule above.
DELETE FROM das.statements WHERE statement_id <= 0;

COMMENT ON TABLE das.statements IS
    'Aurora MySQL statements: the earliest MAIN event of (cluster, instance, pid, session, statementId) with all its AUX events. Derived from das.activity_events by das.merge_statements; connection events are not statements.';
COMMENT ON COLUMN das.activity_events.anomalies IS
    'What was done to store the event: "<field>:type|range|time" (original value in extra, column NULL), "<field>:nul|utf8" (text escaped reversibly), "<field>:bignum" (a number of magnitude 2^63 or more that is not an exact 64-bit integer, or beyond a double: kept exactly as its JSON text), "type:missing|unknown" (an event that is neither a record nor a heartbeat, stored as a row; an unknown type''s value in extra).';
