-- Retention and storage quotas (issue 14, proxy/retention.py). A finished job's
-- files (script, dataset, outputs) and logs expire after the retention time
-- unless its owner pinned it; the row stays, with expired_at set.
ALTER TABLE jobs ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN expired_at DOUBLE PRECISION;
-- The sweep's read: unexpired finished jobs by finish time (expired_at IS NULL
-- is an equality on the index's first column on both databases).
CREATE INDEX jobs_retention ON jobs (expired_at, finished_at);
-- "Does any unexpired job still need this blob?": one probe per column.
CREATE INDEX jobs_script_blob ON jobs (script_blob, expired_at);
CREATE INDEX jobs_dataset_blob ON jobs (dataset_blob, expired_at);
CREATE INDEX jobs_output_blob ON jobs (output_blob, expired_at);
-- A user's stored bytes counted with repeats (retention.check_quota's fast
-- path), read from the index alone.
CREATE INDEX jobs_owner_storage ON jobs (owner_id, expired_at, script_size, dataset_size,
                                         output_size);
-- Blobs no unexpired job referenced when their last job expired: each is
-- claimed by one sweeper, checked again under the blob lock, then unlinked.
CREATE TABLE blob_deletions (
    blob TEXT PRIMARY KEY,
    queued_at DOUBLE PRECISION NOT NULL
);
-- Per-user overrides of the proxy-wide retention_days and storage_quota_mb;
-- NULL: the configured default.
ALTER TABLE user_limits ADD COLUMN retention_days INTEGER;
ALTER TABLE user_limits ADD COLUMN max_storage_mb INTEGER;
