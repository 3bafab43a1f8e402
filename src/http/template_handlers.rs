//! `/api/v1/templates`: saved spawn bodies (see `crate::templates`).

use serde_json::Value;

use super::Ctx;
use super::api::{ApiError, SandboxJson, TemplateJson, duration_field, parse_template, to_json};
use super::handlers::{Incoming, Reply};
use crate::controlplane::SpawnRequest;
use crate::sandboxes::OwnerScope;
use crate::templates::{Saved, Template};
use crate::time::now_ms;

/// Whose templates a caller sees and writes: the owner its key is bound
/// to; for an admin key or no keys, the one `X-User-ID` names (checked by
/// `authorize`); else nobody's (`""`, also a legacy unbound key's).
fn owner(incoming: &Incoming<'_>, scope: &OwnerScope) -> String {
    scope
        .fixed_owner()
        .or(incoming.presented.user_id)
        .unwrap_or("")
        .to_owned()
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        404,
        "TEMPLATE_NOT_FOUND",
        format!("template {name:?} not found"),
    )
}

pub fn list(ctx: &Ctx, incoming: &Incoming<'_>, scope: &OwnerScope) -> Result<Reply, ApiError> {
    let templates = ctx.store.list_templates(&owner(incoming, scope))?;
    let shown: Vec<TemplateJson<'_>> = templates.iter().map(TemplateJson::from).collect();
    Ok(Reply::json(200, to_json(&shown)))
}

pub fn save(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let template = Template {
        owner_id: owner(incoming, scope),
        ..parse_template(body)?
    };
    let status = match ctx.store.save_template(template.clone(), now_ms())? {
        Saved::Created => 201,
        Saved::Updated => 200,
        Saved::Full => {
            return Err(ApiError::new(
                429,
                "RESOURCE_LIMIT",
                format!(
                    "at most {} templates per owner",
                    crate::templates::MAX_PER_OWNER
                ),
            ));
        }
    };
    let saved = ctx
        .store
        .get_template(&template.owner_id, &template.name)?
        .ok_or_else(|| not_found(&template.name))?;
    Ok(Reply::json(status, to_json(&TemplateJson::from(&saved))))
}

pub fn get(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    name: &str,
) -> Result<Reply, ApiError> {
    let template = ctx
        .store
        .get_template(&owner(incoming, scope), name)?
        .ok_or_else(|| not_found(name))?;
    Ok(Reply::json(200, to_json(&TemplateJson::from(&template))))
}

/// Deletes the caller's own template: one of nobody's is only deleted by
/// a caller who is nobody.
pub fn delete(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    name: &str,
) -> Result<Reply, ApiError> {
    if !ctx.store.delete_template(&owner(incoming, scope), name)? {
        return Err(not_found(name));
    }
    Ok(Reply::json(
        200,
        to_json(&serde_json::json!({"name": name, "deleted": true})),
    ))
}

/// Spawns the template's sandbox, as `POST /api/v1/sandboxes` with its
/// fields would (headers included). The body is empty or `{}`.
pub fn spawn(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    scope: &OwnerScope,
    name: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        match super::api::json_body(body)? {
            Value::Object(fields) if fields.is_empty() => {}
            _ => {
                return Err(ApiError::bad_request(
                    "a template spawn takes no fields: send no body or {}",
                ));
            }
        }
    }
    let t = ctx
        .store
        .get_template(&owner(incoming, scope), name)?
        .ok_or_else(|| not_found(name))?;
    let ttl_ms = duration_field(
        "ttl",
        &Value::String(t.ttl.clone()),
        crate::time::MAX_DURATION,
    )?;
    let req = super::sandbox_handlers::with_headers(
        incoming,
        scope,
        SpawnRequest {
            image: Some(t.image),
            provider: (!t.provider.is_empty()).then_some(t.provider),
            memory_mb: Some(u64::from(t.memory_mb)),
            vcpus: Some(u64::from(t.vcpus)),
            ttl_ms: Some(ttl_ms),
            metadata: t.metadata,
            ..SpawnRequest::default()
        },
    )?;
    let (sandbox, _replayed) = ctx.lifecycle.spawn(&req)?;
    Ok(Reply::json(201, to_json(&SandboxJson::from(&sandbox))))
}
