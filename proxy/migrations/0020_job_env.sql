-- Per-job environment variables (issue 15, proxy/jobenv.py): a JSON object of
-- names to values, NULL when the job has none. Values may be secrets: the job
-- JSON shows the names only, the owner reads the values at /jobs/<id>/env.
ALTER TABLE jobs ADD COLUMN env_vars TEXT;
