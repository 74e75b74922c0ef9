-- Portable SQL: runs unchanged on SQLite and PostgreSQL. Ids are
-- server-generated text, times are epoch seconds, booleans are 0/1 integers.

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    must_change_password INTEGER NOT NULL DEFAULT 0,
    -- bumped on password change: invalidates every session cookie of the user
    session_epoch INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    label TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    last_used_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION
);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_by TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION
);

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    enrollment_id TEXT,
    state TEXT NOT NULL,
    cpus DOUBLE PRECISION NOT NULL,
    memory_mb INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    slots INTEGER NOT NULL,
    images TEXT NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL,
    last_seen_at DOUBLE PRECISION NOT NULL,
    -- round-robin position: the live worker with the lowest value gets the next job
    rr_seq BIGINT NOT NULL DEFAULT 0,
    retired_at DOUBLE PRECISION
);
CREATE INDEX workers_state ON workers (state, last_seen_at);
CREATE INDEX workers_name ON workers (name, state);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    script_name TEXT NOT NULL,
    script_blob TEXT NOT NULL,
    script_sha256 TEXT NOT NULL,
    script_size BIGINT NOT NULL,
    dataset_name TEXT,
    dataset_blob TEXT,
    dataset_sha256 TEXT,
    dataset_size BIGINT,
    image TEXT NOT NULL,
    cpus DOUBLE PRECISION NOT NULL,
    memory_mb INTEGER NOT NULL,
    timeout_s INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    -- set on a queued job: reserved for that worker by the round-robin dispatcher;
    -- on a running job: the worker holding the lease
    worker_id TEXT,
    reserved_at DOUBLE PRECISION,
    lease_expires_at DOUBLE PRECISION,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    submitted_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    exit_code INTEGER,
    failure_reason TEXT,
    stdout_tail TEXT,
    stderr_tail TEXT,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    output_blob TEXT,
    output_sha256 TEXT,
    output_size BIGINT,
    cpu_seconds DOUBLE PRECISION,
    peak_memory_bytes BIGINT,
    wall_seconds DOUBLE PRECISION
);
CREATE INDEX jobs_owner ON jobs (owner_id, id);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_worker ON jobs (worker_id, state);

CREATE TABLE job_logs (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    attempt INTEGER NOT NULL,
    stream TEXT NOT NULL,
    byte_offset BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, stream, byte_offset)
);
