-- A PanDA pilot is a worker whose heartbeat is its HTTP calls (dispatcher/pilot): what
-- it was handed is its own under a lease of lease_seconds from its last call. Native
-- workers have none (NULL): they are lost after three heartbeat intervals of silence.
ALTER TABLE workers ADD COLUMN lease_seconds double precision;

-- What a pilot runs for a task's jobs (its transformation and jobPars): the label's
-- pilotCommand. Native workers never need it, so it is not in the task's payload spec.
ALTER TABLE tasks ADD COLUMN pilot_command text;
