//! The transaction logic, written once against the [`Tx`] trait: which
//! rows a request reads and writes, the lease rules it applies
//! ([`crate::leases`]), what it answers, and which in-memory effects wait
//! for COMMIT. A backend runs [`apply`] for each request of a batch inside
//! one open transaction; nothing here knows SQL.
//!
//! Each write runs in its own savepoint ([`isolated`]): an error or a
//! refusal rolls back that request alone. Its reply and its effects on the
//! [`Tallies`] are returned as a [`Deferred`] that the backend runs after
//! COMMIT returned, with the commit's error if it failed.

use std::collections::HashSet;

use crossbeam_channel::Sender;

use super::tallies::tally_lease;
use super::{
    AuditEntry, Deleted, LiveSandbox, Outcome, Reclaimed, SandboxRefusal, SpawnStart, StoreError,
    StoreRequest, StoreResult, Tallies, Tx,
};
use crate::leases::{self, Lease, LeaseError};
use crate::sandboxes::{Sandbox, SandboxState};
use crate::templates::{MAX_PER_OWNER, Saved, Template};

/// A reply held back until the batch's COMMIT returned: on success it sends
/// the result and applies the in-memory effects; on failure it sends the
/// commit error instead (nothing of the batch is durable, so nothing may be
/// acknowledged) and applies nothing.
pub(crate) type Deferred = Box<dyn FnOnce(Option<&StoreError>, &mut Tallies)>;

/// In-memory effects of a committed write.
#[derive(Default)]
struct Effects {
    leases: Vec<Lease>,
    sandboxes: Vec<(Option<Sandbox>, Sandbox)>,
}

impl Effects {
    fn apply(self, t: &mut Tallies) {
        self.leases.iter().for_each(|l| t.lease(l));
        self.sandboxes
            .iter()
            .for_each(|(from, to)| t.moved(from.as_ref(), to));
    }
}

fn defer<T: Send + 'static>(
    reply: Sender<StoreResult<T>>,
    result: StoreResult<T>,
    effects: Effects,
) -> Deferred {
    Box::new(move |commit_error, tallies| {
        let answer = match commit_error {
            Some(e) => Err(e.clone()),
            None => {
                if result.is_ok() {
                    effects.apply(tallies);
                }
                result
            }
        };
        // A caller that gave up waiting dropped its receiver; that is fine.
        let _ = reply.send(answer);
    })
}

/// Runs `f` inside its own savepoint; an error (or a refusal) rolls back
/// just this request.
fn isolated<T, R>(
    tx: &impl Tx,
    f: impl FnOnce(&mut Effects) -> StoreResult<Result<T, R>>,
) -> (StoreResult<Result<T, R>>, Effects) {
    let mut effects = Effects::default();
    let result = (|| {
        tx.savepoint()?;
        let result = f(&mut effects);
        if !matches!(result, Ok(Ok(_))) {
            tx.rollback_to_savepoint()?;
            effects = Effects::default();
        }
        tx.release_savepoint()?;
        result
    })();
    (result, effects)
}

/// A plain write: `Ok` commits, `Err` rolls back.
fn isolated_write<T>(
    tx: &impl Tx,
    f: impl FnOnce(&mut Effects) -> StoreResult<T>,
) -> (StoreResult<T>, Effects) {
    let (result, effects) = isolated(tx, |e| f(e).map(Ok::<T, std::convert::Infallible>));
    (
        result.map(|r| match r {
            Ok(v) => v,
        }),
        effects,
    )
}

/// Runs one request inside the open transaction `tx`.
pub(crate) fn apply(tx: &impl Tx, request: StoreRequest) -> Deferred {
    let none = Effects::default;
    match request {
        StoreRequest::TouchWorkers { updates, reply } => {
            let (result, fx) = isolated_write(tx, |_| {
                for (id, at_ms) in &updates {
                    tx.touch_worker(id, *at_ms)?;
                }
                Ok(())
            });
            defer(reply, result, fx)
        }
        StoreRequest::SaveHeartbeat {
            heartbeat,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |_| {
                let worker = tx.upsert_worker(&heartbeat, now_ms)?;
                if let Some(entry) = &audit {
                    tx.insert_audit(entry)?;
                }
                Ok(worker)
            });
            defer(reply, result, fx)
        }
        StoreRequest::SetWorkerStatus {
            id,
            status,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |_| tx.set_worker_status(&id, status, now_ms));
            defer(reply, result, fx)
        }
        StoreRequest::DeleteWorker { id, audit, reply } => {
            let (result, fx) = isolated_write(tx, |_| {
                let deleted = tx.delete_worker(&id)?;
                let outcome = if deleted == Deleted::Yes {
                    "ok"
                } else {
                    "NOT_FOUND"
                };
                tx.insert_audit(&AuditEntry {
                    outcome: outcome.into(),
                    ..audit
                })?;
                Ok(deleted)
            });
            defer(reply, result, fx)
        }
        StoreRequest::RecordAudit { entry, reply } => {
            let (result, fx) = isolated_write(tx, |_| tx.insert_audit(&entry));
            defer(reply, result, fx)
        }
        StoreRequest::ListWorkers { reply } => defer(reply, tx.list_workers(), none()),
        StoreRequest::StartSpawn {
            sandbox,
            lease_ttl_ms,
            idempotency_key,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                if let Some(key) = &idempotency_key {
                    if let Some(existing) = tx.get_idempotent(key)? {
                        match tx.get_sandbox(&existing)? {
                            Some(s) => return Ok(Ok(SpawnStart::Replayed(s))),
                            // Its sandbox was purged by retention: the key
                            // is spent, this spawn makes a new one.
                            None => tx.forget_idempotent(&existing)?,
                        }
                    }
                }
                let current = lease_to_acquire(tx, &sandbox.id)?;
                let lease = match leases::acquire(
                    current.as_ref(),
                    &sandbox.id,
                    "sandbox",
                    &sandbox.worker_id,
                    lease_ttl_ms,
                    sandbox.created_at_ms,
                ) {
                    Ok((lease, _)) => lease,
                    Err(e) => return Ok(Err(SandboxRefusal::Lease(e))),
                };
                tx.put_lease(&lease)?;
                tx.insert_sandbox(&sandbox)?;
                if let Some(key) = &idempotency_key {
                    tx.put_idempotent(key, &sandbox.id, sandbox.created_at_ms)?;
                }
                fx.leases.push(lease.clone());
                fx.sandboxes.push((None, sandbox.clone()));
                Ok(Ok(SpawnStart::Started { sandbox, lease }))
            });
            defer(reply, result, fx)
        }
        StoreRequest::FinishSpawn {
            id,
            holder,
            ok,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                let Some(before) = tx.get_sandbox(&id)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                // Only a spawn in progress can finish; anything else means
                // the record moved on and must not be overwritten.
                if before.state != SandboxState::Creating {
                    return Ok(Err(SandboxRefusal::NotLive(before.state)));
                }
                let state = if ok {
                    SandboxState::Running
                } else {
                    SandboxState::Error
                };
                let Some(after) = tx.set_sandbox_state(&id, state, now_ms)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                if !ok {
                    release_if_held(tx, fx, &id, &holder, now_ms)?;
                    // A failed spawn is not a result to replay: a retry with
                    // the same Idempotency-Key tries again.
                    tx.forget_idempotent(&id)?;
                }
                fx.sandboxes.push((Some(before), after.clone()));
                Ok(Ok(after))
            });
            defer(reply, result, fx)
        }
        StoreRequest::StartDestroy {
            id,
            holder,
            lease_ttl_ms,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                let Some(sandbox) = tx.get_sandbox(&id)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                // Destroyed is gone; creating is a spawn in progress, which
                // finishes (or undoes itself) first.
                if matches!(
                    sandbox.state,
                    SandboxState::Destroyed | SandboxState::Creating
                ) {
                    return Ok(Err(SandboxRefusal::NotLive(sandbox.state)));
                }
                let current = tx.get_lease(&id)?;
                let lease = match leases::acquire(
                    current.as_ref(),
                    &id,
                    "sandbox",
                    &holder,
                    lease_ttl_ms,
                    now_ms,
                ) {
                    Ok((lease, _)) => lease,
                    Err(e) => return Ok(Err(SandboxRefusal::Lease(e))),
                };
                tx.put_lease(&lease)?;
                tx.put_destroy_intent(&id, now_ms)?;
                fx.leases.push(lease.clone());
                Ok(Ok((sandbox, lease)))
            });
            defer(reply, result, fx)
        }
        StoreRequest::FinishDestroy {
            id,
            holder,
            now_ms,
            reply,
        } => {
            let (result, fx) = end_sandbox(tx, &id, &holder, SandboxState::Destroyed, now_ms);
            defer(reply, result, fx)
        }
        StoreRequest::MarkLost {
            id,
            holder,
            now_ms,
            reply,
        } => {
            let (result, fx) = end_sandbox(tx, &id, &holder, SandboxState::Lost, now_ms);
            defer(reply, result, fx)
        }
        StoreRequest::Extend {
            id,
            holder,
            expires_at_ms,
            lease_ttl_ms,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                let Some(sandbox) = tx.get_sandbox(&id)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                if !sandbox.state.is_live() {
                    return Ok(Err(SandboxRefusal::NotLive(sandbox.state)));
                }
                let current = lease_to_acquire(tx, &id)?;
                let ttl = lease_ttl_ms.max(expires_at_ms - now_ms);
                let lease =
                    match leases::acquire(current.as_ref(), &id, "sandbox", &holder, ttl, now_ms) {
                        Ok((lease, _)) => lease,
                        Err(e) => return Ok(Err(SandboxRefusal::Lease(e))),
                    };
                tx.put_lease(&lease)?;
                let Some(after) = tx.set_sandbox_expiry(&id, expires_at_ms, now_ms)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                fx.leases.push(lease);
                Ok(Ok(after))
            });
            defer(reply, result, fx)
        }
        StoreRequest::GetSandbox { id, reply } => defer(reply, tx.get_sandbox(&id), none()),
        StoreRequest::DestroyIntents { reply } => defer(reply, tx.destroy_intents(), none()),
        StoreRequest::FindIdempotent { key, reply } => {
            let found = tx.get_idempotent(&key).and_then(|id| match id {
                Some(id) => tx.get_sandbox(&id),
                None => Ok(None),
            });
            defer(reply, found, none())
        }
        StoreRequest::ListSandboxes { reply } => defer(reply, tx.list_sandboxes(), none()),
        StoreRequest::ListExpired {
            now_ms,
            limit,
            owner,
            reply,
        } => defer(
            reply,
            tx.list_expired(now_ms, limit, owner.as_deref()),
            none(),
        ),
        StoreRequest::ReclaimSandboxLeases {
            holder,
            ttl_ms,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |fx| {
                let (reclaimed, taken) = reclaim_sandbox_leases(tx, &holder, ttl_ms, now_ms)?;
                fx.leases.extend(taken);
                Ok(reclaimed)
            });
            defer(reply, result, fx)
        }
        StoreRequest::LiveCounts { reply } => defer(reply, tx.live_counts(), none()),
        StoreRequest::AcquireLease {
            resource_id,
            resource_type,
            holder,
            ttl_ms,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = change_lease(tx, &resource_id, audit.as_ref(), true, |current| {
                leases::acquire(
                    current,
                    &resource_id,
                    &resource_type,
                    &holder,
                    ttl_ms,
                    now_ms,
                )
            });
            defer(reply, result, fx)
        }
        StoreRequest::RenewLease {
            resource_id,
            holder,
            ttl_ms,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = change_lease(tx, &resource_id, audit.as_ref(), false, |current| {
                leases::renew(current, &holder, ttl_ms, now_ms).map(|l| (l, ()))
            });
            defer(reply, result.map(|r| r.map(|(lease, ())| lease)), fx)
        }
        StoreRequest::ReleaseLease {
            resource_id,
            holder,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = change_lease(tx, &resource_id, audit.as_ref(), false, |current| {
                leases::release(current, &holder, now_ms).map(|l| (l, ()))
            });
            // Giving the lease back ends a destroy that did not happen.
            let result = match result {
                Ok(Ok(done)) => tx.forget_destroy_intent(&resource_id).map(|()| Ok(done)),
                other => other,
            };
            defer(reply, result.map(|r| r.map(|(lease, ())| lease)), fx)
        }
        StoreRequest::GetLease { resource_id, reply } => {
            defer(reply, tx.get_lease(&resource_id), none())
        }
        StoreRequest::ListLeases { reply } => defer(reply, tx.list_leases(), none()),
        StoreRequest::SaveTemplate {
            template,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |_| save_template(tx, &template, now_ms));
            defer(reply, result, fx)
        }
        StoreRequest::GetTemplate { owner, name, reply } => {
            defer(reply, tx.get_template(&owner, &name), none())
        }
        StoreRequest::ListTemplates { owner, reply } => {
            defer(reply, tx.list_templates(&owner), none())
        }
        StoreRequest::DeleteTemplate { owner, name, reply } => {
            let (result, fx) = isolated_write(tx, |_| tx.delete_template(&owner, &name));
            defer(reply, result, fx)
        }
        StoreRequest::RenewSandboxLeases {
            holder,
            ttl_ms,
            now_ms,
            limit,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |fx| {
                let renewed = tx.renew_live_sandbox_leases(&holder, ttl_ms, now_ms, limit)?;
                for (resource_id, expires_at_ms) in &renewed {
                    fx.leases
                        .push(tally_lease(resource_id.clone(), &holder, *expires_at_ms));
                }
                Ok(renewed.len())
            });
            defer(reply, result, fx)
        }
        StoreRequest::Ping { reply } => defer(reply, Ok(()), none()),
    }
}

/// A lease rule's answer: the store's error, or the rule's own refusal.
type LeaseOutcome<T> = StoreResult<Result<T, LeaseError>>;

/// Applies one lease rule to the stored lease of `resource_id`: on success
/// the new lease (and `audit`, if any) is written in the request's
/// savepoint; a refusal writes nothing. An `acquiring` rule starts above
/// the generation floor where no row exists.
fn change_lease<T>(
    tx: &impl Tx,
    resource_id: &str,
    audit: Option<&AuditEntry>,
    acquiring: bool,
    rule: impl FnOnce(Option<&Lease>) -> Result<(Lease, T), LeaseError>,
) -> (LeaseOutcome<(Lease, T)>, Effects) {
    isolated(tx, |fx| {
        let current = if acquiring {
            lease_to_acquire(tx, resource_id)?
        } else {
            tx.get_lease(resource_id)?
        };
        match rule(current.as_ref()) {
            Ok((lease, extra)) => {
                tx.put_lease(&lease)?;
                if let Some(entry) = audit {
                    tx.insert_audit(entry)?;
                }
                fx.leases.push(lease.clone());
                Ok(Ok((lease, extra)))
            }
            Err(e) => Ok(Err(e)),
        }
    })
}

/// Destroyed or lost: the state change and the lease release commit together.
fn end_sandbox(
    tx: &impl Tx,
    id: &str,
    holder: &str,
    state: SandboxState,
    now_ms: i64,
) -> (Outcome<Sandbox>, Effects) {
    isolated(tx, |fx| {
        let Some(before) = tx.get_sandbox(id)? else {
            return Ok(Err(SandboxRefusal::NotFound));
        };
        let current = tx.get_lease(id)?;
        if let Err(e) = leases::check_holder(current.as_ref(), holder, now_ms) {
            return Ok(Err(SandboxRefusal::Lease(e)));
        }
        let Some(after) = tx.set_sandbox_state(id, state, now_ms)? else {
            return Ok(Err(SandboxRefusal::NotFound));
        };
        release_if_held(tx, fx, id, holder, now_ms)?;
        tx.forget_destroy_intent(id)?;
        fx.sandboxes.push((Some(before), after.clone()));
        Ok(Ok(after))
    })
}

fn release_if_held(
    tx: &impl Tx,
    fx: &mut Effects,
    id: &str,
    holder: &str,
    now_ms: i64,
) -> StoreResult<()> {
    let current = tx.get_lease(id)?;
    if let Ok(released) = leases::release(current.as_ref(), holder, now_ms) {
        tx.put_lease(&released)?;
        fx.leases.push(released);
    }
    Ok(())
}

/// Answers a request that was never applied with `error`.
pub(crate) fn reply_only(request: StoreRequest, error: &StoreError) -> Deferred {
    fn fail<T: Send + 'static>(reply: Sender<StoreResult<T>>, error: &StoreError) -> Deferred {
        defer(reply, Err(error.clone()), Effects::default())
    }
    match request {
        StoreRequest::SaveHeartbeat { reply, .. } => fail(reply, error),
        StoreRequest::SetWorkerStatus { reply, .. } => fail(reply, error),
        StoreRequest::DeleteWorker { reply, .. } => fail(reply, error),
        StoreRequest::TouchWorkers { reply, .. } => fail(reply, error),
        StoreRequest::RecordAudit { reply, .. } | StoreRequest::Ping { reply } => {
            fail(reply, error)
        }
        StoreRequest::ListWorkers { reply } => fail(reply, error),
        StoreRequest::StartSpawn { reply, .. } => fail(reply, error),
        StoreRequest::FinishSpawn { reply, .. }
        | StoreRequest::FinishDestroy { reply, .. }
        | StoreRequest::Extend { reply, .. }
        | StoreRequest::MarkLost { reply, .. } => fail(reply, error),
        StoreRequest::StartDestroy { reply, .. } => fail(reply, error),
        StoreRequest::GetSandbox { reply, .. } | StoreRequest::FindIdempotent { reply, .. } => {
            fail(reply, error)
        }
        StoreRequest::DestroyIntents { reply } => fail(reply, error),
        StoreRequest::ListSandboxes { reply } | StoreRequest::ListExpired { reply, .. } => {
            fail(reply, error)
        }
        StoreRequest::ReclaimSandboxLeases { reply, .. } => fail(reply, error),
        StoreRequest::LiveCounts { reply } => fail(reply, error),
        StoreRequest::AcquireLease { reply, .. } => fail(reply, error),
        StoreRequest::RenewLease { reply, .. } | StoreRequest::ReleaseLease { reply, .. } => {
            fail(reply, error)
        }
        StoreRequest::GetLease { reply, .. } => fail(reply, error),
        StoreRequest::ListLeases { reply } => fail(reply, error),
        StoreRequest::RenewSandboxLeases { reply, .. } => fail(reply, error),
        StoreRequest::SaveTemplate { reply, .. } => fail(reply, error),
        StoreRequest::GetTemplate { reply, .. } => fail(reply, error),
        StoreRequest::ListTemplates { reply, .. } => fail(reply, error),
        StoreRequest::DeleteTemplate { reply, .. } => fail(reply, error),
    }
}

/// The lease an acquire starts from: the stored one, or where no row
/// exists but lease rows were purged, a released placeholder at the
/// generation floor, so that the new lease's generation is above every
/// purged one (see the backend's retention).
fn lease_to_acquire(tx: &impl Tx, resource_id: &str) -> StoreResult<Option<Lease>> {
    if let Some(lease) = tx.get_lease(resource_id)? {
        return Ok(Some(lease));
    }
    let floor = tx.generation_floor()?;
    Ok((floor > 0).then(|| Lease {
        resource_id: resource_id.to_owned(),
        resource_type: String::new(),
        holder_id: String::new(),
        generation: floor,
        acquired_at_ms: 0,
        renewed_at_ms: 0,
        expires_at_ms: i64::MIN,
        transitions: 0,
    }))
}

/// Startup: takes back the leases on `holder`'s live sandboxes and answers
/// those sandboxes. The usual restart finds every lease still held by
/// `holder` and unexpired; those are left as they are (background renewal
/// extends them), and finding them costs two reads and a set difference,
/// not a write or a lookup per row (rewriting or probing 100,000 rows here
/// dominated startup). The rest, lapsed, released or missing, go through
/// the lease rules one by one ([`leases::acquire`]): taken with a new
/// generation, or created; one that another holder has unexpired is left
/// alone and reported. Also returns the leases it wrote, for the tallies.
fn reclaim_sandbox_leases(
    tx: &impl Tx,
    holder: &str,
    ttl_ms: i64,
    now_ms: i64,
) -> StoreResult<(Reclaimed, Vec<Lease>)> {
    let held: HashSet<String> = tx.held_lease_ids(holder, now_ms)?;
    let live: Vec<LiveSandbox> = tx.live_sandboxes_of(holder)?;
    let unheld: Vec<String> = live
        .iter()
        .filter(|s| !held.contains(&s.id))
        .map(|s| s.id.clone())
        .collect();
    let mut reclaimed = Reclaimed {
        live,
        conflicts: Vec::new(),
    };
    let mut taken = Vec::new();
    for id in unheld {
        let current = tx.get_lease(&id)?;
        match leases::acquire(current.as_ref(), &id, "sandbox", holder, ttl_ms, now_ms) {
            Ok((lease, _)) => {
                tx.put_lease(&lease)?;
                taken.push(lease);
            }
            Err(LeaseError::Conflict { holder_id, .. }) => {
                reclaimed.conflicts.push((id, holder_id))
            }
            Err(e) => return Err(StoreError::Database(format!("reclaiming {id}: {e}"))),
        }
    }
    Ok((reclaimed, taken))
}

/// Creates or replaces `template`, unless its owner already has
/// [`MAX_PER_OWNER`] others.
fn save_template(tx: &impl Tx, template: &Template, now_ms: i64) -> StoreResult<Saved> {
    let exists = tx.template_exists(&template.owner_id, &template.name)?;
    if !exists && tx.count_templates(&template.owner_id)? >= MAX_PER_OWNER as u64 {
        return Ok(Saved::Full);
    }
    tx.upsert_template(template, now_ms)?;
    Ok(if exists {
        Saved::Updated
    } else {
        Saved::Created
    })
}
