-- Usage, cost and webhooks (issue 5).
-- GPU time reported by the worker (GPUs x wall seconds, or measured).
ALTER TABLE jobs ADD COLUMN gpu_seconds DOUBLE PRECISION;
-- A job's cost, fixed when it reaches a final state with the prices then in
-- force (later price changes never rewrite it). Integer micro-units of the
-- currency: sums are exact on both databases, no float rounding drift.
ALTER TABLE jobs ADD COLUMN cost_currency TEXT;
ALTER TABLE jobs ADD COLUMN cost_cpu_micros BIGINT;
ALTER TABLE jobs ADD COLUMN cost_memory_micros BIGINT;
ALTER TABLE jobs ADD COLUMN cost_gpu_micros BIGINT;
ALTER TABLE jobs ADD COLUMN cost_micros BIGINT;
-- Where to POST the signed completion notice (checked against the allow-list at intake).
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
-- /usage reads a user's finished jobs by finish time.
CREATE INDEX jobs_owner_finished ON jobs (owner_id, finished_at);
CREATE INDEX jobs_finished ON jobs (finished_at);

-- The prices in force: one row (id = 1), in micro-units per hour, set by admins.
CREATE TABLE prices (
    id INTEGER PRIMARY KEY,
    currency TEXT NOT NULL,
    cpu_hour_micros BIGINT NOT NULL,
    gb_hour_micros BIGINT NOT NULL,
    gpu_hour_micros BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    updated_by TEXT
);

-- One HMAC secret per user: receivers verify what the proxy signed for them.
CREATE TABLE webhook_secrets (
    user_id TEXT PRIMARY KEY REFERENCES users(id),
    secret TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);

-- Deliveries survive restarts: a row per job notice, claimed attempt by
-- attempt with a compare-and-set UPDATE (claimed_until) by any proxy process.
CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    owner_id TEXT NOT NULL REFERENCES users(id),
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    claimed_until DOUBLE PRECISION,
    last_status INTEGER,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE UNIQUE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);
