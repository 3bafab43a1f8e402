//! Prometheus text (checked by promtool), the JSON metrics and diagnostics.

use crate::common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, Request, assert_status, poll_until};
use serde_json::{Value, json};

/// `promtool check metrics` on `text`; panics unless it passes. Missing
/// promtool is a failure: CI installs it (Debian package `prometheus`).
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (apt-get install prometheus): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics failed ({}):\n{}{}\n----- input -----\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Family name -> type, from the `# TYPE` lines; asserts each has `# HELP`.
fn families(text: &str) -> BTreeMap<String, String> {
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or_default());
            types.insert(name.to_string(), kind.to_string());
        }
    }
    for name in types.keys() {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "family {name} has no # HELP"
        );
    }
    types
}

/// The value of the sample with exactly this name and label set.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.split_whitespace().next().unwrap().parse().unwrap())
}

#[test]
fn prometheus_text_is_clean_and_complete() {
    let daemon = Daemon::start();
    for id in ["m-1", "m-2"] {
        assert_status(&daemon.heartbeat(id, &json!({})), 200);
    }
    assert_status(&daemon.get("/api/v1/workers"), 200);
    assert_eq!(daemon.get("/api/v1/nope").status, 404);

    for path in ["/api/v1/metrics/prometheus", "/metrics"] {
        let resp = daemon.get(path);
        assert_status(&resp, 200);
        let content_type = resp.header("Content-Type").unwrap_or_default();
        assert!(
            content_type.starts_with("text/plain") && content_type.contains("0.0.4"),
            "{path}: Content-Type {content_type:?}"
        );
        let text = resp.text();
        assert!(
            text.contains("# HELP ") && text.contains("# TYPE "),
            "{path}:\n{text}"
        );
        promtool_check(&text);

        let types = families(&text);
        for (name, kind) in &types {
            match kind.as_str() {
                "counter" => assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                ),
                _ => assert!(
                    !name.ends_with("_total"),
                    "{kind} {name} must not end in _total"
                ),
            }
        }
        for (name, kind) in [
            ("stacyvmd_workers", "gauge"),
            ("stacyvmd_worker_heartbeat_age_seconds", "gauge"),
            ("stacyvmd_http_requests_total", "counter"),
            ("stacyvmd_http_request_duration_seconds", "histogram"),
            ("stacyvmd_store_commit_batch_size", "histogram"),
            ("stacyvmd_store_commit_duration_seconds", "histogram"),
            ("stacyvmd_build_info", "gauge"),
        ] {
            assert_eq!(
                types.get(name).map(String::as_str),
                Some(kind),
                "{path}: family {name} missing or not a {kind}\n{text}"
            );
        }
        assert!(
            types.keys().any(|n| n.starts_with("process_")),
            "{path}: no process_* metrics\n{text}"
        );
        for status in ["total", "online", "stale", "unhealthy"] {
            assert!(
                sample(&text, &format!("stacyvmd_workers{{status=\"{status}\"}}")).is_some(),
                "{path}: no stacyvmd_workers{{status=\"{status}\"}}\n{text}"
            );
        }
        for worker in ["local", "m-1", "m-2"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("stacyvmd_worker_heartbeat_age_seconds{")
                        && l.contains(&format!("worker=\"{worker}\""))),
                "{path}: no heartbeat age for {worker}\n{text}"
            );
        }
        assert!(
            text.lines().any(|l| l.starts_with("stacyvmd_build_info{")
                && l.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))),
            "{path}: stacyvmd_build_info without version\n{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("stacyvmd_http_requests_total{")
                    && l.contains("code=\"404\"")),
            "{path}: the 404 is not counted\n{text}"
        );
    }
}

#[test]
fn provider_gauges_follow_the_runtimes() {
    let daemon = Daemon::start();
    let runtimes = |daemon: &Daemon| {
        let text = daemon.get("/metrics").text();
        assert_eq!(
            sample(&text, "stacyvmd_provider_healthy{provider=\"mock\"}"),
            Some(1.0),
            "{text}"
        );
        sample(&text, "stacyvmd_provider_runtimes{provider=\"mock\"}")
    };
    assert_eq!(runtimes(&daemon), Some(0.0));
    let spawned =
        daemon.send(&Request::post("/api/v1/sandboxes").json(&json!({"provider": "mock"})));
    assert_status(&spawned, 201);
    assert_eq!(runtimes(&daemon), Some(1.0));
}

#[test]
fn workers_total_matches_the_worker_list() {
    let daemon = Daemon::start();
    for n in 0..5 {
        assert_status(&daemon.heartbeat(&format!("count-{n}"), &json!({})), 200);
    }
    assert_status(
        &daemon.send(&common::Request::delete("/api/v1/admin/workers/count-3")),
        200,
    );
    let listed = daemon.workers().len();
    assert_eq!(listed, 5);
    let mut last = String::new();
    poll_until(
        Duration::from_secs(3),
        "stacyvmd_workers{status=\"total\"} to match the list",
        || {
            last = daemon.get("/metrics").text();
            sample(&last, "stacyvmd_workers{status=\"total\"}") == Some(listed as f64)
        },
    );
    let online = sample(&last, "stacyvmd_workers{status=\"online\"}");
    assert_eq!(
        online,
        Some(listed as f64),
        "all {listed} workers are online\n{last}"
    );
}

#[test]
fn json_metrics_and_diagnostics() {
    let daemon = Daemon::start();
    assert_status(
        &daemon.heartbeat("d-1", &json!({"status": "draining"})),
        200,
    );

    let metrics = daemon.get("/api/v1/metrics");
    assert_status(&metrics, 200);
    assert!(metrics.json().is_object(), "{metrics}");

    for path in ["/api/v1/diagnostics", "/api/v1/admin/diagnostics"] {
        let resp = daemon.get(path);
        assert_status(&resp, 200);
        let diag: Value = resp.json();
        for key in [
            "generated_at",
            "build",
            "process",
            "store",
            "limits",
            "workers",
        ] {
            assert!(!diag[key].is_null(), "{path}: no {key}\n{diag:#}");
        }
        common::rfc3339_millis(diag["generated_at"].as_str().unwrap_or_default());
        assert_eq!(
            diag["build"]["version"],
            env!("CARGO_PKG_VERSION"),
            "{diag:#}"
        );
        assert_eq!(diag["store"]["healthy"], true, "{diag:#}");
        let workers = &diag["workers"];
        assert_eq!(workers["total"], 2, "{diag:#}");
        assert_eq!(workers["online"], 1, "{diag:#}");
        assert_eq!(
            workers["items"].as_array().map(Vec::len),
            Some(2),
            "{diag:#}"
        );
    }
}
