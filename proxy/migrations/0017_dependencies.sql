-- Job dependencies (issue 15, proxy/dependencies.py): a job submitted with
-- `after` starts only once every parent succeeded; a parent that fails, times
-- out or is cancelled cancels its dependents.
--
-- One row per (child, parent) edge. Edges are only made when the child is
-- created, and its parents exist by then, so the graph has no cycles.
CREATE TABLE job_deps (
    child_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    PRIMARY KEY (child_id, parent_id)
);
-- "The children of the job that just finished": one probe when a job ends.
CREATE INDEX job_deps_parent ON job_deps (parent_id, child_id);
-- The parents of a queued job not yet succeeded, kept up to date as each one
-- ends (dependencies.job_finished), so dispatch reads a column instead of
-- joining the edges on every claim.
ALTER TABLE jobs ADD COLUMN deps_pending INTEGER NOT NULL DEFAULT 0;
-- Dispatch looks for unreserved queued jobs whose parents all succeeded:
-- deps_pending joins the equality prefix of the queue index, so a user's
-- thousand waiting children never sit between the probe and a runnable job.
DROP INDEX jobs_queue;
CREATE INDEX jobs_queue ON jobs (worker_id, state, deps_pending, owner_id, id);
