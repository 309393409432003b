-- RDS for Oracle (record version 1.3) and RDS for SQL Server (1.4): their own fields, in typed
-- columns after ingested_at (the order das-ingest COPYs them in, and encodes them for the
-- integrity chain: docs/integrity.md, "Engine columns"). Existing rows keep every value and
-- get NULL in all four, which is how verify knows they were stored before this migration
-- (das-ingest never stores NULL in engine_native_audit_fields from now on).

ALTER TABLE das.activity_events
    ADD COLUMN dbid                       text,
    ADD COLUMN engine_native_audit_fields jsonb,
    ADD COLUMN statement_id_text          text,
    ADD COLUMN times_as_sent              jsonb;

COMMENT ON COLUMN das.activity_events.dbid IS
    'RDS for Oracle: the DBID of UNIFIED_AUDIT_TRAIL, as sent (a number or a string such as "0123456789").';
COMMENT ON COLUMN das.activity_events.engine_native_audit_fields IS
    'engineNativeAuditFields: Oracle UNIFIED_AUDIT_TRAIL columns (UPPERCASE keys), SQL Server fn_get_audit_file columns (snake_case keys); {} unless the stream was started with --engine-native-audit-fields-included (and for Aurora); NULL only for events stored before migration 0006.';
COMMENT ON COLUMN das.activity_events.statement_id_text IS
    'A statementId that is not a 64-bit integer, as sent: RDS for SQL Server''s sequence_group_id ("0x38eaf4..."), shared by the parts of a split audit record (substatement_id orders them). statement_id holds integer ids.';
COMMENT ON COLUMN das.activity_events.times_as_sent IS
    'The original text of logTime/startTime/endTime when it has more precision than timestamptz holds (RDS for SQL Server: seven fraction digits), by wire name; NULL otherwise.';
COMMENT ON COLUMN das.activity_events.object_type IS
    'objectType as sent. RDS for Oracle puts the object''s schema here (OBJECT_SCHEMA): das.events shows it as object_schema.';
COMMENT ON COLUMN das.activity_events.exit_code IS
    'exitCode as sent, per engine: PostgreSQL an SQLSTATE, MySQL an error number, Oracle RETURN_CODE (0 or an ORA- number), SQL Server succeeded (1 success, 0 failure). das.event_failed() reads it right for every engine.';

-- The engine of an event, from its record version (what AWS documents: Aurora PostgreSQL 1.0
-- and 1.1, Aurora MySQL 1.2, RDS for Oracle 1.3, RDS for SQL Server 1.4), else its serverType.
CREATE FUNCTION das.engine(record_version text, server_type text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN record_version = '1.3' OR upper(server_type) = 'ORACLE' THEN 'oracle'
        WHEN record_version = '1.4' OR upper(server_type) = 'SQLSERVER' THEN 'sqlserver'
        WHEN record_version = '1.2' OR upper(server_type) = 'MYSQL' THEN 'mysql'
        WHEN record_version IN ('1.0', '1.1') OR upper(server_type) = 'POSTGRESQL' THEN 'postgresql'
    END
$$;

-- Whether an event reports a failure, right for every engine (ingest/decode/engines.py is the
-- same rule in Python, held equal by the tests):
--   SQL Server (1.4): exitCode is fn_get_audit_file.succeeded, 1 success, 0 failure (for all
--                     but login events it is the permission check's outcome);
--   Oracle (1.3):     exitCode is RETURN_CODE, 0 success, else the ORA- error number (1017:
--                     invalid username/password);
--   Aurora:           an error message, or an exit code other than "", "0" and "00000".
CREATE FUNCTION das.event_failed(record_version text, error_message text, exit_code text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE record_version
        WHEN '1.4' THEN coalesce(exit_code, '') = '0'
        WHEN '1.3' THEN coalesce(exit_code, '') NOT IN ('', '0') OR coalesce(error_message, '') <> ''
        ELSE das.is_failure(error_message, exit_code)
    END
$$;

-- The failure index of 0001 reads Aurora's rule; this one is right for every engine.
CREATE INDEX activity_events_event_failed ON das.activity_events (log_time)
    WHERE das.event_failed(record_version, error_message, exit_code);

-- Default privileged users of the RDS engines (das.privileged_activity lists what they did).
INSERT INTO das.privileged_users VALUES
    ('SYS', 'Oracle superuser'),
    ('SYSTEM', 'Oracle administrative user'),
    ('RDSADMIN', 'Amazon RDS for Oracle management user'),
    ('sa', 'SQL Server system administrator login'),
    ('rdsa', 'Amazon RDS for SQL Server management login')
ON CONFLICT (db_user_name) DO NOTHING;
