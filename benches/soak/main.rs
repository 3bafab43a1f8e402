//! Retention soak: steady churn against the release daemon for a while,
//! sampling the database and WAL sizes and the row counts, to show that
//! with `store.retention` they stay bounded (docs/benchmarks.md,
//! "Retention soak").
//!
//! The churn, at `--rate` operations per second from one paced client, in
//! rotation: spawn a sandbox (with an Idempotency-Key), destroy the oldest
//! live one beyond 50, acquire an admin lease on a fresh resource id, and
//! release it (both audited). Every 30 s a line: elapsed, operations done,
//! database and WAL bytes, rows per table.
//!
//!     cargo bench --bench soak -- [--duration 10m] [--rate 150] [--retention 60s]

#[path = "../loadgen/client.rs"]
mod client;
#[path = "../common/daemon.rs"]
mod daemon;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use client::Client;
use stacyvmd::time::parse_duration;

const USAGE: &str = "usage: cargo bench --bench soak -- [--duration D] [--rate N] [--retention D]";
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
const LIVE: usize = 50;

struct Options {
    duration: Duration,
    rate: u32,
    retention: String,
}

fn parse_options(args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut o = Options {
        duration: Duration::from_secs(600),
        rate: 150,
        retention: "60s".into(),
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => o.duration = parse_duration(&value()?)?,
            "--rate" => o.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--retention" => o.retention = value()?,
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if o.rate == 0 {
        return Err("--rate must be positive".into());
    }
    Ok(Some(o))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn rows(db: &Path) -> Result<String, String> {
    let conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
    let mut parts = Vec::new();
    for table in ["sandboxes", "leases", "idempotency_keys", "admin_audit"] {
        let n: i64 = conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .map_err(|e| format!("{table}: {e}"))?;
        parts.push(format!("{table}={n}"));
    }
    Ok(parts.join(" "))
}

fn run() -> Result<(), String> {
    let Some(options) = parse_options(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_stacyvmd"));
    println!("machine: {}", daemon::machine_description());
    println!(
        "soak: {:?} at {} ops/s, store.retention = {}",
        options.duration, options.rate, options.retention
    );
    let scratch = daemon::ScratchDir::new("stacyvmd-soak")?;
    let data = scratch.0.join("data");
    let config = scratch.0.join("stacyvmd.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nretention = \"{}\"\n\n[worker]\nmax_sandboxes = 100000\n\n[sandboxes]\nmax_sandboxes = 100000\n",
            options.retention
        ),
    )
    .map_err(|e| format!("writing {}: {e}", config.display()))?;
    let mut args: Vec<OsString> = vec!["--config".into(), config.into_os_string()];
    args.extend(daemon::local_args(&data));
    let running = daemon::Daemon::start(binary, &args, None, &scratch.0.join("stderr.log"))?;
    let db = data.join("stacyvmd.db");
    let wal = data.join("stacyvmd.db-wal");
    let mut client = Client::connect(running.addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;

    let interval = Duration::from_secs_f64(1.0 / f64::from(options.rate));
    let started = Instant::now();
    let mut next_sample = started + SAMPLE_EVERY;
    let mut live: VecDeque<String> = VecDeque::new();
    let (mut done, mut failed) = (0u64, 0u64);
    // Every refusal by operation kind and status (0: no answer), with the
    // first answer of each, so that a failure in a long run can be told
    // apart.
    let mut refusals: std::collections::BTreeMap<(&str, u16), (u64, String)> = Default::default();
    let (mut max_db, mut max_wal) = (0u64, 0u64);
    let mut op = 0u64;
    while started.elapsed() < options.duration {
        let due = started + interval.mul_f64(op as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let request = match op % 4 {
            0 => format!(
                "POST /api/v1/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                 Idempotency-Key: soak-{op}\r\nContent-Length: 2\r\n\r\n{{}}"
            )
            .into_bytes(),
            1 => match (live.len() > LIVE).then(|| live.pop_front()).flatten() {
                Some(id) => format!("DELETE /api/v1/sandboxes/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    .into_bytes(),
                None => client::get("/api/v1/live"),
            },
            2 => client::post_json(
                &format!("/api/v1/admin/leases/soak-res-{}/acquire", op / 4),
                r#"{"holder_id":"soak","ttl":"1h","resource_type":"pool_vm"}"#,
            ),
            _ => client::post_json(
                &format!("/api/v1/admin/leases/soak-res-{}/release", op / 4),
                r#"{"holder_id":"soak"}"#,
            ),
        };
        let kind = ["spawn", "destroy", "acquire", "release"][(op % 4) as usize];
        let response = match client.exchange(&request) {
            Ok(r) => r,
            Err(e) => {
                // No answer within the client's 10 s (or a broken
                // connection): counted, shown at the end, and the run goes
                // on over a new connection.
                failed += 1;
                let when = started.elapsed().as_secs();
                let seen = refusals
                    .entry((kind, 0))
                    .or_insert_with(|| (0, format!("at {when} s: {e}")));
                seen.0 += 1;
                client = Client::connect(running.addr, Duration::from_secs(10))
                    .map_err(|e| format!("reconnecting: {e}"))?;
                op += 1;
                continue;
            }
        };
        if (200..300).contains(&response.status) {
            done += 1;
            if op % 4 == 0 {
                let body: serde_json::Value =
                    serde_json::from_slice(response.body).map_err(|e| e.to_string())?;
                if let Some(id) = body["id"].as_str() {
                    live.push_back(id.to_owned());
                }
            }
        } else {
            failed += 1;
            let seen = refusals.entry((kind, response.status)).or_insert_with(|| {
                (
                    0,
                    String::from_utf8_lossy(response.body)
                        .chars()
                        .take(200)
                        .collect(),
                )
            });
            seen.0 += 1;
        }
        op += 1;
        if Instant::now() >= next_sample {
            next_sample += SAMPLE_EVERY;
            let (d, w) = (file_bytes(&db), file_bytes(&wal));
            max_db = max_db.max(d);
            max_wal = max_wal.max(w);
            println!(
                "{:>5.0}s ops={done} failed={failed} db={d} wal={w} {}",
                started.elapsed().as_secs_f64(),
                rows(&db)?
            );
        }
    }
    let elapsed = started.elapsed();
    println!(
        "end: {done} ok and {failed} failed in {elapsed:?} ({:.1} ops/s); max db {max_db} B, max wal {max_wal} B; final db {} B, wal {} B, {}",
        done as f64 / elapsed.as_secs_f64(),
        file_bytes(&db),
        file_bytes(&wal),
        rows(&db)?
    );
    for ((kind, status), (n, first)) in &refusals {
        println!("refused: {n} x {kind} -> {status}, first: {first}");
    }
    running.stop()?;
    Ok(())
}
