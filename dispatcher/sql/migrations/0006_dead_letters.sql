-- The control plane issues every next attempt now (workers may not publish work), and
-- Postgres records each step, so that a crash between a commit and a publish repeats
-- the step instead of losing it:
-- issue: each publication of an event is a new issue (a copy); a range of an older
--   issue that comes back (it was reissued since) is stale and reissues nothing;
-- unpublished: a copy was decided (a retry, an event that came back) and is not yet
--   confirmed in RabbitMQ;
-- retry_at: a retrying event's next attempt is in a delay queue, due then;
-- dead_at: a failed event's dead letter was confirmed in es.dlq.
ALTER TABLE events ADD COLUMN issue integer NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN unpublished boolean NOT NULL DEFAULT false;
ALTER TABLE events ADD COLUMN retry_at timestamptz;
ALTER TABLE events ADD COLUMN dead_at timestamptz;
UPDATE events SET dead_at = coalesce(ended_at, now()) WHERE status = 'failed';
-- workers that refused a job because its set-up failed: out of attempts, its events fail
ALTER TABLE jobs ADD COLUMN setup_failures integer NOT NULL DEFAULT 0;
-- jobs a worker is setting up (it consumes their queue only once set up): not jobs
-- whose worker died, though nobody consumes them
ALTER TABLE workers ADD COLUMN setting_up bigint[] NOT NULL DEFAULT '{}';
