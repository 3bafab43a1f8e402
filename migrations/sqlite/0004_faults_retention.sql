-- stacyvmd schema 4: what the fault paths and retention need.
--
-- destroy_intents: a destroy writes its intent (with the lease it takes)
-- before the provider runs, and the row goes with the final commit. A row
-- left behind means the provider may have removed the runtime while the
-- record still says `running`: startup reconciliation finishes such a
-- destroy (state `destroyed`) instead of calling the sandbox `lost`.
CREATE TABLE destroy_intents (
    sandbox_id   TEXT PRIMARY KEY NOT NULL,
    requested_at INTEGER NOT NULL
) STRICT;

-- store_meta: small named integers. `generation_floor` is the highest lease
-- generation among purged lease rows: a lease created where no row exists
-- starts above it, so a generation never goes back even if a resource id
-- comes again after its row was purged. `probe` is what the store writes
-- to learn whether it can commit again after the disk was full.
CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) STRICT;

-- Ended sandboxes by when they ended, for the retention purge.
CREATE INDEX sandboxes_ended ON sandboxes (updated_at) WHERE state IN ('destroyed', 'error');
