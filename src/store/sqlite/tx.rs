//! [`Tx`] for a rusqlite transaction: each method is one statement
//! function of statements.rs, sandbox_statements.rs or
//! template_statements.rs. No rules here; those are in store/rules.rs.

use std::collections::HashSet;

use rusqlite::Transaction;

use super::template_statements as templates;
use super::{retention, sandbox_statements as sandboxes, statements as workers};
use crate::leases::Lease;
use crate::sandboxes::{Sandbox, SandboxState};
use crate::store::{AuditEntry, Deleted, LiveSandbox, StoreResult, Tx};
use crate::templates::Template;
use crate::workers::{Heartbeat, Worker, WorkerStatus};

/// The one savepoint a request runs in (requests never nest).
const SAVEPOINT: &str = "one";

impl Tx for Transaction<'_> {
    fn savepoint(&self) -> StoreResult<()> {
        Ok(self.execute_batch(&format!("SAVEPOINT {SAVEPOINT}"))?)
    }

    fn rollback_to_savepoint(&self) -> StoreResult<()> {
        Ok(self.execute_batch(&format!("ROLLBACK TO {SAVEPOINT}"))?)
    }

    fn release_savepoint(&self) -> StoreResult<()> {
        Ok(self.execute_batch(&format!("RELEASE {SAVEPOINT}"))?)
    }

    fn upsert_worker(&self, heartbeat: &Heartbeat, now_ms: i64) -> StoreResult<Worker> {
        workers::upsert_worker(self, heartbeat, now_ms)
    }

    fn set_worker_status(
        &self,
        id: &str,
        status: WorkerStatus,
        now_ms: i64,
    ) -> StoreResult<Option<Worker>> {
        workers::set_worker_status(self, id, status, now_ms)
    }

    fn touch_worker(&self, id: &str, at_ms: i64) -> StoreResult<()> {
        workers::touch_worker(self, id, at_ms)
    }

    fn delete_worker(&self, id: &str) -> StoreResult<Deleted> {
        workers::delete_worker(self, id)
    }

    fn list_workers(&self) -> StoreResult<Vec<Worker>> {
        workers::list_workers(self)
    }

    fn insert_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
        workers::insert_audit(self, entry)
    }

    fn insert_sandbox(&self, sandbox: &Sandbox) -> StoreResult<()> {
        sandboxes::insert_sandbox(self, sandbox)
    }

    fn get_sandbox(&self, id: &str) -> StoreResult<Option<Sandbox>> {
        sandboxes::get_sandbox(self, id)
    }

    fn set_sandbox_state(
        &self,
        id: &str,
        state: SandboxState,
        now_ms: i64,
    ) -> StoreResult<Option<Sandbox>> {
        sandboxes::set_sandbox_state(self, id, state, now_ms)
    }

    fn set_sandbox_expiry(
        &self,
        id: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Option<Sandbox>> {
        sandboxes::set_sandbox_expiry(self, id, expires_at_ms, now_ms)
    }

    fn list_sandboxes(&self) -> StoreResult<Vec<Sandbox>> {
        sandboxes::list_sandboxes(self)
    }

    fn list_expired(
        &self,
        now_ms: i64,
        limit: usize,
        owner: Option<&str>,
    ) -> StoreResult<Vec<Sandbox>> {
        sandboxes::list_expired(self, now_ms, limit, owner)
    }

    fn live_counts(&self) -> StoreResult<Vec<(String, String, u32)>> {
        sandboxes::live_counts(self)
    }

    fn live_sandboxes_of(&self, worker: &str) -> StoreResult<Vec<LiveSandbox>> {
        sandboxes::live_sandboxes_of(self, worker)
    }

    fn get_idempotent(&self, key: &str) -> StoreResult<Option<String>> {
        sandboxes::get_idempotent(self, key)
    }

    fn put_idempotent(&self, key: &str, sandbox_id: &str, now_ms: i64) -> StoreResult<()> {
        sandboxes::put_idempotent(self, key, sandbox_id, now_ms)
    }

    fn forget_idempotent(&self, sandbox_id: &str) -> StoreResult<()> {
        sandboxes::forget_idempotent(self, sandbox_id)
    }

    fn put_destroy_intent(&self, sandbox_id: &str, now_ms: i64) -> StoreResult<()> {
        sandboxes::put_destroy_intent(self, sandbox_id, now_ms)
    }

    fn forget_destroy_intent(&self, sandbox_id: &str) -> StoreResult<()> {
        sandboxes::forget_destroy_intent(self, sandbox_id)
    }

    fn destroy_intents(&self) -> StoreResult<Vec<String>> {
        sandboxes::destroy_intents(self)
    }

    fn get_lease(&self, resource_id: &str) -> StoreResult<Option<Lease>> {
        sandboxes::get_lease(self, resource_id)
    }

    fn put_lease(&self, lease: &Lease) -> StoreResult<()> {
        sandboxes::put_lease(self, lease)
    }

    fn list_leases(&self) -> StoreResult<Vec<Lease>> {
        sandboxes::list_leases(self)
    }

    fn generation_floor(&self) -> StoreResult<u64> {
        Ok(retention::generation_floor(self)?)
    }

    fn held_lease_ids(&self, holder: &str, now_ms: i64) -> StoreResult<HashSet<String>> {
        sandboxes::held_lease_ids(self, holder, now_ms)
    }

    fn renew_live_sandbox_leases(
        &self,
        holder: &str,
        ttl_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<(String, i64)>> {
        sandboxes::renew_live_sandbox_leases(self, holder, ttl_ms, now_ms, limit)
    }

    fn template_exists(&self, owner: &str, name: &str) -> StoreResult<bool> {
        templates::exists(self, owner, name)
    }

    fn count_templates(&self, owner: &str) -> StoreResult<u64> {
        templates::count(self, owner)
    }

    fn upsert_template(&self, template: &Template, now_ms: i64) -> StoreResult<()> {
        templates::upsert(self, template, now_ms)
    }

    fn get_template(&self, owner: &str, name: &str) -> StoreResult<Option<Template>> {
        templates::get(self, owner, name)
    }

    fn list_templates(&self, owner: &str) -> StoreResult<Vec<Template>> {
        templates::list(self, owner)
    }

    fn delete_template(&self, owner: &str, name: &str) -> StoreResult<bool> {
        templates::delete(self, owner, name)
    }
}
