-- Signed at creation: the Ed25519 signature of the `dispatch` frame a command becomes
-- (`<key id>:<base64 signature>`, see `trellis_protocol::signing`), computed when the
-- command is stored and sent unchanged with every dispatch of it. A row altered later
-- (params, agent, type, deadline) no longer matches it, and a pinned agent refuses it.
-- Rows stored by an earlier version are signed once at the next start.
ALTER TABLE commands ADD COLUMN signature TEXT;
