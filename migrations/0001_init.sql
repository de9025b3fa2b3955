-- Trellis schema. Portable SQL that runs unchanged on SQLite and PostgreSQL:
-- ids are UUID text, timestamps are Unix milliseconds (BIGINT), JSON is TEXT,
-- booleans are BIGINT 0/1.

CREATE TABLE agents (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    token_hash       TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'offline',
    last_heartbeat   BIGINT,
    connected_at     BIGINT,
    version          TEXT,
    hostname         TEXT,
    capabilities     TEXT NOT NULL DEFAULT '[]',
    facts            TEXT NOT NULL DEFAULT '{}',
    max_concurrency  BIGINT NOT NULL DEFAULT 4,
    session_epoch    BIGINT NOT NULL DEFAULT 0,
    revoked_at       BIGINT,
    created_at       BIGINT NOT NULL
);
CREATE UNIQUE INDEX agents_name_live ON agents (name) WHERE revoked_at IS NULL;
CREATE UNIQUE INDEX agents_token_hash ON agents (token_hash);

CREATE TABLE commands (
    id               TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL REFERENCES agents (id),
    type             TEXT NOT NULL,
    params           TEXT NOT NULL,
    status           TEXT NOT NULL,
    stage            TEXT,
    percent          DOUBLE PRECISION,
    progress_seq     BIGINT NOT NULL DEFAULT 0,
    last_seq         BIGINT NOT NULL DEFAULT 0,
    result           TEXT,
    error            TEXT,
    attempt          BIGINT NOT NULL DEFAULT 1,
    root_id          TEXT NOT NULL,
    retry_of         TEXT,
    idempotency_key  TEXT,
    created_by       TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    dispatched_at    BIGINT,
    started_at       BIGINT,
    finished_at      BIGINT,
    deadline_at      BIGINT NOT NULL,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    session_epoch    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX commands_agent_status ON commands (agent_id, status, created_at);
CREATE INDEX commands_status_deadline ON commands (status, deadline_at);
CREATE INDEX commands_created ON commands (created_at);
CREATE UNIQUE INDEX commands_idempotency ON commands (idempotency_key);

CREATE TABLE command_stages (
    command_id   TEXT NOT NULL REFERENCES commands (id),
    idx          BIGINT NOT NULL,
    name         TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',
    started_at   BIGINT,
    finished_at  BIGINT,
    message      TEXT,
    PRIMARY KEY (command_id, name)
);

CREATE TABLE command_events (
    command_id  TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    ts          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    stream      TEXT,
    data        TEXT NOT NULL,
    PRIMARY KEY (command_id, seq)
);

CREATE TABLE templates (
    id                      TEXT PRIMARY KEY,
    name                    TEXT NOT NULL,
    description             TEXT,
    memory                  BIGINT NOT NULL,
    cores                   BIGINT NOT NULL,
    proxmox_template_id     BIGINT,
    proxmox_node            TEXT,
    network_bridge          TEXT,
    pre_provision_commands  TEXT NOT NULL DEFAULT '[]',
    post_provision_commands TEXT NOT NULL DEFAULT '[]',
    system                  BIGINT NOT NULL DEFAULT 0,
    created_at              BIGINT NOT NULL,
    updated_at              BIGINT NOT NULL
);

CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    application      TEXT,
    name             TEXT NOT NULL,
    template_id      TEXT REFERENCES templates (id),
    memory           BIGINT NOT NULL,
    cores            BIGINT NOT NULL,
    vm_id            BIGINT,
    hypervisor_id    TEXT REFERENCES agents (id),
    ip_address       TEXT,
    status           TEXT NOT NULL DEFAULT 'pending_provision',
    last_command_id  TEXT,
    error            TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX nodes_last_command ON nodes (last_command_id);

CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
