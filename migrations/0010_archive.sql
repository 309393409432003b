-- The archive (das-ingest archive): whole UTC days exported to Parquet on S3 with a manifest
-- that carries their chain links and anchors, and retention that drops only what was archived.
--
-- * das.archived_days: one row per stream and day whose archive was written and then verified
--   from S3 (every file's SHA-256, every event's digest against the manifest's links, the
--   anchors). Retention drops a day only when every stream with events on it has a row here
--   with exactly the rows the warehouse holds.
-- * das.retention_log.archive: for a drop of archived days, where each stream's day went
--   ([{"stream", "day", "manifest", "manifest_sha256", "rows"}]); NULL for a drop without one
--   (--no-archive, or before this migration).

CREATE TABLE das.archived_days (
    stream_name      text        NOT NULL,
    day              date        NOT NULL,
    -- s3://bucket/prefix/stream=<name>/day=<YYYY-MM-DD>/_manifest.json
    manifest         text        NOT NULL,
    manifest_sha256  text        NOT NULL,
    rows             bigint      NOT NULL,
    files            integer     NOT NULL,
    archived_at      timestamptz NOT NULL DEFAULT now(),
    verified_at      timestamptz NOT NULL,
    PRIMARY KEY (stream_name, day, manifest)
);

COMMENT ON TABLE das.archived_days IS
    'Days exported by das-ingest archive and verified from the archive; retention drops only these.';

ALTER TABLE das.retention_log ADD COLUMN archive jsonb;
COMMENT ON COLUMN das.retention_log.archive IS
    'Where the removed days were archived: [{stream, day, manifest, manifest_sha256, rows}] (NULL: not archived).';
