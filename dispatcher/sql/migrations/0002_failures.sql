-- Failures: an event may wait for a retry ('retrying'), be replayed out of the dead-letter
-- queue (replays), and workers report heartbeats (workers) so lost work is found again.

ALTER TABLE events DROP CONSTRAINT events_status_check;
ALTER TABLE events ADD CONSTRAINT events_status_check
    CHECK (status IN ('ready', 'queued', 'running', 'retrying', 'finished', 'failed', 'cancelled'));
ALTER TABLE events ADD COLUMN replays integer NOT NULL DEFAULT 0;

ALTER TABLE tasks ADD COLUMN retry_delay double precision NOT NULL DEFAULT 2;

CREATE TABLE workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    slots        integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('live', 'stopping', 'stopped', 'lost')),
    jobs         bigint[] NOT NULL DEFAULT '{}',
    events_done  bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL
);
