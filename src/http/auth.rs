//! API key checks. Keys are compared in constant time (no early exit on the
//! first differing byte, and every configured key is compared), and are never
//! logged: a caller is named by the position of its key (`admin-key#1`).

use super::api::ApiError;
use super::router::Access;
use crate::config::AuthConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// No keys are configured (the loopback default), or the route is open.
    Anonymous,
    User(usize),
    Admin(usize),
}

impl Principal {
    /// How audit records and logs name the caller.
    pub fn actor(self) -> String {
        match self {
            Principal::Anonymous => "anonymous".into(),
            Principal::User(i) => format!("api-key#{}", i + 1),
            Principal::Admin(i) => format!("admin-key#{}", i + 1),
        }
    }
}

/// The credentials a request presented.
#[derive(Debug, Default)]
pub struct Presented<'a> {
    pub api_key: Option<&'a str>,
    pub bearer: Option<&'a str>,
    pub admin_key: Option<&'a str>,
}

/// Decides whether a request may use a route of the given access level.
pub fn authorize(
    access: Access,
    auth: &AuthConfig,
    presented: &Presented<'_>,
) -> Result<Principal, ApiError> {
    if access == Access::Open || !auth.enabled() {
        return Ok(Principal::Anonymous);
    }
    let candidates = [presented.admin_key, presented.api_key, presented.bearer];
    let mut admin = None;
    let mut user = None;
    for candidate in candidates.into_iter().flatten() {
        admin = admin.or(find_key(&auth.admin_api_keys, candidate));
        user = user.or(find_key(&auth.api_keys, candidate));
    }
    match (access, admin, user) {
        (_, Some(i), _) => Ok(Principal::Admin(i)),
        (Access::User, None, Some(i)) => Ok(Principal::User(i)),
        (Access::Admin, None, Some(_)) => Err(ApiError::forbidden(
            "this route needs an admin key (X-Admin-API-Key)",
        )),
        _ if candidates.iter().all(Option::is_none) => Err(ApiError::unauthorized(match access {
            Access::Admin => "missing admin key: send X-Admin-API-Key",
            _ => "missing API key: send X-API-Key or Authorization: Bearer",
        })),
        _ => Err(ApiError::unauthorized("invalid API key")),
    }
}

/// Index of the key equal to `candidate`, comparing against every key.
fn find_key(keys: &[String], candidate: &str) -> Option<usize> {
    let mut found = None;
    for (i, key) in keys.iter().enumerate() {
        if constant_time_eq(key.as_bytes(), candidate.as_bytes()) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// Equal-length inputs take the same time whatever their content; the
/// length itself is not secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> AuthConfig {
        AuthConfig {
            api_keys: vec!["user-1".into(), "user-2".into()],
            admin_api_keys: vec!["admin-1".into()],
        }
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn decisions() {
        let a = auth();
        let p = |api, bearer, admin| Presented {
            api_key: api,
            bearer,
            admin_key: admin,
        };
        let status = |r: Result<Principal, ApiError>| r.map_err(|e| e.status);
        assert_eq!(
            status(authorize(Access::Open, &a, &p(None, None, None))),
            Ok(Principal::Anonymous)
        );
        assert_eq!(
            status(authorize(Access::User, &a, &p(None, None, None))),
            Err(401)
        );
        assert_eq!(
            status(authorize(Access::User, &a, &p(Some("nope"), None, None))),
            Err(401)
        );
        assert_eq!(
            status(authorize(Access::User, &a, &p(Some("user-2"), None, None))),
            Ok(Principal::User(1))
        );
        assert_eq!(
            status(authorize(Access::User, &a, &p(None, Some("user-1"), None))),
            Ok(Principal::User(0))
        );
        assert_eq!(
            status(authorize(Access::User, &a, &p(None, None, Some("admin-1")))),
            Ok(Principal::Admin(0))
        );
        assert_eq!(
            status(authorize(Access::Admin, &a, &p(Some("user-1"), None, None))),
            Err(403)
        );
        assert_eq!(
            status(authorize(Access::Admin, &a, &p(None, None, None))),
            Err(401)
        );
        assert_eq!(
            status(authorize(Access::Admin, &a, &p(None, None, Some("user-1")))),
            Err(403)
        );
        assert_eq!(
            status(authorize(
                Access::Admin,
                &a,
                &p(None, None, Some("admin-1"))
            )),
            Ok(Principal::Admin(0))
        );
        let open = AuthConfig {
            api_keys: vec![],
            admin_api_keys: vec![],
        };
        assert_eq!(
            status(authorize(Access::Admin, &open, &p(None, None, None))),
            Ok(Principal::Anonymous)
        );
    }
}
