//! The crash test: concurrent spawns and destroys, lease writers and
//! heartbeat writers, `kill -9` at a random moment, restart on the same
//! data dir, and check that nothing acknowledged was lost, nothing
//! destroyed came back, leases are sane and never went back, and no
//! runtime is left without a record.
//!
//! Beside the spawn/destroy clients, lease writers acquire, renew and
//! release leases on resources of their own through the admin lease routes
//! (two holders per writer, so some of their requests are refused), and
//! heartbeat writers register remote workers and heartbeat them, sometimes
//! with a change of a registration field and sometimes as a plain refresh.
//! Each writer keeps a model of what it was told. After every restart a
//! lease is exactly its last acknowledged state (or the outcome of the one
//! request that got no answer), and a worker has its last acknowledged
//! registration fields; a plain refresh is soft state (docs/api.md), so its
//! time is not required to survive, only the time of the last change.
//!
//! The moment of the kill is random (a seeded PRNG; set
//! `STACYVMD_CRASH_SEED` to replay a run, the seed is printed) but expressed
//! as progress, not time: the daemon dies once the clients have had a
//! random number of operations acknowledged, with more still in flight.

use crate::common;
use crate::sandbox_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Daemon, Request, assert_status, poll_until, rfc3339_millis};
use sandbox_support::{
    LEASES, SANDBOXES, destroy_ok, id_of, leases, list, markers, sandbox_path, spawn_ok, spawn_req,
    state_in, worker,
};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const CLIENTS: usize = 6;
const LEASE_WRITERS: usize = 2;
const LEASES_PER_WRITER: u64 = 4;
const HEARTBEAT_WRITERS: usize = 1;
const WORKERS_PER_WRITER: u64 = 3;
/// Long enough that no lease of a writer expires during the test, so the
/// model needs no clock: every answer follows from the acknowledged state.
const LEASE_TTLS: [&str; 3] = ["10m", "30m", "1h"];
/// The resource type of the writers' leases (a pool VM's, not a sandbox's).
const WRITER_RESOURCE_TYPE: &str = "pool_vm";
const STATUSES: [&str; 3] = ["online", "draining", "unhealthy"];

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
    /// Each lease writer's resources: the last acknowledged state.
    leases: BTreeMap<String, LeaseState>,
    /// Lease requests sent with no answer (the daemon died), by resource.
    pending_leases: BTreeMap<String, LeaseOp>,
    /// Each heartbeat writer's workers: the last acknowledged registration.
    workers: BTreeMap<String, WorkerState>,
    /// Heartbeats sent with no answer, by worker: the fields they declared.
    pending_heartbeats: BTreeMap<String, Value>,
}

/// What a lease writer was last told about one of its resources.
#[derive(Clone, Debug, Default, PartialEq)]
enum LeaseState {
    /// Never acquired: there is no lease row.
    #[default]
    Absent,
    Held {
        holder: String,
        generation: u64,
        expires_at: i64,
    },
    Released {
        generation: u64,
    },
}

impl LeaseState {
    /// The state a lease object shows (`None`: not a well-formed lease of
    /// a writer).
    fn of(lease: &Value) -> Option<LeaseState> {
        let generation = lease["generation"].as_u64()?;
        if lease["resource_type"] != WRITER_RESOURCE_TYPE {
            return None;
        }
        match lease["holder_id"].as_str()? {
            "" if lease["expired"] == true => Some(LeaseState::Released { generation }),
            "" => None,
            holder if lease["expired"] == false => Some(LeaseState::Held {
                holder: holder.to_string(),
                generation,
                expires_at: rfc3339_millis(lease["expires_at"].as_str()?),
            }),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum LeaseVerb {
    Acquire,
    Renew,
    Release,
}

impl LeaseVerb {
    fn as_str(self) -> &'static str {
        match self {
            LeaseVerb::Acquire => "acquire",
            LeaseVerb::Renew => "renew",
            LeaseVerb::Release => "release",
        }
    }
}

#[derive(Clone, Debug)]
struct LeaseOp {
    verb: LeaseVerb,
    holder: String,
}

impl LeaseOp {
    /// The refusal the lease rules give for this request in state
    /// `before` (status, code), or `None` when it is granted.
    fn refusal(&self, before: &LeaseState) -> Option<(u16, &'static str)> {
        match (self.verb, before) {
            (LeaseVerb::Acquire, LeaseState::Held { holder, .. }) if *holder != self.holder => {
                Some((409, "CONFLICT"))
            }
            (LeaseVerb::Acquire, _) => None,
            (_, LeaseState::Absent) => Some((404, "NOT_FOUND")),
            (_, LeaseState::Held { holder, .. }) if *holder == self.holder => None,
            (_, LeaseState::Held { .. } | LeaseState::Released { .. }) => Some((409, "CONFLICT")),
        }
    }

    /// Whether `after` is what granting this request in state `before`
    /// may leave: the holder it names, a generation bumped exactly when
    /// ownership is taken after a gap, an expiry that never moves back.
    fn grants(&self, before: &LeaseState, after: &LeaseState) -> bool {
        match (self.verb, before, after) {
            (
                LeaseVerb::Acquire,
                LeaseState::Absent,
                LeaseState::Held {
                    holder, generation, ..
                },
            ) => *holder == self.holder && *generation >= 1,
            (
                LeaseVerb::Acquire,
                LeaseState::Released { generation: old },
                LeaseState::Held {
                    holder, generation, ..
                },
            ) => *holder == self.holder && generation > old,
            (
                LeaseVerb::Acquire | LeaseVerb::Renew,
                LeaseState::Held {
                    holder: old_holder,
                    generation: old,
                    expires_at: old_expiry,
                },
                LeaseState::Held {
                    holder,
                    generation,
                    expires_at,
                },
            ) => {
                *old_holder == self.holder
                    && *holder == self.holder
                    && generation == old
                    && expires_at >= old_expiry
            }
            (
                LeaseVerb::Release,
                LeaseState::Held {
                    holder,
                    generation: old,
                    ..
                },
                LeaseState::Released { generation },
            ) => *holder == self.holder && generation == old,
            _ => false,
        }
    }
}

/// What a heartbeat writer was last told about one of its workers.
#[derive(Clone, Debug)]
struct WorkerState {
    /// hostname, status, providers, capabilities and capacity.
    declared: Value,
    created_at: i64,
    /// `last_heartbeat` and `updated_at` of the last acknowledged
    /// registration or change (durable; later refreshes only raise them).
    changed_at: i64,
    updated_at: i64,
}

/// The registration fields of a worker object (or of a heartbeat body
/// that sends them all).
fn declared_of(worker: &Value) -> Value {
    json!({
        "hostname": worker["hostname"],
        "status": worker["status"],
        "providers": worker["providers"],
        "capabilities": worker["capabilities"],
        "capacity": worker["capacity"],
    })
}

fn lease_resource(writer: usize, index: u64) -> String {
    format!("pool-lw{writer}-{index}")
}

fn heartbeat_worker(writer: usize, index: u64) -> String {
    format!("crash-hb{writer}-{index}")
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

/// Acquires, renews and releases leases on this writer's resources, for
/// two holders, and checks every answer against the model.
fn lease_loop(
    addr: SocketAddr,
    writer: usize,
    seed: u64,
    ledger: Arc<Mutex<Ledger>>,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed);
    let Ok(mut client) = Client::try_connect(addr) else {
        return;
    };
    let holders = [format!("lw{writer}-a"), format!("lw{writer}-b")];
    while !stop.load(Ordering::SeqCst) {
        let resource = lease_resource(writer, rng.below(LEASES_PER_WRITER));
        let op = LeaseOp {
            verb: match rng.below(10) {
                0..=4 => LeaseVerb::Acquire,
                5..=7 => LeaseVerb::Renew,
                _ => LeaseVerb::Release,
            },
            holder: holders[rng.below(2) as usize].clone(),
        };
        let ttl = LEASE_TTLS[rng.below(LEASE_TTLS.len() as u64) as usize];
        let before = {
            let mut l = ledger.lock().unwrap();
            l.pending_leases.insert(resource.clone(), op.clone());
            l.leases.get(&resource).cloned().unwrap_or_default()
        };
        let req = Request::post(&format!("{LEASES}/{resource}/{}", op.verb.as_str())).json(
            &json!({"holder_id": op.holder, "ttl": ttl, "resource_type": WRITER_RESOURCE_TYPE}),
        );
        let Ok(resp) = client.send(&req) else {
            return; // the daemon died; the request stays pending
        };
        let mut l = ledger.lock().unwrap();
        l.pending_leases.remove(&resource);
        let what = format!(
            "{} {resource} by {} in {before:?}",
            op.verb.as_str(),
            op.holder
        );
        match op.refusal(&before) {
            Some((status, code)) => {
                if resp.status == status && resp.json()["code"] == code {
                    acked.fetch_add(1, Ordering::SeqCst);
                } else {
                    l.unexpected
                        .push(format!("{what}: expected {status} {code}: {resp}"));
                }
            }
            None => match (resp.status, LeaseState::of(&resp.json())) {
                (200, Some(after)) if op.grants(&before, &after) => {
                    l.leases.insert(resource, after);
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                _ => l
                    .unexpected
                    .push(format!("{what}: expected a grant: {resp}")),
            },
        }
    }
}

/// Registers this writer's workers and heartbeats them: half the
/// heartbeats change a registration field, half are plain refreshes.
fn heartbeat_loop(
    addr: SocketAddr,
    writer: usize,
    seed: u64,
    ledger: Arc<Mutex<Ledger>>,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(seed);
    let Ok(mut client) = Client::try_connect(addr) else {
        return;
    };
    let lists: [&[&str]; 3] = [&[], &["vm"], &["vm", "gpu"]];
    while !stop.load(Ordering::SeqCst) {
        let id = heartbeat_worker(writer, rng.below(WORKERS_PER_WRITER));
        let known = ledger.lock().unwrap().workers.get(&id).cloned();
        let refresh = known.is_some() && rng.below(2) == 0;
        let (body, declared) = match &known {
            Some(known) if refresh => {
                // Declares nothing new: the same status alone, or every
                // field again.
                let body = if rng.below(2) == 0 {
                    json!({"status": known.declared["status"]})
                } else {
                    known.declared.clone()
                };
                (body, known.declared.clone())
            }
            _ => {
                // A capacity of 0 keeps these workers out of placement, so
                // the spawns stay on the local worker.
                let declared = json!({
                    "hostname": format!("host-{:016x}", rng.next()),
                    "status": STATUSES[rng.below(3) as usize],
                    "providers": lists[rng.below(3) as usize],
                    "capabilities": lists[rng.below(3) as usize],
                    "capacity": {"max_sandboxes": 0},
                });
                (declared.clone(), declared)
            }
        };
        ledger
            .lock()
            .unwrap()
            .pending_heartbeats
            .insert(id.clone(), declared.clone());
        let req = Request::post(&format!("/api/v1/admin/workers/{id}/heartbeat")).json(&body);
        let Ok(resp) = client.send(&req) else {
            return; // the daemon died; the heartbeat stays pending
        };
        let mut l = ledger.lock().unwrap();
        l.pending_heartbeats.remove(&id);
        let w = resp.json();
        let at = |field: &str| w[field].as_str().map(rfc3339_millis);
        let (Some(created_at), Some(last_heartbeat), Some(updated_at)) =
            (at("created_at"), at("last_heartbeat"), at("updated_at"))
        else {
            l.unexpected.push(format!("heartbeat {id} {body}: {resp}"));
            continue;
        };
        let answered_right = resp.status == 200
            && w["id"] == id.as_str()
            && declared_of(&w) == declared
            && w["stale"] == false
            && known.as_ref().is_none_or(|k| {
                k.created_at == created_at
                    && last_heartbeat >= k.changed_at
                    && updated_at >= k.updated_at
            });
        if !answered_right {
            l.unexpected.push(format!("heartbeat {id} {body}: {resp}"));
            continue;
        }
        if !refresh {
            l.workers.insert(
                id,
                WorkerState {
                    declared,
                    created_at,
                    changed_at: last_heartbeat,
                    updated_at,
                },
            );
        }
        acked.fetch_add(1, Ordering::SeqCst);
    }
}

/// Checks the lease and heartbeat writers' resources on a freshly
/// restarted daemon, then settles the requests the crash left unanswered
/// by taking what the daemon shows as the writers' new acknowledged state.
/// Returns how many unanswered lease requests and heartbeat changes turned
/// out to have been committed.
fn check_writers_after_restart(
    daemon: &Daemon,
    round: usize,
    ledger: &mut Ledger,
) -> (usize, usize) {
    let (mut leases_committed, mut heartbeats_committed) = (0, 0);
    let mut writer_leases: BTreeMap<String, LeaseState> = BTreeMap::new();
    for l in leases(daemon) {
        if l["resource_type"] == "sandbox" {
            continue;
        }
        let id = l["resource_id"].as_str().expect("resource_id").to_string();
        let state = LeaseState::of(&l)
            .unwrap_or_else(|| panic!("round {round}: malformed writer lease: {l}"));
        assert!(
            ledger.leases.contains_key(&id) || ledger.pending_leases.contains_key(&id),
            "round {round}: a lease no writer was granted: {l}"
        );
        writer_leases.insert(id, state);
    }
    let resources: BTreeSet<String> = ledger
        .leases
        .keys()
        .chain(ledger.pending_leases.keys())
        .cloned()
        .collect();
    for id in resources {
        let acked = ledger.leases.get(&id).cloned().unwrap_or_default();
        let now = writer_leases.get(&id).cloned().unwrap_or_default();
        let pending = ledger.pending_leases.remove(&id);
        let explained = now == acked
            || pending
                .as_ref()
                .is_some_and(|op| op.refusal(&acked).is_none() && op.grants(&acked, &now));
        assert!(
            explained,
            "round {round}: lease {id} is {now:?}; acknowledged {acked:?}, unanswered {pending:?}"
        );
        leases_committed += usize::from(now != acked);
        ledger.leases.insert(id, now);
    }

    let workers: BTreeMap<String, Value> = daemon
        .workers()
        .into_iter()
        .map(|w| (w["id"].as_str().expect("worker id").to_string(), w))
        .collect();
    for id in workers.keys() {
        assert!(
            id == "local"
                || ledger.workers.contains_key(id)
                || ledger.pending_heartbeats.contains_key(id),
            "round {round}: a worker no writer registered: {}",
            workers[id]
        );
    }
    let ids: BTreeSet<String> = ledger
        .workers
        .keys()
        .chain(ledger.pending_heartbeats.keys())
        .cloned()
        .collect();
    for id in ids {
        let acked = ledger.workers.get(&id).cloned();
        let pending = ledger.pending_heartbeats.remove(&id);
        let Some(w) = workers.get(&id) else {
            assert!(
                acked.is_none(),
                "round {round}: acknowledged registration of {id} is gone: {acked:?}"
            );
            continue; // an unanswered registration that did not commit
        };
        let declared = declared_of(w);
        assert!(
            acked.as_ref().is_some_and(|a| a.declared == declared)
                || pending.as_ref() == Some(&declared),
            "round {round}: worker {id} declares {declared}; acknowledged {acked:?}, \
             unanswered {pending:?}"
        );
        let at = |field: &str| rfc3339_millis(w[field].as_str().expect("worker time"));
        if let Some(a) = &acked {
            assert_eq!(
                at("created_at"),
                a.created_at,
                "round {round}: created_at of {id} changed: {w}"
            );
            assert!(
                at("last_heartbeat") >= a.changed_at && at("updated_at") >= a.updated_at,
                "round {round}: worker {id} went back before its last acknowledged \
                 change {a:?}: {w}"
            );
        }
        // A restart gives every known worker a fresh grace window.
        assert_eq!(w["stale"], false, "round {round}: worker {id}: {w}");
        heartbeats_committed += usize::from(acked.is_none_or(|a| a.declared != declared));
        ledger.workers.insert(
            id,
            WorkerState {
                declared,
                created_at: at("created_at"),
                changed_at: at("last_heartbeat"),
                updated_at: at("updated_at"),
            },
        );
    }
    (leases_committed, heartbeats_committed)
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
        let generation = l["generation"].as_u64().expect("generation");
        assert!(generation >= 1, "round {round}: {l}");
        let at = |f: &str| rfc3339_millis(l[f].as_str().expect("lease time"));
        assert!(
            at("acquired_at") <= at("renewed_at") && at("renewed_at") <= at("expires_at"),
            "round {round}: lease times out of order: {l}"
        );
        if l["resource_type"] != "sandbox" {
            continue; // a lease writer's: check_writers_after_restart
        }
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
    let (mut total_lease_acked, mut total_heartbeat_acked) = (0, 0);

    for round in 0..ROUNDS {
        let target = 20 + rng.below(120) as usize;
        let lease_target = 10 + rng.below(60) as usize;
        let heartbeat_target = 10 + rng.below(60) as usize;
        let acked = Arc::new(AtomicUsize::new(0));
        let lease_acked = Arc::new(AtomicUsize::new(0));
        let heartbeat_acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients: Vec<_> = (0..CLIENTS)
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
        for i in 0..LEASE_WRITERS {
            let (ledger, acked, stop) = (ledger.clone(), lease_acked.clone(), stop.clone());
            let (addr, writer_seed) = (daemon.addr, rng.next());
            clients.push(
                thread::Builder::new()
                    .name(format!("crash-leases-{i}"))
                    .spawn(move || lease_loop(addr, i, writer_seed, ledger, acked, stop))
                    .expect("spawn lease writer"),
            );
        }
        for i in 0..HEARTBEAT_WRITERS {
            let (ledger, acked, stop) = (ledger.clone(), heartbeat_acked.clone(), stop.clone());
            let (addr, writer_seed) = (daemon.addr, rng.next());
            clients.push(
                thread::Builder::new()
                    .name(format!("crash-heartbeats-{i}"))
                    .spawn(move || heartbeat_loop(addr, i, writer_seed, ledger, acked, stop))
                    .expect("spawn heartbeat writer"),
            );
        }
        poll_until(
            Duration::from_secs(20),
            &format!(
                "round {round}: {target} acknowledged operations, {lease_target} lease and \
                 {heartbeat_target} heartbeat answers"
            ),
            || {
                acked.load(Ordering::SeqCst) >= target
                    && lease_acked.load(Ordering::SeqCst) >= lease_target
                    && heartbeat_acked.load(Ordering::SeqCst) >= heartbeat_target
            },
        );
        daemon.kill9();
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.join().expect("client thread");
        }
        total_acked += acked.load(Ordering::SeqCst);
        total_lease_acked += lease_acked.load(Ordering::SeqCst);
        total_heartbeat_acked += heartbeat_acked.load(Ordering::SeqCst);

        daemon = daemon.restart();
        let mut l = ledger.lock().unwrap();
        assert!(
            l.unexpected.is_empty(),
            "round {round}: unexpected answers:\n{}",
            l.unexpected.join("\n")
        );
        generations = check_after_restart(&daemon, round, &l, &generations);
        let unanswered = (l.pending_leases.len(), l.pending_heartbeats.len());
        let committed = check_writers_after_restart(&daemon, round, &mut l);
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for s in list(&daemon) {
            *states.entry(s["state"].to_string()).or_default() += 1;
        }
        eprintln!(
            "round {round}: killed after {} acked (target {target}), {} lease answers \
             ({lease_target}), {} heartbeat answers ({heartbeat_target}); {} lease and {} \
             heartbeat requests unanswered, of which {} and {} changes were committed; totals: {} spawned, {} destroyed, {} destroys \
             unanswered; states now {states:?}",
            acked.load(Ordering::SeqCst),
            lease_acked.load(Ordering::SeqCst),
            heartbeat_acked.load(Ordering::SeqCst),
            unanswered.0,
            unanswered.1,
            committed.0,
            committed.1,
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
    let mut l = ledger.lock().unwrap();
    check_after_restart(&daemon, ROUNDS, &l, &generations);
    check_writers_after_restart(&daemon, ROUNDS, &mut l);
    assert!(
        total_acked >= ROUNDS * 20,
        "too few operations acknowledged: {total_acked}"
    );
    assert!(
        total_lease_acked >= ROUNDS * 10 && total_heartbeat_acked >= ROUNDS * 10,
        "too few lease ({total_lease_acked}) or heartbeat ({total_heartbeat_acked}) answers"
    );
    let held = l
        .leases
        .values()
        .filter(|s| matches!(s, LeaseState::Held { .. }))
        .count();
    let released = l
        .leases
        .values()
        .filter(|s| matches!(s, LeaseState::Released { .. }))
        .count();
    eprintln!(
        "writers: {total_lease_acked} lease answers ({held} held, {released} released at the \
         end), {total_heartbeat_acked} heartbeat answers, {} workers registered",
        l.workers.len()
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
