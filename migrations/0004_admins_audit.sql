-- Named admins, their browser sessions, the audit log, and the node a command acts on.

-- Named admin API tokens (`trellis admins create NAME`). Only the token's SHA-256 is
-- stored. A revoked admin keeps its row (audit rows name it), so a name is never reused.
CREATE TABLE admins (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    token_hash    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);
CREATE UNIQUE INDEX admins_name ON admins (name);
CREATE UNIQUE INDEX admins_token_hash ON admins (token_hash);

-- Cookie sessions made by `POST /api/session`: the SHA-256 of the session secret, the
-- admin it acts as (the bootstrap admin is 'admin'), and a fixed expiry.
CREATE TABLE admin_sessions (
    secret_hash   TEXT PRIMARY KEY,
    admin_name    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL
);
CREATE INDEX admin_sessions_expires ON admin_sessions (expires_at);

-- One row per mutating admin request and per failed authentication. Never secrets.
CREATE TABLE audit_log (
    id            TEXT PRIMARY KEY,
    at            BIGINT NOT NULL,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    target_type   TEXT,
    target_id     TEXT,
    target_name   TEXT,
    outcome       TEXT NOT NULL,
    status        BIGINT NOT NULL,
    error_code    TEXT,
    remote_addr   TEXT,
    details       TEXT
);
CREATE INDEX audit_log_at ON audit_log (at, id);
CREATE INDEX audit_log_actor ON audit_log (actor, at);
CREATE INDEX audit_log_target ON audit_log (target_id, at);

-- The node a command was started for (provision, power, destroy, and their retries):
-- a retry of a node's provision must still find that node, whoever created it.
ALTER TABLE commands ADD COLUMN node_id TEXT;
UPDATE commands SET node_id = substr(created_by, 6) WHERE created_by LIKE 'node:%';
UPDATE commands SET node_id = (SELECT r.node_id FROM commands r WHERE r.id = commands.root_id)
    WHERE node_id IS NULL AND root_id <> id;
CREATE INDEX commands_node ON commands (node_id);
