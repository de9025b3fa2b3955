-- One name rule, kept by the database: no two live (not `destroyed`) nodes share a name,
-- compared ignoring case, unless the later one was created with `force: true`. The API
-- checks first for a helpful 409 `duplicate_name`; this index closes the race between
-- that check and the insert (two concurrent creates of one name, on any replica).
--
-- `name_forced` marks a node whose name an admin accepted as a duplicate (`force`); such
-- nodes stay out of the index. A rename clears it (a new name must be free).
ALTER TABLE nodes ADD COLUMN name_forced BIGINT NOT NULL DEFAULT 0;

-- Duplicates made before this migration (forced, or racing the old check) keep their
-- names: all but the oldest of each name count as forced.
UPDATE nodes SET name_forced = 1
WHERE status <> 'destroyed' AND EXISTS (
    SELECT 1 FROM nodes o
    WHERE LOWER(o.name) = LOWER(nodes.name) AND o.status <> 'destroyed'
      AND (o.created_at < nodes.created_at OR (o.created_at = nodes.created_at AND o.id < nodes.id))
);

-- VM names are ASCII (letters, digits, '-', '.'), so LOWER folds alike on both backends.
CREATE UNIQUE INDEX nodes_live_name ON nodes (LOWER(name))
    WHERE status <> 'destroyed' AND name_forced = 0;
