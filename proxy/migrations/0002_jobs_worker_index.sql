-- (worker_id, state, id) serves both hot queries of a claim in id order:
-- "the queued jobs reserved for this worker" and "the unreserved queued jobs"
-- (worker_id IS NULL). The old (worker_id, state) index made the planner walk
-- jobs_state and filter every queued row instead (bench/claim).
DROP INDEX jobs_worker;
CREATE INDEX jobs_worker ON jobs (worker_id, state, id);
