-- stacyvmd schema 1: the worker registry and the admin audit log.
-- Times are integer milliseconds since the Unix epoch (UTC).

CREATE TABLE workers (
    id             TEXT PRIMARY KEY NOT NULL,
    hostname       TEXT NOT NULL DEFAULT '',
    status         TEXT NOT NULL,
    providers      TEXT NOT NULL DEFAULT '[]',   -- JSON array; empty = every provider
    capabilities   TEXT NOT NULL DEFAULT '[]',   -- JSON array
    capacity       TEXT NOT NULL DEFAULT '{}',   -- JSON object; max_sandboxes read by placement
    last_heartbeat INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
) STRICT;

CREATE TABLE admin_audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,      -- which credential acted (never the key itself)
    request_id TEXT NOT NULL,
    action     TEXT NOT NULL,      -- e.g. worker.heartbeat, worker.delete
    target     TEXT NOT NULL,
    outcome    TEXT NOT NULL,      -- ok, or the error code
    detail     TEXT NOT NULL DEFAULT ''
) STRICT;

CREATE INDEX admin_audit_at ON admin_audit (at);
