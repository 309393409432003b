-- The stream of every row the auditor views show, so dashboards and queries can be cut by
-- stream (several clusters' streams may share one warehouse; shard ids repeat across them).
--
-- das.statements gains stream_name, set by das.merge_statements from the stream it merges
-- (a statement key belongs to one cluster, hence to one stream; a row keeps the first stream
-- it was merged from). Rows merged before this migration get it from their earliest MAIN
-- event; the rest (AUX only so far) get it at their next merge, or from
-- `das-ingest rebuild-statements`.
-- failed_logins, failed_statements, ddl_changes and privileged_activity gain a last column
-- stream_name (CREATE OR REPLACE VIEW may only append columns).

ALTER TABLE das.statements ADD COLUMN stream_name text;

UPDATE das.statements s SET stream_name = e.stream_name
FROM das.activity_events e
WHERE s.stream_name IS NULL
  AND e.shard_id = s.main_shard_id
  AND e.sequence_number = s.main_sequence_number
  AND e.event_index = s.main_event_index
  AND e.log_time = s.log_time;  -- the same event: its time also prunes the partitions

CREATE OR REPLACE FUNCTION das.merge_statements(
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

CREATE OR REPLACE VIEW das.failed_logins AS
SELECT
    log_time, cluster_id, instance_id, db_user_name, database_name, remote_host, remote_port,
    client_application, command, exit_code, error_message, session_id, pid, server_type,
    shard_id, sequence_number, event_index,
    das.engine(record_version, server_type) AS engine, command_text, stream_name
FROM das.activity_events
WHERE upper(command) IN ('FAILED_CONNECT', 'AUTH FAILURE', 'AUTHENTICATION FAILURE',
                         'LOGIN FAILED')
   OR (das.is_login_command(command) AND das.event_failed(record_version, error_message, exit_code));

CREATE OR REPLACE VIEW das.failed_statements AS
SELECT
    log_time, cluster_id, instance_id, db_user_name, database_name, remote_host, command,
    object_type, object_name, command_text, exit_code, error_message, session_id, pid,
    statement_id, server_type, shard_id, sequence_number, event_index,
    das.engine(record_version, server_type) AS engine, statement_id_text, stream_name
FROM das.activity_events
WHERE das.event_failed(record_version, error_message, exit_code)
  AND NOT das.is_login_command(command)
  AND class IS DISTINCT FROM 'AUX';

CREATE OR REPLACE VIEW das.ddl_changes AS
SELECT
    e.log_time, e.cluster_id, e.instance_id, e.db_user_name, e.database_name, e.remote_host,
    e.command, e.object_type, e.object_name, e.command_text,
    das.event_failed(e.record_version, e.error_message, e.exit_code) AS failed,
    e.session_id, e.server_type, e.shard_id, e.sequence_number, e.event_index,
    das.engine(e.record_version, e.server_type) AS engine, e.class, e.stream_name
FROM das.activity_events e
WHERE e.class IS DISTINCT FROM 'MAIN' AND e.class IS DISTINCT FROM 'AUX'
  AND (e.class IN ('DDL', 'ROLE') OR das.is_schema_change(e.command))
UNION ALL
SELECT
    s.log_time, s.cluster_id, s.instance_id, s.db_user_name, s.database_name, s.remote_host,
    coalesce((SELECT string_agg(DISTINCT a->>'command', ',') FROM jsonb_array_elements(s.aux) a
              WHERE a->>'command' ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)'),
             s.command),
    coalesce(s.object_type, (SELECT min(a->>'object_type') FROM jsonb_array_elements(s.aux) a)),
    coalesce(nullif(s.object_name, ''),
             (SELECT string_agg(DISTINCT a->>'object_name', ',') FROM jsonb_array_elements(s.aux) a)),
    s.command_text,
    das.is_failure(s.error_message, s.exit_code),
    s.session_id, 'MySQL', s.main_shard_id, s.main_sequence_number, s.main_event_index,
    'mysql', 'MAIN', s.stream_name
FROM das.statements s
WHERE s.command_text ~* '^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)\M'
   OR EXISTS (SELECT 1 FROM jsonb_array_elements(s.aux) a
              WHERE a->>'command' ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)');

CREATE OR REPLACE VIEW das.privileged_activity AS
SELECT
    e.log_time, e.cluster_id, e.instance_id, e.db_user_name, e.database_name, e.remote_host,
    e.class, e.command, e.object_type, e.object_name, e.command_text,
    das.event_failed(e.record_version, e.error_message, e.exit_code) AS failed,
    e.session_id, e.server_type, e.shard_id, e.sequence_number, e.event_index,
    das.engine(e.record_version, e.server_type) AS engine, e.stream_name
FROM das.activity_events e
JOIN das.privileged_users p ON p.db_user_name = e.db_user_name
WHERE e.class IS DISTINCT FROM 'AUX';
