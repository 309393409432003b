-- The outcome of every `das-ingest verify`, so the workers can export the last one as metrics
-- (das_verify_last_exit_code, das_verify_last_run_timestamp_seconds) and an alert can say when
-- verification stopped running or found something. Verify runs as an auditor that writes
-- nothing else: it records its run only through das.record_verify_run (SECURITY DEFINER).
CREATE TABLE das.verify_runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_name  text,                   -- NULL: every stream was verified
    finished_at  timestamptz NOT NULL DEFAULT now(),
    exit_code    smallint    NOT NULL,   -- 0 clean, 1 findings, 3 anchors unchecked
    findings     integer     NOT NULL,
    links        bigint      NOT NULL,
    events       bigint      NOT NULL,
    verified_by  text        NOT NULL DEFAULT session_user
);
CREATE INDEX verify_runs_finished ON das.verify_runs (finished_at);

CREATE FUNCTION das.record_verify_run(
    p_stream text, p_exit_code smallint, p_findings integer, p_links bigint, p_events bigint
) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO das.verify_runs (stream_name, exit_code, findings, links, events, verified_by)
    VALUES (p_stream, p_exit_code, p_findings, p_links, p_events, session_user);
$$;
