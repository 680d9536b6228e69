-- A range can come back while the worker that runs its event is alive: its node of a
-- RabbitMQ cluster died, or the broker restarted, and the worker reconnects elsewhere
-- and goes on. Such an event is not charged an attempt at once: returned_at records when
-- its range came back, and the control plane charges it (lost with its worker) only if
-- the worker says nothing more after that, or is found lost.
ALTER TABLE events ADD COLUMN returned_at timestamptz;
CREATE INDEX events_returned ON events (job_id, number) WHERE returned_at IS NOT NULL;
