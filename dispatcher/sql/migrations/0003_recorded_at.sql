-- When the bookkeeping recorded each attempt's latest status: the lag from a worker's
-- report to Postgres is recorded_at - ended_at (benchmarks, monitoring).
ALTER TABLE attempts ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT clock_timestamp();
