//! Per-owner quotas (`[quotas.<owner>]`, issue 13): checked at admission
//! over the fleet-wide limits, reloaded on SIGHUP, summarised without any
//! owner's data at `GET /api/v1/quotas/summary`.

use crate::common;
use crate::sandbox_support;

use std::time::Duration;

use common::{Daemon, Request, assert_error, assert_status, poll_until};
use sandbox_support::{ADMISSION, SANDBOXES, destroy_ok, id_of};
use serde_json::{Value, json};

fn spawn_as(daemon: &Daemon, owner: &str, body: Value) -> common::Response {
    daemon.send(
        &Request::post(SANDBOXES)
            .header("X-User-ID", owner)
            .json(&body),
    )
}

fn admission_as(daemon: &Daemon, owner: &str, body: Value) -> Value {
    let resp = daemon.send(
        &Request::post(ADMISSION)
            .header("X-User-ID", owner)
            .json(&body),
    );
    assert_status(&resp, 200);
    resp.json()
}

const CONFIG: &str = "[sandboxes]\nmax_per_owner = 5\nmax_ttl = \"24h\"\n\n\
     [quotas.alice]\nmax_sandboxes = 2\nmax_ttl = \"1h\"\n\n\
     [quotas.bob]\nmax_ttl = \"2h\"\n";

#[test]
fn an_owners_quota_is_enforced_at_admission_and_only_for_that_owner() {
    let daemon = Daemon::builder().config(CONFIG).start();
    let a1 = spawn_as(&daemon, "alice", json!({}));
    assert_status(&a1, 201);
    assert_status(&spawn_as(&daemon, "alice", json!({})), 201);
    // alice's third is over her quota of 2, though under max_per_owner 5.
    let refused = spawn_as(&daemon, "alice", json!({}));
    let message = assert_error(&refused, 429, "RESOURCE_LIMIT");
    assert!(message.contains("max_sandboxes_per_owner"), "{message}");
    let pre = admission_as(&daemon, "alice", json!({}));
    assert_eq!(
        (
            &pre["allowed"],
            &pre["reason"],
            &pre["max_owner_sandboxes"],
            &pre["max_ttl"]
        ),
        (
            &json!(false),
            &json!("max_sandboxes_per_owner"),
            &json!(2),
            &json!("1h")
        ),
        "{pre}"
    );
    // Her ttl bound is 1h; bob's 2h; carol (no quota) has the fleet's 24h.
    let long = spawn_as(&daemon, "alice", json!({"ttl": "90m"}));
    assert!(assert_error(&long, 429, "RESOURCE_LIMIT").contains("max_ttl"));
    assert_status(&spawn_as(&daemon, "bob", json!({"ttl": "90m"})), 201);
    assert_error(
        &spawn_as(&daemon, "bob", json!({"ttl": "3h"})),
        429,
        "RESOURCE_LIMIT",
    );
    assert_status(&spawn_as(&daemon, "carol", json!({"ttl": "20h"})), 201);
    for _ in 0..3 {
        assert_status(&spawn_as(&daemon, "bob", json!({})), 201);
    }
    let bob = admission_as(&daemon, "bob", json!({}));
    assert_eq!(
        (&bob["allowed"], &bob["max_owner_sandboxes"]),
        (&json!(true), &json!(5)),
        "bob has no sandbox quota, the fleet's 5 applies: {bob}"
    );
    // Extending is bound by the same quota: alice's 1h, carol's fleet 24h.
    let extend = |id: &str, ttl: &str| {
        daemon.send(
            &Request::post(&format!("{SANDBOXES}/{id}/extend"))
                .header("X-User-ID", "x")
                .json(&json!({ "ttl": ttl })),
        )
    };
    let alice_id = id_of(&a1.json());
    let message = assert_error(&extend(&alice_id, "2h"), 400, "BAD_REQUEST");
    assert!(message.contains("quota"), "{message}");
    assert_status(&extend(&alice_id, "50m"), 200);
    // A destroyed sandbox gives its place back.
    destroy_ok(&daemon, &id_of(&a1.json()));
    assert_status(&spawn_as(&daemon, "alice", json!({})), 201);
}

#[test]
fn the_summary_counts_policies_and_shows_no_owner() {
    let mut daemon = Daemon::builder().config(CONFIG).start();
    let summary = daemon.get("/api/v1/quotas/summary");
    assert_status(&summary, 200);
    assert_eq!(
        summary.json(),
        json!({"total": 2, "with_max_sandboxes": 1, "with_max_ttl": 2, "with_max_exec_timeout": 0})
    );
    assert!(!summary.text().contains("alice"), "{summary}");
    // Reloaded on SIGHUP: a new policy is counted and enforced.
    daemon.write_config(&format!("{CONFIG}\n[quotas.carol]\nmax_sandboxes = 1\n"));
    daemon.sighup();
    poll_until(Duration::from_secs(5), "the reload", || {
        daemon.get("/api/v1/quotas/summary").json()["total"] == 3
    });
    assert_status(&spawn_as(&daemon, "carol", json!({})), 201);
    assert_error(
        &spawn_as(&daemon, "carol", json!({})),
        429,
        "RESOURCE_LIMIT",
    );
    daemon.stop();
}

#[test]
fn bad_quota_tables_are_refused_at_start() {
    for (config, what) in [
        (
            "[quotas.alice]\nmax_sandboxes = 0\n",
            "quotas.alice.max_sandboxes",
        ),
        (
            "[quotas.alice]\nmax_ttl = \"forever\"\n",
            "quotas.alice.max_ttl",
        ),
        ("[quotas.alice]\nmax_memory_mb = 5\n", "max_memory_mb"),
        ("[quotas]\nalice = 3\n", "quotas.alice"),
        ("[quotas.\"a b\"]\nmax_sandboxes = 1\n", "quotas.a b"),
    ] {
        let failed = Daemon::builder()
            .config(config)
            .try_start()
            .err()
            .unwrap_or_else(|| panic!("{config:?} was accepted"));
        assert!(
            failed.stderr.contains(what),
            "{config:?}: {}",
            failed.stderr
        );
    }
}
