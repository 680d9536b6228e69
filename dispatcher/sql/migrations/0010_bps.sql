-- BPS gives an EventService job without a requestWalltime the whole maxWmsJobWalltime:
-- a task's job walltime when requestWalltime does not set it (requestWalltime x payloads).
ALTER TABLE tasks ADD COLUMN job_walltime double precision;

-- A task released once its parents have ended, whatever their outcome (BPS's final job,
-- whenRun: ALWAYS), instead of once they all finished; never cancelled for their failure.
ALTER TABLE tasks ADD COLUMN run_always boolean NOT NULL DEFAULT false;
