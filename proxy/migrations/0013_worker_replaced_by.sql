-- A registration replaced by a later registration of the same worker (it
-- restarted, or rejoined after a partition) points at its replacement. Its
-- secret is then refused as `worker_replaced`, not `worker_retired`, and may
-- rejoin again: the worker may never have received the replacement's secret
-- (an answer lost to a proxy killed or a connection cut). An admin's retire
-- leaves it NULL, and that ends the worker.
ALTER TABLE workers ADD COLUMN replaced_by TEXT;
