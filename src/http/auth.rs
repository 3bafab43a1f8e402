//! API key checks. Keys are compared in constant time (no early exit on the
//! first differing byte, and every configured key is compared), and are never
//! logged: a caller is named by the position of its key (`admin-key#1`,
//! `key#2`).
//!
//! A request's key decides two things: its [`Principal`] (who, for audit
//! records and route access) and its [`OwnerScope`] (which owners' sandboxes it
//! sees). Both the relay (before a body) and the handler call [`authorize`],
//! so they never disagree.

use super::api::ApiError;
use super::router::Access;
use crate::config::{AuthConfig, KeyRole};
use crate::sandboxes::OwnerScope;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// No keys are configured (the loopback default), or the route is open.
    Anonymous,
    /// `auth.api_keys[i]`.
    User(usize),
    /// `auth.admin_api_keys[i]`.
    Admin(usize),
    /// `[[auth.keys]]` entry `i`, of either role.
    Key(usize),
}

impl Principal {
    /// How audit records and logs name the caller.
    pub fn actor(self) -> String {
        match self {
            Principal::Anonymous => "anonymous".into(),
            Principal::User(i) => format!("api-key#{}", i + 1),
            Principal::Admin(i) => format!("admin-key#{}", i + 1),
            Principal::Key(i) => format!("key#{}", i + 1),
        }
    }
}

/// An authorized request: who it is and what it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    pub scope: OwnerScope,
}

impl Caller {
    const ANONYMOUS: Caller = Caller {
        principal: Principal::Anonymous,
        scope: OwnerScope::All,
    };
}

/// The credentials a request presented, and the owner it claims.
#[derive(Debug, Default)]
pub struct Presented<'a> {
    pub api_key: Option<&'a str>,
    pub bearer: Option<&'a str>,
    pub admin_key: Option<&'a str>,
    /// `X-User-ID`: honoured from callers that may act for any owner;
    /// from the others, refused unless it names their own owner.
    pub user_id: Option<&'a str>,
}

/// The token of an `Authorization` value whose scheme is `Bearer`, matched
/// case-insensitively (RFC 7235), with any run of spaces after it.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value
        .trim_start_matches([' ', '\t'])
        .split_once([' ', '\t'])?;
    let token = rest.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Decides whether a request may use a route of the given access level,
/// and with which scope.
pub fn authorize(
    access: Access,
    auth: &AuthConfig,
    presented: &Presented<'_>,
) -> Result<Caller, ApiError> {
    if access == Access::Open || !auth.enabled() {
        return Ok(Caller::ANONYMOUS);
    }
    let candidates = [presented.admin_key, presented.api_key, presented.bearer];
    let mut admin = None;
    let mut user = None;
    for candidate in candidates.into_iter().flatten() {
        match identify(auth, candidate) {
            Some(Identity::Admin(p)) => admin = admin.or(Some(p)),
            Some(Identity::User(p, scope)) => user = user.or(Some((p, scope))),
            None => {}
        }
    }
    let caller = match (access, admin, user) {
        (_, Some(principal), _) => Caller {
            principal,
            scope: OwnerScope::All,
        },
        (Access::User, None, Some((principal, scope))) => Caller { principal, scope },
        (Access::Admin, None, Some(_)) => {
            return Err(ApiError::forbidden(
                "this route needs an admin key (X-Admin-API-Key)",
            ));
        }
        _ if candidates.iter().all(Option::is_none) => {
            return Err(ApiError::unauthorized(match access {
                Access::Admin => "missing admin key: send X-Admin-API-Key",
                _ => "missing API key: send X-API-Key or Authorization: Bearer",
            }));
        }
        _ => return Err(ApiError::unauthorized("invalid API key")),
    };
    check_named_owner(&caller.scope, presented.user_id, "X-User-ID")?;
    Ok(caller)
}

/// Refuses an owner named by the caller (`what`: the header or field)
/// that its scope does not allow: a key bound to an owner may name only
/// that owner, a key bound to none may name none. Empty names no one.
pub fn check_named_owner(
    scope: &OwnerScope,
    named: Option<&str>,
    what: &str,
) -> Result<(), ApiError> {
    let (Some(fixed), Some(named)) = (scope.fixed_owner(), named) else {
        return Ok(());
    };
    if named.is_empty() || named == fixed {
        return Ok(());
    }
    Err(ApiError::forbidden(match scope {
        OwnerScope::Owner(owner) => format!(
            "{what} names another owner than this API key's ({owner:?}); a user key acts only for its own owner"
        ),
        _ => format!(
            "{what} is honoured only from admin keys and from keys bound to that owner ([[auth.keys]]); this API key has no owner"
        ),
    }))
}

enum Identity {
    Admin(Principal),
    User(Principal, OwnerScope),
}

/// Which configured key `candidate` is. Every key of every list is
/// compared (keys are unique, checked at load).
fn identify(auth: &AuthConfig, candidate: &str) -> Option<Identity> {
    let legacy_user = find_key(auth.api_keys.iter().map(String::as_str), candidate);
    let legacy_admin = find_key(auth.admin_api_keys.iter().map(String::as_str), candidate);
    let entry = find_key(auth.keys.iter().map(|e| e.key.as_str()), candidate);
    if let Some(i) = legacy_admin {
        return Some(Identity::Admin(Principal::Admin(i)));
    }
    if let Some(i) = entry {
        return Some(match &auth.keys[i].role {
            KeyRole::Admin => Identity::Admin(Principal::Key(i)),
            KeyRole::User { owner_id } => {
                Identity::User(Principal::Key(i), OwnerScope::Owner(owner_id.clone()))
            }
        });
    }
    legacy_user.map(|i| Identity::User(Principal::User(i), OwnerScope::Unowned))
}

/// Index of the key equal to `candidate`, comparing against every key.
fn find_key<'k>(keys: impl Iterator<Item = &'k str>, candidate: &str) -> Option<usize> {
    let mut found = None;
    for (i, key) in keys.enumerate() {
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
            keys: vec![
                crate::config::KeyEntry {
                    key: "alice-1".into(),
                    role: KeyRole::User {
                        owner_id: "alice".into(),
                    },
                },
                crate::config::KeyEntry {
                    key: "admin-2".into(),
                    role: KeyRole::Admin,
                },
            ],
        }
    }

    #[test]
    fn bearer_scheme() {
        for (value, token) in [
            ("Bearer k", Some("k")),
            ("bearer k", Some("k")),
            ("BEARER    k ", Some("k")),
            ("bEaReR\tk", Some("k")),
            ("Bearer", None),
            ("Bearer   ", None),
            ("Bearerk", None),
            ("Basic k", None),
            ("k", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }

    #[test]
    fn scopes_and_named_owners() {
        let a = auth();
        let p = |api, user_id| Presented {
            api_key: api,
            user_id,
            ..Presented::default()
        };
        let caller = |api, user_id| {
            authorize(Access::User, &a, &p(api, user_id)).map_err(|e| (e.status, e.code))
        };
        assert_eq!(
            caller(Some("alice-1"), None),
            Ok(Caller {
                principal: Principal::Key(0),
                scope: OwnerScope::Owner("alice".into())
            })
        );
        assert!(caller(Some("alice-1"), Some("alice")).is_ok());
        assert!(caller(Some("alice-1"), Some("")).is_ok());
        assert_eq!(
            caller(Some("alice-1"), Some("bob")),
            Err((403, "FORBIDDEN"))
        );
        assert_eq!(
            caller(Some("user-1"), None).map(|c| c.scope),
            Ok(OwnerScope::Unowned)
        );
        assert_eq!(caller(Some("user-1"), Some("bob")), Err((403, "FORBIDDEN")));
        assert_eq!(
            caller(Some("admin-2"), Some("bob")),
            Ok(Caller {
                principal: Principal::Key(1),
                scope: OwnerScope::All
            })
        );
        assert_eq!(
            authorize(
                Access::Admin,
                &a,
                &Presented {
                    admin_key: Some("admin-2"),
                    ..Presented::default()
                }
            )
            .map(|c| c.principal),
            Ok(Principal::Key(1))
        );
        assert_eq!(
            authorize(Access::Admin, &a, &p(Some("alice-1"), None)).map_err(|e| e.status),
            Err(403)
        );
        assert_eq!(Principal::Key(1).actor(), "key#2");
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
            user_id: None,
        };
        let status = |r: Result<Caller, ApiError>| r.map(|c| c.principal).map_err(|e| e.status);
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
        let open = AuthConfig::default();
        assert_eq!(
            status(authorize(Access::Admin, &open, &p(None, None, None))),
            Ok(Principal::Anonymous)
        );
    }
}
