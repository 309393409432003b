-- A batch's policy state in one round trip (issue 13, the policy pack's cost): what
-- ingest/alerts/store.py did in four statements per commit (threshold counters upsert, their
-- window sums, each first seen rule's start, the first sightings) as one function call.
--
-- The statements are the same and run in the same order, inside the batch's transaction;
-- a VOLATILE PL/pgSQL function takes a new snapshot for each of them (READ COMMITTED), as
-- separate statements from the client did, so the window sums still see what a concurrent
-- batch committed while the upsert waited for its rows. Security invoker: the caller needs
-- the privileges on das.policy_counters, das.policy_rule_start and das.policy_seen it needed
-- before (the ingest role has them).
--
-- The threshold counters are taken under a lock per (rule, group) first (see below).
--
-- Rows returned, by kind:
--   'sum'   per (rule, group_key, bucket) of the tallies: the window's amount, first and last
--           time (the buckets from bucket - p_buckets + 1 to bucket);
--   'start' per first seen rule: when it began learning (NULL only if another transaction
--           inserted it after this one's snapshot, as before);
--   'seen'  per sighting the fleet had not seen: rule, group_key, value.

CREATE FUNCTION das.record_policy_state(
    t_rule text[], t_group_key text[], t_bucket bigint[], t_amount bigint[], t_events bigint[],
    t_first timestamptz[], t_last timestamptz[], p_buckets bigint,
    r_rule text[], r_first timestamptz[],
    s_rule text[], s_group_key text[], s_value text[], s_time timestamptz[])
RETURNS TABLE (o_kind text, o_rule text, o_group_key text, o_bucket bigint, o_value text,
               o_amount bigint, o_first_time timestamptz, o_last_time timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF cardinality(t_rule) > 0 THEN
        -- One transaction-scoped lock per (rule, group) counted, taken in one order (by the
        -- lock's number) before the counters: a second worker's batch for the same group waits
        -- for this one to commit, then its window sums (a new snapshot) see both. Without it
        -- two batches adding to different buckets of one window at the same moment each see
        -- only their own part, and an incident split between two shards may never reach its
        -- threshold.
        PERFORM pg_advisory_xact_lock(s.k) FROM (
            SELECT DISTINCT hashtextextended(g.rule || chr(31) || g.group_key, 31) AS k
            FROM unnest(t_rule, t_group_key) AS g(rule, group_key)
            ORDER BY 1
        ) AS s;
        -- sorted by the caller, so two workers updating the same groups never deadlock
        INSERT INTO das.policy_counters AS c (rule, group_key, bucket, amount, events,
                                              first_time, last_time)
        SELECT * FROM unnest(t_rule, t_group_key, t_bucket, t_amount, t_events, t_first,
                             t_last)
        ON CONFLICT (rule, group_key, bucket) DO UPDATE SET
            amount = c.amount + EXCLUDED.amount,
            events = c.events + EXCLUDED.events,
            first_time = least(c.first_time, EXCLUDED.first_time),
            last_time = greatest(c.last_time, EXCLUDED.last_time);
        RETURN QUERY
        SELECT 'sum'::text, t.rule, t.group_key, t.bucket, NULL::text,
               sum(c.amount)::bigint, min(c.first_time), max(c.last_time)
        FROM unnest(t_rule, t_group_key, t_bucket) AS t(rule, group_key, bucket)
        JOIN das.policy_counters c
          ON c.rule = t.rule AND c.group_key = t.group_key
         AND c.bucket BETWEEN t.bucket - p_buckets + 1 AND t.bucket
        GROUP BY t.rule, t.group_key, t.bucket;
    END IF;
    IF cardinality(r_rule) > 0 THEN
        RETURN QUERY
        WITH ins AS (
            INSERT INTO das.policy_rule_start AS p (rule, started_at)
            SELECT * FROM unnest(r_rule, r_first)
            ON CONFLICT DO NOTHING
            RETURNING p.rule, p.started_at
        )
        SELECT 'start'::text, ins.rule, NULL::text, NULL::bigint, NULL::text, NULL::bigint,
               ins.started_at, NULL::timestamptz
        FROM ins
        UNION ALL
        -- a rule that was learning already (the snapshot does not hold ins's new rows)
        SELECT 'start'::text, p.rule, NULL::text, NULL::bigint, NULL::text, NULL::bigint,
               p.started_at, NULL::timestamptz
        FROM das.policy_rule_start p WHERE p.rule = ANY (r_rule);
    END IF;
    IF cardinality(s_rule) > 0 THEN
        RETURN QUERY
        WITH ins AS (
            INSERT INTO das.policy_seen AS p (rule, group_key, value, first_seen)
            SELECT * FROM unnest(s_rule, s_group_key, s_value, s_time)
            ON CONFLICT DO NOTHING
            RETURNING p.rule, p.group_key, p.value
        )
        SELECT 'seen'::text, ins.rule, ins.group_key, NULL::bigint, ins.value, NULL::bigint,
               NULL::timestamptz, NULL::timestamptz
        FROM ins;
    END IF;
END;
$$;

COMMENT ON FUNCTION das.record_policy_state(text[], text[], bigint[], bigint[], bigint[],
    timestamptz[], timestamptz[], bigint, text[], timestamptz[], text[], text[], text[],
    timestamptz[]) IS
    'A batch''s threshold counters and first sightings, in the caller''s transaction '
    '(ingest/alerts/store.py); one round trip instead of four.';
