-- Protocol v2: acks cover the contiguous durable prefix of a command's events
-- (`durable_seq`: every seq 1..=durable_seq is stored), and nothing may follow the
-- agent's `finished` event (`finished_seq`: its seq).
ALTER TABLE commands ADD COLUMN durable_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN finished_seq BIGINT;
-- Commands stored before were acked by their highest seq.
UPDATE commands SET durable_seq = last_seq;
UPDATE commands SET finished_seq = (SELECT MIN(seq) FROM command_events e
    WHERE e.command_id = commands.id AND e.kind = 'finished');
