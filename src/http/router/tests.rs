//! Unit tests of `router`.

use super::*;

#[test]
fn routes_table() {
    let table: &[(&str, &str, Result<Route, RouteError>)] = &[
        ("GET", "/api/v1/health", Ok(Route::Health)),
        (
            "GET",
            "/api/v1/workers",
            Ok(Route::ListWorkers { admin: false }),
        ),
        (
            "GET",
            "/api/v1/workers/w-1",
            Ok(Route::GetWorker {
                id: "w-1".into(),
                admin: false,
            }),
        ),
        (
            "GET",
            "/api/v1/admin/workers/w-1",
            Ok(Route::GetWorker {
                id: "w-1".into(),
                admin: true,
            }),
        ),
        (
            "DELETE",
            "/api/v1/admin/workers/w-1",
            Ok(Route::DeleteWorker { id: "w-1".into() }),
        ),
        (
            "POST",
            "/api/v1/admin/workers/w%201/heartbeat",
            Ok(Route::Heartbeat { id: "w 1".into() }),
        ),
        (
            "POST",
            "/api/v1/admin/workers/a%2Fb/heartbeat",
            Ok(Route::Heartbeat { id: "a/b".into() }),
        ),
        (
            "GET",
            "/metrics",
            Ok(Route::MetricsPrometheus { root: true }),
        ),
        (
            "POST",
            "/api/v1/workers",
            Err(RouteError::MethodNotAllowed("GET")),
        ),
        (
            "PUT",
            "/api/v1/admin/workers/x",
            Err(RouteError::MethodNotAllowed("GET, DELETE")),
        ),
        (
            "GET",
            "/api/v1/admin/workers/x/heartbeat",
            Err(RouteError::MethodNotAllowed("POST")),
        ),
        ("GET", "/api/v1/nope", Err(RouteError::NotFound)),
        (
            "POST",
            "/api/v1/sandboxes/sb-1/exec",
            Ok(Route::Exec { id: "sb-1".into() }),
        ),
        (
            "GET",
            "/api/v1/sandboxes/sb-1/exec",
            Err(RouteError::MethodNotAllowed("POST")),
        ),
        (
            "PUT",
            "/api/v1/sandboxes/sb-1/files",
            Ok(Route::Files {
                id: "sb-1".into(),
                op: FileRoute::Upload,
            }),
        ),
        (
            "GET",
            "/api/v1/sandboxes/sb-1/files/glob",
            Ok(Route::Files {
                id: "sb-1".into(),
                op: FileRoute::Glob,
            }),
        ),
        (
            "GET",
            "/api/v1/sandboxes/sb-1/files/move",
            Err(RouteError::MethodNotAllowed("POST")),
        ),
        (
            "PATCH",
            "/api/v1/sandboxes/sb-1/files",
            Err(RouteError::MethodNotAllowed("GET, POST, PUT, DELETE")),
        ),
        (
            "GET",
            "/api/v1/sandboxes/sb-1/files/nope",
            Err(RouteError::NotFound),
        ),
        ("GET", "/api/v1/workers/a/b", Err(RouteError::NotFound)),
        ("GET", "/", Err(RouteError::NotFound)),
    ];
    for (method, path, expected) in table {
        assert_eq!(&route(method, path), expected, "{method} {path}");
    }
    assert!(matches!(
        route("GET", "/api/v1/workers/%ff"),
        Err(RouteError::BadPath(_))
    ));
    assert!(matches!(
        route("GET", "/api/v1/workers/%zz"),
        Err(RouteError::BadPath(_))
    ));
}

#[test]
fn access_levels() {
    assert_eq!(Route::Live.access(), Access::Open);
    assert_eq!(Route::ListWorkers { admin: false }.access(), Access::User);
    assert_eq!(Route::ListWorkers { admin: true }.access(), Access::Admin);
    assert_eq!(Route::Heartbeat { id: "x".into() }.access(), Access::Admin);
}

#[test]
fn queries() {
    assert_eq!(
        query_pairs("force=true&x=a%20b").unwrap(),
        vec![("force".into(), "true".into()), ("x".into(), "a b".into())]
    );
    assert!(query_pairs("x=%").is_err());
}

#[test]
fn every_route_id_is_listed_once() {
    for (i, id) in RouteId::ALL.iter().enumerate() {
        assert_eq!(*id as usize, i);
    }
}

proptest::proptest! {
    #[test]
    fn routing_never_panics(method in "[A-Z]{0,8}", path in "\\PC{0,64}") {
        let _ = route(&method, &path);
    }
}
