-- Issue 14: impossible jobs refused at submission, every queued job says why it waits.
--
-- A job accepted without a full capacity check says why on its page and in its
-- JSON: no worker was live and the scaler reported no VM shape (a fresh
-- cluster), or an admin lets jobs queue for capacity that does not exist yet
-- (queue_unmet_capacity).
ALTER TABLE jobs ADD COLUMN capacity_note TEXT;

-- The worker shapes the scaler (vm_provisioning) can create, as it last reported
-- them (PUT /api/v1/admin/scaler/report). A shape not reported again within
-- capacity.SHAPE_FRESH_S counts as gone: a stopped scaler creates nothing.
CREATE TABLE scaler_shapes (
    position INTEGER PRIMARY KEY,
    cpus DOUBLE PRECISION NOT NULL,
    memory_mb BIGINT NOT NULL,
    gpus INTEGER NOT NULL,
    images TEXT NOT NULL,
    reported_at DOUBLE PRECISION NOT NULL
);

-- How long the scaler's VMs took from `booting` to their worker registering,
-- derived from its reports: a queued job waiting for a booting VM says how long
-- a boot typically takes. Pruned to the newest few (proxy/vms.py).
CREATE TABLE vm_boots (
    id TEXT PRIMARY KEY,
    vm_name TEXT NOT NULL,
    ready_at DOUBLE PRECISION NOT NULL,
    boot_s DOUBLE PRECISION NOT NULL
);
CREATE INDEX vm_boots_ready_at ON vm_boots (ready_at);
