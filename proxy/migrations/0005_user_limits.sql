-- Per-user limits and priority weight, set by admins. NULL: no limit beyond the
-- proxy-wide ones in the configuration.
CREATE TABLE user_limits (
    user_id TEXT PRIMARY KEY REFERENCES users(id),
    max_running INTEGER,
    max_queued INTEGER,
    max_submissions_per_minute INTEGER,
    max_cpus DOUBLE PRECISION,
    max_memory_mb INTEGER,
    max_gpus INTEGER,
    max_timeout_s INTEGER,
    weight DOUBLE PRECISION NOT NULL DEFAULT 1
);
