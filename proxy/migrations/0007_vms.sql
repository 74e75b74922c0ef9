-- What the libvirt scaler (vm_provisioning, a separate deployable) reports through
-- the admin API: the VMs it manages and the decisions it took, with their reasons.
-- The proxy only stores and shows these (dashboard, /metrics); it never calls libvirt.
CREATE TABLE vms (
    name TEXT PRIMARY KEY,
    host_uri TEXT NOT NULL,
    state TEXT NOT NULL,
    worker_name TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE scaler_events (
    id TEXT PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    vm_name TEXT
);
CREATE INDEX scaler_events_at ON scaler_events (at);

-- Decisions ever taken, by action, for /metrics: scaler_events is pruned (proxy/vms.py),
-- and counting it would be a scan on every scrape.
CREATE TABLE scaler_decision_counts (
    action TEXT PRIMARY KEY,
    n BIGINT NOT NULL
);
