//! Statements for sandboxes, leases and idempotency keys, and their row
//! conversions. Only the store thread calls these, inside its transaction.

use std::collections::{BTreeMap, HashSet};

use rusqlite::{OptionalExtension, Row, Transaction, params};

use crate::leases::Lease;
use crate::sandboxes::{Sandbox, SandboxState};
use crate::store::{LiveSandbox, StoreError, StoreResult};

const SANDBOX_COLUMNS: &str = "id, state, provider, image, memory_mb, vcpus, owner_id, metadata, worker_id, created_at, expires_at, updated_at";
const LIVE: &str = "state IN ('creating', 'running')";

pub fn insert_sandbox(tx: &Transaction<'_>, s: &Sandbox) -> StoreResult<()> {
    let metadata =
        serde_json::to_string(&s.metadata).map_err(|e| StoreError::Database(e.to_string()))?;
    tx.prepare_cached(&format!(
        "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))?
    .execute(params![
        s.id,
        s.state.as_str(),
        s.provider,
        s.image,
        s.memory_mb,
        s.vcpus,
        s.owner_id,
        metadata,
        s.worker_id,
        s.created_at_ms,
        s.expires_at_ms,
        s.updated_at_ms
    ])?;
    Ok(())
}

pub fn get_sandbox(tx: &Transaction<'_>, id: &str) -> StoreResult<Option<Sandbox>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"
    ))?;
    Ok(stmt.query_row(params![id], sandbox_from_row).optional()?)
}

pub fn set_sandbox_state(
    tx: &Transaction<'_>,
    id: &str,
    state: SandboxState,
    now_ms: i64,
) -> StoreResult<Option<Sandbox>> {
    let mut stmt = tx.prepare_cached(&format!(
        "UPDATE sandboxes SET state = ?2, updated_at = ?3 WHERE id = ?1 RETURNING {SANDBOX_COLUMNS}"
    ))?;
    Ok(stmt
        .query_row(params![id, state.as_str(), now_ms], sandbox_from_row)
        .optional()?)
}

pub fn set_sandbox_expiry(
    tx: &Transaction<'_>,
    id: &str,
    expires_at_ms: i64,
    now_ms: i64,
) -> StoreResult<Option<Sandbox>> {
    let mut stmt = tx.prepare_cached(&format!(
        "UPDATE sandboxes SET expires_at = ?2, updated_at = ?3 WHERE id = ?1 RETURNING {SANDBOX_COLUMNS}"
    ))?;
    Ok(stmt
        .query_row(params![id, expires_at_ms, now_ms], sandbox_from_row)
        .optional()?)
}

/// Every sandbox not destroyed, newest first.
pub fn list_sandboxes(tx: &Transaction<'_>) -> StoreResult<Vec<Sandbox>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state <> 'destroyed' ORDER BY created_at DESC, id DESC"
    ))?;
    let rows = stmt.query_map([], sandbox_from_row)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// Live sandboxes whose TTL passed, oldest expiry first; only `owner`'s
/// when given.
pub fn list_expired(
    tx: &Transaction<'_>,
    now_ms: i64,
    limit: usize,
    owner: Option<&str>,
) -> StoreResult<Vec<Sandbox>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE {LIVE} AND expires_at <= ?1 AND (?3 IS NULL OR owner_id = ?3) ORDER BY expires_at LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![now_ms, limit as i64, owner], sandbox_from_row)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// (worker, owner, live count) for the scheduler's view at start.
pub fn live_counts(tx: &Transaction<'_>) -> StoreResult<Vec<(String, String, u32)>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT worker_id, owner_id, count(*) FROM sandboxes WHERE {LIVE} GROUP BY worker_id, owner_id"
    ))?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u32))
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// (state, provider, worker, count) for the in-memory tallies at start.
pub fn sandbox_tally(
    tx: &Transaction<'_>,
) -> StoreResult<Vec<(SandboxState, String, String, u64)>> {
    let mut stmt =
        tx.prepare_cached("SELECT state, provider, worker_id, count(*) FROM sandboxes GROUP BY state, provider, worker_id")?;
    let rows = stmt.query_map([], |r| {
        let state: String = r.get(0)?;
        Ok((
            SandboxState::parse(&state),
            r.get(1)?,
            r.get(2)?,
            r.get::<_, i64>(3)? as u64,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (state, provider, worker, n) = row?;
        let state =
            state.ok_or_else(|| StoreError::Database("corrupt sandboxes.state column".into()))?;
        out.push((state, provider, worker, n));
    }
    Ok(out)
}

pub fn get_idempotent(tx: &Transaction<'_>, key: &str) -> StoreResult<Option<String>> {
    let mut stmt = tx.prepare_cached("SELECT sandbox_id FROM idempotency_keys WHERE key = ?1")?;
    Ok(stmt.query_row(params![key], |r| r.get(0)).optional()?)
}

pub fn forget_idempotent(tx: &Transaction<'_>, sandbox_id: &str) -> StoreResult<()> {
    tx.prepare_cached("DELETE FROM idempotency_keys WHERE sandbox_id = ?1")?
        .execute(params![sandbox_id])?;
    Ok(())
}

/// A destroy is under way for `sandbox_id` (see migration 0004).
pub fn put_destroy_intent(tx: &Transaction<'_>, sandbox_id: &str, now_ms: i64) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO destroy_intents (sandbox_id, requested_at) VALUES (?1, ?2)
         ON CONFLICT (sandbox_id) DO UPDATE SET requested_at = excluded.requested_at",
    )?
    .execute(params![sandbox_id, now_ms])?;
    Ok(())
}

pub fn forget_destroy_intent(tx: &Transaction<'_>, sandbox_id: &str) -> StoreResult<()> {
    tx.prepare_cached("DELETE FROM destroy_intents WHERE sandbox_id = ?1")?
        .execute(params![sandbox_id])?;
    Ok(())
}

pub fn destroy_intents(tx: &Transaction<'_>) -> StoreResult<Vec<String>> {
    let mut stmt =
        tx.prepare_cached("SELECT sandbox_id FROM destroy_intents ORDER BY sandbox_id")?;
    let ids = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(ids)
}

pub fn put_idempotent(
    tx: &Transaction<'_>,
    key: &str,
    sandbox_id: &str,
    now_ms: i64,
) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO idempotency_keys (key, sandbox_id, created_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![key, sandbox_id, now_ms])?;
    Ok(())
}

const LEASE_COLUMNS: &str = "resource_id, resource_type, holder_id, generation, acquired_at, renewed_at, expires_at, transitions";

pub fn get_lease(tx: &Transaction<'_>, resource_id: &str) -> StoreResult<Option<Lease>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {LEASE_COLUMNS} FROM leases WHERE resource_id = ?1"
    ))?;
    Ok(stmt
        .query_row(params![resource_id], lease_from_row)
        .optional()?)
}

pub fn put_lease(tx: &Transaction<'_>, l: &Lease) -> StoreResult<()> {
    tx.prepare_cached(&format!(
        "INSERT INTO leases ({LEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (resource_id) DO UPDATE SET
             resource_type = ?2, holder_id = ?3, generation = ?4, acquired_at = ?5,
             renewed_at = ?6, expires_at = ?7, transitions = ?8"
    ))?
    .execute(params![
        l.resource_id,
        l.resource_type,
        l.holder_id,
        l.generation as i64,
        l.acquired_at_ms,
        l.renewed_at_ms,
        l.expires_at_ms,
        l.transitions as i64
    ])?;
    Ok(())
}

pub fn list_leases(tx: &Transaction<'_>) -> StoreResult<Vec<Lease>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {LEASE_COLUMNS} FROM leases ORDER BY resource_id"
    ))?;
    let rows = stmt.query_map([], lease_from_row)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// Every lease as (resource_id, holder, expires_at), in table order: what
/// the in-memory tallies keep of a lease, read without the other columns
/// and without sorting (startup reads 100,000 of them).
pub fn for_each_lease_holder(
    tx: &Transaction<'_>,
    mut each: impl FnMut(String, String, i64),
) -> StoreResult<()> {
    let mut stmt = tx.prepare_cached("SELECT resource_id, holder_id, expires_at FROM leases")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        each(row.get(0)?, row.get(1)?, row.get(2)?);
    }
    Ok(())
}

/// Extends up to `limit` of the unexpired leases `holder` has on live
/// sandboxes of its own to `now_ms + ttl_ms`, soonest expiry first. Only
/// leases that expire before `now_ms + ttl_ms` are taken, so a renewed one
/// is not taken again by the next call with the same `now_ms`: calling
/// until fewer than `limit` come back renews them all, one bounded commit
/// at a time. Returns the renewed (resource_id, expires_at) pairs.
pub fn renew_live_sandbox_leases(
    tx: &Transaction<'_>,
    holder: &str,
    ttl_ms: i64,
    now_ms: i64,
    limit: usize,
) -> StoreResult<Vec<(String, i64)>> {
    // The inner query walks the (holder_id, expires_at) index in expiry
    // order and checks each candidate's sandbox by primary key, so a chunk
    // costs O(limit), not a pass over every sandbox.
    let mut stmt = tx.prepare_cached(&format!(
        "UPDATE leases SET renewed_at = ?2, expires_at = ?2 + ?3
         WHERE resource_id IN (
             SELECT l.resource_id FROM leases l
             WHERE l.holder_id = ?1 AND l.expires_at > ?2 AND l.expires_at < ?2 + ?3
               AND EXISTS (SELECT 1 FROM sandboxes s
                           WHERE s.id = l.resource_id AND s.worker_id = ?1 AND s.{LIVE})
             ORDER BY l.expires_at LIMIT ?4)
         RETURNING resource_id, expires_at"
    ))?;
    let rows = stmt.query_map(params![holder, now_ms, ttl_ms, limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

fn sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<Sandbox> {
    let bad = |column: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("corrupt sandboxes.{what} column").into(),
        )
    };
    let state: String = row.get(1)?;
    let metadata: String = row.get(7)?;
    Ok(Sandbox {
        id: row.get(0)?,
        state: SandboxState::parse(&state).ok_or_else(|| bad(1, "state"))?,
        provider: row.get(2)?,
        image: row.get(3)?,
        memory_mb: row.get(4)?,
        vcpus: row.get(5)?,
        owner_id: row.get(6)?,
        metadata: serde_json::from_str::<BTreeMap<String, String>>(&metadata)
            .map_err(|_| bad(7, "metadata"))?,
        worker_id: row.get(8)?,
        created_at_ms: row.get(9)?,
        expires_at_ms: row.get(10)?,
        updated_at_ms: row.get(11)?,
    })
}

fn lease_from_row(row: &Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        resource_id: row.get(0)?,
        resource_type: row.get(1)?,
        holder_id: row.get(2)?,
        generation: row.get::<_, i64>(3)? as u64,
        acquired_at_ms: row.get(4)?,
        renewed_at_ms: row.get(5)?,
        expires_at_ms: row.get(6)?,
        transitions: row.get::<_, i64>(7)? as u64,
    })
}

/// Resources whose lease `holder` holds unexpired at `now_ms` (one scan
/// of the `(holder_id, expires_at)` index).
pub fn held_lease_ids(
    tx: &Transaction<'_>,
    holder: &str,
    now_ms: i64,
) -> StoreResult<HashSet<String>> {
    let held = tx
        .prepare_cached("SELECT resource_id FROM leases WHERE holder_id = ?1 AND expires_at > ?2")?
        .query_map(params![holder, now_ms], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(held)
}

/// `worker`'s live sandboxes, in no particular order.
pub fn live_sandboxes_of(tx: &Transaction<'_>, worker: &str) -> StoreResult<Vec<LiveSandbox>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT id, state, provider, owner_id FROM sandboxes WHERE {LIVE} AND worker_id = ?1"
    ))?;
    let mut rows = stmt.query(params![worker])?;
    let mut live = Vec::new();
    while let Some(row) = rows.next()? {
        let state: String = row.get(1)?;
        live.push(LiveSandbox {
            id: row.get(0)?,
            state: SandboxState::parse(&state)
                .ok_or_else(|| StoreError::Database("corrupt sandboxes.state column".into()))?,
            provider: row.get(2)?,
            owner_id: row.get(3)?,
        });
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sandboxes `sb-0`.. with leases expiring at the given instants:
    /// (worker and holder, state, lease expiry).
    fn fleet(rows: &[(&str, &str, i64)]) -> rusqlite::Connection {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        super::super::migrate::migrate(&mut conn, 0).unwrap();
        for (i, (who, state, expires)) in rows.iter().enumerate() {
            conn.execute(
                "INSERT INTO sandboxes (id, state, provider, image, memory_mb, vcpus, worker_id, created_at, expires_at, updated_at)
                 VALUES (?1, ?2, 'mock', 'default', 1, 1, ?3, 0, 10000000, 0)",
                params![format!("sb-{i}"), state, who],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO leases (resource_id, resource_type, holder_id, generation, acquired_at, renewed_at, expires_at, transitions)
                 VALUES (?1, 'sandbox', ?2, 1, 0, 0, ?3, 1)",
                params![format!("sb-{i}"), who, expires],
            )
            .unwrap();
        }
        conn
    }

    fn expiry(tx: &Transaction<'_>, id: &str) -> i64 {
        get_lease(tx, id).unwrap().unwrap().expires_at_ms
    }

    /// Chunked renewal takes the soonest expiries first, never takes a
    /// lease twice for one `now`, stops (a short chunk) once every lease
    /// due is renewed, and leaves alone leases that are expired, held by
    /// another worker, on a sandbox that is not live, or not yet due.
    #[test]
    fn renewal_in_chunks_renews_each_due_lease_once() {
        let mut conn = fleet(&[
            ("me", "running", 1_500),    // sb-0
            ("me", "running", 1_100),    // sb-1
            ("me", "creating", 1_300),   // sb-2
            ("me", "running", 1_200),    // sb-3
            ("me", "running", 1_400),    // sb-4
            ("me", "running", 900),      // sb-5: expired at 1,000
            ("other", "running", 1_200), // sb-6: another holder
            ("me", "destroyed", 1_200),  // sb-7: not live
            ("me", "running", 1_600),    // sb-8: already at now + ttl
        ]);
        let tx = conn.transaction().unwrap();
        let (now, ttl) = (1_000, 600);
        let mut chunks = Vec::new();
        loop {
            let renewed = renew_live_sandbox_leases(&tx, "me", ttl, now, 2).unwrap();
            let n = renewed.len();
            chunks.push(renewed.into_iter().map(|(id, _)| id).collect::<Vec<_>>());
            if n < 2 {
                break;
            }
        }
        let mut chunks: Vec<Vec<String>> = chunks
            .into_iter()
            .map(|mut c| {
                c.sort();
                c
            })
            .collect();
        chunks.retain(|c| !c.is_empty());
        assert_eq!(
            chunks,
            vec![vec!["sb-1", "sb-3"], vec!["sb-2", "sb-4"], vec!["sb-0"]]
        );
        for id in ["sb-0", "sb-1", "sb-2", "sb-3", "sb-4", "sb-8"] {
            assert_eq!(expiry(&tx, id), 1_600, "{id}");
        }
        for (id, untouched) in [("sb-5", 900), ("sb-6", 1_200), ("sb-7", 1_200)] {
            assert_eq!(expiry(&tx, id), untouched, "{id}");
        }
    }
}
