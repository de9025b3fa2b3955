-- Several trellis replicas on one database. Each running replica has a row, renewed every
-- couple of seconds (`heartbeat_at`): a replica whose lease ran out is dead, and the
-- housekeeping leader marks the agents whose sessions it owned offline and deletes its row.
-- `leader` is written by the replica that holds the housekeeping lock (PostgreSQL advisory
-- lock; SQLite has one replica, always leader), for operators to see.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    draining INTEGER NOT NULL DEFAULT 0,
    leader INTEGER NOT NULL DEFAULT 0
);

-- The replica that holds the agent's current session (with `session_epoch`, which every
-- connection increments): a replica only marks offline the sessions it owns.
ALTER TABLE agents ADD COLUMN session_replica TEXT;
