-- das-ingest audit warehouse: events, MySQL statements, dead letters, heartbeats, leases.
-- Applied by `das-ingest migrate` in one transaction. Requires PostgreSQL 15 or newer
-- (UNIQUE NULLS NOT DISTINCT).

CREATE SCHEMA IF NOT EXISTS das;

-- One row per DAS event of type "record". Column names are the DAS field names in snake_case.
CREATE TABLE das.activity_events (
    log_time            timestamptz,
    cluster_id          text,
    instance_id         text,
    record_version      text        NOT NULL,
    -- provenance: where in the stream this event came from
    shard_id            text        NOT NULL,
    sequence_number     numeric NOT NULL,
    event_index         integer     NOT NULL,
    class               text,
    client_application  text,
    command             text,
    command_text        text,
    database_name       text,
    db_protocol         text,
    db_user_name        text,
    end_time            timestamptz,
    error_message       text,
    exit_code           text,        -- null, "0", "" or an SQLSTATE: text on purpose
    net_protocol        text,
    object_name         text,
    object_type         text,
    param_list          jsonb,
    pid                 bigint,
    remote_host         text,
    remote_port         text,
    row_count           bigint,
    server_host         text,
    server_type         text,
    server_version      text,
    service_name        text,
    session_id          text,        -- "5ce73c6f.7e64" (PostgreSQL) or "725121" (MySQL)
    start_time          timestamptz,
    statement_id        bigint,
    substatement_id     bigint,
    transaction_id      text,
    -- every field the engine sent that has no column, and the original value of any field
    -- that could not be stored in its column (listed in anomalies)
    extra               jsonb       NOT NULL DEFAULT '{}',
    anomalies           text[]      NOT NULL DEFAULT '{}',
    ingested_at         timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (log_time);

COMMENT ON TABLE das.activity_events IS
    'One row per Database Activity Streams event (type record), partitioned by day of log_time (UTC).';
COMMENT ON COLUMN das.activity_events.anomalies IS
    'What was done to store the event: "<field>:type|range|time" (original value in extra, column NULL), "<field>:nul|utf8" (text escaped reversibly).';

-- Events without a log_time, or outside the window partitions are created for, land here.
CREATE TABLE das.activity_events_default PARTITION OF das.activity_events DEFAULT;

-- No event is ever stored twice (belt and braces behind the transactional checkpoint).
CREATE UNIQUE INDEX activity_events_provenance
    ON das.activity_events (shard_id, sequence_number, event_index, log_time) NULLS NOT DISTINCT;
-- The questions auditors ask: who, what object, which session, what failed.
CREATE INDEX activity_events_user_time ON das.activity_events (db_user_name, log_time);
CREATE INDEX activity_events_object ON das.activity_events (object_name, log_time)
    WHERE object_name IS NOT NULL AND object_name <> '';
CREATE INDEX activity_events_session
    ON das.activity_events (cluster_id, instance_id, session_id, log_time);
CREATE INDEX activity_events_failed ON das.activity_events (log_time)
    WHERE (error_message IS NOT NULL AND error_message <> '')
       OR (exit_code IS NOT NULL AND exit_code NOT IN ('', '0', '00000'));
CREATE INDEX activity_events_command ON das.activity_events (command, log_time);

-- Creates the day partition for `day` (UTC), moving any rows of that day out of the default
-- partition first. Runs as the schema owner so the ingest role needs no DDL rights.
CREATE FUNCTION das.ensure_partition(day date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    part text := format('activity_events_p%s', to_char(day, 'YYYYMMDD'));
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(format('das.%I', part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('das.ensure_partition'));
    IF to_regclass(format('das.%I', part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    BEGIN
        EXECUTE format(
            'CREATE TABLE das.%I (LIKE das.activity_events INCLUDING DEFAULTS INCLUDING STORAGE)',
            part);
    EXCEPTION WHEN duplicate_table THEN
        -- Another worker created it between our check and our lock (the catalog check can
        -- miss a creation committed while we waited).
        RETURN false;
    END;
    -- The CHECK lets ATTACH skip scanning the new table.
    EXECUTE format('ALTER TABLE das.%I ADD CONSTRAINT %I CHECK '
                   '(log_time IS NOT NULL AND log_time >= %L AND log_time < %L)',
                   part, part || '_bounds', lo, hi);
    EXECUTE format('WITH moved AS (DELETE FROM das.activity_events_default '
                   'WHERE log_time >= %L AND log_time < %L RETURNING *) '
                   'INSERT INTO das.%I SELECT * FROM moved', lo, hi, part);
    EXECUTE format('ALTER TABLE das.activity_events ATTACH PARTITION das.%I '
                   'FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    EXECUTE format('ALTER TABLE das.%I DROP CONSTRAINT %I', part, part || '_bounds');
    RETURN true;
END
$$;

CREATE FUNCTION das.ensure_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    created integer := 0;
    d date := first_day;
BEGIN
    WHILE d <= last_day LOOP
        IF das.ensure_partition(d) THEN
            created := created + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Partitions dropped by `das-ingest retention`: legitimate disappearance of rows.
CREATE TABLE das.retention_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partition_name  text        NOT NULL,
    range_start     timestamptz,
    range_end       timestamptz,
    rows_removed    bigint      NOT NULL,
    removed_at      timestamptz NOT NULL DEFAULT now(),
    removed_by      text        NOT NULL DEFAULT current_user
);

-- Aurora MySQL statements: the MAIN event joined with its AUX events (same statementId).
-- Derived from das.activity_events; `das-ingest rebuild-statements` recomputes it.
CREATE TABLE das.statements (
    cluster_id           text,
    instance_id          text,
    pid                  bigint,
    session_id           text,
    statement_id         bigint      NOT NULL,
    has_main             boolean     NOT NULL DEFAULT false,
    log_time             timestamptz,
    start_time           timestamptz,
    end_time             timestamptz,
    db_user_name         text,
    database_name        text,
    remote_host          text,
    command              text,
    command_text         text,
    object_type          text,
    object_name          text,
    row_count            bigint,
    exit_code            text,
    error_message        text,
    transaction_id       text,
    main_shard_id        text,
    main_sequence_number numeric,
    main_event_index     integer,
    aux                  jsonb       NOT NULL DEFAULT '[]',
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT statements_key UNIQUE NULLS NOT DISTINCT
        (cluster_id, instance_id, pid, session_id, statement_id)
);
CREATE INDEX statements_user_time ON das.statements (db_user_name, log_time);
CREATE INDEX statements_time ON das.statements (log_time);

-- Records that could not be processed: kept whole, with where and why, until re-driven.
CREATE TABLE das.dead_letters (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_name      text        NOT NULL,
    shard_id         text        NOT NULL,
    sequence_number  numeric NOT NULL,
    partition_key    text,
    arrival_time     timestamptz,
    stage            text        NOT NULL,
    error            text        NOT NULL,
    raw              bytea       NOT NULL,
    first_seen       timestamptz NOT NULL DEFAULT now(),
    last_attempt     timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 1,
    CONSTRAINT dead_letters_record UNIQUE (stream_name, shard_id, sequence_number)
);
CREATE INDEX dead_letters_stage ON das.dead_letters (stage, first_seen);

-- The last heartbeat of each instance (liveness for `das-ingest status`).
CREATE TABLE das.heartbeats (
    cluster_id       text        NOT NULL DEFAULT '',
    instance_id      text        NOT NULL DEFAULT '',
    log_time         timestamptz,
    seen_at          timestamptz NOT NULL DEFAULT now(),
    stream_name      text        NOT NULL,
    shard_id         text        NOT NULL,
    sequence_number  numeric NOT NULL,
    fields           jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (cluster_id, instance_id)
);

-- Shard leases, modelled on the Kinesis Client Library. Every write is conditional on
-- lease_counter, which changes whenever ownership changes (take, steal, release); the
-- checkpoint moves in the same transaction as the rows it covers.
CREATE TABLE das.leases (
    stream_name       text        NOT NULL,
    shard_id          text        NOT NULL,
    owner             text,
    lease_counter     bigint      NOT NULL DEFAULT 0,
    expires_at        timestamptz,
    -- a sequence number, or TRIM_HORIZON / LATEST / AT_TIMESTAMP / SHARD_END
    checkpoint        text        NOT NULL DEFAULT 'TRIM_HORIZON',
    checkpoint_at     timestamptz,
    parent_shard_ids  text[]      NOT NULL DEFAULT '{}',
    hash_key_start    numeric(40, 0),
    hash_key_end      numeric(40, 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    owner_changes     bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (stream_name, shard_id)
);

-- Workers alive on a stream (for balancing: a worker without leases still counts).
CREATE TABLE das.workers (
    stream_name   text        NOT NULL,
    worker_id     text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    ready         boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (stream_name, worker_id)
);

-- Users whose activity the privileged_activity view lists; edit to taste.
CREATE TABLE das.privileged_users (
    db_user_name  text PRIMARY KEY,
    note          text
);
INSERT INTO das.privileged_users VALUES
    ('rdsadmin', 'Amazon RDS management user'),
    ('rdsrepladmin', 'Amazon RDS replication user'),
    ('postgres', 'PostgreSQL default master user'),
    ('master', 'common master user name'),
    ('admin', 'common master user name'),
    ('root', 'MySQL superuser');
