//! Statements on `templates` (migration 0005).

use rusqlite::{OptionalExtension, Transaction, params};

use crate::store::{StoreError, StoreResult};
use crate::templates::Template;

const COLUMNS: &str =
    "owner_id, name, image, provider, memory_mb, vcpus, ttl, metadata, created_at, updated_at";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Template> {
    let metadata: String = row.get(7)?;
    Ok(Template {
        owner_id: row.get(0)?,
        name: row.get(1)?,
        image: row.get(2)?,
        provider: row.get(3)?,
        memory_mb: row.get(4)?,
        vcpus: row.get(5)?,
        ttl: row.get(6)?,
        // Written by `save` from a map of strings; a row that does not
        // parse is shown without metadata rather than failing the read.
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        created_at_ms: row.get(8)?,
        updated_at_ms: row.get(9)?,
    })
}

pub fn exists(tx: &Transaction<'_>, owner: &str, name: &str) -> StoreResult<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM templates WHERE owner_id = ?1 AND name = ?2")?
        .exists(params![owner, name])?)
}

pub fn count(tx: &Transaction<'_>, owner: &str) -> StoreResult<u64> {
    let n: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM templates WHERE owner_id = ?1")?
        .query_row([owner], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

/// Creates or replaces `template` (keeping `created_at` of the one it
/// replaces).
pub fn upsert(tx: &Transaction<'_>, template: &Template, now_ms: i64) -> StoreResult<()> {
    let metadata = serde_json::to_string(&template.metadata)
        .map_err(|e| StoreError::Database(format!("template metadata: {e}")))?;
    tx.prepare_cached(
        "INSERT INTO templates (owner_id, name, image, provider, memory_mb, vcpus, ttl, metadata, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
         ON CONFLICT (owner_id, name) DO UPDATE SET
             image = excluded.image, provider = excluded.provider,
             memory_mb = excluded.memory_mb, vcpus = excluded.vcpus, ttl = excluded.ttl,
             metadata = excluded.metadata, updated_at = excluded.updated_at",
    )?
    .execute(params![
        template.owner_id,
        template.name,
        template.image,
        template.provider,
        template.memory_mb,
        template.vcpus,
        template.ttl,
        metadata,
        now_ms
    ])?;
    Ok(())
}

/// `owner`'s template `name`, else nobody's.
pub fn get(tx: &Transaction<'_>, owner: &str, name: &str) -> StoreResult<Option<Template>> {
    Ok(tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM templates WHERE name = ?2 AND owner_id IN (?1, '')
             ORDER BY owner_id = '' LIMIT 1"
        ))?
        .query_row(params![owner, name], from_row)
        .optional()?)
}

/// `owner`'s templates and nobody's, by name (the owner's first on a tie).
pub fn list(tx: &Transaction<'_>, owner: &str) -> StoreResult<Vec<Template>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM templates WHERE owner_id IN (?1, '') ORDER BY name, owner_id = ''"
    ))?;
    let rows = stmt.query_map([owner], from_row)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::from)
}

/// Deletes `owner`'s own template `name` (never nobody's on a caller's
/// behalf, unless the caller is nobody); whether there was one.
pub fn delete(tx: &Transaction<'_>, owner: &str, name: &str) -> StoreResult<bool> {
    let n = tx
        .prepare_cached("DELETE FROM templates WHERE owner_id = ?1 AND name = ?2")?
        .execute(params![owner, name])?;
    Ok(n > 0)
}
