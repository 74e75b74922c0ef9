-- Fair dispatch walks the queue per user: (worker_id IS NULL, state, owner_id, id)
-- finds the users with queued jobs by one probe each (a loose index scan) and each
-- user's oldest runnable jobs in order.
CREATE INDEX jobs_queue ON jobs (worker_id, state, owner_id, id);

-- Fair dispatch: among users with equally many jobs running, the one served
-- longest ago goes first (like workers.rr_seq for workers).
ALTER TABLE users ADD COLUMN rr_seq BIGINT NOT NULL DEFAULT 0;
