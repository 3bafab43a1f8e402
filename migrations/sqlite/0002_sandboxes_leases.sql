-- stacyvmd schema 2: sandboxes owned by workers, leases that fence them,
-- and idempotency keys for spawn retries. Times are epoch milliseconds.

CREATE TABLE sandboxes (
    id          TEXT PRIMARY KEY NOT NULL,            -- sb-<hex>
    state       TEXT NOT NULL,                        -- creating, running, destroyed, error, lost
    provider    TEXT NOT NULL,
    image       TEXT NOT NULL,
    memory_mb   INTEGER NOT NULL,
    vcpus       INTEGER NOT NULL,
    owner_id    TEXT NOT NULL DEFAULT '',
    metadata    TEXT NOT NULL DEFAULT '{}',           -- JSON object of strings
    worker_id   TEXT NOT NULL CHECK (worker_id <> ''), -- the owner worker, never blank
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

-- Live sandboxes by expiry (the reaper) and by worker (placement counts).
CREATE INDEX sandboxes_live_expiry ON sandboxes (expires_at) WHERE state IN ('creating', 'running');
CREATE INDEX sandboxes_live_worker ON sandboxes (worker_id) WHERE state IN ('creating', 'running');

CREATE TABLE leases (
    resource_id   TEXT PRIMARY KEY NOT NULL,
    resource_type TEXT NOT NULL,
    holder_id     TEXT NOT NULL,       -- '' once released; the row (and generation) stays
    generation    INTEGER NOT NULL CHECK (generation > 0),
    acquired_at   INTEGER NOT NULL,
    renewed_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    transitions   INTEGER NOT NULL
) STRICT;

CREATE INDEX leases_holder ON leases (holder_id, expires_at);

CREATE TABLE idempotency_keys (
    key        TEXT PRIMARY KEY NOT NULL,   -- owner-scoped: '<owner_id>\n<Idempotency-Key>'
    sandbox_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
