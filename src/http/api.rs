//! The JSON edge of the REST API: the error type and its one mapping to
//! status and code, the wire shapes of responses, and request-body parsing
//! with messages that name the offending field.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::scheduler::{SchedulerError, WorkerRef, WorkerView};
use crate::store::StoreError;
use crate::time::{MAX_DURATION, Rfc3339};
use crate::workers::{Capacity, Heartbeat, MAX_LIST_ITEMS, WorkerStatus, validate_name};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// For 405: the methods the path allows.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(400, "BAD_REQUEST", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError::new(401, "UNAUTHORIZED", m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(403, "FORBIDDEN", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(404, "NOT_FOUND", m)
    }
    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError {
            allow: Some(allow),
            ..ApiError::new(
                405,
                "METHOD_NOT_ALLOWED",
                format!("method not allowed; use {allow}"),
            )
        }
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, "CONFLICT", m)
    }
    pub fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            413,
            "PAYLOAD_TOO_LARGE",
            format!("request body is larger than {limit} bytes"),
        )
    }
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        ApiError::new(503, "UNAVAILABLE", m)
    }
    /// 507: the disk of the store is full; retry once space returns.
    pub fn storage_full(m: impl Into<String>) -> ApiError {
        ApiError::new(507, "STORAGE_FULL", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, "INTERNAL_ERROR", m)
    }

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"code": self.code, "message": self.message}))
            .unwrap_or_else(|_| {
                br#"{"code":"INTERNAL_ERROR","message":"error rendering failed"}"#.to_vec()
            })
    }
}

/// The one place store and scheduler failures become HTTP answers.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            StoreError::Database(_) => ApiError::internal(e.to_string()),
            StoreError::Full(_) => ApiError::storage_full(e.to_string()),
        }
    }
}

impl From<SchedulerError> for ApiError {
    fn from(e: SchedulerError) -> ApiError {
        match e {
            SchedulerError::Unavailable(_) => ApiError::unavailable(e.to_string()),
        }
    }
}

#[derive(Serialize)]
struct CapacityJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_sandboxes: Option<u32>,
}

/// The worker object of the API (StacyVM's fields plus stacyvmd's).
#[derive(Serialize)]
pub struct WorkerJson<'a> {
    id: &'a str,
    hostname: &'a str,
    status: &'static str,
    providers: &'a [String],
    capabilities: &'a [String],
    capacity: CapacityJson,
    last_heartbeat: Rfc3339,
    created_at: Rfc3339,
    updated_at: Rfc3339,
    stale: bool,
    health: &'static str,
    eligible: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ineligible_reason: Option<&'static str>,
    active_sandboxes: u32,
    last_seen_seconds: f64,
}

impl<'a> From<&'a WorkerView> for WorkerJson<'a> {
    fn from(v: &'a WorkerView) -> WorkerJson<'a> {
        WorkerJson::from(v.as_ref())
    }
}

impl<'a> From<WorkerRef<'a>> for WorkerJson<'a> {
    fn from(v: WorkerRef<'a>) -> WorkerJson<'a> {
        let w = v.worker;
        WorkerJson {
            id: &w.id,
            hostname: &w.hostname,
            status: w.status.as_str(),
            providers: &w.providers,
            capabilities: &w.capabilities,
            capacity: CapacityJson {
                max_sandboxes: w.capacity.max_sandboxes,
            },
            last_heartbeat: Rfc3339(w.last_heartbeat_ms),
            created_at: Rfc3339(w.created_at_ms),
            updated_at: Rfc3339(w.updated_at_ms),
            stale: v.stale,
            health: v.health.as_str(),
            eligible: v.ineligible.is_none(),
            ineligible_reason: v.ineligible.map(|r| r.as_str()),
            active_sandboxes: v.active_sandboxes,
            last_seen_seconds: (v.last_seen.as_secs_f64() * 1000.0).round() / 1000.0,
        }
    }
}

pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value)
        .unwrap_or_else(|e| ApiError::internal(format!("rendering failed: {e}")).body())
}

/// Parses a heartbeat body. Empty means "refresh only". Every field is
/// optional; unknown fields, wrong types and bad values are refused with a
/// message naming the field.
pub fn parse_heartbeat(id: &str, body: &[u8]) -> Result<Heartbeat, ApiError> {
    let mut hb = Heartbeat {
        id: id.to_owned(),
        ..Default::default()
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(hb);
    }
    let Value::Object(fields) = json_body(body)? else {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    };
    for (key, value) in &fields {
        match key.as_str() {
            "hostname" => {
                let s = string_field("hostname", value)?;
                validate_name("hostname", s).map_err(ApiError::bad_request)?;
                hb.hostname = Some(s.to_owned());
            }
            "status" => {
                let s = string_field("status", value)?;
                hb.status = Some(WorkerStatus::parse(s).ok_or_else(|| {
                    let allowed: Vec<&str> = WorkerStatus::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::bad_request(format!(
                        "field `status` must be one of {}",
                        allowed.join(", ")
                    ))
                })?);
            }
            "providers" => hb.providers = Some(name_list("providers", value)?),
            "capabilities" => hb.capabilities = Some(name_list("capabilities", value)?),
            "capacity" => hb.capacity = Some(capacity(value)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{other}` (expected hostname, status, providers, capabilities, capacity)"
                )));
            }
        }
    }
    Ok(hb)
}

fn string_field<'v>(field: &str, value: &'v Value) -> Result<&'v str, ApiError> {
    value
        .as_str()
        .ok_or_else(|| ApiError::bad_request(format!("field `{field}` must be a string")))
}

fn name_list(field: &str, value: &Value) -> Result<Vec<String>, ApiError> {
    let items = value.as_array().ok_or_else(|| {
        ApiError::bad_request(format!("field `{field}` must be an array of strings"))
    })?;
    if items.len() > MAX_LIST_ITEMS {
        return Err(ApiError::bad_request(format!(
            "field `{field}` has more than {MAX_LIST_ITEMS} items"
        )));
    }
    items
        .iter()
        .map(|item| {
            let s = item.as_str().ok_or_else(|| {
                ApiError::bad_request(format!("field `{field}` must be an array of strings"))
            })?;
            if s.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "field `{field}` must not contain empty names"
                )));
            }
            validate_name(field, s).map_err(ApiError::bad_request)?;
            Ok(s.to_owned())
        })
        .collect()
}

const MAX_CAPACITY: u64 = 1_000_000;

fn capacity(value: &Value) -> Result<Capacity, ApiError> {
    let fields = value
        .as_object()
        .ok_or_else(|| ApiError::bad_request("field `capacity` must be an object"))?;
    let mut c = Capacity::default();
    for (key, v) in fields {
        match key.as_str() {
            "max_sandboxes" => {
                let n = v.as_u64().filter(|n| *n <= MAX_CAPACITY).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "field `capacity.max_sandboxes` must be an integer from 0 to {MAX_CAPACITY}"
                    ))
                })?;
                c.max_sandboxes = Some(n as u32);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `capacity.{other}` (expected max_sandboxes)"
                )));
            }
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_bodies() {
        let ok = parse_heartbeat(
            "w",
            br#"{"hostname":"h","status":"","providers":["mock"],"capabilities":[],"capacity":{"max_sandboxes":3}}"#,
        )
        .unwrap();
        assert_eq!(ok.status, Some(WorkerStatus::Online));
        assert_eq!(
            ok.capacity,
            Some(Capacity {
                max_sandboxes: Some(3)
            })
        );
        assert_eq!(
            parse_heartbeat("w", b"").unwrap(),
            Heartbeat {
                id: "w".into(),
                ..Default::default()
            }
        );
        let bad: &[(&[u8], &str)] = &[
            (b"{", "malformed JSON"),
            (b"[]", "JSON object"),
            (br#"{"status":5}"#, "`status`"),
            (br#"{"status":"sleepy"}"#, "`status`"),
            (br#"{"providers":"x"}"#, "`providers`"),
            (br#"{"providers":[1]}"#, "`providers`"),
            (
                br#"{"capacity":{"max_sandboxes":-1}}"#,
                "`capacity.max_sandboxes`",
            ),
            (
                br#"{"capacity":{"max_sandboxes":1.5}}"#,
                "`capacity.max_sandboxes`",
            ),
            (br#"{"capacity":{"cpus":1}}"#, "`capacity.cpus`"),
            (br#"{"extra":1}"#, "`extra`"),
            (br#"{"hostname":"a\u0000b"}"#, "`hostname`"),
        ];
        for (body, needle) in bad {
            let e = parse_heartbeat("w", body).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(
                e.message.contains(needle),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_heartbeat("w", &body);
        }
    }
}

/// The one place lifecycle failures become HTTP answers.
impl From<crate::controlplane::LifecycleError> for ApiError {
    fn from(e: crate::controlplane::LifecycleError) -> ApiError {
        use crate::controlplane::LifecycleError as L;
        match e {
            L::Invalid(m) => ApiError::bad_request(m),
            L::NotFound(m) => ApiError::not_found(m),
            L::Conflict(m) => ApiError::conflict(m),
            L::Denied(a) => {
                let reason = a.denial.map_or("unknown", |d| d.as_str());
                let mut message = format!("admission denied: {reason}");
                if !a.rejections.is_empty() {
                    let parts: Vec<String> = a
                        .rejections
                        .iter()
                        .map(|(r, n)| format!("{n} {r}"))
                        .collect();
                    message.push_str(&format!(" (workers filtered: {})", parts.join(", ")));
                }
                ApiError::new(429, "RESOURCE_LIMIT", message)
            }
            L::Provider(m) | L::Internal(m) => ApiError::internal(m),
            L::Unavailable(m) => ApiError::unavailable(m),
            L::StorageFull(m) => ApiError::storage_full(m),
        }
    }
}

#[derive(Serialize)]
pub struct SandboxJson<'a> {
    id: &'a str,
    state: &'static str,
    provider: &'a str,
    image: &'a str,
    memory_mb: u32,
    vcpus: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    owner_id: &'a str,
    worker_id: &'a str,
    created_at: Rfc3339,
    expires_at: Rfc3339,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    metadata: &'a std::collections::BTreeMap<String, String>,
}

impl<'a> From<&'a crate::sandboxes::Sandbox> for SandboxJson<'a> {
    fn from(s: &'a crate::sandboxes::Sandbox) -> SandboxJson<'a> {
        SandboxJson {
            id: &s.id,
            state: s.state.as_str(),
            provider: &s.provider,
            image: &s.image,
            memory_mb: s.memory_mb,
            vcpus: s.vcpus,
            owner_id: &s.owner_id,
            worker_id: &s.worker_id,
            created_at: Rfc3339(s.created_at_ms),
            expires_at: Rfc3339(s.expires_at_ms),
            metadata: &s.metadata,
        }
    }
}

#[derive(Serialize)]
pub struct LeaseJson<'a> {
    resource_id: &'a str,
    resource_type: &'a str,
    holder_id: &'a str,
    generation: u64,
    acquired_at: Rfc3339,
    renewed_at: Rfc3339,
    expires_at: Rfc3339,
    expired: bool,
    transitions: u64,
}

impl<'a> LeaseJson<'a> {
    pub fn new(l: &'a crate::leases::Lease, now_ms: i64) -> LeaseJson<'a> {
        LeaseJson {
            resource_id: &l.resource_id,
            resource_type: &l.resource_type,
            holder_id: &l.holder_id,
            generation: l.generation,
            acquired_at: Rfc3339(l.acquired_at_ms),
            renewed_at: Rfc3339(l.renewed_at_ms),
            expires_at: Rfc3339(l.expires_at_ms),
            expired: !l.is_active(now_ms),
            transitions: l.transitions,
        }
    }
}

fn object(body: &[u8]) -> Result<Option<serde_json::Map<String, Value>>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match json_body(body)? {
        Value::Object(fields) => Ok(Some(fields)),
        _ => Err(ApiError::bad_request("request body must be a JSON object")),
    }
}

/// Every JSON request body goes through here: malformed JSON and a key
/// repeated at any depth are both 400 `BAD_REQUEST`.
pub fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    crate::json::parse(body).map_err(|e| match e {
        crate::json::JsonError::Syntax(e) => {
            ApiError::bad_request(format!("malformed JSON body: {e}"))
        }
        duplicate => ApiError::bad_request(format!("{duplicate} in the JSON body")),
    })
}

/// A positive duration of at most `max`, in milliseconds.
pub fn duration_field(field: &str, value: &Value, max: Duration) -> Result<i64, ApiError> {
    let text = string_field(field, value)?;
    crate::time::parse_duration_within(text, Duration::from_millis(1), max)
        .map(crate::time::millis)
        .map_err(|e| ApiError::bad_request(format!("field `{field}`: {e}")))
}

fn count_field(field: &str, value: &Value) -> Result<u64, ApiError> {
    value
        .as_u64()
        .ok_or_else(|| ApiError::bad_request(format!("field `{field}` must be a positive integer")))
}

/// Parses a spawn (or admission) body into a request; the caller adds the
/// headers (`X-User-ID`, `Idempotency-Key`).
pub fn parse_spawn(body: &[u8]) -> Result<crate::controlplane::SpawnRequest, ApiError> {
    match object(body)? {
        Some(fields) => spawn_fields(&fields),
        None => Ok(crate::controlplane::SpawnRequest::default()),
    }
}

/// The fields of a spawn body, checked one by one.
fn spawn_fields(
    fields: &serde_json::Map<String, Value>,
) -> Result<crate::controlplane::SpawnRequest, ApiError> {
    use crate::sandboxes::{MAX_METADATA_ENTRIES, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN};
    let mut req = crate::controlplane::SpawnRequest::default();
    let mut template = None;
    for (key, value) in fields {
        match key.as_str() {
            "image" => req.image = Some(string_field("image", value)?.to_owned()),
            "template" => template = Some(string_field("template", value)?.to_owned()),
            "provider" => req.provider = Some(string_field("provider", value)?.to_owned()),
            "memory_mb" => req.memory_mb = Some(count_field("memory_mb", value)?),
            "vcpus" => req.vcpus = Some(count_field("vcpus", value)?),
            // Over `sandboxes.max_ttl` is an admission denial (429
            // `max_ttl`, as StacyVM answers); the parser's ceiling only
            // keeps the arithmetic sound.
            "ttl" => req.ttl_ms = Some(duration_field("ttl", value, MAX_DURATION)?),
            "owner_id" => req.owner_id = string_field("owner_id", value)?.to_owned(),
            "metadata" => {
                let map = value.as_object().ok_or_else(|| {
                    ApiError::bad_request("field `metadata` must be an object of strings")
                })?;
                if map.len() > MAX_METADATA_ENTRIES {
                    return Err(ApiError::bad_request(format!(
                        "field `metadata` has more than {MAX_METADATA_ENTRIES} entries"
                    )));
                }
                for (k, v) in map {
                    let v = v.as_str().ok_or_else(|| {
                        ApiError::bad_request(format!("field `metadata.{k}` must be a string"))
                    })?;
                    if k.is_empty()
                        || k.len() > MAX_METADATA_KEY_LEN
                        || v.len() > MAX_METADATA_VALUE_LEN
                    {
                        return Err(ApiError::bad_request(format!(
                            "field `metadata`: keys must be 1 to {MAX_METADATA_KEY_LEN} bytes, values at most {MAX_METADATA_VALUE_LEN}"
                        )));
                    }
                    req.metadata.insert(k.clone(), v.to_owned());
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{other}` (expected image, provider, memory_mb, vcpus, ttl, owner_id, metadata, template)"
                )));
            }
        }
    }
    // StacyVM's `template` names an image; an explicit `image` wins.
    if req.image.is_none() {
        req.image = template;
    }
    Ok(req)
}

/// A template body (`POST /api/v1/templates`): `name` and `image`, and the
/// spawn fields `provider` (`""` is the default one), `memory_mb`,
/// `vcpus`, `ttl` and `metadata`, checked as a spawn's.
pub fn parse_template(body: &[u8]) -> Result<crate::templates::Template, ApiError> {
    let mut fields = object(body)?
        .ok_or_else(|| ApiError::bad_request("fields `name` and `image` are required"))?;
    let name = match fields.remove("name") {
        Some(v) => string_field("name", &v)?.to_owned(),
        None => return Err(ApiError::bad_request("field `name` is required")),
    };
    crate::templates::validate_name(&name).map_err(ApiError::bad_request)?;
    if let Some(other) = ["owner_id", "template"]
        .iter()
        .find(|k| fields.contains_key(**k))
    {
        return Err(ApiError::bad_request(format!(
            "unknown field `{other}` (expected name, image, provider, memory_mb, vcpus, ttl, metadata)"
        )));
    }
    if fields.get("provider").and_then(Value::as_str) == Some("") {
        fields.remove("provider");
    }
    let ttl = match fields.get("ttl") {
        Some(v) => Some(string_field("ttl", v)?.to_owned()),
        None => None,
    };
    let req = spawn_fields(&fields)?;
    let small = |field: &str, v: Option<u64>, default: u32| {
        v.map_or(Ok(default), |n| {
            u32::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| ApiError::bad_request(format!("field `{field}` is out of range")))
        })
    };
    Ok(crate::templates::Template {
        owner_id: String::new(),
        name,
        image: req
            .image
            .ok_or_else(|| ApiError::bad_request("field `image` is required"))?,
        provider: req.provider.unwrap_or_default(),
        memory_mb: small(
            "memory_mb",
            req.memory_mb,
            crate::templates::DEFAULT_MEMORY_MB,
        )?,
        vcpus: small("vcpus", req.vcpus, crate::templates::DEFAULT_VCPUS)?,
        ttl: ttl.unwrap_or_else(|| crate::templates::DEFAULT_TTL.to_owned()),
        metadata: req.metadata,
        created_at_ms: 0,
        updated_at_ms: 0,
    })
}

/// A template as the API shows it (the SDK's `Template` fields, and when
/// it was written).
#[derive(Serialize)]
pub struct TemplateJson<'a> {
    name: &'a str,
    image: &'a str,
    provider: &'a str,
    memory_mb: u32,
    vcpus: u32,
    ttl: &'a str,
    metadata: &'a std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    owner_id: &'a str,
    created_at: Rfc3339,
    updated_at: Rfc3339,
}

impl<'a> From<&'a crate::templates::Template> for TemplateJson<'a> {
    fn from(t: &'a crate::templates::Template) -> TemplateJson<'a> {
        TemplateJson {
            name: &t.name,
            image: &t.image,
            provider: &t.provider,
            memory_mb: t.memory_mb,
            vcpus: t.vcpus,
            ttl: &t.ttl,
            metadata: &t.metadata,
            owner_id: &t.owner_id,
            created_at: Rfc3339(t.created_at_ms),
            updated_at: Rfc3339(t.updated_at_ms),
        }
    }
}

/// `{"ttl":"30m"}` for extend; at most `max` (`sandboxes.max_ttl`).
pub fn parse_ttl(body: &[u8], max: Duration) -> Result<i64, ApiError> {
    let fields = object(body)?.ok_or_else(|| ApiError::bad_request("field `ttl` is required"))?;
    let mut ttl = None;
    for (key, value) in &fields {
        match key.as_str() {
            "ttl" => ttl = Some(duration_field("ttl", value, max)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{other}` (expected ttl)"
                )));
            }
        }
    }
    ttl.ok_or_else(|| ApiError::bad_request("field `ttl` is required"))
}

/// Body of the admin lease actions: `holder_id`, and `ttl` / `resource_type`
/// where they apply.
pub struct LeaseBody {
    pub holder_id: String,
    pub ttl_ms: Option<i64>,
    pub resource_type: String,
}

/// `max_ttl` is `leases.max_ttl`.
pub fn parse_lease_body(body: &[u8], max_ttl: Duration) -> Result<LeaseBody, ApiError> {
    let fields =
        object(body)?.ok_or_else(|| ApiError::bad_request("field `holder_id` is required"))?;
    let mut out = LeaseBody {
        holder_id: String::new(),
        ttl_ms: None,
        resource_type: "sandbox".into(),
    };
    for (key, value) in &fields {
        match key.as_str() {
            "holder_id" => out.holder_id = string_field("holder_id", value)?.to_owned(),
            "ttl" => out.ttl_ms = Some(duration_field("ttl", value, max_ttl)?),
            "resource_type" => out.resource_type = string_field("resource_type", value)?.to_owned(),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{other}` (expected holder_id, ttl, resource_type)"
                )));
            }
        }
    }
    crate::workers::validate_worker_id(&out.holder_id)
        .map_err(|e| ApiError::bad_request(format!("field `holder_id`: {e}")))?;
    crate::workers::validate_name("resource_type", &out.resource_type)
        .map_err(ApiError::bad_request)?;
    Ok(out)
}
