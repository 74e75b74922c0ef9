-- Usage a worker reported beyond what the proxy observed (issue 12): the
-- fields clamped, comma-separated (cpu_seconds, peak_memory_bytes,
-- wall_seconds); NULL when the report was within bounds. For admins: a worker
-- that over-reports is buggy or rogue.
ALTER TABLE jobs ADD COLUMN usage_clamped TEXT;
