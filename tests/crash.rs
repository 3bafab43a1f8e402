//! The crash test: concurrent spawns and destroys, `kill -9` at a random
//! moment, restart on the same data dir, and check that nothing
//! acknowledged was lost, nothing destroyed came back, leases are sane and
//! never went back, and no runtime is left without a record.
//!
//! The moment of the kill is random (a seeded PRNG; set
//! `STACYVMD_CRASH_SEED` to replay a run, the seed is printed) but expressed
//! as progress, not time: the daemon dies once the clients have had a
//! random number of operations acknowledged, with more still in flight.

mod common;
mod sandbox_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Daemon, Request, assert_status, poll_until, rfc3339_millis};
use sandbox_support::{
    SANDBOXES, destroy_ok, id_of, leases, list, markers, sandbox_path, spawn_ok, spawn_req,
    state_in, worker,
};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const CLIENTS: usize = 6;

/// Room for every sandbox the rounds create: limits are not under test.
const CONFIG: &str = "[worker]\nmax_sandboxes = 100000\n\n[sandboxes]\nmax_sandboxes = 100000\n";

/// xorshift64*: small, seedable, good enough to pick moments and ids.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Everything the clients were told, across rounds.
#[derive(Default)]
struct Ledger {
    /// 201 with this id.
    spawned: BTreeSet<String>,
    /// 200 to DELETE.
    destroyed: BTreeSet<String>,
    /// DELETE sent, no answer (the daemon died): either outcome is fine.
    pending_destroys: BTreeSet<String>,
    /// Acknowledged spawns with no destroy sent yet: what clients destroy.
    live: Vec<String>,
    /// Answers no client should ever get (status, what).
    unexpected: Vec<String>,
}

fn client_loop(
    addr: SocketAddr,
    seed: u64,
    ledger: Arc<Mutex<Ledger>>,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed);
    let Ok(mut client) = Client::try_connect(addr) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        let victim = if rng.below(10) < 4 {
            let mut l = ledger.lock().unwrap();
            if l.live.is_empty() {
                None
            } else {
                let i = rng.below(l.live.len() as u64) as usize;
                let id = l.live.swap_remove(i);
                l.pending_destroys.insert(id.clone());
                Some(id)
            }
        } else {
            None
        };
        match victim {
            Some(id) => {
                let Ok(resp) = client.send(&Request::delete(&sandbox_path(&id))) else {
                    return; // the daemon died; the destroy stays pending
                };
                let mut l = ledger.lock().unwrap();
                if resp.status == 200 {
                    l.pending_destroys.remove(&id);
                    l.destroyed.insert(id);
                    acked.fetch_add(1, Ordering::SeqCst);
                } else {
                    l.unexpected.push(format!("DELETE {id}: {resp}"));
                }
            }
            None => {
                let body = json!({"ttl": "1h", "metadata": {"seed": seed.to_string()}});
                let Ok(resp) = client.send(&spawn_req(&body)) else {
                    return; // the daemon died; this spawn may or may not exist
                };
                let mut l = ledger.lock().unwrap();
                if resp.status == 201 {
                    let id = id_of(&resp.json());
                    l.spawned.insert(id.clone());
                    l.live.push(id);
                    acked.fetch_add(1, Ordering::SeqCst);
                } else {
                    l.unexpected.push(format!("POST {SANDBOXES}: {resp}"));
                }
            }
        }
    }
}

/// Checks every invariant on a freshly restarted daemon; returns the lease
/// generations seen, for the next round's comparison.
fn check_after_restart(
    daemon: &Daemon,
    round: usize,
    ledger: &Ledger,
    previous: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    let listed = list(daemon);
    let by_id: BTreeMap<String, &Value> = listed.iter().map(|s| (id_of(s), s)).collect();
    assert_eq!(
        by_id.len(),
        listed.len(),
        "round {round}: duplicate ids listed"
    );
    for s in &listed {
        let state = s["state"].as_str().unwrap_or_default();
        assert!(
            ["running", "error", "lost"].contains(&state),
            "round {round}: after reconciliation no sandbox may be {state:?}: {s}"
        );
    }
    let running: BTreeSet<String> = listed
        .iter()
        .filter(|s| s["state"] == "running")
        .map(id_of)
        .collect();

    let all_leases = leases(daemon);
    let mut lease_of: BTreeMap<String, &Value> = BTreeMap::new();
    for l in &all_leases {
        let id = l["resource_id"].as_str().expect("resource_id").to_string();
        assert!(
            lease_of.insert(id.clone(), l).is_none(),
            "round {round}: two lease rows for {id}"
        );
        let holder = l["holder_id"].as_str().expect("holder_id");
        assert!(
            holder.is_empty() || holder == "local",
            "round {round}: unknown holder {holder:?}: {l}"
        );
        if holder.is_empty() {
            assert_eq!(
                l["expired"], true,
                "round {round}: released lease not expired: {l}"
            );
        }
        let generation = l["generation"].as_u64().expect("generation");
        assert!(generation >= 1, "round {round}: {l}");
        let at = |f: &str| rfc3339_millis(l[f].as_str().expect("lease time"));
        assert!(
            at("acquired_at") <= at("renewed_at") && at("renewed_at") <= at("expires_at"),
            "round {round}: lease times out of order: {l}"
        );
        // An unexpired lease is held for a running sandbox, nothing else.
        if l["expired"] == false {
            assert!(
                running.contains(&id),
                "round {round}: unexpired lease on {id}, which is not running: {l}"
            );
        }
    }
    // Generations never go back, and lease rows are never lost.
    for (id, old) in previous {
        let row = lease_of
            .get(id)
            .unwrap_or_else(|| panic!("round {round}: the lease row of {id} disappeared"));
        let now = row["generation"].as_u64().unwrap();
        assert!(
            now >= *old,
            "round {round}: generation of {id} went back from {old} to {now}"
        );
    }

    // Every acknowledged spawn not (maybe) destroyed since: running, leased, with a runtime.
    let runtimes = markers(&daemon.data_dir());
    for id in &ledger.spawned {
        if ledger.destroyed.contains(id) || ledger.pending_destroys.contains(id) {
            continue;
        }
        let s = by_id
            .get(id)
            .unwrap_or_else(|| panic!("round {round}: acknowledged spawn {id} is gone"));
        assert_eq!(
            s["state"], "running",
            "round {round}: acknowledged spawn {id}: {s}"
        );
        let l = lease_of
            .get(id)
            .unwrap_or_else(|| panic!("round {round}: acknowledged spawn {id} has no lease"));
        assert_eq!(l["holder_id"], "local", "round {round}: lease of {id}: {l}");
        assert_eq!(l["expired"], false, "round {round}: lease of {id}: {l}");
        assert!(
            runtimes.contains(id),
            "round {round}: runtime of {id} is gone"
        );
    }
    // Every acknowledged destroy stays destroyed.
    for id in &ledger.destroyed {
        assert!(
            !by_id.contains_key(id),
            "round {round}: destroyed {id} is listed again"
        );
        let resp = daemon.get(&sandbox_path(id));
        assert_eq!(resp.status, 404, "round {round}: destroyed {id}:\n{resp}");
        assert!(
            !runtimes.contains(id),
            "round {round}: destroyed {id} has a runtime"
        );
    }
    // No runtime without a running record, and no running record without one.
    for id in &runtimes {
        assert!(
            running.contains(id),
            "round {round}: orphan runtime {id} (record: {:?})",
            by_id.get(id)
        );
    }
    for id in &running {
        assert!(
            runtimes.contains(id),
            "round {round}: running {id} has no runtime"
        );
        assert!(
            lease_of.contains_key(id),
            "round {round}: running {id} has no lease"
        );
    }
    // The scheduler's count matches the records.
    assert_eq!(
        worker(daemon, "local")["active_sandboxes"].as_u64(),
        Some(running.len() as u64),
        "round {round}: scheduler count differs from the running records"
    );

    lease_of
        .into_iter()
        .map(|(id, l)| (id, l["generation"].as_u64().unwrap()))
        .collect()
}

#[test]
fn kill_9_during_spawns_and_destroys_loses_nothing_acknowledged() {
    let seed = std::env::var("STACYVMD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| common::now_millis() as u64);
    eprintln!("crash test seed: {seed} (replay with STACYVMD_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let started = Instant::now();

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut generations = BTreeMap::new();
    let mut daemon = Daemon::builder().config(CONFIG).start();
    let mut total_acked = 0;

    for round in 0..ROUNDS {
        let target = 20 + rng.below(120) as usize;
        let acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (ledger, acked, stop) = (ledger.clone(), acked.clone(), stop.clone());
                let addr = daemon.addr;
                let client_seed = rng.next() ^ i as u64;
                thread::Builder::new()
                    .name(format!("crash-client-{i}"))
                    .spawn(move || client_loop(addr, client_seed, ledger, acked, stop))
                    .expect("spawn client")
            })
            .collect();
        poll_until(
            Duration::from_secs(20),
            &format!("round {round}: {target} acknowledged operations"),
            || acked.load(Ordering::SeqCst) >= target,
        );
        daemon.kill9();
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.join().expect("client thread");
        }
        total_acked += acked.load(Ordering::SeqCst);

        daemon = daemon.restart();
        let mut l = ledger.lock().unwrap();
        assert!(
            l.unexpected.is_empty(),
            "round {round}: unexpected answers:\n{}",
            l.unexpected.join("\n")
        );
        generations = check_after_restart(&daemon, round, &l, &generations);
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for s in list(&daemon) {
            *states.entry(s["state"].to_string()).or_default() += 1;
        }
        eprintln!(
            "round {round}: killed after {} acked (target {target}); totals: {} spawned, \
             {} destroyed, {} destroys unanswered; states now {states:?}",
            acked.load(Ordering::SeqCst),
            l.spawned.len(),
            l.destroyed.len(),
            l.pending_destroys.len(),
        );

        // Settle the destroys the crash left unanswered: the sandbox is
        // either destroyed already (404) or still there (lost or running).
        let pending: Vec<String> = l.pending_destroys.iter().cloned().collect();
        for id in pending {
            let resp = daemon.send(&Request::delete(&sandbox_path(&id)));
            assert!(
                resp.status == 200 || resp.status == 404,
                "round {round}: destroy of {id} after restart:\n{resp}"
            );
            l.pending_destroys.remove(&id);
            l.destroyed.insert(id);
        }
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "the crash test is too slow: {:?} after round {round}",
            started.elapsed()
        );
    }

    // A last clean check after the pending destroys, then a clean stop.
    let l = ledger.lock().unwrap();
    check_after_restart(&daemon, ROUNDS, &l, &generations);
    assert!(
        total_acked >= ROUNDS * 20,
        "too few operations acknowledged: {total_acked}"
    );
    assert!(!l.destroyed.is_empty(), "no destroy was ever acknowledged");
    assert_status(&daemon.get("/api/v1/ready"), 200);
    assert_eq!(daemon.stop().code(), Some(0), "{}", daemon.stderr_text());
}

#[test]
fn restart_reconciles_runtimes_with_records() {
    let mut daemon = Daemon::start();
    let kept = id_of(&spawn_ok(&daemon, &json!({})));
    let vanished = id_of(&spawn_ok(&daemon, &json!({})));
    let gone = id_of(&spawn_ok(&daemon, &json!({})));
    destroy_ok(&daemon, &gone);
    assert_eq!(daemon.stop().code(), Some(0));

    // While it is down: one runtime disappears, an unknown one appears, and
    // the destroyed sandbox's runtime comes back.
    let runtimes = daemon.data_dir().join("mock-runtimes");
    std::fs::remove_file(runtimes.join(&vanished)).expect("remove runtime");
    let orphan = "sb-00000000000000ff";
    std::fs::write(runtimes.join(orphan), b"").expect("write orphan runtime");
    std::fs::write(runtimes.join(&gone), b"").expect("write runtime of destroyed");

    let daemon = daemon.restart();
    let listed = list(&daemon);
    let state = |id: &str| state_in(&listed, id);
    assert_eq!(state(&kept), Some(json!("running")), "{listed:?}");
    assert_eq!(state(&vanished), Some(json!("lost")), "{listed:?}");
    assert_eq!(state(&gone), None, "{listed:?}");
    assert_eq!(state(orphan), None, "{listed:?}");
    assert_eq!(
        markers(&daemon.data_dir()).into_iter().collect::<Vec<_>>(),
        vec![kept.clone()],
        "orphan runtimes must be reaped"
    );
    let leases_now: BTreeMap<String, Value> = leases(&daemon)
        .into_iter()
        .map(|l| (l["resource_id"].as_str().unwrap().to_string(), l))
        .collect();
    assert_eq!(leases_now[&kept]["holder_id"], "local");
    assert_eq!(leases_now[&kept]["expired"], false);
    for id in [vanished.as_str(), gone.as_str(), orphan] {
        let l = leases_now
            .get(id)
            .unwrap_or_else(|| panic!("no lease row for {id}: {leases_now:?}"));
        assert!(
            l["holder_id"] == "" || l["expired"] == true,
            "lease of {id} still held after reconciliation: {l}"
        );
    }
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 1);
    assert_eq!(
        daemon.get(&sandbox_path(&gone)).status,
        404,
        "a destroyed sandbox came back"
    );
}
