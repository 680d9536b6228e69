-- The control plane issues every next attempt now (workers may not publish work), and
-- Postgres records each step it took, so that a crash between a commit and a publish
-- repeats the step instead of losing it:
-- retry_at: a retrying event's next attempt is in a delay queue, due then (NULL: not
--   published yet);
-- dead_at: a failed event's dead letter was confirmed in es.dlq (NULL: not yet).
ALTER TABLE events ADD COLUMN retry_at timestamptz;
ALTER TABLE events ADD COLUMN dead_at timestamptz;
UPDATE events SET dead_at = coalesce(ended_at, now()) WHERE status = 'failed';
