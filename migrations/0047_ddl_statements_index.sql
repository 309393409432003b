-- das.ddl_changes' MySQL half read every statement of the window (issue 16): its WHERE (a regex
-- on command_text, or an AUX event whose command is DDL, found by unpacking the aux array) is
-- no index's predicate, so a week's question read and tested every MySQL statement of the week
-- (80,750 rows for 615 DDL ones at 1M events; 1.65 s of the query's 2.7 s), and the planner's
-- estimate for it (half the week) was above jit_above_cost: JIT compiled the query, another
-- 0.65 s.
--
-- The test moves into a function, das.is_ddl_statement, which the view and a partial index of
-- das.statements both name: the planner proves the view's WHERE implies the index's predicate
-- (both inline to the same expression), and reads only the DDL statements of the window. An
-- index predicate may hold no subquery, so the AUX test is a JSON path (the same case-blind
-- regex over each AUX event's command) rather than the view's EXISTS over
-- jsonb_array_elements; it also keeps the function inlinable, which halves what the test costs
-- each statement merged (~5 us a row, against ~11 us for a function the planner must call).
-- Same rule, same rows (tests/test_query_plans.py holds them equal): an IMMUTABLE expression
-- of the row's own columns.
--
-- The view and the index say "IS TRUE" (the same rows: NULL was no DDL either), and the
-- expression has statistics: the planner estimates a bare function call at a third of the
-- rows (27,000 of a week's 80,750 statements for 615 DDL ones at 1M events), a cost that
-- crossed jit_above_cost and made every run compile the query (0.3-0.45 s of a query that
-- runs in 7-14 ms without); "IS TRUE" is estimated from the expression's statistics.

CREATE FUNCTION das.is_ddl_statement(command_text text, aux jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT command_text ~* '^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)\M'
        OR jsonb_path_exists(aux, '$[*] ? (@.command like_regex "^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)" flag "i")')
$$;

COMMENT ON FUNCTION das.is_ddl_statement(text, jsonb) IS
    'Whether a das.statements row is a schema or permission change (its text, or an AUX event''s command): das.ddl_changes'' MySQL rows.';

CREATE INDEX statements_ddl ON das.statements (log_time)
    WHERE das.is_ddl_statement(command_text, aux) IS TRUE;

CREATE STATISTICS das.statements_ddl_stats ON (das.is_ddl_statement(command_text, aux))
    FROM das.statements;
ANALYZE das.statements;

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
WHERE das.is_ddl_statement(s.command_text, s.aux) IS TRUE;
