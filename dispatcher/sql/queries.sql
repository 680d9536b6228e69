-- Named queries: each starts with "-- name: NAME" and runs through Store.

-- name: insert_workflow
INSERT INTO workflows (name, spec, mapping_path) VALUES ($1, $2, $3) RETURNING id;

-- name: insert_task
INSERT INTO tasks (workflow_id, label, event_service, max_payloads_per_job, events_per_range,
                   max_attempts, request_walltime, payload, retry_delay, pilot_command, job_walltime, run_always)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
RETURNING id;

-- name: insert_task_dep
INSERT INTO task_deps (task_id, parent_id) VALUES ($1, $2);

-- name: create_staging
CREATE TEMP TABLE staging (task_id bigint NOT NULL, number bigint NOT NULL, payload text NOT NULL)
ON COMMIT DROP;

-- name: count_staged
SELECT task_id, count(*) AS n FROM staging GROUP BY task_id;

-- name: stage_jobs
-- Jobs are cut over the sorted event numbers of each task; gaps in the numbers are fine.
-- A task of n events gets k = ceil(n / max) jobs whose sizes differ by one at most
-- (1000 events at most 36 a job: 20 jobs of 36 and 8 of 35, not 27 of 36 and one of 28):
-- a short last job would end alone while the workers of the others sit idle.
CREATE TEMP TABLE staged ON COMMIT DROP AS
SELECT task_id, number, payload,
       (i * ((n + max_per_job - 1) / max_per_job)) / n AS seq
FROM (SELECT s.task_id, s.number, s.payload, t.max_payloads_per_job AS max_per_job,
             row_number() OVER w - 1 AS i, count(*) OVER (PARTITION BY s.task_id) AS n
      FROM staging s JOIN tasks t ON t.id = s.task_id
      WINDOW w AS (PARTITION BY s.task_id ORDER BY s.number)) ranked;

-- name: insert_jobs
INSERT INTO jobs (workflow_id, task_id, seq, n_events, first_number, last_number, walltime)
SELECT $1, s.task_id, s.seq, count(*), min(s.number), max(s.number),
       coalesce(t.job_walltime, t.request_walltime * count(*))
FROM staged s JOIN tasks t ON t.id = s.task_id
GROUP BY s.task_id, s.seq, t.request_walltime, t.job_walltime
ORDER BY s.task_id, s.seq;

-- name: insert_events
INSERT INTO events (job_id, number, task_id, payload)
SELECT j.id, s.number, s.task_id, s.payload
FROM staged s JOIN jobs j ON j.task_id = s.task_id AND j.seq = s.seq;

-- name: count_task_jobs
UPDATE tasks t SET n_events = c.n_events, n_jobs = c.n_jobs
FROM (SELECT task_id, sum(n_events) AS n_events, count(*) AS n_jobs FROM jobs WHERE workflow_id = $1 GROUP BY task_id) c
WHERE t.id = c.task_id;

-- name: count_workflow_events
UPDATE workflows SET n_events = (SELECT coalesce(sum(n_events), 0) FROM tasks WHERE workflow_id = $1)
WHERE id = $1;

-- name: notify_submitted
SELECT pg_notify('dispatcher_submitted', $1::bigint::text);

-- name: release_ready_tasks
-- A waiting task is released when every task it depends on has finished (a run_always
-- one: has ended, whatever its outcome).
UPDATE tasks t SET status = 'released', released_at = now()
WHERE t.status = 'waiting'
  AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks p ON p.id = d.parent_id
                  WHERE d.task_id = t.id AND p.status <> 'finished'
                    AND NOT (t.run_always AND p.status IN ('failed', 'cancelled')))
RETURNING t.id, t.workflow_id, t.label;

-- name: cancel_blocked_tasks
-- A waiting task whose parent failed or was cancelled can never run (but a run_always one).
UPDATE tasks t SET status = 'cancelled', finished_at = now()
WHERE t.status = 'waiting' AND NOT t.run_always
  AND EXISTS (SELECT 1 FROM task_deps d JOIN tasks p ON p.id = d.parent_id
              WHERE d.task_id = t.id AND p.status IN ('failed', 'cancelled'))
RETURNING t.id, t.workflow_id, t.label;

-- name: cancel_task_work
WITH j AS (
    UPDATE jobs SET status = 'cancelled', finished_at = now()
    WHERE task_id = ANY($1::bigint[]) AND status NOT IN ('finished', 'failed', 'cancelled')
    RETURNING id
)
UPDATE events SET status = 'cancelled'
WHERE job_id IN (SELECT id FROM j) AND status NOT IN ('finished', 'failed', 'cancelled');

-- name: count_active_jobs
SELECT count(*) FROM jobs WHERE status IN ('releasing', 'queued', 'running');

-- name: try_lead
-- The leader of the control planes holds this lock in an open transaction (dispatcher/leader.py).
SELECT pg_try_advisory_xact_lock(4542410532);

-- name: lock_release_window
-- Counting the active jobs and claiming up to the window is one step across control
-- planes: two that claimed at once would each fill the whole window.
SELECT pg_advisory_xact_lock(4542410531);

-- name: claim_jobs
-- The releaser claims pending jobs of released tasks, oldest first, up to its window,
-- for its control plane ($2), under a lease from now.
UPDATE jobs SET status = 'releasing', claimed_at = now(), claimed_by = $2
WHERE id IN (
    SELECT j.id FROM jobs j JOIN tasks t ON t.id = j.task_id
    WHERE j.status = 'pending' AND t.status IN ('released', 'running')
    ORDER BY j.id
    LIMIT $1
    FOR UPDATE OF j SKIP LOCKED
)
RETURNING id;

-- name: reclaim_stale_releasing
-- Jobs left 'releasing' by a control plane that died (or stalled) while publishing them:
-- their lease ran out. They become $2's.
UPDATE jobs SET claimed_at = now(), claimed_by = $2
WHERE status = 'releasing' AND claimed_at < now() - make_interval(secs => $1)
RETURNING id;

-- name: renew_claims
-- A control plane's lease on the jobs it is publishing ($2), renewed.
UPDATE jobs SET claimed_at = now() WHERE status = 'releasing' AND claimed_by = $1 AND id = ANY ($2::bigint[]);

-- name: publishing
-- Control plane $2 is about to publish job $1's ranges up to event $4, if it still holds
-- the job under its lease ($3 seconds); recorded first, so that one taking the job over
-- starts after it (a batch recorded and never sent is found by the reconciliation).
UPDATE jobs SET published_upto = $4
WHERE id = $1 AND status = 'releasing' AND claimed_by IS NOT DISTINCT FROM $2
  AND claimed_at > now() - make_interval(secs => $3)
RETURNING id;

-- name: jobs_to_publish
SELECT j.id, j.workflow_id, j.task_id, t.label, t.payload, t.events_per_range, t.max_attempts, t.retry_delay,
       j.published_upto
FROM jobs j JOIN tasks t ON t.id = j.task_id
WHERE j.id = ANY($1::bigint[])
ORDER BY j.id;

-- name: job_events
-- What to publish of a job: its events not started, after event $2 if given (a job taken
-- over: what comes before was published by the control plane that claimed it first).
SELECT number, payload, greatest(attempt, 1) AS attempt, issue
FROM events WHERE job_id = $1 AND status IN ('ready', 'queued') AND ($2::bigint IS NULL OR number > $2)
ORDER BY number;

-- name: reissue_stale_jobs
-- Jobs whose queue lost its ranges (the reconciliation) get new copies of what has not
-- started (their queue was purged of what is left in it; copies held anywhere are now
-- stale), retries whose range should have reached the queue by now included.
UPDATE events SET issue = issue + 1,
                  status = CASE WHEN status = 'retrying' THEN 'queued' ELSE status END,
                  attempt = CASE WHEN status = 'retrying' THEN attempt + 1 ELSE attempt END,
                  retry_at = NULL
WHERE job_id = ANY($1::bigint[])
  AND (status IN ('ready', 'queued') OR (status = 'retrying' AND NOT unpublished AND retry_at <= now()));

-- name: mark_jobs_queued
WITH j AS (
    UPDATE jobs SET status = 'queued', queued_at = now()
    WHERE id = ANY($1::bigint[]) AND status = 'releasing'
    RETURNING id
)
UPDATE events SET status = 'queued', attempt = greatest(attempt, 1)
WHERE job_id IN (SELECT id FROM j) AND status = 'ready';

-- name: apply_updates
-- A batch of status updates in one statement (its columns are sent and decoded once),
-- in two parts on the same snapshot: the events, and their attempts.
--
-- Refused (recorded nowhere; the caller dead-letters their messages): an update that
-- names no event, or an attempt never issued. The attempt issued last is events.attempt:
-- the releaser issues the first (a 'ready' event's 0 counts as 1: its range may be out
-- before the event is marked queued), the control plane every next one; while an event
-- is 'retrying' its next attempt is issued too (its range waits in a delay queue).
--
-- The event state machine. An update applies only if it is newer: a later attempt, or
-- the same attempt further along (queued < running < finished/failed). Terminal events
-- never move, so duplicates and stale attempts change nothing. A failed attempt with
-- attempts left makes the event 'retrying' (the control plane then issues the next);
-- the last one makes it 'failed'. A 'fatal' one (a PanDA pilot's) is a failed attempt
-- that gets no next one.
--
-- Every attempt is recorded, with the worker that ran it.
WITH u AS (
    SELECT job_id, number, attempt, CASE WHEN how = 'fatal' THEN 'failed' ELSE how END AS status,
           how = 'fatal' AS fatal, worker, started_at, ended_at, exit_code, error
    FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::text[], $5::text[],
                $6::timestamptz[], $7::timestamptz[], $8::int[], $9::text[])
         AS u(job_id, number, attempt, how, worker, started_at, ended_at, exit_code, error)
), k AS (
    SELECT u.*, e.task_id, e.job_id IS NOT NULL AS known,
           e.job_id IS NOT NULL AND u.attempt <= greatest(e.attempt, 1) + (e.status = 'retrying')::int AS issued
    FROM u
    LEFT JOIN events e ON e.job_id = u.job_id AND e.number = u.number
), moved AS (
    UPDATE events e SET
        status = CASE WHEN n.retry THEN 'retrying' ELSE n.status END,
        attempt = n.attempt,
        worker = n.worker,
        started_at = coalesce(n.started_at, CASE WHEN n.attempt = e.attempt THEN e.started_at END),
        ended_at = n.ended_at,
        exit_code = n.exit_code,
        error = n.error,
        -- a retry is a new issue, to be published by the control plane
        issue = CASE WHEN n.retry THEN e.issue + 1 ELSE e.issue END,
        unpublished = n.retry,
        retry_at = NULL
    FROM (
        -- one row per event, its newest update: an UPDATE joined to several rows of one
        -- event would apply an arbitrary one (a batch may hold several attempts of it);
        -- a failure is retried if the task has attempts left (looked up for failures only)
        SELECT DISTINCT ON (job_id, number) *,
               CASE WHEN status <> 'failed' OR fatal THEN false
                    ELSE attempt < (SELECT t.max_attempts FROM tasks t WHERE t.id = k.task_id) END AS retry
        FROM k
        WHERE issued
        ORDER BY job_id, number, attempt DESC, es_status_rank(status) DESC
    ) AS n
    WHERE e.job_id = n.job_id AND e.number = n.number
      AND e.status NOT IN ('finished', 'failed', 'cancelled')
      AND (n.attempt > e.attempt OR (n.attempt = e.attempt AND es_status_rank(n.status) > es_status_rank(e.status)))
    RETURNING e.job_id
), recorded AS (
    INSERT INTO attempts AS a (job_id, number, attempt, status, worker, started_at, ended_at, exit_code, error)
    SELECT k.job_id, k.number, k.attempt, k.status, k.worker, k.started_at, k.ended_at, k.exit_code, k.error
    FROM k
    WHERE k.issued
    ON CONFLICT (job_id, number, attempt) DO UPDATE SET
        status = excluded.status,
        worker = excluded.worker,
        started_at = coalesce(excluded.started_at, a.started_at),
        ended_at = excluded.ended_at,
        exit_code = excluded.exit_code,
        error = excluded.error,
        recorded_at = clock_timestamp()
    WHERE es_status_rank(excluded.status) > es_status_rank(a.status)
)
SELECT coalesce((SELECT array_agg(DISTINCT job_id) FROM moved), '{}') AS moved,
       coalesce(array_agg(job_id), '{}') AS refused_jobs,
       coalesce(array_agg(number), '{}') AS refused_numbers,
       coalesce(array_agg(attempt), '{}') AS refused_attempts,
       coalesce(array_agg(known), '{}') AS refused_known
FROM k
WHERE NOT issued;

-- name: return_events
-- Events that came back to the control plane: 'returned' (their range was delivered
-- again after its holder was lost; the reporter did not run them) and 'stopped' (given
-- back unfinished by the worker that held them: a shutdown, a job closed).
-- Attempts are charged from what Postgres saw, never from a broker's redelivered flag:
-- an event returned while Postgres saw it running lost that attempt with its worker,
-- which is recorded as a failed attempt of that worker, with its start, and the next
-- attempt is issued (or, out of attempts, the event fails). An event not started (ready,
-- queued, or retrying with its next attempt's range returned) goes back at the attempt
-- last issued, charged nothing, but only if the range is the copy in flight: a stale copy
-- (reissued since) reissues nothing, so a range returned twice is not published twice.
-- A stopped event goes back at its attempt. Each row updated becomes a new copy, marked
-- unpublished until the caller has published it ('queued'), or failed for its dead letter.
-- $7: a running event whose holder is live is 'held', not lost: a range comes back when
-- its holder's connection is lost, which a broker node's crash does to a worker that
-- lives on (it reconnects to another node and reports the event). Only returned_at is
-- set then; the watchdog charges the event if the holder says nothing after it
-- (held_returns). The watchdog's own calls pass false: the holder is gone.
WITH r AS (
    SELECT DISTINCT ON (job_id, number) *
    FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::text[], $5::text[], $6::int[])
         AS r(job_id, number, attempt, how, worker, issue)
    ORDER BY job_id, number, attempt DESC
), k AS (
    SELECT e.job_id, e.number, e.status, e.attempt, e.worker AS holder, e.started_at, t.max_attempts,
           CASE WHEN e.status = 'running' AND r.attempt = e.attempt AND r.how = 'returned' AND $7
                     AND EXISTS (SELECT 1 FROM workers w WHERE w.id = e.worker AND w.status IN ('live', 'stopping'))
                     THEN 'held'
                WHEN e.status = 'running' AND r.attempt = e.attempt
                     AND NOT (r.how = 'stopped' AND r.worker = e.worker) THEN 'lost'
                WHEN e.status = 'running' AND r.attempt = e.attempt THEN 'again'
                WHEN e.status IN ('ready', 'queued', 'retrying') AND r.issue = e.issue
                     AND r.attempt = CASE WHEN e.status = 'retrying' THEN e.attempt + 1
                                          ELSE greatest(e.attempt, 1) END THEN 'again'
           END AS action
    FROM r
    JOIN events e ON e.job_id = r.job_id AND e.number = r.number
    JOIN tasks t ON t.id = e.task_id
), lost AS (
    INSERT INTO attempts AS a (job_id, number, attempt, status, worker, started_at, ended_at, error)
    SELECT job_id, number, attempt, 'failed', coalesce(holder, 'unknown'), started_at, clock_timestamp(),
           'lost with its worker ' || coalesce(holder, 'unknown')
    FROM k WHERE action = 'lost'
    ON CONFLICT (job_id, number, attempt) DO UPDATE SET
        status = 'failed', ended_at = excluded.ended_at, error = excluded.error, recorded_at = clock_timestamp()
    WHERE a.status = 'running'
), held AS (
    UPDATE events e SET returned_at = coalesce(e.returned_at, clock_timestamp())
    FROM k
    WHERE e.job_id = k.job_id AND e.number = k.number AND k.action = 'held'
      AND e.status = k.status AND e.attempt = k.attempt
)
UPDATE events e SET
    status = CASE WHEN k.action = 'lost' AND k.attempt >= k.max_attempts THEN 'failed' ELSE 'queued' END,
    attempt = CASE WHEN k.action = 'lost' AND k.attempt < k.max_attempts THEN k.attempt + 1
                   WHEN k.status = 'retrying' THEN k.attempt + 1
                   ELSE greatest(k.attempt, 1) END,
    issue = e.issue + 1,
    unpublished = NOT (k.action = 'lost' AND k.attempt >= k.max_attempts),
    retry_at = NULL,
    ended_at = CASE WHEN k.action = 'lost' THEN clock_timestamp() ELSE e.ended_at END,
    error = CASE WHEN k.action = 'lost' THEN 'lost with its worker ' || coalesce(k.holder, 'unknown') ELSE e.error END,
    returned_at = NULL
FROM k
WHERE e.job_id = k.job_id AND e.number = k.number AND k.action IN ('lost', 'again')
  -- as read above: not moved meanwhile by a transaction that committed first
  AND e.status = k.status AND e.attempt = k.attempt
RETURNING e.job_id, e.number, e.status;

-- name: followups
-- Events of these keys that wait for the control plane: a copy to publish (a retry into a
-- delay queue, or an event that came back into its job's queue), or a dead letter to
-- write. A status message delivered again after a crash finds them here again.
SELECT e.job_id, e.number, e.status, e.attempt, e.issue, e.payload, e.worker, e.error, j.workflow_id,
       j.status IN ('releasing', 'queued', 'running') AS job_active, t.label, t.retry_delay, t.events_per_range
FROM (SELECT DISTINCT * FROM unnest($1::bigint[], $2::bigint[]) AS k(job_id, number)) k
JOIN events e ON e.job_id = k.job_id AND e.number = k.number
JOIN jobs j ON j.id = e.job_id
JOIN tasks t ON t.id = e.task_id
WHERE (e.unpublished AND e.status IN ('retrying', 'queued')) OR (e.status = 'failed' AND e.dead_at IS NULL);

-- name: mark_published
-- These copies are confirmed in RabbitMQ (a retry's due at the time given).
UPDATE events e SET unpublished = false, retry_at = k.due
FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::timestamptz[]) AS k(job_id, number, issue, due)
WHERE e.job_id = k.job_id AND e.number = k.number AND e.issue = k.issue AND e.unpublished;

-- name: mark_dead_lettered
UPDATE events e SET dead_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS k(job_id, number)
WHERE e.job_id = k.job_id AND e.number = k.number AND e.status = 'failed' AND e.dead_at IS NULL;

-- name: mark_jobs_running
WITH j AS (
    UPDATE jobs SET status = 'running', started_at = now()
    WHERE id = ANY($1::bigint[]) AND status = 'queued'
    RETURNING task_id
)
UPDATE tasks SET status = 'running', started_at = now()
WHERE id IN (SELECT task_id FROM j) AND status = 'released';

-- name: set_job_logs
UPDATE jobs j SET log_path = u.path
FROM unnest($1::bigint[], $2::text[]) AS u(job_id, path)
WHERE j.id = u.job_id;

-- name: job_workflows
SELECT DISTINCT workflow_id FROM jobs WHERE id = ANY($1::bigint[]);

-- name: notify_progress
SELECT pg_notify('dispatcher_progress', w::text) FROM unnest($1::bigint[]) AS w;

-- name: finish_jobs
-- Idempotent: a job ends once, when none of its events is left to run.
UPDATE jobs j SET
    status = CASE WHEN EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.status = 'failed')
                  THEN 'failed' ELSE 'finished' END,
    finished_at = now()
WHERE j.id = ANY($1::bigint[]) AND j.status IN ('releasing', 'queued', 'running')
  AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id
                  AND e.status NOT IN ('finished', 'failed', 'cancelled'))
RETURNING j.id, j.task_id, j.status;

-- name: finish_tasks
UPDATE tasks t SET
    status = CASE WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.task_id = t.id AND j.status <> 'finished')
                  THEN 'failed' ELSE 'finished' END,
    finished_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status IN ('released', 'running')
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.task_id = t.id
                  AND j.status NOT IN ('finished', 'failed', 'cancelled'))
RETURNING t.id, t.workflow_id, t.status;

-- name: finish_workflows
UPDATE workflows w SET
    status = CASE WHEN EXISTS (SELECT 1 FROM tasks t WHERE t.workflow_id = w.id AND t.status <> 'finished')
                  THEN 'failed' ELSE 'finished' END,
    finished_at = now()
WHERE w.id = ANY($1::bigint[]) AND w.status = 'running'
  AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.workflow_id = w.id
                  AND t.status NOT IN ('finished', 'failed', 'cancelled'))
RETURNING w.id, w.status;

-- name: unfinished_jobs
-- Start-up sweep: jobs with a queue whose events may all be terminal already (a
-- 'releasing' one too: its control plane may have died after publishing it whole).
SELECT id FROM jobs WHERE status IN ('releasing', 'queued', 'running');

-- name: stuck_jobs
-- Active jobs none of whose events is left to run (a control plane died before finishing
-- one, or republished one that had ended meanwhile): finished whatever their state.
SELECT j.id FROM jobs j
WHERE j.status IN ('releasing', 'queued', 'running')
  AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id
                  AND e.status NOT IN ('finished', 'failed', 'cancelled'));

-- name: waiting_in_queue
-- Of these jobs, how many events Postgres says wait in the job's queue: queued, their
-- copy published (a retry's range in a delay queue is 'retrying', not counted). Only
-- jobs claimed more than $2 seconds ago: a control plane that stalled while publishing
-- one may still send what it had started to until RabbitMQ drops its connection.
SELECT e.job_id, count(*) AS waiting FROM events e JOIN jobs j ON j.id = e.job_id
WHERE e.job_id = ANY ($1::bigint[]) AND e.status = 'queued' AND NOT e.unpublished
  AND (j.claimed_at IS NULL OR j.claimed_at < now() - make_interval(secs => $2))
GROUP BY e.job_id;

-- name: recently_ended_jobs
-- Jobs that ended in the last day, newest first (whose queue should be gone).
SELECT id FROM jobs
WHERE status IN ('finished', 'failed', 'cancelled') AND finished_at > now() - interval '1 day'
ORDER BY finished_at DESC LIMIT $1;

-- name: running_workflows
SELECT id FROM workflows WHERE status = 'running';

-- name: workflow
SELECT id, name, status, n_events, submitted_at, finished_at FROM workflows WHERE id = $1;

-- name: latest_workflows
SELECT id, name, status, n_events, submitted_at, finished_at FROM workflows ORDER BY id DESC LIMIT $1;

-- name: task_summary
SELECT t.id, t.label, t.status, t.event_service, t.max_payloads_per_job, t.n_events, t.n_jobs,
       t.released_at, t.started_at, t.finished_at
FROM tasks t WHERE t.workflow_id = $1 ORDER BY t.id;

-- name: event_counts
-- From the counters the statements on events keep (migration 0011), not from the events.
SELECT task_id, status, sum(n)::bigint AS n FROM event_counts
WHERE task_id IN (SELECT id FROM tasks WHERE workflow_id = $1)
GROUP BY task_id, status HAVING sum(n) <> 0;

-- name: compact_event_counts
-- Fold each (task, state)'s delta rows into one, and drop those that add up to nothing;
-- returns the tasks whose counts changed since the last fold. Safe beside the triggers
-- and another fold: a row is deleted once, and rows added meanwhile wait for the next.
WITH many AS (
    SELECT task_id, status FROM event_counts GROUP BY task_id, status HAVING count(*) > 1 OR sum(n) = 0
), gone AS (
    DELETE FROM event_counts c USING many m WHERE c.task_id = m.task_id AND c.status = m.status
    RETURNING c.task_id, c.status, c.n
), folded AS (
    INSERT INTO event_counts (task_id, status, n)
    SELECT task_id, status, sum(n) FROM gone GROUP BY task_id, status HAVING sum(n) <> 0
)
SELECT DISTINCT task_id FROM gone;

-- name: compact_attempt_durations
WITH many AS (
    SELECT task_id, status, bucket FROM attempt_durations
    GROUP BY task_id, status, bucket HAVING count(*) > 1 OR sum(n) = 0
), gone AS (
    DELETE FROM attempt_durations d USING many m
    WHERE d.task_id = m.task_id AND d.status = m.status AND d.bucket = m.bucket
    RETURNING d.task_id, d.status, d.bucket, d.n
)
INSERT INTO attempt_durations (task_id, status, bucket, n)
SELECT task_id, status, bucket, sum(n) FROM gone GROUP BY task_id, status, bucket HAVING sum(n) <> 0;

-- name: sample_event_counts
-- The counts of the tasks $1 now, for the pictures of progress over time. A task is
-- sampled at most once per $2-th of its run so far (from its first sample), and at every
-- fold while that is shorter: the pictures draw a few hundred points of a run, and a
-- task that runs for weeks added a row every fold (17,280 a day); this way its rows grow
-- with the logarithm of its run. A task with nothing left to run is sampled whenever it
-- changes: its last counts end its pictures.
INSERT INTO event_count_samples (task_id, at, counts)
SELECT c.task_id, now(), c.counts
FROM (
    SELECT task_id, jsonb_object_agg(status, n) AS counts FROM (
        SELECT task_id, status, sum(n) AS n FROM event_counts WHERE task_id = ANY($1::bigint[])
        GROUP BY task_id, status HAVING sum(n) <> 0
    ) s GROUP BY task_id
) c
CROSS JOIN LATERAL (
    SELECT min(at) AS first, max(at) AS last FROM event_count_samples x WHERE x.task_id = c.task_id
) h
WHERE h.last IS NULL
   OR NOT c.counts ?| array['ready', 'queued', 'running', 'retrying']
   OR now() - h.last >= (now() - h.first) / $2::int
ON CONFLICT DO NOTHING;

-- name: event_count_samples
-- The samples of the tasks $1, at most about $2 of each (evenly spaced, the last kept).
SELECT task_id, at, counts FROM (
    SELECT task_id, at, counts, row_number() OVER w AS i, count(*) OVER (PARTITION BY task_id) AS total
    FROM event_count_samples WHERE task_id = ANY($1::bigint[])
    WINDOW w AS (PARTITION BY task_id ORDER BY at)
) s
WHERE i % greatest(total / $2, 1) = 0 OR i = total OR i = 1
ORDER BY at;

-- name: attempt_durations
SELECT status, bucket, sum(n)::bigint AS n FROM attempt_durations WHERE task_id = ANY($1::bigint[])
GROUP BY status, bucket HAVING sum(n) <> 0 ORDER BY bucket;

-- name: job_counts
SELECT task_id, status, count(*) AS n FROM jobs WHERE workflow_id = $1 GROUP BY task_id, status;

-- name: upsert_worker
INSERT INTO workers AS w (id, host, pid, slots, status, jobs, events_done, started_at, last_seen, setting_up)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status, jobs = excluded.jobs, events_done = excluded.events_done, last_seen = now(),
    setting_up = excluded.setting_up
WHERE w.status <> 'stopped';

-- name: mark_lost_workers
-- Workers silent for $1 seconds, pilots for their lease.
UPDATE workers SET status = 'lost', jobs = '{}'
WHERE status IN ('live', 'stopping') AND last_seen < now() - make_interval(secs => coalesce(lease_seconds, $1))
RETURNING id;

-- name: held_returns
-- Running events whose range came back while their holder seemed alive (return_events'
-- 'held'): those whose holder has been heard from since are its own again (returned_at
-- cleared, as for events that moved on); those whose holder has been silent for $1
-- seconds since (a pilot: its lease), or is lost or stopped, are returned: (job, number,
-- attempt, issue).
WITH settled AS (
    UPDATE events e SET returned_at = NULL
    WHERE e.returned_at IS NOT NULL
      AND (e.status <> 'running'
           OR EXISTS (SELECT 1 FROM workers w
                      WHERE w.id = e.worker AND w.status IN ('live', 'stopping') AND w.last_seen > e.returned_at))
    RETURNING e.job_id, e.number
)
SELECT e.job_id, e.number, e.attempt, e.issue
FROM events e
LEFT JOIN workers w ON w.id = e.worker AND w.status IN ('live', 'stopping')
WHERE e.returned_at IS NOT NULL AND e.status = 'running'
  AND NOT EXISTS (SELECT 1 FROM settled s WHERE s.job_id = e.job_id AND s.number = e.number)
  AND (w.id IS NULL OR e.returned_at < now() - make_interval(secs => coalesce(w.lease_seconds, $1)));

-- name: running_under
-- Events of active jobs running under these workers (lost ones: nobody will report them).
SELECT e.job_id, e.number, e.attempt, e.issue
FROM events e JOIN jobs j ON j.id = e.job_id
WHERE j.status IN ('releasing', 'queued', 'running') AND e.status = 'running' AND e.worker = ANY ($1::text[]);

-- name: active_jobs
SELECT id FROM jobs WHERE status IN ('releasing', 'queued', 'running') ORDER BY id;

-- name: jobs_not_being_set_up
-- Active jobs no live worker says it is setting up (a job is consumed only once set up).
SELECT j.id FROM jobs j
WHERE j.status IN ('releasing', 'queued', 'running')
  AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.status = 'live' AND j.id = ANY (w.setting_up))
ORDER BY j.id;

-- name: unattended_jobs
-- Jobs with work that no live worker says it serves or sets up (its worker died, or left before a
-- retry or a returned range arrived).
SELECT j.id FROM jobs j
WHERE j.status IN ('queued', 'running')
  AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.status = 'live'
                  AND (j.id = ANY (w.jobs) OR j.id = ANY (w.setting_up)));

-- name: cancel_workflow
WITH w AS (
    UPDATE workflows SET status = 'cancelled', finished_at = now()
    WHERE id = $1 AND status = 'running' RETURNING id
), t AS (
    UPDATE tasks SET status = 'cancelled', finished_at = now()
    WHERE workflow_id IN (SELECT id FROM w) AND status NOT IN ('finished', 'failed', 'cancelled')
), j AS (
    UPDATE jobs SET status = 'cancelled', finished_at = now()
    WHERE workflow_id IN (SELECT id FROM w) AND status NOT IN ('finished', 'failed', 'cancelled')
    RETURNING id, status
), e AS (
    UPDATE events SET status = 'cancelled', ended_at = coalesce(ended_at, now())
    WHERE job_id IN (SELECT id FROM jobs WHERE workflow_id IN (SELECT id FROM w))
      AND status NOT IN ('finished', 'failed', 'cancelled')
)
-- every statement sees the rows as they were: these are the jobs that had a queue
SELECT id FROM jobs
WHERE workflow_id IN (SELECT id FROM w) AND status IN ('releasing', 'queued', 'running');

-- name: dead_event
SELECT e.status, e.attempt, e.issue, e.payload, j.workflow_id, w.status AS workflow_status
FROM events e JOIN jobs j ON j.id = e.job_id JOIN workflows w ON w.id = j.workflow_id
WHERE e.job_id = $1 AND e.number = $2;

-- name: replay_event
-- The event gets a fresh attempt, counted from Postgres ($3: the attempt it failed at);
-- its job, task and workflow run again, and the tasks cancelled because this one failed
-- wait again for it. Returns what to publish: the payload is Postgres's, never a dead letter's.
WITH e AS (
    UPDATE events SET status = 'queued', attempt = attempt + 1, issue = issue + 1, replays = replays + 1,
                      error = NULL, exit_code = NULL, ended_at = NULL, dead_at = NULL
    WHERE job_id = $1 AND number = $2 AND status = 'failed' AND attempt = $3
    RETURNING job_id, attempt, issue, payload
), j AS (
    UPDATE jobs SET status = 'queued', finished_at = NULL
    WHERE id IN (SELECT job_id FROM e) RETURNING task_id, workflow_id
), t AS (
    UPDATE tasks SET status = 'running', finished_at = NULL
    WHERE id IN (SELECT task_id FROM j) RETURNING workflow_id
), w AS (
    UPDATE workflows SET status = 'running', finished_at = NULL
    WHERE id IN (SELECT workflow_id FROM j) RETURNING id
)
SELECT job_id, attempt, issue, payload FROM e;

-- name: reopen_cancelled_descendants
-- After a replay: tasks cancelled only because a parent failed wait again.
WITH t AS (
    UPDATE tasks SET status = 'waiting', finished_at = NULL
    WHERE workflow_id = $1 AND status = 'cancelled' RETURNING id
), j AS (
    UPDATE jobs SET status = 'pending', finished_at = NULL
    WHERE task_id IN (SELECT id FROM t) AND status = 'cancelled' RETURNING id
)
UPDATE events SET status = 'ready', ended_at = NULL
WHERE job_id IN (SELECT id FROM j) AND status = 'cancelled';

-- name: live_workers
SELECT id, host, pid, slots, status, jobs, events_done, started_at, last_seen FROM workers
WHERE status IN ('live', 'stopping') ORDER BY id;

-- Monitor ------------------------------------------------------------------------------

-- name: monitor_workflows
SELECT w.id, w.name, w.status, w.n_events, w.submitted_at, w.finished_at,
       coalesce((SELECT jsonb_object_agg(c.status, c.n) FROM (
           SELECT e.status, sum(e.n) AS n FROM event_counts e
           WHERE e.task_id IN (SELECT id FROM tasks WHERE workflow_id = w.id)
           GROUP BY e.status HAVING sum(e.n) <> 0) c), '{}') AS events
FROM workflows w ORDER BY w.id DESC LIMIT $1;

-- name: monitor_task_deps
SELECT d.task_id, p.label AS parent FROM task_deps d JOIN tasks p ON p.id = d.parent_id
WHERE p.workflow_id = $1 ORDER BY d.task_id, p.id;

-- name: monitor_jobs
SELECT j.id, t.label, j.seq, j.status, j.n_events, j.first_number, j.last_number, j.log_path,
       j.queued_at, j.started_at, j.finished_at
FROM jobs j JOIN tasks t ON t.id = j.task_id
WHERE j.workflow_id = $1 AND j.id > $2 AND ($3::text IS NULL OR j.status = $3)
ORDER BY j.id LIMIT $4;

-- name: monitor_job
SELECT j.id, j.workflow_id, w.name AS workflow, j.task_id, t.label, j.seq, j.status, j.n_events,
       j.first_number, j.last_number, j.walltime, j.log_path, j.queued_at, j.started_at, j.finished_at
FROM jobs j JOIN tasks t ON t.id = j.task_id JOIN workflows w ON w.id = j.workflow_id
WHERE j.id = $1;

-- name: monitor_job_counts
SELECT status, count(*) AS n FROM events WHERE job_id = $1 GROUP BY status;

-- name: monitor_job_events
-- Keyset pagination over the primary key: as fast on page 1,000 as on page 1.
SELECT number, payload, status, attempt, worker, started_at, ended_at, exit_code, error, replays
FROM events
WHERE job_id = $1 AND number > $2 AND ($3::text IS NULL OR status = $3)
ORDER BY number LIMIT $4;

-- name: monitor_task_events
SELECT job_id, number, payload, status, attempt, worker, started_at, ended_at, exit_code, error, replays
FROM events
WHERE task_id = $1 AND number > $2 AND ($3::text IS NULL OR status = $3)
ORDER BY number LIMIT $4;

-- name: monitor_failed_events
SELECT j.workflow_id, t.label, e.job_id, e.number, e.payload, e.attempt, e.worker, e.ended_at, e.error
FROM events e JOIN jobs j ON j.id = e.job_id JOIN tasks t ON t.id = e.task_id
WHERE e.status = 'failed' AND ($1::bigint IS NULL OR j.workflow_id = $1)
ORDER BY j.workflow_id, e.job_id, e.number LIMIT $2;

-- name: monitor_workers
SELECT id, host, pid, slots, status, jobs, events_done, started_at, last_seen FROM workers
WHERE status IN ('live', 'stopping') OR last_seen > now() - interval '1 hour'
ORDER BY status, id;

-- name: metrics_events
SELECT status, sum(n)::bigint AS n FROM event_counts GROUP BY status HAVING sum(n) <> 0;

-- name: metrics_attempts
SELECT count(*) FILTER (WHERE attempt > 1) AS retries, count(*) AS attempts FROM attempts;

-- name: metrics_workers
SELECT status, count(*) AS n FROM workers GROUP BY status;

-- name: setup_failed
-- A worker could not set the job up. Once as many workers failed as the task has
-- attempts, the job cannot run anywhere: its events fail (their dead letters follow),
-- instead of the job being announced for ever.
WITH j AS (
    UPDATE jobs j SET setup_failures = j.setup_failures + 1
    FROM tasks t
    WHERE j.id = $1 AND t.id = j.task_id AND j.status IN ('releasing', 'queued', 'running')
    RETURNING j.id, j.setup_failures >= t.max_attempts AS given_up
)
UPDATE events e SET status = 'failed', error = $2, ended_at = now(), unpublished = false
FROM j
WHERE e.job_id = j.id AND j.given_up AND e.status IN ('ready', 'queued', 'retrying')
RETURNING e.job_id, e.number;

-- PanDA pilots (dispatcher/pilot): a pilot holding job J is the worker 'pilot:J', whose
-- heartbeat is its calls and whose silence is measured against its lease.

-- name: pilot_job
-- A job as a pilot's calls name it.
SELECT j.id, j.task_id, j.workflow_id, j.status, j.n_events, t.label, t.pilot_command, t.max_attempts,
       w.name AS workflow
FROM jobs j JOIN tasks t ON t.id = j.task_id JOIN workflows w ON w.id = j.workflow_id
WHERE j.id = $1;

-- name: pilot_take_job
-- getJob: the oldest active job with events waiting that no live pilot holds becomes
-- the job of a pilot ($1 its host, $2 its lease in seconds, $3 its cores). Concurrent
-- calls skip each other's job (one pilot per PanDA job, as in PanDA).
WITH j AS (
    SELECT j.id FROM jobs j
    WHERE j.status IN ('releasing', 'queued', 'running')
      AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = 'pilot:' || j.id AND w.status IN ('live', 'stopping'))
      AND EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.status IN ('ready', 'queued', 'retrying'))
    ORDER BY j.id
    LIMIT 1
    FOR UPDATE OF j SKIP LOCKED
)
INSERT INTO workers AS w (id, host, pid, slots, status, jobs, started_at, last_seen, lease_seconds)
SELECT 'pilot:' || j.id, $1, 0, $3, 'live', ARRAY[j.id], now(), now(), $2 FROM j
ON CONFLICT (id) DO UPDATE SET
    host = excluded.host, slots = excluded.slots, status = 'live', jobs = excluded.jobs, events_done = 0,
    started_at = now(), last_seen = now(), lease_seconds = excluded.lease_seconds
WHERE w.status NOT IN ('live', 'stopping')
RETURNING w.jobs[1] AS job_id;

-- name: pilot_seen
-- A pilot's call ($1 the pilot, $2 its host, $3 its job, $4 its lease): its lease runs
-- from now. One lost meanwhile is live again: what it held was charged and issued again,
-- and its late reports of those attempts are stale.
INSERT INTO workers AS w (id, host, pid, slots, status, jobs, started_at, last_seen, lease_seconds)
VALUES ($1, $2, 0, 1, 'live', ARRAY[$3::bigint], now(), now(), $4)
ON CONFLICT (id) DO UPDATE SET status = 'live', jobs = excluded.jobs, last_seen = now(),
                               lease_seconds = excluded.lease_seconds;

-- name: pilot_lease
-- The events of a range taken off job $1's queue for pilot $2 ($3 numbers, $4 attempts,
-- $5 issues): each still waiting for that copy's attempt is now running under the pilot,
-- its lease recorded before the range is acked. A stale copy (reissued since, or run
-- elsewhere meanwhile) takes nothing. Returns what the pilot is handed.
WITH r AS (
    SELECT * FROM unnest($3::bigint[], $4::int[], $5::int[]) AS r(number, attempt, issue)
), taken AS (
    UPDATE events e SET status = 'running', attempt = r.attempt, worker = $2, started_at = clock_timestamp(),
                        ended_at = NULL, exit_code = NULL, error = NULL, returned_at = NULL, retry_at = NULL
    FROM r
    WHERE e.job_id = $1 AND e.number = r.number AND e.issue = r.issue
      AND ((e.status IN ('ready', 'queued') AND r.attempt = greatest(e.attempt, 1))
           OR (e.status = 'retrying' AND r.attempt = e.attempt + 1))
    RETURNING e.job_id, e.number, e.attempt, e.started_at
), recorded AS (
    INSERT INTO attempts (job_id, number, attempt, status, worker, started_at)
    SELECT job_id, number, attempt, 'running', $2, started_at FROM taken
    ON CONFLICT (job_id, number, attempt) DO NOTHING
)
SELECT number, attempt FROM taken ORDER BY number;

-- name: pilot_outstanding
-- Whether more of job $1 may come to pilot $2: the job is active and some event of it is
-- neither ended nor the pilot's own (waiting, retrying, or held by another worker that
-- may be lost).
SELECT j.status IN ('releasing', 'queued', 'running')
       AND EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.status NOT IN ('finished', 'failed', 'cancelled')
                   AND NOT (e.status = 'running' AND e.worker = $2))
FROM jobs j WHERE j.id = $1;

-- name: pilot_holds
-- Of these attempts of job $1's events ($3 numbers, $4 attempts), those pilot $2 was
-- handed and that are still its last: what its reports may speak of (a report of an
-- older attempt, charged when the pilot's lease ran out, is stale).
SELECT e.number, e.attempt
FROM events e JOIN unnest($3::bigint[], $4::int[]) AS k(number, attempt)
     ON e.job_id = $1 AND e.number = k.number AND e.attempt = k.attempt
WHERE e.worker = $2;

-- name: pilot_running
-- What pilot $2 still runs of job $1 (given back when it says its job ended).
SELECT number, attempt, issue FROM events WHERE job_id = $1 AND status = 'running' AND worker = $2;

-- name: pilot_stop
UPDATE workers SET status = 'stopped', jobs = '{}', last_seen = now() WHERE id = $1 AND lease_seconds IS NOT NULL;

-- name: pilot_available
-- checkEventsAvailability: the events of job $1 that wait for a worker.
SELECT count(*) FROM events WHERE job_id = $1 AND status IN ('ready', 'queued', 'retrying');

-- name: task_mapping
-- A task's events, number and payload (the label's part of a mapping file).
SELECT number, payload FROM events WHERE task_id = $1 ORDER BY number;

-- name: task_label
SELECT label FROM tasks WHERE id = $1;

-- name: workflow_spec
SELECT spec FROM workflows WHERE id = $1;

-- name: job_attempts
-- A job's newest $2 attempts that started, for its timeline; retried: failed, and the
-- event's next attempt was issued (it is on a later attempt, or retrying this one).
-- (the event is looked up for failed attempts only, after the limit: a join sorted a
-- 100,000-event job's events with its attempts, three times slower)
SELECT a.number, a.attempt, a.status, a.worker, a.started_at, a.ended_at,
       a.status = 'failed' AND (
           SELECT e.attempt > a.attempt OR e.status = 'retrying' FROM events e
           WHERE e.job_id = a.job_id AND e.number = a.number
       ) AS retried
FROM attempts a
WHERE a.job_id = $1 AND a.started_at IS NOT NULL
ORDER BY a.started_at DESC
LIMIT $2;

-- name: count_job_attempts
SELECT count(*) FROM attempts WHERE job_id = $1 AND started_at IS NOT NULL;

-- name: monitor_task
SELECT t.id, t.workflow_id, w.name AS workflow, t.label, t.status, t.event_service, t.max_payloads_per_job,
       t.n_events, t.n_jobs, t.released_at, t.started_at, t.finished_at
FROM tasks t JOIN workflows w ON w.id = t.workflow_id WHERE t.id = $1;

-- name: task_event_counts
SELECT status, sum(n)::bigint AS n FROM event_counts WHERE task_id = $1 GROUP BY status HAVING sum(n) <> 0;
