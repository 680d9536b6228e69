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
