//! The SQLite backend of the store contract: one process, one writer
//! connection on the `store` thread, group commit, WAL checkpoints from a
//! second connection.
//!
//! - open.rs: data directory, `flock`, modes, reserve, pragmas, migrations,
//!   threads;
//! - batch.rs: the `store` thread's loop (group commit, duties between
//!   batches: disk-full recovery, retention, the reserve);
//! - checkpoint.rs: the `store-checkpoint` thread;
//! - migrate.rs: `migrations/sqlite/NNNN_name.sql`, applied in order;
//! - tx.rs: [`crate::store::Tx`] for `rusqlite::Transaction`, calling
//!   statements.rs (workers, audit), sandbox_statements.rs (sandboxes,
//!   leases, idempotency keys, destroy intents) and template_statements.rs;
//! - retention.rs: the purge between batches and the generation floor;
//! - space.rs: the reserve file, free space, which errors mean a full disk.

mod batch;
mod checkpoint;
pub mod migrate;
pub(crate) mod open;
mod retention;
mod sandbox_statements;
pub mod space;
mod statements;
mod template_statements;
mod tx;

#[cfg(test)]
mod tests;

pub use checkpoint::Checkpointer;
pub use open::{OpenError, Store, full_at_start};

use crate::store::StoreError;

/// A statement's failure as the caller sees it; the rusqlite error's text
/// is kept (the batch's commit error is cloned into every reply).
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
            _ => StoreError::Database(e.to_string()),
        }
    }
}
