-- stacyvmd schema 3: a leaner audit table. Every audited lease change
-- (a renew, say) wrote its row, the at index and the AUTOINCREMENT counter
-- in sqlite_sequence: three of the five pages of its commit. The audit is
-- append-only and never deleted from, so a plain INTEGER PRIMARY KEY (the
-- highest rowid plus one) already never reuses a number; nothing in the
-- daemon reads by `at`, and `seq` order is time order. Rows keep their
-- `seq`.

CREATE TABLE admin_audit_new (
    seq        INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,      -- which credential acted (never the key itself)
    request_id TEXT NOT NULL,
    action     TEXT NOT NULL,      -- e.g. worker.heartbeat, lease.renew
    target     TEXT NOT NULL,
    outcome    TEXT NOT NULL,      -- ok, or the error code
    detail     TEXT NOT NULL DEFAULT ''
) STRICT;

INSERT INTO admin_audit_new (seq, at, actor, request_id, action, target, outcome, detail)
    SELECT seq, at, actor, request_id, action, target, outcome, detail FROM admin_audit;

DROP TABLE admin_audit;
ALTER TABLE admin_audit_new RENAME TO admin_audit;
