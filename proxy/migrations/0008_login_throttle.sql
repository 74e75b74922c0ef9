-- Login throttling (issue 11, proxy/throttle.py): failed and in-flight password
-- checks per account name and per client address, shared by every proxy process
-- and instance. A row is pruned an hour after its last failure.
-- scope: 'account' (subject: the name as typed) or 'address' (subject: the
-- client's IPv4 address or IPv6 /64).
-- last_failure_at: 0 when the key has had checks but no failure yet.
-- pending: checks begun and not yet ended; ignored after pending_until (their
-- process died before it could end them).
CREATE TABLE login_throttle (
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    failures INTEGER NOT NULL,
    last_failure_at DOUBLE PRECISION NOT NULL,
    pending INTEGER NOT NULL,
    pending_until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, subject)
);
CREATE INDEX login_throttle_last_failure ON login_throttle (last_failure_at);
