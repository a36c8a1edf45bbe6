-- One fencing tier: every `fencepost serve` process with a proxy that
-- shares this store is a replica (see docs/replicas.md).

-- Every advance of a mark takes the next number of the one advance_seq row,
-- holding its row lock until commit, so advances commit in the order of
-- their numbers: a replica that has seen advance n has seen every advance
-- below n. `fences.seq` is the number of the advance that set the mark (0:
-- set before this migration, or by a store without the tier).
ALTER TABLE fences ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX fences_seq ON fences (seq);

CREATE TABLE advance_seq (
    id  INT    NOT NULL PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO advance_seq (id, seq) VALUES (1, 0);

-- A replica's lease. Expiry is by the store's own clock (now()), never a
-- replica's. joined_seq: the advance number current when the replica first
-- joined; it loads every mark from `fences` after that, so it owes no
-- acknowledgement for advances up to it.
CREATE TABLE replicas (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    addresses     TEXT             NOT NULL,
    started_at_ms BIGINT           NOT NULL,
    joined_seq    BIGINT           NOT NULL,
    renewed_at    TIMESTAMPTZ      NOT NULL,
    expires_at    TIMESTAMPTZ      NOT NULL
);

-- The highest token per resource each replica has raised its mark to and
-- drained below.
CREATE TABLE acks (
    resource   TEXT COLLATE "C" NOT NULL,
    replica_id TEXT COLLATE "C" NOT NULL,
    token      TEXT COLLATE "C" NOT NULL CHECK (token ~ '^[0-9]{20}$'),
    PRIMARY KEY (resource, replica_id)
);
