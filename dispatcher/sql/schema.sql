-- The current schema, as a fresh database gets it. Keep equal to all migrations applied (tests/test_migrations.py).

CREATE FUNCTION es_status_rank(status text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE status WHEN 'ready' THEN 0 WHEN 'queued' THEN 1 WHEN 'running' THEN 2 ELSE 3 END $$;

CREATE TABLE workflows (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL,
    status        text NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'finished', 'failed', 'cancelled')),
    spec          jsonb NOT NULL,
    mapping_path  text,
    n_events      bigint NOT NULL DEFAULT 0,
    submitted_at  timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);

CREATE TABLE tasks (
    id                    bigserial PRIMARY KEY,
    workflow_id           bigint NOT NULL REFERENCES workflows ON DELETE CASCADE,
    label                 text NOT NULL,
    status                text NOT NULL DEFAULT 'waiting'
                          CHECK (status IN ('waiting', 'released', 'running', 'finished', 'failed', 'cancelled')),
    event_service         boolean NOT NULL,
    max_payloads_per_job  integer NOT NULL CHECK (max_payloads_per_job >= 1),
    events_per_range      integer NOT NULL CHECK (events_per_range >= 1),
    max_attempts          integer NOT NULL CHECK (max_attempts >= 1),
    request_walltime      double precision,
    payload               jsonb NOT NULL,
    n_events              bigint NOT NULL DEFAULT 0,
    n_jobs                integer NOT NULL DEFAULT 0,
    released_at           timestamptz,
    started_at            timestamptz,
    finished_at           timestamptz,
    retry_delay           double precision NOT NULL DEFAULT 2,
    pilot_command         text,  -- what a PanDA pilot runs for its jobs (0009)
    job_walltime          double precision,  -- a job's walltime when requestWalltime does not set it (0010)
    run_always            boolean NOT NULL DEFAULT false,  -- released once its parents ended, however (0010)
    UNIQUE (workflow_id, label)
);

CREATE TABLE task_deps (
    task_id    bigint NOT NULL REFERENCES tasks ON DELETE CASCADE,
    parent_id  bigint NOT NULL REFERENCES tasks ON DELETE CASCADE,
    PRIMARY KEY (task_id, parent_id)
);
CREATE INDEX task_deps_parent ON task_deps (parent_id);

CREATE TABLE jobs (
    id            bigserial PRIMARY KEY,
    workflow_id   bigint NOT NULL REFERENCES workflows ON DELETE CASCADE,
    task_id       bigint NOT NULL REFERENCES tasks ON DELETE CASCADE,
    seq           integer NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'releasing', 'queued', 'running', 'finished', 'failed', 'cancelled')),
    n_events      integer NOT NULL,
    first_number  bigint NOT NULL,
    last_number   bigint NOT NULL,
    walltime      double precision,
    log_path      text,
    claimed_at    timestamptz,
    queued_at     timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    setup_failures integer NOT NULL DEFAULT 0,  -- workers whose set-up of it failed (0006)
    claimed_by    text,  -- the control plane publishing it, under a lease renewed in claimed_at (0008)
    published_upto bigint,  -- ... and the last event number its publication reached (0008)
    UNIQUE (task_id, seq)
);
CREATE INDEX jobs_workflow ON jobs (workflow_id);
-- the releaser's work list and window count stay small whatever the size of the table
CREATE INDEX jobs_pending ON jobs (id) WHERE status = 'pending';
CREATE INDEX jobs_active ON jobs (status) WHERE status IN ('releasing', 'queued', 'running');

-- No index on status, and half of each page free: status updates stay HOT (heap-only) and cheap.
CREATE TABLE events (
    job_id      bigint NOT NULL,  -- no foreign key: see the triggers below (migration 0005)
    number      bigint NOT NULL,
    task_id     bigint NOT NULL,
    payload     text NOT NULL,
    status      text NOT NULL DEFAULT 'ready'
                CHECK (status IN ('ready', 'queued', 'running', 'retrying', 'finished', 'failed', 'cancelled')),
    attempt     integer NOT NULL DEFAULT 0,
    worker      text,
    started_at  timestamptz,
    ended_at    timestamptz,
    exit_code   integer,
    error       text,
    replays     integer NOT NULL DEFAULT 0,
    -- migration 0006: the issue (publication) of its range in flight (older ones are stale), a copy decided
    -- but not yet confirmed in RabbitMQ, when a retry is due, when its dead letter was confirmed
    issue       integer NOT NULL DEFAULT 0,
    unpublished boolean NOT NULL DEFAULT false,
    retry_at    timestamptz,
    dead_at     timestamptz,
    -- migration 0007: its range came back while its worker seemed alive (charged only if it stays silent)
    returned_at timestamptz,
    PRIMARY KEY (job_id, number),
    UNIQUE (task_id, number)
) WITH (fillfactor = 50);  -- room in each page for HOT updates (migration 0004)
CREATE INDEX events_returned ON events (job_id, number) WHERE returned_at IS NOT NULL;

CREATE TABLE attempts (
    job_id      bigint NOT NULL,
    number      bigint NOT NULL,
    attempt     integer NOT NULL,
    status      text NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    worker      text NOT NULL,
    started_at  timestamptz,
    ended_at    timestamptz,
    exit_code   integer,
    error       text,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, number, attempt)
);

-- Events and attempts are written only by set-based statements that take their keys
-- from the rows they join: no foreign key checks them row by row. Deleting a job still
-- deletes its events, and an event its attempts, once per statement (migration 0005).
CREATE FUNCTION delete_events_of_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM events e USING gone g WHERE e.job_id = g.id;
    RETURN NULL;
END
$$;

CREATE FUNCTION delete_attempts_of_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM attempts a USING gone g WHERE a.job_id = g.job_id AND a.number = g.number;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_delete_events AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION delete_events_of_jobs();
CREATE TRIGGER events_delete_attempts AFTER DELETE ON events
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION delete_attempts_of_events();

-- Events by state per task (migration 0011), kept by the statements that change events,
-- in their own transaction: the monitor's and `dispatcher status`'s counts read these few rows instead
-- of a GROUP BY over every event (291 ms for a workflow at 1,000,000 events).
--
-- Append-only deltas: each statement adds a row per (task, state) it changed, so that
-- concurrent bookkeepers never wait on one hot counter row; a count is the sum of its
-- rows, and compact_event_counts (the watchdog's) folds them into one now and then.
CREATE TABLE event_counts (
    task_id  bigint NOT NULL,
    status   text NOT NULL,
    n        bigint NOT NULL
);
CREATE INDEX event_counts_task ON event_counts (task_id, status);

CREATE FUNCTION count_added_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_counts (task_id, status, n) SELECT task_id, status, count(*) FROM added GROUP BY 1, 2;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_removed_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_counts (task_id, status, n) SELECT task_id, status, -count(*) FROM gone GROUP BY 1, 2;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_changed_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_counts (task_id, status, n)
    SELECT task_id, status, sum(n) FROM (
        SELECT task_id, status, count(*) AS n FROM added GROUP BY 1, 2
        UNION ALL
        SELECT task_id, status, -count(*) FROM gone GROUP BY 1, 2
    ) c GROUP BY 1, 2 HAVING sum(n) <> 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_count_added AFTER INSERT ON events
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION count_added_events();
CREATE TRIGGER events_count_removed AFTER DELETE ON events
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION count_removed_events();
CREATE TRIGGER events_count_changed AFTER UPDATE ON events
    REFERENCING OLD TABLE AS gone NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION count_changed_events();
-- The monitor's pictures, from the same kind of counters: how many events each task had
-- in each state, sampled as the watchdog folds the counters (a task's row only when its
-- counts changed), and how long attempts ran, in quarter-octave buckets of milliseconds
-- (bucket b holds [2^(b/4), 2^((b+1)/4)) ms; bucket 0 everything under 1.19 ms).
CREATE TABLE event_count_samples (
    task_id  bigint NOT NULL,
    at       timestamptz NOT NULL,
    counts   jsonb NOT NULL,
    PRIMARY KEY (task_id, at)
);

CREATE TABLE attempt_durations (
    task_id  bigint NOT NULL,
    status   text NOT NULL,  -- finished, failed
    bucket   integer NOT NULL,
    n        bigint NOT NULL
);
CREATE INDEX attempt_durations_task ON attempt_durations (task_id, status, bucket);

CREATE FUNCTION es_duration_bucket(started timestamptz, ended timestamptz) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT greatest(0, floor(4 * log(2, greatest(extract(epoch FROM ended - started) * 1000, 1))))::integer $$;

CREATE FUNCTION count_attempt_durations() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- ended attempts the statement added, less those it took away (an update: both)
    IF TG_OP = 'INSERT' THEN
        INSERT INTO attempt_durations (task_id, status, bucket, n)
        SELECT j.task_id, a.status, es_duration_bucket(a.started_at, a.ended_at), count(*)
        FROM added a JOIN jobs j ON j.id = a.job_id
        WHERE a.ended_at IS NOT NULL AND a.started_at IS NOT NULL AND a.status IN ('finished', 'failed')
        GROUP BY 1, 2, 3;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO attempt_durations (task_id, status, bucket, n)
        SELECT j.task_id, a.status, es_duration_bucket(a.started_at, a.ended_at), -count(*)
        FROM gone a JOIN jobs j ON j.id = a.job_id
        WHERE a.ended_at IS NOT NULL AND a.started_at IS NOT NULL AND a.status IN ('finished', 'failed')
        GROUP BY 1, 2, 3;
    ELSE
        INSERT INTO attempt_durations (task_id, status, bucket, n)
        SELECT j.task_id, c.status, c.bucket, sum(c.n) FROM (
            SELECT job_id, status, es_duration_bucket(started_at, ended_at) AS bucket, 1 AS n FROM added
            WHERE ended_at IS NOT NULL AND started_at IS NOT NULL AND status IN ('finished', 'failed')
            UNION ALL
            SELECT job_id, status, es_duration_bucket(started_at, ended_at), -1 FROM gone
            WHERE ended_at IS NOT NULL AND started_at IS NOT NULL AND status IN ('finished', 'failed')
        ) c JOIN jobs j ON j.id = c.job_id
        GROUP BY 1, 2, 3 HAVING sum(c.n) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER attempts_count_added AFTER INSERT ON attempts
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION count_attempt_durations();
CREATE TRIGGER attempts_count_removed AFTER DELETE ON attempts
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION count_attempt_durations();
CREATE TRIGGER attempts_count_changed AFTER UPDATE ON attempts
    REFERENCING OLD TABLE AS gone NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION count_attempt_durations();

CREATE TABLE workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    slots        integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('live', 'stopping', 'stopped', 'lost')),
    jobs         bigint[] NOT NULL DEFAULT '{}',
    events_done  bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    setting_up   bigint[] NOT NULL DEFAULT '{}',  -- jobs it sets up, not consumed yet (0006)
    lease_seconds double precision  -- a PanDA pilot's lease from its last call; NULL: a native worker (0009)
);
