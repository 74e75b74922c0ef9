-- Per-job disk quota (issue 12): the size of the job's own filesystem on the
-- worker, in MiB, and whether the job filled it. NULL disk_mb: a job submitted
-- before quotas (the worker applies its own default).
ALTER TABLE jobs ADD COLUMN disk_mb INTEGER;
ALTER TABLE jobs ADD COLUMN disk_full INTEGER NOT NULL DEFAULT 0;
-- What output collection kept and left out of the archive (JSON: counts, and
-- what was left out by reason); NULL for jobs finished before this column.
ALTER TABLE jobs ADD COLUMN outputs_report TEXT;
ALTER TABLE user_limits ADD COLUMN max_disk_mb INTEGER;
