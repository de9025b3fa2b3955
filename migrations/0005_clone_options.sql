-- Clone options: a template may carry defaults for the Proxmox clone options of the
-- nodes provisioned from it (JSON of the protocol's CloneOptions; NULL = none).
ALTER TABLE templates ADD COLUMN clone_defaults TEXT;

-- Duplicate-name checks and imports look nodes up by name and by their VM.
CREATE INDEX nodes_name ON nodes (name);
CREATE INDEX nodes_vm ON nodes (hypervisor_id, vm_id);
