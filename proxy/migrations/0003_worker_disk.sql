-- Workers report the free disk of their data directory (datasets, job dirs).
ALTER TABLE workers ADD COLUMN disk_mb BIGINT;
