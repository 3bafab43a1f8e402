//! Handlers for sandboxes, providers and leases; the lifecycle work itself
//! is in `crate::controlplane`, shared with every other caller.

use serde_json::json;

use super::Ctx;
use super::api::{
    ApiError, LeaseJson, SandboxJson, parse_lease_body, parse_spawn, parse_ttl, to_json,
};
use super::auth::{Principal, check_named_owner};
use super::handlers::{Incoming, Reply};
use super::router::LeaseVerb;
use crate::controlplane::SpawnRequest;
use crate::leases::LeaseError;
use crate::sandboxes::{MAX_IDEMPOTENCY_KEY_LEN, OwnerScope};
use crate::store::LeaseOp;
use crate::time::{format_duration, now_ms};

fn spawn_request(
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    body: &[u8],
) -> Result<SpawnRequest, ApiError> {
    with_headers(incoming, scope, parse_spawn(body)?)
}

/// The spawn as asked, owned as the caller's scope says: a key bound to an
/// owner creates for that owner (naming another is refused, and `authorize`
/// has already checked `X-User-ID`); an admin key or no keys may name any.
/// `Idempotency-Key` is applied too.
pub(super) fn with_headers(
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    mut req: SpawnRequest,
) -> Result<SpawnRequest, ApiError> {
    check_named_owner(scope, Some(&req.owner_id), "field `owner_id`")?;
    match scope.fixed_owner() {
        Some(owner) => req.owner_id = owner.to_owned(),
        // StacyVM: the X-User-ID header names the owner, over the body.
        None => {
            if let Some(user) = incoming.presented.user_id {
                req.owner_id = user.to_owned();
            }
        }
    }
    if let Some(key) = incoming.idempotency_key {
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || key.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable characters"
            )));
        }
        req.idempotency_key = Some(key.to_owned());
    }
    Ok(req)
}

pub fn spawn(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let req = spawn_request(incoming, scope, body)?;
    let (sandbox, replayed) = ctx.lifecycle.spawn(&req)?;
    if replayed {
        log::debug!(
            "spawn replayed {} for idempotency key (request {})",
            sandbox.id,
            incoming.request_id
        );
    }
    Ok(Reply::json(201, to_json(&SandboxJson::from(&sandbox))))
}

/// The admission answer. By default exactly the fields of the StacyVM
/// SDK's `SpawnAdmissionDecision`, which takes every field of the answer as
/// a keyword and fails on any other; `?detail=placement` adds the
/// placement detail (`worker_reason`, `rejections`, `selected_worker_id`,
/// `eligible_workers`), the spec's optional fields.
pub fn admission(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    query: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let placement = match super::io_handlers::query_value(query, "detail")?.as_deref() {
        None => false,
        Some("placement") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "query parameter `detail` must be \"placement\", not {other:?}"
            )));
        }
    };
    let req = spawn_request(incoming, scope, body)?;
    let a = ctx.lifecycle.admission(&req)?;
    let config = ctx.live.get();
    // The owner's quota, where it has one, over the fleet-wide limits.
    let limits = crate::controlplane::limits_for(&config, &req.owner_id);
    let max_ttl = std::time::Duration::from_millis(limits.max_ttl_ms.max(0) as u64);
    let mut out = json!({
        "allowed": a.denial.is_none(),
        "queueable": false,
        "active_sandboxes": a.active_sandboxes,
        "max_sandboxes": limits.max_sandboxes,
        "max_ttl": format_duration(max_ttl),
    });
    let fields = out.as_object_mut().expect("json! object");
    if placement {
        fields.insert("worker_reason".into(), json!(a.worker_reason));
        fields.insert("rejections".into(), json!(a.rejections));
        if let Some(id) = a.selected_worker_id {
            fields.insert("selected_worker_id".into(), id.into());
        }
        if let Some(n) = a.eligible_workers {
            fields.insert("eligible_workers".into(), n.into());
        }
    }
    if let Some(denial) = a.denial {
        fields.insert("reason".into(), denial.as_str().into());
    }
    if !req.owner_id.is_empty() {
        fields.insert(
            "active_owner_sandboxes".into(),
            a.active_owner_sandboxes.into(),
        );
    }
    if limits.max_per_owner > 0 {
        fields.insert("max_owner_sandboxes".into(), limits.max_per_owner.into());
    }
    Ok(Reply::json(200, to_json(&out)))
}

pub fn list(ctx: &Ctx, scope: &OwnerScope) -> Result<Reply, ApiError> {
    let all = ctx.lifecycle.list(scope)?;
    let items: Vec<SandboxJson<'_>> = all.iter().map(SandboxJson::from).collect();
    Ok(Reply::json(200, to_json(&items)))
}

pub fn get(ctx: &Ctx, scope: &OwnerScope, id: &str) -> Result<Reply, ApiError> {
    let sandbox = ctx.lifecycle.get(scope, id)?;
    Ok(Reply::json(200, to_json(&SandboxJson::from(&sandbox))))
}

pub fn destroy(ctx: &Ctx, scope: &OwnerScope, id: &str) -> Result<Reply, ApiError> {
    ctx.lifecycle.destroy(scope, id)?;
    Ok(Reply::json(200, br#"{"status":"destroyed"}"#.to_vec()))
}

pub fn prune(ctx: &Ctx, scope: &OwnerScope) -> Result<Reply, ApiError> {
    let pruned = ctx.lifecycle.prune(scope)?;
    Ok(Reply::json(200, to_json(&json!({ "pruned": pruned }))))
}

pub fn extend(ctx: &Ctx, scope: &OwnerScope, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let ttl_ms = parse_ttl(body, ctx.live.get().sandboxes.max_ttl)?;
    let sandbox = ctx.lifecycle.extend(scope, id, ttl_ms)?;
    Ok(Reply::json(200, to_json(&SandboxJson::from(&sandbox))))
}

pub fn providers(ctx: &Ctx) -> Result<Reply, ApiError> {
    let items = crate::diagnostics::providers_json(ctx.lifecycle.providers());
    Ok(Reply::json(200, to_json(&items)))
}

pub fn list_leases(ctx: &Ctx) -> Result<Reply, ApiError> {
    let all = ctx.store.list_leases()?;
    let now = now_ms();
    let items: Vec<LeaseJson<'_>> = all.iter().map(|l| LeaseJson::new(l, now)).collect();
    Ok(Reply::json(200, to_json(&items)))
}

pub fn get_lease(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    match ctx.store.get_lease(id)? {
        Some(lease) => Ok(Reply::json(200, to_json(&LeaseJson::new(&lease, now_ms())))),
        None => Err(ApiError::not_found(format!("no lease for {id}"))),
    }
}

fn lease_error(id: &str, e: LeaseError) -> ApiError {
    match e {
        LeaseError::NotFound => ApiError::not_found(format!("no lease for {id}")),
        LeaseError::Invalid(m) => ApiError::bad_request(m),
        other => ApiError::conflict(format!("lease on {id}: {other}")),
    }
}

/// Admin lease actions, for operators and for fencing tests: the same rule
/// set as the admin socket's (`workerproto::lease_action`). A change is
/// audited in its own transaction and published; a refusal by the store is
/// logged and audited with its lease code.
pub fn lease_action(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    who: Principal,
    id: &str,
    verb: LeaseVerb,
    body: &[u8],
) -> Result<Reply, ApiError> {
    crate::workerproto::validate_resource_id(id).map_err(ApiError::bad_request)?;
    let leases = &ctx.live.get().leases;
    let b = parse_lease_body(body, leases.max_ttl)?;
    let now = now_ms();
    let ttl = b.ttl_ms.unwrap_or(crate::time::millis(leases.ttl));
    let op = match verb {
        LeaseVerb::Acquire => LeaseOp::Acquire {
            resource_type: b.resource_type.clone(),
        },
        LeaseVerb::Renew => LeaseOp::Renew,
        LeaseVerb::Release => LeaseOp::Release,
    };
    let call = crate::workerproto::LeaseCall {
        op,
        resource_id: id,
        holder_id: &b.holder_id,
        ttl_ms: ttl,
        actor: &who.actor(),
        request_id: incoming.request_id,
    };
    match crate::workerproto::lease_action(&ctx.store, call, now) {
        Ok(lease) => Ok(Reply::json(200, to_json(&LeaseJson::new(&lease, now)))),
        Err(crate::workerproto::LeaseActionError::Invalid(m)) => Err(ApiError::bad_request(m)),
        Err(crate::workerproto::LeaseActionError::Refused(e)) => Err(lease_error(id, e)),
        Err(crate::workerproto::LeaseActionError::Store(e)) => Err(e.into()),
    }
}
