-- stacyvmd schema 5: templates, named spawn bodies (POST
-- /api/v1/templates/{name}/spawn).
--
-- A template belongs to an owner (`owner_id`, '' for one every caller
-- sees); names are unique per owner. `ttl` is kept as the caller wrote it
-- ("30m"), checked by the same parser as a spawn's; `metadata` is a JSON
-- object of strings. Times are Unix milliseconds.
CREATE TABLE templates (
    owner_id   TEXT NOT NULL,
    name       TEXT NOT NULL,
    image      TEXT NOT NULL,
    provider   TEXT NOT NULL,
    memory_mb  INTEGER NOT NULL,
    vcpus      INTEGER NOT NULL,
    ttl        TEXT NOT NULL,
    metadata   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner_id, name)
) STRICT;
