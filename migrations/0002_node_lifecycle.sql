-- Node lifecycle: the tag of the VM a node owns (destroy refuses a VM without it), the
-- Proxmox node it is on, when the agent's inventory last saw it, and each agent's latest
-- inventory (to list VMs Trellis tagged but no node tracks).
ALTER TABLE nodes ADD COLUMN vm_tag TEXT;
ALTER TABLE nodes ADD COLUMN vm_node TEXT;
ALTER TABLE nodes ADD COLUMN observed_at BIGINT;
-- 1 when its VM also carries the Proxmox tag (provisioned by an agent that sets it): the
-- inventory then matches the VM by tag, not by a VMID that Proxmox may have reused.
ALTER TABLE nodes ADD COLUMN vm_tag_listed BIGINT NOT NULL DEFAULT 0;
-- Inventory reports in a row that did not show its VM (missing only after two).
ALTER TABLE nodes ADD COLUMN absent_reports BIGINT NOT NULL DEFAULT 0;

-- Nodes provisioned before: their VM carries the tag of their provision's first attempt.
UPDATE nodes SET vm_tag = 'trellis-command=' ||
    (SELECT root_id FROM commands WHERE commands.id = nodes.last_command_id)
    WHERE vm_id IS NOT NULL
      AND EXISTS (SELECT 1 FROM commands WHERE commands.id = nodes.last_command_id);

CREATE INDEX nodes_hypervisor ON nodes (hypervisor_id);

CREATE TABLE agent_vms (
    agent_id      TEXT NOT NULL,
    vm_id         BIGINT NOT NULL,
    node          TEXT NOT NULL,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    tag           TEXT,
    ip_addresses  TEXT NOT NULL DEFAULT '[]',
    seen_at       BIGINT NOT NULL,
    PRIMARY KEY (agent_id, vm_id)
);
