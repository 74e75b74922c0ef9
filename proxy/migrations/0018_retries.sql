-- Retry policies (issue 15, proxy/retries.py). A job's policy is fixed when it
-- is submitted: how many policy retries it may use, which exit codes count as
-- retryable (NULL: any non-zero exit but an OOM kill), and the exponential
-- back-off's base and cap. retries_used counts the policy retries taken so far
-- (the lost-worker requeues count in `attempt` alone, leases.requeue).
ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retry_exit_codes TEXT;
ALTER TABLE jobs ADD COLUMN retry_backoff_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retry_backoff_max_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retries_used INTEGER NOT NULL DEFAULT 0;
-- A queued job in its back-off is not handed out before this time
-- (scheduler.dispatch); NULL for every other job. The index answers "is any
-- job in its back-off now?" and "when does the next one end?" with one probe.
ALTER TABLE jobs ADD COLUMN not_before DOUBLE PRECISION;
CREATE INDEX jobs_not_before ON jobs (not_before);

-- Every try of a job that ended without ending the job: a policy retry
-- (outcome 'retried') or a lost worker (outcome 'worker_lost'); the try that
-- ends the job is the job row itself. Its logs stay in job_logs under its
-- attempt; the tails and usage it reported are kept here.
CREATE TABLE job_tries (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    attempt INTEGER NOT NULL,
    try_number INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    state TEXT,
    worker_id TEXT,
    started_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION NOT NULL,
    exit_code INTEGER,
    failure_reason TEXT,
    stdout_tail TEXT,
    stderr_tail TEXT,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    cpu_seconds DOUBLE PRECISION,
    peak_memory_bytes BIGINT,
    wall_seconds DOUBLE PRECISION,
    gpu_seconds DOUBLE PRECISION,
    retry_at DOUBLE PRECISION,
    PRIMARY KEY (job_id, attempt)
);
