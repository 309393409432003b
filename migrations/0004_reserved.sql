-- PLACEHOLDER on branch `integrity` only: version 4 belongs to engineer A's
-- 0004_statements_merge.sql (branch decode-fixes). Migrations must run 1..N without gaps, so
-- this empty file stands in for it until both branches are merged. DELETE THIS FILE when
-- merging (keep A's 0004); nothing here changes the schema.
SELECT 1;
