-- Bulk provisioning: the nodes one request created and started together share a batch
-- id, so the UI can follow the group (a progress grid) and retry its failed members.
ALTER TABLE nodes ADD COLUMN batch_id TEXT;
CREATE INDEX nodes_batch ON nodes (batch_id);
