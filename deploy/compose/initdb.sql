-- Roles and database of the local demo warehouse (docker-compose.yml). The postgres image runs
-- this once, as its superuser, when the data directory is created.
--
--   das_owner    owns database audit and (after `das-ingest migrate`) schema das: migrations,
--                retention, dead-letter re-drives. Not a superuser, no CREATEROLE.
--   das_ingest   NOLOGIN group role: append-only ingest (privileges granted by migrate)
--   das_analyst  NOLOGIN group role: read-only (privileges granted by migrate)
--   das_verifier NOLOGIN group role: auditors running verify (reads all, writes only
--                das.verify_progress; privileges granted by migrate)
--   ingester     the login `das-ingest run` uses: a member of das_ingest, nothing else
--   analyst      the login Grafana, `das-ingest status` and people use: a member of das_analyst
--
-- The group roles exist before migrate runs, so the owner needs no CREATEROLE (migrate only
-- creates the roles it does not find). No passwords: the demo uses trust authentication on the
-- compose network; production uses scram-sha-256 or IAM authentication (docs/operations.md).

CREATE ROLE das_owner LOGIN;
CREATE ROLE das_ingest NOLOGIN;
CREATE ROLE das_analyst NOLOGIN;
CREATE ROLE das_verifier NOLOGIN;
CREATE ROLE ingester LOGIN IN ROLE das_ingest;
CREATE ROLE analyst LOGIN IN ROLE das_analyst;
CREATE DATABASE audit OWNER das_owner;
-- Nobody else may even connect, nor create temporary tables (the ingester needs none).
REVOKE ALL ON DATABASE audit FROM PUBLIC;
GRANT CONNECT ON DATABASE audit TO das_ingest;
GRANT CONNECT ON DATABASE audit TO das_analyst;
GRANT CONNECT ON DATABASE audit TO das_verifier;
