//! A full disk: the data dir on a small tmpfs (the tests run as root, as
//! `.ci/run` does), filled to the last page by a filler file while clients
//! spawn. Readiness must fail while the store cannot commit, answers must
//! be 507 `STORAGE_FULL` (never a 500), the local worker must not go stale,
//! writes must come back by themselves within 5 s of space returning, and
//! nothing acknowledged may be lost. A destroy whose final commit fails
//! after the provider ran must say so and be finished later, and a start on
//! a full disk must say what is wrong and exit 3.

use crate::common;
use crate::sandbox_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Daemon, Request, assert_status, poll_until};
use sandbox_support::{SANDBOXES, get_sandbox, sandbox_path, spawn_ok, spawn_req};
use serde_json::{Value, json};

static NEXT_MOUNT: AtomicUsize = AtomicUsize::new(0);

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!(
            "stacyvmd-tmpfs-{}-{}",
            std::process::id(),
            NEXT_MOUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed (these tests need root, as .ci/run has): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes a filler file until the filesystem has no page left.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("create filler");
        for chunk in [1 << 20, 64 << 10, 4 << 10] {
            let block = vec![0xa5u8; chunk];
            while file.write_all(&block).is_ok() {}
        }
        let _ = file.flush();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn daemon_on(fs: &Tmpfs, config: &str) -> common::DaemonBuilder {
    let data = fs.path().join("data");
    Daemon::builder()
        .no_data_dir()
        .args(&["--data-dir", data.to_str().expect("utf-8 path")])
        .config(config)
}

/// The default reserve (8 MiB) is kept: the filesystems are sized for it.
const RESERVE: u64 = 8 << 20;

const CONFIG: &str = "\
[worker]
max_sandboxes = 100000
heartbeat_interval = \"200ms\"
stale_after = \"1s\"

[sandboxes]
max_sandboxes = 100000
";

fn sandbox_state(db: &Path, id: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(db).expect("open db");
    conn.query_row("SELECT state FROM sandboxes WHERE id = ?1", [id], |r| {
        r.get(0)
    })
    .ok()
}

/// Spawns from `clients` threads until `stop`; every 201 id goes into
/// `acked`, every answer that is not 201, 507 or 503 into `unexpected`.
fn spawn_load(
    addr: std::net::SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    full_answers: Arc<AtomicUsize>,
    unexpected: Arc<Mutex<Vec<String>>>,
) -> Vec<thread::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let (stop, acked, full_answers, unexpected) = (
                stop.clone(),
                acked.clone(),
                full_answers.clone(),
                unexpected.clone(),
            );
            thread::spawn(move || {
                let mut client = Client::connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    let resp = match client
                        .send(&spawn_req(&json!({"metadata": {"pad": "x".repeat(512)}})))
                    {
                        Ok(r) => r,
                        Err(_) => {
                            client = Client::connect(addr);
                            continue;
                        }
                    };
                    match resp.status {
                        201 => acked
                            .lock()
                            .unwrap()
                            .push(resp.json()["id"].as_str().unwrap().to_string()),
                        507 => {
                            let body = resp.json();
                            if body["code"] != "STORAGE_FULL" {
                                unexpected.lock().unwrap().push(resp.to_string());
                            }
                            full_answers.fetch_add(1, Ordering::Relaxed);
                        }
                        503 => {}
                        _ => unexpected.lock().unwrap().push(resp.to_string()),
                    }
                }
            })
        })
        .collect()
}

#[test]
fn a_full_disk_fails_readiness_answers_507_and_recovers_by_itself() {
    let fs = Tmpfs::mount("32m");
    let mut daemon = daemon_on(&fs, CONFIG).start();
    let local = daemon.worker_id.clone();
    let reserve = PathBuf::from(format!("{}.reserve", daemon.db.display()));
    assert_status(&daemon.get("/api/v1/ready"), 200);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let full_answers = Arc::new(AtomicUsize::new(0));
    let unexpected = Arc::new(Mutex::new(Vec::new()));
    let load = spawn_load(
        daemon.addr,
        2,
        stop.clone(),
        acked.clone(),
        full_answers.clone(),
        unexpected.clone(),
    );
    poll_until(
        Duration::from_secs(20),
        "some spawns before the fill",
        || acked.lock().unwrap().len() >= 20,
    );

    let filler = fs.fill();
    let mut failed_ready = None;
    poll_until(
        Duration::from_secs(20),
        "/ready to fail on the full disk",
        || {
            let resp = daemon.get("/api/v1/ready");
            if resp.status == 503 {
                failed_ready = Some(resp);
            }
            failed_ready.is_some()
        },
    );
    let failed_ready = failed_ready.expect("polled");
    let message = failed_ready.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.starts_with("store: storage full"),
        "/ready must name the store and the full disk:\n{failed_ready}"
    );
    poll_until(Duration::from_secs(20), "a 507 STORAGE_FULL answer", || {
        full_answers.load(Ordering::Relaxed) > 0
    });
    // Three staleness windows on the full disk: the local worker's own
    // heartbeats are soft state and keep it fresh throughout.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let w = sandbox_support::worker(&daemon, &local);
        assert_eq!(
            w["stale"], false,
            "local worker went stale on a full disk: {w}"
        );
    }

    std::fs::remove_file(&filler).expect("remove filler");
    let freed = Instant::now();
    let before = acked.lock().unwrap().len();
    poll_until(
        Duration::from_secs(5),
        "a spawn to succeed after space returned",
        || acked.lock().unwrap().len() > before,
    );
    let recovered_in = freed.elapsed();
    poll_until(
        Duration::from_secs(5),
        "/ready 200 after space returned",
        || daemon.get("/api/v1/ready").status == 200,
    );
    eprintln!("writes recovered {recovered_in:?} after space returned");
    stop.store(true, Ordering::Relaxed);
    load.into_iter()
        .for_each(|h| h.join().expect("load thread"));
    poll_until(
        Duration::from_secs(5),
        "the reserve to be made again",
        || std::fs::metadata(&reserve).map(|m| m.len()).ok() == Some(RESERVE),
    );

    let unexpected = unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "{} answers that are neither 201, 507 STORAGE_FULL nor 503, e.g.\n{}",
        unexpected.len(),
        unexpected[0]
    );
    let acked = acked.lock().unwrap().clone();
    assert_eq!(daemon.stop().code(), Some(0));
    let daemon = daemon.restart();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| get_sandbox(&daemon, id).status != 200)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged spawns lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        lost.first()
    );
}

#[test]
fn a_start_on_a_full_disk_says_what_is_wrong_and_exits_3() {
    let fs = Tmpfs::mount("8m");
    let _filler = fs.fill();
    let refused = daemon_on(&fs, CONFIG)
        .try_start()
        .err()
        .expect("stacyvmd started on a full disk");
    assert_eq!(refused.status.code(), Some(3), "{refused}");
    let out = refused.output();
    let line = out
        .lines()
        .find(|l| l.contains("storage full"))
        .unwrap_or_else(|| panic!("no `storage full` line\n{refused}"));
    assert!(
        line.contains(&fs.path().join("data").display().to_string()) && line.contains("bytes free"),
        "the line must name the path and the free space: {line}"
    );
}

/// The disk fills while the provider destroys a runtime: the destroy's
/// final commit fails after the runtime is gone.
fn destroy_on_a_filling_disk(fs: &Tmpfs, daemon: &Daemon) -> (String, PathBuf) {
    let sandbox = spawn_ok(daemon, &json!({}));
    let id = sandbox["id"].as_str().unwrap().to_string();
    let addr = daemon.addr;
    let path = sandbox_path(&id);
    let answer = thread::spawn(move || Client::connect(addr).request(&Request::delete(&path)));
    let db = daemon.db.clone();
    poll_until(
        Duration::from_secs(10),
        "the destroy to take its lease",
        || {
            let conn = rusqlite::Connection::open(&db).expect("open db");
            conn.query_row(
                "SELECT count(*) FROM destroy_intents WHERE sandbox_id = ?1",
                [&id],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
                == 1
        },
    );
    // The WAL reuses its pages once reset: truncate it (as any
    // checkpointer may), so the next commit needs new pages.
    poll_until(Duration::from_secs(5), "a WAL truncate", || {
        let conn = rusqlite::Connection::open(&db).expect("open db");
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap_or(1)
            == 0
    });
    let filler = fs.fill();
    let resp = answer.join().expect("destroy thread");
    assert_eq!(resp.status, 507, "destroy on a full disk:\n{resp}");
    let body = resp.json();
    assert_eq!(body["code"], "STORAGE_FULL", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("runtime is destroyed") && message.contains("finished"),
        "the answer must say the runtime is gone and the record will be finished: {message}"
    );
    assert!(
        !sandbox_support::markers(&fs.path().join("data")).contains(&id),
        "the provider did not run"
    );
    (id, filler)
}

/// No reserve: nothing but the test gives space back, so the destroy's
/// record stays unfinished until it does.
const SLOW_CONFIG: &str = "\
[store]
reserve_bytes = 0

[providers.mock]
latency = \"1s\"
";

#[test]
fn a_destroy_whose_commit_failed_on_a_full_disk_is_finished_when_space_returns() {
    let fs = Tmpfs::mount("32m");
    let daemon = daemon_on(&fs, SLOW_CONFIG).start();
    let (id, filler) = destroy_on_a_filling_disk(&fs, &daemon);
    // Meanwhile no answer claims the runtime that is gone.
    assert_eq!(get_sandbox(&daemon, &id).status, 404);
    let listed = daemon.get(SANDBOXES).json();
    assert!(
        !listed.as_array().unwrap().iter().any(|s| s["id"] == id),
        "listed while its runtime is gone: {listed}"
    );
    std::fs::remove_file(&filler).expect("remove filler");
    poll_until(Duration::from_secs(10), "the record to be finished", || {
        sandbox_state(&daemon.db, &id).as_deref() == Some("destroyed")
    });
    let lease = sandbox_support::lease(&daemon, &id);
    assert_eq!(
        lease["holder_id"], "",
        "lease released with the record: {lease}"
    );
}

#[test]
fn a_destroy_interrupted_on_a_full_disk_is_finished_at_restart_not_lost() {
    let fs = Tmpfs::mount("32m");
    let mut daemon = daemon_on(&fs, SLOW_CONFIG).start();
    let (id, filler) = destroy_on_a_filling_disk(&fs, &daemon);
    daemon.kill9();
    assert_eq!(sandbox_state(&daemon.db, &id).as_deref(), Some("running"));
    std::fs::remove_file(&filler).expect("remove filler");
    let daemon = daemon.restart();
    assert_eq!(
        sandbox_state(&daemon.db, &id).as_deref(),
        Some("destroyed"),
        "reconciliation must finish the destroy, not call it lost\n{}",
        daemon.stderr_text()
    );
    // The log line is written before the readiness line, but stderr is
    // read by its own thread: wait for it, bounded.
    let logged = format!("finished the interrupted destroy of {id}");
    poll_until(
        std::time::Duration::from_secs(5),
        "reconciliation to log what it did",
        || daemon.stderr_text().contains(&logged),
    );
    let body: Value = daemon.get("/api/v1/ready").json();
    assert_eq!(body["status"], "ready", "{body}");
}
