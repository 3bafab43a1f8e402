//! The worker protocol: the single source of the wire contract spoken on the
//! admin socket (and, later, between the control plane and remote workers).
//!
//! Request envelope: `{"id","method","worker_id","lease","params"}`; reply:
//! `{"id","ok":true,"result"}` or `{"id","ok":false,"error":{"code","message"}}`.
//! Error codes are the closed set [`ErrorCode`]. The six worker methods, the
//! admin methods, which of them mutate and need a lease, and which scope each
//! needs are all declared here, in [`Method`]. Parsing is total: any bytes
//! give an envelope or an error with a code from the set, never a panic.

use serde_json::{Map, Value, json};

use crate::json::JsonError;
use crate::leases::LeaseError;

/// Closed set of error codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    ParseError,
    InvalidRequest,
    UnknownMethod,
    InvalidParams,
    Forbidden,
    NotFound,
    Conflict,
    LeaseRequired,
    LeaseConflict,
    LeaseExpired,
    StaleGeneration,
    ResourceLimit,
    Unavailable,
    LineTooLong,
    TooManyConnections,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::ParseError,
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownMethod,
        ErrorCode::InvalidParams,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::LeaseRequired,
        ErrorCode::LeaseConflict,
        ErrorCode::LeaseExpired,
        ErrorCode::StaleGeneration,
        ErrorCode::ResourceLimit,
        ErrorCode::Unavailable,
        ErrorCode::LineTooLong,
        ErrorCode::TooManyConnections,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LeaseRequired => "lease_required",
            ErrorCode::LeaseConflict => "lease_conflict",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::StaleGeneration => "stale_generation",
            ErrorCode::ResourceLimit => "resource_limit",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error reply: a code from the closed set and a message for people.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ProtoError {
        ProtoError {
            code,
            message: message.into(),
        }
    }
}

impl From<LeaseError> for ProtoError {
    fn from(e: LeaseError) -> ProtoError {
        let code = match &e {
            LeaseError::Conflict { .. } | LeaseError::NotHolder { .. } => ErrorCode::LeaseConflict,
            LeaseError::Expired { .. } => ErrorCode::LeaseExpired,
            LeaseError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
            LeaseError::NotFound => ErrorCode::NotFound,
            LeaseError::Invalid(_) => ErrorCode::InvalidParams,
        };
        ProtoError::new(code, e.to_string())
    }
}

/// Worker credentials' scopes. User and admin keys are never worker
/// credentials, and worker scopes never grant admin methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Heartbeat,
    Spawn,
    Destroy,
    Status,
    Lease,
    Shutdown,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Heartbeat,
        Scope::Spawn,
        Scope::Destroy,
        Scope::Status,
        Scope::Lease,
        Scope::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Heartbeat => "worker:heartbeat",
            Scope::Spawn => "worker:spawn",
            Scope::Destroy => "worker:destroy",
            Scope::Status => "worker:status",
            Scope::Lease => "worker:lease",
            Scope::Shutdown => "worker:shutdown",
        }
    }
}

/// What a validated credential allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub worker_id: String,
    pub scopes: Vec<Scope>,
    /// Epoch milliseconds; `None` = does not expire (a socket peer's
    /// credentials last as long as its connection).
    pub expires_ms: Option<i64>,
    /// Admin methods are allowed (the socket peer's access level).
    pub admin: bool,
}

/// Admin socket access levels, from the peer's uid/gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Admin,
}

impl Claims {
    pub fn for_access(access: Access, worker_id: &str) -> Claims {
        match access {
            Access::Admin => Claims {
                worker_id: worker_id.to_owned(),
                scopes: Scope::ALL.to_vec(),
                expires_ms: None,
                admin: true,
            },
            Access::Read => Claims {
                worker_id: worker_id.to_owned(),
                scopes: vec![Scope::Status],
                expires_ms: None,
                admin: false,
            },
        }
    }

    pub fn allows(&self, method: Method, now_ms: i64) -> bool {
        if self.expires_ms.is_some_and(|e| now_ms >= e) {
            return false;
        }
        match method.scope() {
            Some(scope) => self.scopes.contains(&scope),
            None if method.mutates() => self.admin,
            None => true,
        }
    }
}

macro_rules! methods {
    ($($variant:ident = $name:literal, lease: $lease:literal, mutates: $mutates:literal, scope: $scope:expr, params: $params:literal;)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Method { $($variant,)* }

        impl Method {
            pub const ALL: &'static [Method] = &[$(Method::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(Method::$variant => $name,)* }
            }

            pub fn parse(name: &str) -> Option<Method> {
                match name { $($name => Some(Method::$variant),)* _ => None }
            }

            /// Mutating worker methods need a lease token.
            pub fn needs_lease(self) -> bool {
                match self { $(Method::$variant => $lease,)* }
            }

            /// Changes state (logged and audited with the peer's identity).
            pub fn mutates(self) -> bool {
                match self { $(Method::$variant => $mutates,)* }
            }

            /// The worker scope a method needs; `None` for admin methods.
            pub fn scope(self) -> Option<Scope> {
                match self { $(Method::$variant => $scope,)* }
            }

            /// One line describing the params, for `help`.
            pub fn params_help(self) -> &'static str {
                match self { $(Method::$variant => $params,)* }
            }
        }
    };
}

methods! {
    WorkerHeartbeat = "worker.heartbeat", lease: false, mutates: true, scope: Some(Scope::Heartbeat), params: "{hostname?, status?, providers?, capabilities?, capacity?{max_sandboxes}}";
    WorkerSpawn = "worker.spawn", lease: true, mutates: true, scope: Some(Scope::Spawn), params: "{image?, provider?, memory_mb?, vcpus?, ttl?, owner_id?, metadata?} with lease{resource_id = the new sandbox id}";
    WorkerDestroy = "worker.destroy", lease: true, mutates: true, scope: Some(Scope::Destroy), params: "{} with lease{resource_id = the sandbox}";
    WorkerStatus = "worker.status", lease: false, mutates: false, scope: Some(Scope::Status), params: "{}";
    WorkerRenewLease = "worker.renew_lease", lease: true, mutates: true, scope: Some(Scope::Lease), params: "{ttl?} with the lease to renew";
    WorkerShutdown = "worker.shutdown", lease: false, mutates: true, scope: Some(Scope::Shutdown), params: "{deadline?: duration, mode?: \"stop\"|\"drain\"}";
    WorkerList = "worker.list", lease: false, mutates: false, scope: None, params: "{}";
    WorkerGet = "worker.get", lease: false, mutates: false, scope: None, params: "{id}";
    WorkerDelete = "worker.delete", lease: false, mutates: true, scope: None, params: "{id, force?}";
    WorkerDrain = "worker.drain", lease: false, mutates: true, scope: None, params: "{id}";
    WorkerUndrain = "worker.undrain", lease: false, mutates: true, scope: None, params: "{id}";
    SandboxList = "sandbox.list", lease: false, mutates: false, scope: None, params: "{}";
    SandboxGet = "sandbox.get", lease: false, mutates: false, scope: None, params: "{id}";
    SandboxSpawn = "sandbox.spawn", lease: false, mutates: true, scope: None, params: "{image?, provider?, memory_mb?, vcpus?, ttl?, owner_id?, metadata?}";
    SandboxDestroy = "sandbox.destroy", lease: false, mutates: true, scope: None, params: "{id}";
    LeaseAcquire = "lease.acquire", lease: false, mutates: true, scope: None, params: "{resource_id, resource_type?, holder_id, ttl?}";
    LeaseRenew = "lease.renew", lease: false, mutates: true, scope: None, params: "{resource_id, holder_id, ttl?}";
    LeaseRelease = "lease.release", lease: false, mutates: true, scope: None, params: "{resource_id, holder_id}";
    LeaseGet = "lease.get", lease: false, mutates: false, scope: None, params: "{resource_id}";
    LeaseList = "lease.list", lease: false, mutates: false, scope: None, params: "{}";
    SchedulerStatus = "scheduler.status", lease: false, mutates: false, scope: None, params: "{}";
    SchedulerExplain = "scheduler.explain", lease: false, mutates: false, scope: None, params: "{provider?, owner_id?, ttl?}";
    DaemonStatus = "daemon.status", lease: false, mutates: false, scope: None, params: "{}";
    DaemonDiagnostics = "daemon.diagnostics", lease: false, mutates: false, scope: None, params: "{}";
    DaemonReload = "daemon.reload", lease: false, mutates: true, scope: None, params: "{}";
    DaemonLogLevel = "daemon.log_level", lease: false, mutates: true, scope: None, params: "{level}";
    EventsSubscribe = "events.subscribe", lease: false, mutates: false, scope: None, params: "{topics?: [\"worker\", \"lease\", \"sandbox\", \"admission\"]}";
    Help = "help", lease: false, mutates: false, scope: None, params: "{method?}";
}

/// The lease token presented with a mutating worker method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken {
    pub resource_id: String,
    pub holder_id: String,
    pub generation: u64,
    pub expires_at_ms: i64,
}

/// A parsed request envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: Option<String>,
    pub method: Method,
    pub worker_id: Option<String>,
    pub lease: Option<LeaseToken>,
    pub params: Map<String, Value>,
}

/// A parse failure, with the request id when it could be read (so the reply
/// can still be matched).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: Option<String>,
    pub error: ProtoError,
}

const MAX_ID_LEN: usize = 256;

/// Parses one line (without its newline) into an envelope.
pub fn parse_envelope(line: &[u8]) -> Result<Envelope, Rejected> {
    let reject = |id: Option<String>, code, message: String| Rejected {
        id,
        error: ProtoError::new(code, message),
    };
    let value = crate::json::parse(line).map_err(|e| match e {
        JsonError::Syntax(e) => reject(None, ErrorCode::ParseError, format!("invalid JSON: {e}")),
        // Refused like any other bad member, so a client never acts on a
        // value other than the one it (or a log) read first.
        duplicate @ JsonError::DuplicateKey(_) => {
            reject(None, ErrorCode::InvalidParams, duplicate.to_string())
        }
    })?;
    let Value::Object(mut fields) = value else {
        return Err(reject(
            None,
            ErrorCode::InvalidRequest,
            "a request must be a JSON object".into(),
        ));
    };
    let id = match fields.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_ID_LEN => Some(s),
        Some(Value::String(_)) => {
            return Err(reject(
                None,
                ErrorCode::InvalidRequest,
                format!("`id` is longer than {MAX_ID_LEN} bytes"),
            ));
        }
        Some(_) => {
            return Err(reject(
                None,
                ErrorCode::InvalidRequest,
                "`id` must be a string".into(),
            ));
        }
    };
    let invalid = |message: String| reject(id.clone(), ErrorCode::InvalidRequest, message);
    let method_name = match fields.remove("method") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(invalid("`method` must be a string".into())),
        None => return Err(invalid("`method` is required".into())),
    };
    let worker_id = match fields.remove("worker_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(invalid("`worker_id` must be a string".into())),
    };
    let lease = match fields.remove("lease") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            parse_lease_token(v).map_err(|m| reject(id.clone(), ErrorCode::InvalidRequest, m))?,
        ),
    };
    let params = match fields.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(invalid("`params` must be an object".into())),
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(invalid(format!(
            "unknown field `{unknown}` (expected id, method, worker_id, lease, params)"
        )));
    }
    let method = Method::parse(&method_name).ok_or_else(|| {
        reject(
            id.clone(),
            ErrorCode::UnknownMethod,
            format!("unknown method {method_name:?}; try \"help\""),
        )
    })?;
    Ok(Envelope {
        id,
        method,
        worker_id,
        lease,
        params,
    })
}

fn parse_lease_token(value: Value) -> Result<LeaseToken, String> {
    let Value::Object(mut f) = value else {
        return Err("`lease` must be an object".into());
    };
    let mut string = |key: &str| match f.remove(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(format!("`lease.{key}` must be a non-empty string")),
    };
    let resource_id = string("resource_id")?;
    let holder_id = string("holder_id")?;
    let expires = string("expires_at")?;
    let expires_at_ms = crate::time::parse_rfc3339(&expires)
        .ok_or("`lease.expires_at` must be an RFC 3339 UTC time")?;
    let generation = match f.remove("generation") {
        Some(v) => v
            .as_u64()
            .filter(|g| *g > 0)
            .ok_or("`lease.generation` must be a positive integer")?,
        None => return Err("`lease.generation` is required".into()),
    };
    if let Some(unknown) = f.keys().next() {
        return Err(format!("unknown field `lease.{unknown}`"));
    }
    Ok(LeaseToken {
        resource_id,
        holder_id,
        generation,
        expires_at_ms,
    })
}

/// The acting worker's checks on a presented lease, before anything
/// changes: present when the method needs one, held by the actor,
/// unexpired, and not older than the highest generation seen.
pub fn check_lease(
    method: Method,
    lease: Option<&LeaseToken>,
    actor: &str,
    highest_seen: u64,
    now_ms: i64,
) -> Result<(), ProtoError> {
    if !method.needs_lease() {
        return Ok(());
    }
    let Some(lease) = lease else {
        return Err(ProtoError::new(
            ErrorCode::LeaseRequired,
            format!("{} needs a lease", method.name()),
        ));
    };
    if lease.holder_id != actor {
        return Err(ProtoError::new(
            ErrorCode::LeaseConflict,
            format!(
                "lease on {} names holder {}, not this worker ({actor})",
                lease.resource_id, lease.holder_id
            ),
        ));
    }
    if now_ms >= lease.expires_at_ms {
        return Err(ProtoError::new(
            ErrorCode::LeaseExpired,
            format!("lease on {} has expired", lease.resource_id),
        ));
    }
    if lease.generation < highest_seen {
        return Err(ProtoError::new(
            ErrorCode::StaleGeneration,
            format!(
                "lease generation {} on {} is older than {highest_seen}",
                lease.generation, lease.resource_id
            ),
        ));
    }
    Ok(())
}

pub fn ok_reply(id: Option<&str>, result: &Value) -> String {
    #[derive(serde::Serialize)]
    struct OkReply<'a> {
        id: Option<&'a str>,
        ok: bool,
        result: &'a Value,
    }
    serde_json::to_string(&OkReply {
        id,
        ok: true,
        result,
    })
    .unwrap_or_else(|e| unserialisable(id, &e))
}

/// Unreachable for `Value`s and strings (their map keys are strings), but
/// answered rather than panicked on.
fn unserialisable(id: Option<&str>, e: &serde_json::Error) -> String {
    error_reply(
        id,
        &ProtoError::new(
            ErrorCode::Internal,
            format!("cannot serialise the reply: {e}"),
        ),
    )
}

/// [`ok_reply`] around a result that is already serialised JSON.
pub fn ok_reply_serialized(id: Option<&str>, result: &str) -> String {
    let id = match serde_json::to_string(&id) {
        Ok(id) => id,
        Err(e) => return unserialisable(None, &e),
    };
    // Room for the envelope and the newline the writer adds.
    let mut line = String::with_capacity(id.len() + result.len() + 32);
    line.push_str("{\"id\":");
    line.push_str(&id);
    line.push_str(",\"ok\":true,\"result\":");
    line.push_str(result);
    line.push('}');
    line
}

pub fn error_reply(id: Option<&str>, error: &ProtoError) -> String {
    json!({"id": id, "ok": false, "error": {"code": error.code.as_str(), "message": error.message}})
        .to_string()
}

/// The greeting line written on connect.
pub fn greeting(worker_id: &str) -> String {
    let methods: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
    json!({
        "protocol": "stacyvm-workerproto",
        "version": 1,
        "daemon": "stacyvmd",
        "daemon_version": env!("CARGO_PKG_VERSION"),
        "worker_id": worker_id,
        "methods": methods,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn envelopes() {
        let e = parse_envelope(br#"{"id":"1","method":"worker.status"}"#).unwrap();
        assert_eq!(
            (e.id.as_deref(), e.method),
            (Some("1"), Method::WorkerStatus)
        );
        let e = parse_envelope(
            br#"{"id":"2","method":"worker.destroy","worker_id":"local","lease":{"resource_id":"sb-1","holder_id":"local","generation":4,"expires_at":"2026-05-09T10:31:00Z"},"params":{}}"#,
        )
        .unwrap();
        assert_eq!(e.lease.unwrap().generation, 4);
        let table: &[(&[u8], ErrorCode)] = &[
            (b"{", ErrorCode::ParseError),
            (b"\xff\xfe", ErrorCode::ParseError),
            (b"[1]", ErrorCode::InvalidRequest),
            (b"{}", ErrorCode::InvalidRequest),
            (br#"{"id":5,"method":"help"}"#, ErrorCode::InvalidRequest),
            (br#"{"method":"nope"}"#, ErrorCode::UnknownMethod),
            (br#"{"method":"help","extra":1}"#, ErrorCode::InvalidRequest),
            (
                br#"{"method":"help","params":[]}"#,
                ErrorCode::InvalidRequest,
            ),
            (
                br#"{"method":"worker.destroy","lease":{"resource_id":"x"}}"#,
                ErrorCode::InvalidRequest,
            ),
        ];
        for (line, code) in table {
            assert_eq!(
                parse_envelope(line).unwrap_err().error.code,
                *code,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // The id survives a later error, so the reply can be matched.
        assert_eq!(
            parse_envelope(br#"{"id":"7","method":"nope"}"#)
                .unwrap_err()
                .id
                .as_deref(),
            Some("7")
        );
    }

    #[test]
    fn both_ok_replies_have_the_same_shape() {
        for id in [None, Some("1"), Some("quote \" and \\ and \u{1}")] {
            let result = json!({"a": [1, "x"], "b": null});
            let from_value: Value = serde_json::from_str(&ok_reply(id, &result)).unwrap();
            let serialized = ok_reply_serialized(id, &result.to_string());
            let from_text: Value = serde_json::from_str(&serialized).unwrap();
            assert_eq!(from_value, from_text, "{serialized}");
            assert_eq!(from_text, json!({"id": id, "ok": true, "result": result}));
        }
    }

    #[test]
    fn lease_checks() {
        let token = LeaseToken {
            resource_id: "sb-1".into(),
            holder_id: "local".into(),
            generation: 4,
            expires_at_ms: 1000,
        };
        assert!(check_lease(Method::WorkerStatus, None, "local", 0, 0).is_ok());
        let code = |r: Result<(), ProtoError>| r.unwrap_err().code;
        assert_eq!(
            code(check_lease(Method::WorkerDestroy, None, "local", 0, 0)),
            ErrorCode::LeaseRequired
        );
        assert_eq!(
            code(check_lease(
                Method::WorkerDestroy,
                Some(&token),
                "other",
                0,
                0
            )),
            ErrorCode::LeaseConflict
        );
        assert_eq!(
            code(check_lease(
                Method::WorkerDestroy,
                Some(&token),
                "local",
                0,
                1000
            )),
            ErrorCode::LeaseExpired
        );
        assert_eq!(
            code(check_lease(
                Method::WorkerDestroy,
                Some(&token),
                "local",
                5,
                0
            )),
            ErrorCode::StaleGeneration
        );
        assert!(check_lease(Method::WorkerDestroy, Some(&token), "local", 4, 999).is_ok());
    }

    #[test]
    fn scopes() {
        let read = Claims::for_access(Access::Read, "local");
        assert!(read.allows(Method::WorkerStatus, 0));
        assert!(read.allows(Method::SandboxList, 0));
        assert!(!read.allows(Method::SandboxDestroy, 0));
        assert!(!read.allows(Method::WorkerSpawn, 0));
        let admin = Claims::for_access(Access::Admin, "local");
        assert!(Method::ALL.iter().all(|m| admin.allows(*m, 0)));
        let expired = Claims {
            expires_ms: Some(10),
            ..admin
        };
        assert!(!expired.allows(Method::WorkerStatus, 10));
        let mutating_worker_methods: Vec<&str> = Method::ALL
            .iter()
            .filter(|m| m.needs_lease())
            .map(|m| m.name())
            .collect();
        assert_eq!(
            mutating_worker_methods,
            vec!["worker.spawn", "worker.destroy", "worker.renew_lease"]
        );
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_envelope_or_a_known_code(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Err(r) = parse_envelope(&line) {
                prop_assert!(ErrorCode::ALL.contains(&r.error.code));
            }
        }

        #[test]
        fn any_json_gives_an_envelope_or_a_known_code(
            method in prop_oneof![Just("help".to_owned()), Just("worker.status".to_owned()), "[a-z.]{0,16}"],
            id in proptest::option::of("[ -~]{0,8}"),
            extra in proptest::option::of("[a-z]{1,6}"),
            params in proptest::option::of(prop_oneof![Just(json!({})), Just(json!([])), Just(json!(1)), Just(json!({"x": null}))]),
        ) {
            let mut object = serde_json::Map::new();
            object.insert("method".into(), Value::String(method));
            if let Some(id) = id { object.insert("id".into(), Value::String(id)); }
            if let Some(extra) = extra { object.insert(extra, json!(true)); }
            if let Some(params) = params { object.insert("params".into(), params); }
            let line = Value::Object(object).to_string();
            if let Err(r) = parse_envelope(line.as_bytes()) {
                prop_assert!(ErrorCode::ALL.contains(&r.error.code));
            }
        }
    }
}

/// One lease action (`lease.acquire`, `lease.renew`, `lease.release`),
/// decoded by either edge: the REST route `POST /api/v1/admin/leases/{id}/{verb}`
/// and the admin socket method build the same call and run it through
/// [`lease_action`], so both edges validate, publish and audit alike.
pub struct LeaseCall<'a> {
    pub op: crate::store::LeaseOp,
    pub resource_id: &'a str,
    pub holder_id: &'a str,
    pub ttl_ms: i64,
    /// How audit rows and logs name the caller.
    pub actor: &'a str,
    pub request_id: &'a str,
}

impl LeaseCall<'_> {
    /// The audited action name, the same as the admin method's.
    pub fn action(&self) -> &'static str {
        match self.op {
            crate::store::LeaseOp::Acquire { .. } => "lease.acquire",
            crate::store::LeaseOp::Renew => "lease.renew",
            crate::store::LeaseOp::Release => "lease.release",
        }
    }
}

/// Why a lease action failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseActionError {
    /// A bad resource or holder id: refused before the store, changes nothing.
    #[error("invalid lease action: {0}")]
    Invalid(String),
    /// The store refused the action (conflict, expiry, stale generation, no
    /// lease); audited with the lease code as outcome.
    #[error("lease action refused: {0}")]
    Refused(LeaseError),
    /// The store could not run it (`StoreError` is not an `Error` type yet,
    /// so it is shown rather than kept as a source).
    #[error("lease action not stored: {0}")]
    Store(crate::store::StoreError),
}

impl From<crate::store::StoreError> for LeaseActionError {
    fn from(e: crate::store::StoreError) -> LeaseActionError {
        LeaseActionError::Store(e)
    }
}

/// A lease resource id: 1 to 255 bytes, no whitespace or control characters.
pub fn validate_resource_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 255 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("invalid resource id".to_owned());
    }
    Ok(())
}

/// Runs a lease action, the one rule set of both edges: both ids are
/// validated; a change is audited in its own transaction and published as
/// `lease.changed`; a refusal by the store is logged and commits nothing
/// (a refused acquire must stay cheaper than a granted one, PERFORMANCE.md
/// L3). The admin socket audits a refused command itself, as it audits
/// every mutating command (admin protocol).
pub fn lease_action(
    store: &crate::store::StoreHandle,
    call: LeaseCall<'_>,
    now_ms: i64,
) -> Result<crate::leases::Lease, LeaseActionError> {
    validate_resource_id(call.resource_id).map_err(LeaseActionError::Invalid)?;
    crate::workers::validate_worker_id(call.holder_id)
        .map_err(|e| LeaseActionError::Invalid(format!("holder_id: {e}")))?;
    let action = call.action();
    let audit = crate::store::AuditEntry::new(
        now_ms,
        call.actor,
        call.request_id,
        action,
        call.resource_id,
        call.holder_id,
    );
    match store.lease_op(
        call.op,
        call.resource_id,
        call.holder_id,
        call.ttl_ms,
        now_ms,
        audit,
    )? {
        Ok(lease) => {
            crate::events::publish(|| {
                crate::events::Event::LeaseChanged(crate::events::LeaseFigures {
                    resource_id: call.resource_id.to_owned(),
                    holder_id: lease.holder_id.clone(),
                    generation: lease.generation,
                })
            });
            Ok(lease)
        }
        Err(LeaseError::Invalid(m)) => Err(LeaseActionError::Invalid(m)),
        Err(e) => {
            log::info!(
                "{action} on {} for {} refused by {}: {e}",
                call.resource_id,
                call.holder_id,
                call.actor
            );
            Err(LeaseActionError::Refused(e))
        }
    }
}
