-- Terraform state kept by trellis (Terraform's `http` backend under
-- /api/terraform/state/{workspace}). Every stored state is a new version; `state` is the
-- state sealed with the secrets key (ChaCha20-Poly1305, the workspace name as associated
-- data): `v1:<key id>:<base64 nonce|ciphertext>`, never the JSON in clear. `serial` and
-- `lineage` are Terraform's own counters, kept in clear for the version list.
CREATE TABLE terraform_state_versions (
    workspace TEXT NOT NULL,
    version BIGINT NOT NULL,
    command_id TEXT,
    serial BIGINT,
    lineage TEXT,
    size_bytes BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (workspace, version)
);

-- At most one lock per workspace: the lock info Terraform sent (`ID`, `Who`, …) and the
-- command whose credential took it. A lock whose command has finished is stale and
-- taken over by the next LOCK.
CREATE TABLE terraform_state_locks (
    workspace TEXT PRIMARY KEY,
    lock_id TEXT NOT NULL,
    command_id TEXT NOT NULL,
    info TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
