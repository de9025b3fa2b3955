-- A bootstrap admin's session is bound to the bootstrap token it signed in with: the
-- SHA-256 of that token's stored hash. A new --admin-token ends the old token's sessions.
-- NULL for named admins (their revocation deletes their sessions) and for bootstrap
-- sessions made before this column existed (refused: sign in again).
ALTER TABLE admin_sessions ADD COLUMN bootstrap_fp TEXT;
