-- Grants, revokes and user or login changes of a time window, by command (issue 16): the README's
-- RDS for Oracle question (das.events WHERE engine = 'oracle' AND command IN ('GRANT', 'REVOKE',
-- 'CREATE USER', 'ALTER USER') AND a week) had no index to serve it (engine is computed, and
-- das.activity_events has no command index since 0021), so it read the whole week: 1.8 s at 20M
-- events for a handful of rows.
--
-- A partial index of just these events: a query naming any of these commands (command IN (...)
-- or command = ...) implies its predicate, and reads only them, whatever else it filters on.
-- They are rare (a few hundred a day of ~130,000 in the bench fill), so every COPY tests the
-- predicate but seldom adds an entry.

CREATE INDEX activity_events_privilege_changes ON das.activity_events (log_time)
    WHERE command IN ('GRANT', 'REVOKE', 'DENY',
                      'CREATE USER', 'ALTER USER', 'DROP USER',
                      'CREATE ROLE', 'ALTER ROLE', 'DROP ROLE',
                      'CREATE LOGIN', 'ALTER LOGIN', 'DROP LOGIN',
                      'ADD MEMBER', 'DROP MEMBER', 'ADD ROLE MEMBER', 'DROP ROLE MEMBER');
