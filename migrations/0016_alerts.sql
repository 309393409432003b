-- Policy alerts (issue 13): the alerts, their delivery outbox, acknowledgements, and the
-- window and first-seen state every worker of a fleet shares.

-- One row per alert, append-only for the ingest role. An alert's identity is its rule, group
-- key and window: evaluating the same events again (after a crash, a lease takeover, a
-- re-drive) finds the row there and adds nothing.
CREATE TABLE das.alerts (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule             text        NOT NULL,
    severity         text        NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    title            text        NOT NULL,
    group_key        text        NOT NULL,
    window_start     timestamptz NOT NULL,
    first_event_time timestamptz,
    last_event_time  timestamptz,
    -- matching events (or the summed field, e.g. rows) known when the alert was created
    event_count      bigint      NOT NULL,
    created_at       timestamptz NOT NULL,
    stream_name      text,
    shard_id         text,
    cluster_id       text,
    instance_id      text,
    -- the triggering events: [{"stream_name", "shard_id", "sequence_number", "event_index"}]
    events           jsonb       NOT NULL DEFAULT '[]',
    -- the alert chain (docs/policies.md): SHA-256(prev_hash || alert text)
    prev_hash        bytea       NOT NULL,
    alert_hash       bytea       NOT NULL,
    CONSTRAINT alerts_identity UNIQUE (rule, group_key, window_start)
);
CREATE INDEX alerts_created ON das.alerts (created_at);
CREATE INDEX alerts_rule_created ON das.alerts (rule, created_at);

COMMENT ON TABLE das.alerts IS
    'Alerts raised by policy rules; identity (rule, group_key, window_start); hash-chained.';

-- Acknowledgements are separate rows: das.alerts is never updated.
CREATE TABLE das.alert_acks (
    alert_id  bigint      PRIMARY KEY REFERENCES das.alerts (id),
    acked_at  timestamptz NOT NULL DEFAULT now(),
    acked_by  text        NOT NULL DEFAULT current_user,
    note      text
);

-- Delivery, per alert and notifier: at least once, retried with backoff, terminal 'failed'.
CREATE TABLE das.alert_outbox (
    alert_id        bigint      NOT NULL REFERENCES das.alerts (id),
    notifier        text        NOT NULL,
    state           text        NOT NULL DEFAULT 'pending'
                                CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz,
    PRIMARY KEY (alert_id, notifier)
);
CREATE INDEX alert_outbox_due ON das.alert_outbox (next_attempt_at) WHERE state = 'pending';

-- Threshold state: per rule, group key and bucket (a sixth of the rule's window, numbered
-- from 1970 in event time), what matched. Updated in the batch's transaction, so a batch is
-- counted exactly once, by whichever worker commits it.
CREATE TABLE das.policy_counters (
    rule        text        NOT NULL,
    group_key   text        NOT NULL,
    bucket      bigint      NOT NULL,
    amount      bigint      NOT NULL,
    events      bigint      NOT NULL,
    first_time  timestamptz,
    last_time   timestamptz,
    PRIMARY KEY (rule, group_key, bucket)
);

-- First-seen state: every value seen per rule and group, and when each rule began learning.
CREATE TABLE das.policy_seen (
    rule        text        NOT NULL,
    group_key   text        NOT NULL,
    value       text        NOT NULL,
    first_seen  timestamptz NOT NULL,
    PRIMARY KEY (rule, group_key, value)
);
CREATE TABLE das.policy_rule_start (
    rule        text        PRIMARY KEY,
    started_at  timestamptz NOT NULL
);

-- Alerts with their acknowledgement and delivery state, for people.
CREATE VIEW das.alerts_overview AS
SELECT a.id, a.rule, a.severity, a.title, a.group_key, a.first_event_time, a.last_event_time,
       a.event_count, a.created_at, a.stream_name, a.cluster_id, a.instance_id,
       k.acked_at, k.acked_by,
       (SELECT jsonb_object_agg(o.notifier, o.state) FROM das.alert_outbox o
         WHERE o.alert_id = a.id) AS deliveries
FROM das.alerts a LEFT JOIN das.alert_acks k ON k.alert_id = a.id;
