-- Per-job Python packages (issue 15, proxy/requirements.py, worker/pyenv.py):
-- the job's normalised requirements.txt, stored as a blob like its script
-- (counted in storage, expired by retention), and how its environment was
-- had: built for it (seconds the build took) or found in the worker's cache.
ALTER TABLE jobs ADD COLUMN requirements_blob TEXT;
ALTER TABLE jobs ADD COLUMN requirements_sha256 TEXT;
ALTER TABLE jobs ADD COLUMN requirements_size BIGINT;
ALTER TABLE jobs ADD COLUMN env_build_s DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN env_cached INTEGER;
-- "Does any unexpired job still need this blob?" (retention.is_referenced).
CREATE INDEX jobs_requirements_blob ON jobs (requirements_blob, expired_at);
-- retention._storage_bound's index-only read, now with the requirements' size (IF
-- EXISTS: a store migrated before 0015 had this index lacks it).
DROP INDEX IF EXISTS jobs_owner_storage;
CREATE INDEX jobs_owner_storage ON jobs (owner_id, expired_at, script_size, dataset_size,
                                         output_size, requirements_size);
