-- Bounded storage, indexed housekeeping, and credentials that bind live sessions.

-- Log bytes stored per command (for the per-command log limit, `log_limit`), and commands
-- an admin keeps past the retention period.
ALTER TABLE commands ADD COLUMN log_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN pinned BIGINT NOT NULL DEFAULT 0;

-- Incremented by every token rotation and revocation; a live session that authenticated
-- with an older version is closed within one heartbeat interval.
ALTER TABLE agents ADD COLUMN credential_version BIGINT NOT NULL DEFAULT 0;

-- The periodic queries each get an index that holds only the rows they look for: the
-- deadline sweep reads live commands only (a handful, however long the history), the
-- retention pass terminal ones by age, the stale-agent sweep online agents, the node
-- repair nodes in a transitional status. The deadline sweep repeats the partial-index
-- predicate word for word (SQLite uses a partial index only then); retention's
-- `finished_at < $1` implies `finished_at IS NOT NULL` on both backends.
CREATE INDEX commands_live_deadline ON commands (deadline_at)
    WHERE status IN ('queued', 'dispatched', 'running');
CREATE INDEX commands_finished ON commands (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX agents_status_heartbeat ON agents (status, last_heartbeat);
CREATE INDEX nodes_status ON nodes (status);
