-- Wake-ups on SQLite (proxy/wakeups.py): each row names a topic whose waiters a
-- commit wakes; every process's watcher reads the rows past the last id it saw.
-- PostgreSQL uses pg_notify instead and leaves this table empty.
CREATE TABLE wakeups (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL
);

-- A user's jobs by state, newest first (the live user stream's running and
-- queued jobs, reserved for a worker or not: a submission is dispatched at once).
CREATE INDEX jobs_owner_state ON jobs (owner_id, state, id);
