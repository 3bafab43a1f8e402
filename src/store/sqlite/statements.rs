//! One function per SQL statement, and the row <-> domain conversions.
//! Only the store thread calls these (inside its transaction).

use rusqlite::{OptionalExtension, Row, Transaction, params};

use crate::store::{AuditEntry, Deleted, StoreError, StoreResult};
use crate::workers::{Capacity, Heartbeat, Worker, WorkerStatus};

const WORKER_COLUMNS: &str = "id, hostname, status, providers, capabilities, capacity, last_heartbeat, created_at, updated_at";

/// Insert or refresh. Absent heartbeat fields keep the stored value
/// (`COALESCE(new, old)`); `created_at` is never touched by an update.
pub fn upsert_worker(tx: &Transaction<'_>, hb: &Heartbeat, now_ms: i64) -> StoreResult<Worker> {
    let status = hb.status.unwrap_or(WorkerStatus::Online).as_str();
    let providers = hb.providers.as_ref().map(|p| list_to_json(p));
    let capabilities = hb.capabilities.as_ref().map(|c| list_to_json(c));
    let capacity = hb.capacity.map(capacity_to_json);
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO workers ({WORKER_COLUMNS})
         VALUES (?1, COALESCE(?2, ''), ?3, COALESCE(?4, '[]'), COALESCE(?5, '[]'), COALESCE(?6, '{{}}'), ?7, ?7, ?7)
         ON CONFLICT (id) DO UPDATE SET
             hostname = COALESCE(?2, hostname),
             status = ?3,
             providers = COALESCE(?4, providers),
             capabilities = COALESCE(?5, capabilities),
             capacity = COALESCE(?6, capacity),
             last_heartbeat = ?7,
             updated_at = ?7
         RETURNING {WORKER_COLUMNS}"
    ))?;
    let worker = stmt.query_row(
        params![
            hb.id,
            hb.hostname,
            status,
            providers,
            capabilities,
            capacity,
            now_ms
        ],
        worker_from_row,
    )?;
    Ok(worker)
}

pub fn set_worker_status(
    tx: &Transaction<'_>,
    id: &str,
    status: WorkerStatus,
    now_ms: i64,
) -> StoreResult<Option<Worker>> {
    let mut stmt = tx.prepare_cached(&format!(
        "UPDATE workers SET status = ?2, updated_at = ?3 WHERE id = ?1 RETURNING {WORKER_COLUMNS}"
    ))?;
    Ok(stmt
        .query_row(params![id, status.as_str(), now_ms], worker_from_row)
        .optional()?)
}

/// A heartbeat refresh: later receive times only (batches may overlap).
pub fn touch_worker(tx: &Transaction<'_>, id: &str, at_ms: i64) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE workers SET last_heartbeat = max(last_heartbeat, ?2), updated_at = max(updated_at, ?2) WHERE id = ?1",
    )?
    .execute(params![id, at_ms])?;
    Ok(())
}

pub fn delete_worker(tx: &Transaction<'_>, id: &str) -> StoreResult<Deleted> {
    let n = tx
        .prepare_cached("DELETE FROM workers WHERE id = ?1")?
        .execute(params![id])?;
    Ok(if n == 0 {
        Deleted::NotFound
    } else {
        Deleted::Yes
    })
}

pub fn list_workers(tx: &Transaction<'_>) -> StoreResult<Vec<Worker>> {
    let mut stmt =
        tx.prepare_cached(&format!("SELECT {WORKER_COLUMNS} FROM workers ORDER BY id"))?;
    let rows = stmt.query_map([], worker_from_row)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

pub fn insert_audit(tx: &Transaction<'_>, e: &AuditEntry) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO admin_audit (at, actor, request_id, action, target, outcome, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        e.at_ms,
        e.actor,
        e.request_id,
        e.action,
        e.target,
        e.outcome,
        e.detail
    ])?;
    Ok(())
}

fn worker_from_row(row: &Row<'_>) -> rusqlite::Result<Worker> {
    let status: String = row.get(2)?;
    let bad = |column: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("corrupt workers.{what} column").into(),
        )
    };
    Ok(Worker {
        id: row.get(0)?,
        hostname: row.get(1)?,
        status: WorkerStatus::parse(&status).ok_or_else(|| bad(2, "status"))?,
        providers: list_from_json(&row.get::<_, String>(3)?).ok_or_else(|| bad(3, "providers"))?,
        capabilities: list_from_json(&row.get::<_, String>(4)?)
            .ok_or_else(|| bad(4, "capabilities"))?,
        capacity: capacity_from_json(&row.get::<_, String>(5)?)
            .ok_or_else(|| bad(5, "capacity"))?,
        last_heartbeat_ms: row.get(6)?,
        created_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
    })
}

fn list_to_json(items: &[String]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}

fn list_from_json(text: &str) -> Option<Vec<String>> {
    serde_json::from_str(text).ok()
}

fn capacity_to_json(c: Capacity) -> String {
    let mut object = serde_json::Map::new();
    if let Some(max) = c.max_sandboxes {
        object.insert("max_sandboxes".into(), max.into());
    }
    serde_json::Value::Object(object).to_string()
}

fn capacity_from_json(text: &str) -> Option<Capacity> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let object = value.as_object()?;
    let max_sandboxes = match object.get("max_sandboxes") {
        None => None,
        Some(v) => Some(u32::try_from(v.as_u64()?).ok()?),
    };
    Some(Capacity { max_sandboxes })
}
