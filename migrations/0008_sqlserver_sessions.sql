-- das.sessions (migration 0007) without RDS for SQL Server's session 0: SQL Server reports a
-- failed login with session id 0, which is no session; das.failed_logins lists those attempts.

-- Sessions from login to logout, with duration (NULL while still open or if the logout was not
-- recorded). A failed login opens no session (das.failed_logins lists it).
CREATE OR REPLACE VIEW das.sessions AS
SELECT
    das.engine(record_version, server_type)                  AS engine,
    cluster_id,
    instance_id,
    session_id,
    pid,
    max(db_user_name)                                        AS db_user_name,
    max(database_name)                                       AS database_name,
    max(remote_host)                                         AS remote_host,
    max(client_application)                                  AS client_application,
    max(server_type)                                         AS server_type,
    min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)) AS connected_at,
    max(log_time) FILTER (WHERE das.is_session_end(command)) AS disconnected_at,
    max(log_time) FILTER (WHERE das.is_session_end(command))
      - min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)) AS duration,
    min(log_time)                                            AS first_event_at,
    max(log_time)                                            AS last_event_at,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX')     AS statements,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                       AND das.event_failed(record_version, error_message, exit_code))
                                                             AS failed_statements
FROM das.activity_events
WHERE session_id IS NOT NULL
  -- SQL Server reports a failed login in session 0: no session (das.failed_logins has it)
  AND NOT (record_version = '1.4' AND session_id = '0')
GROUP BY das.engine(record_version, server_type), cluster_id, instance_id, session_id, pid;
