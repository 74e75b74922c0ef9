-- Webhook failures (issue 13): last_error is what the job's owner reads, one
-- category for every failure to get a 2xx answer; why it failed (refused,
-- timeout, TLS, HTTP status, DNS) is kept here for admins only, since that
-- detail tells which ports of an allowed host are open.
ALTER TABLE webhook_deliveries ADD COLUMN last_error_detail TEXT;
