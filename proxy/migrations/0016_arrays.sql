-- Job arrays (issue 15, proxy/arrays.py): one submission makes N ordinary job
-- rows that share one stored script and dataset; the array row holds what is
-- common to them (the spec as given, the cap on how many run at once).
CREATE TABLE job_arrays (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    -- "0-99%8" as submitted, or the parameters file's name.
    spec TEXT NOT NULL,
    size INTEGER NOT NULL,
    -- At most this many of its jobs reserved or running at once; NULL: no cap.
    max_running INTEGER,
    params_name TEXT,
    submitted_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX job_arrays_owner ON job_arrays (owner_id, id);
ALTER TABLE jobs ADD COLUMN array_id TEXT;
ALTER TABLE jobs ADD COLUMN array_index INTEGER;
-- The array's cap, on each of its jobs: dispatch reads it with the job (arrays.Caps).
ALTER TABLE jobs ADD COLUMN array_max_running INTEGER;
-- A parameters file's row for this job, as a JSON object (JOBCLOUD_PARAMS).
ALTER TABLE jobs ADD COLUMN array_params TEXT;
-- Jobs by index (the array's JSON, its archive); counts per state, and the
-- dispatcher's step over a capped array's queue: its last unreserved queued
-- job is this index's last entry for (array_id, 'queued', NULL).
CREATE INDEX jobs_array ON jobs (array_id, array_index);
CREATE INDEX jobs_array_state ON jobs (array_id, state, worker_id, id);
