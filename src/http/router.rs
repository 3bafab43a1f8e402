//! Routing: one match on (method, path segments) into a [`Route`]. Pure: no
//! I/O, no auth (that is decided per route in `handlers`).

/// Every route, for metric labels. `Unmatched` covers 404 and 405 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    Health,
    Live,
    Ready,
    ListWorkers,
    GetWorker,
    Heartbeat,
    DeleteWorker,
    Diagnostics,
    MetricsJson,
    MetricsPrometheus,
    Scheduler,
    Spawn,
    ListSandboxes,
    PruneSandboxes,
    Admission,
    GetSandbox,
    DestroySandbox,
    ExtendSandbox,
    Exec,
    Files,
    FilesList,
    FilesStat,
    FilesGlob,
    FilesMove,
    FilesChmod,
    Providers,
    ListLeases,
    GetLease,
    LeaseAction,
    ListTemplates,
    SaveTemplate,
    GetTemplate,
    DeleteTemplate,
    SpawnTemplate,
    QuotaSummary,
    Handoff,
    Unmatched,
}

impl RouteId {
    pub const ALL: [RouteId; 37] = [
        RouteId::Health,
        RouteId::Live,
        RouteId::Ready,
        RouteId::ListWorkers,
        RouteId::GetWorker,
        RouteId::Heartbeat,
        RouteId::DeleteWorker,
        RouteId::Diagnostics,
        RouteId::MetricsJson,
        RouteId::MetricsPrometheus,
        RouteId::Scheduler,
        RouteId::Spawn,
        RouteId::ListSandboxes,
        RouteId::PruneSandboxes,
        RouteId::Admission,
        RouteId::GetSandbox,
        RouteId::DestroySandbox,
        RouteId::ExtendSandbox,
        RouteId::Exec,
        RouteId::Files,
        RouteId::FilesList,
        RouteId::FilesStat,
        RouteId::FilesGlob,
        RouteId::FilesMove,
        RouteId::FilesChmod,
        RouteId::Providers,
        RouteId::ListLeases,
        RouteId::GetLease,
        RouteId::LeaseAction,
        RouteId::ListTemplates,
        RouteId::SaveTemplate,
        RouteId::GetTemplate,
        RouteId::DeleteTemplate,
        RouteId::SpawnTemplate,
        RouteId::QuotaSummary,
        RouteId::Handoff,
        RouteId::Unmatched,
    ];

    pub fn path_label(self) -> &'static str {
        match self {
            RouteId::Health => "/api/v1/health",
            RouteId::Live => "/api/v1/live",
            RouteId::Ready => "/api/v1/ready",
            RouteId::ListWorkers => "/api/v1/workers",
            RouteId::GetWorker => "/api/v1/workers/{id}",
            RouteId::Heartbeat => "/api/v1/admin/workers/{id}/heartbeat",
            RouteId::DeleteWorker => "/api/v1/admin/workers/{id}",
            RouteId::Diagnostics => "/api/v1/diagnostics",
            RouteId::MetricsJson => "/api/v1/metrics",
            RouteId::MetricsPrometheus => "/api/v1/metrics/prometheus",
            RouteId::Scheduler => "/api/v1/scheduler",
            RouteId::Spawn | RouteId::ListSandboxes | RouteId::PruneSandboxes => {
                "/api/v1/sandboxes"
            }
            RouteId::Admission => "/api/v1/sandboxes/admission",
            RouteId::GetSandbox | RouteId::DestroySandbox => "/api/v1/sandboxes/{id}",
            RouteId::ExtendSandbox => "/api/v1/sandboxes/{id}/extend",
            RouteId::Exec => "/api/v1/sandboxes/{id}/exec",
            RouteId::Files => "/api/v1/sandboxes/{id}/files",
            RouteId::FilesList => "/api/v1/sandboxes/{id}/files/list",
            RouteId::FilesStat => "/api/v1/sandboxes/{id}/files/stat",
            RouteId::FilesGlob => "/api/v1/sandboxes/{id}/files/glob",
            RouteId::FilesMove => "/api/v1/sandboxes/{id}/files/move",
            RouteId::FilesChmod => "/api/v1/sandboxes/{id}/files/chmod",
            RouteId::Providers => "/api/v1/providers",
            RouteId::ListLeases => "/api/v1/admin/leases",
            RouteId::GetLease => "/api/v1/admin/leases/{id}",
            RouteId::LeaseAction => "/api/v1/admin/leases/{id}/{action}",
            RouteId::ListTemplates | RouteId::SaveTemplate => "/api/v1/templates",
            RouteId::GetTemplate | RouteId::DeleteTemplate => "/api/v1/templates/{name}",
            RouteId::SpawnTemplate => "/api/v1/templates/{name}/spawn",
            RouteId::QuotaSummary => "/api/v1/quotas/summary",
            RouteId::Handoff => "/-/handoff",
            RouteId::Unmatched => "unmatched",
        }
    }

    pub fn method_label(self) -> &'static str {
        match self {
            RouteId::Heartbeat
            | RouteId::Spawn
            | RouteId::Admission
            | RouteId::ExtendSandbox
            | RouteId::Exec
            | RouteId::FilesMove
            | RouteId::FilesChmod
            | RouteId::LeaseAction
            | RouteId::SaveTemplate
            | RouteId::SpawnTemplate => "POST",
            RouteId::Files => "any",
            RouteId::DeleteWorker
            | RouteId::PruneSandboxes
            | RouteId::DestroySandbox
            | RouteId::DeleteTemplate => "DELETE",
            RouteId::Unmatched => "any",
            _ => "GET",
        }
    }
}

/// The route as the metrics count it: its place in [`RouteId::ALL`] and labels.
impl From<RouteId> for crate::metrics::RouteLabel {
    fn from(route: RouteId) -> Self {
        crate::metrics::RouteLabel {
            slot: route as usize,
            path: route.path_label(),
            method: route.method_label(),
        }
    }
}

const _: () = assert!(RouteId::ALL.len() <= crate::metrics::ROUTE_SLOTS);

/// Who may call a route when API keys are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    User,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Live,
    Ready,
    /// `admin` is true for the `/api/v1/admin/...` alias.
    ListWorkers {
        admin: bool,
    },
    GetWorker {
        id: String,
        admin: bool,
    },
    Heartbeat {
        id: String,
    },
    DeleteWorker {
        id: String,
    },
    Diagnostics {
        admin: bool,
    },
    MetricsJson,
    /// `root` is true for the scrape-config path `/metrics`.
    MetricsPrometheus {
        root: bool,
    },
    Scheduler,
    Spawn,
    ListSandboxes,
    PruneSandboxes,
    Admission,
    GetSandbox {
        id: String,
    },
    DestroySandbox {
        id: String,
    },
    ExtendSandbox {
        id: String,
    },
    Exec {
        id: String,
    },
    /// `/api/v1/sandboxes/{id}/files[/op]`.
    Files {
        id: String,
        op: FileRoute,
    },
    Providers,
    ListLeases,
    GetLease {
        id: String,
    },
    LeaseAction {
        id: String,
        action: LeaseVerb,
    },
    ListTemplates,
    SaveTemplate,
    GetTemplate {
        name: String,
    },
    DeleteTemplate {
        name: String,
    },
    SpawnTemplate {
        name: String,
    },
    QuotaSummary,
    /// The relay's pickup probe on a new internal connection (see `conn`).
    Handoff,
}

impl Route {
    pub fn id(&self) -> RouteId {
        match self {
            Route::Health => RouteId::Health,
            Route::Live => RouteId::Live,
            Route::Ready => RouteId::Ready,
            Route::ListWorkers { .. } => RouteId::ListWorkers,
            Route::GetWorker { .. } => RouteId::GetWorker,
            Route::Heartbeat { .. } => RouteId::Heartbeat,
            Route::DeleteWorker { .. } => RouteId::DeleteWorker,
            Route::Diagnostics { .. } => RouteId::Diagnostics,
            Route::MetricsJson => RouteId::MetricsJson,
            Route::MetricsPrometheus { .. } => RouteId::MetricsPrometheus,
            Route::Scheduler => RouteId::Scheduler,
            Route::Spawn => RouteId::Spawn,
            Route::ListSandboxes => RouteId::ListSandboxes,
            Route::PruneSandboxes => RouteId::PruneSandboxes,
            Route::Admission => RouteId::Admission,
            Route::GetSandbox { .. } => RouteId::GetSandbox,
            Route::DestroySandbox { .. } => RouteId::DestroySandbox,
            Route::ExtendSandbox { .. } => RouteId::ExtendSandbox,
            Route::Exec { .. } => RouteId::Exec,
            Route::Files { op, .. } => match op {
                FileRoute::Write | FileRoute::Upload | FileRoute::Read | FileRoute::Delete => {
                    RouteId::Files
                }
                FileRoute::List => RouteId::FilesList,
                FileRoute::Stat => RouteId::FilesStat,
                FileRoute::Glob => RouteId::FilesGlob,
                FileRoute::Move => RouteId::FilesMove,
                FileRoute::Chmod => RouteId::FilesChmod,
            },
            Route::Providers => RouteId::Providers,
            Route::ListLeases => RouteId::ListLeases,
            Route::GetLease { .. } => RouteId::GetLease,
            Route::LeaseAction { .. } => RouteId::LeaseAction,
            Route::ListTemplates => RouteId::ListTemplates,
            Route::SaveTemplate => RouteId::SaveTemplate,
            Route::GetTemplate { .. } => RouteId::GetTemplate,
            Route::DeleteTemplate { .. } => RouteId::DeleteTemplate,
            Route::SpawnTemplate { .. } => RouteId::SpawnTemplate,
            Route::QuotaSummary => RouteId::QuotaSummary,
            Route::Handoff => RouteId::Handoff,
        }
    }

    pub fn access(&self) -> Access {
        match self {
            Route::Health
            | Route::Live
            | Route::Ready
            | Route::Handoff
            | Route::MetricsPrometheus { root: true } => Access::Open,
            Route::ListWorkers { admin: true }
            | Route::GetWorker { admin: true, .. }
            | Route::Heartbeat { .. }
            | Route::DeleteWorker { .. }
            | Route::Diagnostics { admin: true } => Access::Admin,
            Route::ListWorkers { admin: false }
            | Route::GetWorker { admin: false, .. }
            | Route::Diagnostics { admin: false }
            | Route::MetricsJson
            | Route::MetricsPrometheus { root: false }
            | Route::Scheduler
            | Route::Spawn
            | Route::ListSandboxes
            | Route::PruneSandboxes
            | Route::Admission
            | Route::GetSandbox { .. }
            | Route::DestroySandbox { .. }
            | Route::ExtendSandbox { .. }
            | Route::Exec { .. }
            | Route::Files { .. }
            | Route::Providers
            | Route::ListTemplates
            | Route::SaveTemplate
            | Route::GetTemplate { .. }
            | Route::DeleteTemplate { .. }
            | Route::SpawnTemplate { .. }
            | Route::QuotaSummary => Access::User,
            Route::ListLeases | Route::GetLease { .. } | Route::LeaseAction { .. } => Access::Admin,
        }
    }
}

/// The file operations under `/api/v1/sandboxes/{id}/files`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRoute {
    /// `POST /files`: JSON `{"path","content","mode"?}`.
    Write,
    /// `PUT /files?path=`: the raw body is the content (streamed).
    Upload,
    /// `GET /files?path=`: the raw content.
    Read,
    Delete,
    List,
    Stat,
    Glob,
    Move,
    Chmod,
}

/// `POST /api/v1/admin/leases/{id}/{acquire|renew|release}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseVerb {
    Acquire,
    Renew,
    Release,
}

impl LeaseVerb {
    fn parse(text: &str) -> Option<LeaseVerb> {
        match text {
            "acquire" => Some(LeaseVerb::Acquire),
            "renew" => Some(LeaseVerb::Renew),
            "release" => Some(LeaseVerb::Release),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The path exists; these methods are allowed on it.
    MethodNotAllowed(&'static str),
    /// A path segment is not valid percent-encoded UTF-8.
    BadPath(String),
}

/// Matches a request. `path` excludes the query string.
pub fn route(method: &str, path: &str) -> Result<Route, RouteError> {
    let raw: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let mut segments = Vec::with_capacity(raw.len());
    for s in &raw {
        segments
            .push(percent_decode(s).ok_or_else(|| {
                RouteError::BadPath(format!("invalid percent-encoding in {s:?}"))
            })?);
    }
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let allow = |allowed: &'static str, ok: Route| {
        if allowed.split(", ").any(|m| m == method) {
            Ok(ok)
        } else {
            Err(RouteError::MethodNotAllowed(allowed))
        }
    };
    match seg.as_slice() {
        ["metrics"] => allow("GET", Route::MetricsPrometheus { root: true }),
        ["-", "handoff"] => allow("GET", Route::Handoff),
        ["api", "v1", rest @ ..] => match rest {
            ["health"] => allow("GET", Route::Health),
            ["live"] => allow("GET", Route::Live),
            ["ready"] => allow("GET", Route::Ready),
            ["workers"] => allow("GET", Route::ListWorkers { admin: false }),
            ["workers", id] => allow(
                "GET",
                Route::GetWorker {
                    id: (*id).to_owned(),
                    admin: false,
                },
            ),
            ["diagnostics"] => allow("GET", Route::Diagnostics { admin: false }),
            ["metrics"] => allow("GET", Route::MetricsJson),
            ["metrics", "prometheus"] => allow("GET", Route::MetricsPrometheus { root: false }),
            ["scheduler"] => allow("GET", Route::Scheduler),
            ["providers"] => allow("GET", Route::Providers),
            ["sandboxes"] => match method {
                "POST" => Ok(Route::Spawn),
                "DELETE" => Ok(Route::PruneSandboxes),
                _ => allow("GET, POST, DELETE", Route::ListSandboxes),
            },
            ["sandboxes", "admission"] => allow("POST", Route::Admission),
            ["sandboxes", id] => match method {
                "DELETE" => Ok(Route::DestroySandbox {
                    id: (*id).to_owned(),
                }),
                _ => allow(
                    "GET, DELETE",
                    Route::GetSandbox {
                        id: (*id).to_owned(),
                    },
                ),
            },
            ["sandboxes", id, "extend"] => allow(
                "POST",
                Route::ExtendSandbox {
                    id: (*id).to_owned(),
                },
            ),
            ["sandboxes", id, "exec"] => allow(
                "POST",
                Route::Exec {
                    id: (*id).to_owned(),
                },
            ),
            ["sandboxes", id, "files"] => {
                let op = match method {
                    "POST" => FileRoute::Write,
                    "PUT" => FileRoute::Upload,
                    "DELETE" => FileRoute::Delete,
                    _ => FileRoute::Read,
                };
                allow(
                    "GET, POST, PUT, DELETE",
                    Route::Files {
                        id: (*id).to_owned(),
                        op,
                    },
                )
            }
            ["sandboxes", id, "files", op] => {
                let (allowed, op) = match *op {
                    "list" => ("GET", FileRoute::List),
                    "stat" => ("GET", FileRoute::Stat),
                    "glob" => ("GET", FileRoute::Glob),
                    "move" => ("POST", FileRoute::Move),
                    "chmod" => ("POST", FileRoute::Chmod),
                    _ => return Err(RouteError::NotFound),
                };
                allow(
                    allowed,
                    Route::Files {
                        id: (*id).to_owned(),
                        op,
                    },
                )
            }
            ["quotas", "summary"] => allow("GET", Route::QuotaSummary),
            ["templates"] => match method {
                "POST" => Ok(Route::SaveTemplate),
                _ => allow("GET, POST", Route::ListTemplates),
            },
            ["templates", name] => {
                let name = (*name).to_owned();
                match method {
                    "DELETE" => Ok(Route::DeleteTemplate { name }),
                    _ => allow("GET, DELETE", Route::GetTemplate { name }),
                }
            }
            ["templates", name, "spawn"] => allow(
                "POST",
                Route::SpawnTemplate {
                    name: (*name).to_owned(),
                },
            ),
            ["admin", "leases"] => allow("GET", Route::ListLeases),
            ["admin", "leases", id] => allow(
                "GET",
                Route::GetLease {
                    id: (*id).to_owned(),
                },
            ),
            ["admin", "leases", id, verb] => match LeaseVerb::parse(verb) {
                Some(action) => allow(
                    "POST",
                    Route::LeaseAction {
                        id: (*id).to_owned(),
                        action,
                    },
                ),
                None => Err(RouteError::NotFound),
            },
            ["admin", "workers"] => allow("GET", Route::ListWorkers { admin: true }),
            ["admin", "workers", id] => match method {
                "DELETE" => Ok(Route::DeleteWorker {
                    id: (*id).to_owned(),
                }),
                _ => allow(
                    "GET, DELETE",
                    Route::GetWorker {
                        id: (*id).to_owned(),
                        admin: true,
                    },
                ),
            },
            ["admin", "workers", id, "heartbeat"] => allow(
                "POST",
                Route::Heartbeat {
                    id: (*id).to_owned(),
                },
            ),
            ["admin", "diagnostics"] => allow("GET", Route::Diagnostics { admin: true }),
            _ => Err(RouteError::NotFound),
        },
        _ => Err(RouteError::NotFound),
    }
}

/// Decodes `%XX` escapes; `None` for a bad escape or invalid UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return Some(text.to_owned());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits `a=1&b=two` into decoded pairs; malformed pairs are errors.
pub fn query_pairs(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode(&s.replace('+', " "))
                    .ok_or_else(|| format!("invalid query parameter {pair:?}"))
            };
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests;
