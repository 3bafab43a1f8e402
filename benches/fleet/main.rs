//! Fleet benchmark: the sandbox, lease, memory and startup targets of
//! PERFORMANCE.md (S1, S2, L1, L3, MEM, START).
//!
//!     cargo build --release && cargo bench --bench fleet [-- --quick] [-- --runs N]
//!
//! Everything runs on this machine in this one run, on loopback only: the
//! release daemon (target/release/stacyvmd) started on 127.0.0.1:0 with a
//! config and data dir written here; PostgreSQL 15 and etcd installed (Debian
//! packages) and started by benches/fleet/peers.sh on 127.0.0.1 in a scratch
//! dir; client threads in this process over keep-alive connections (and, for
//! the lease renewals of L1, also over the daemon's admin socket). Every
//! measurement is bounded in time and request count, and everything started
//! is stopped at the end. The program prints a table and exits 0 whether
//! targets pass or fail; it exits 1 only when it could not measure.
//! See docs/benchmarks-fleet.md.

#[allow(dead_code)]
#[path = "../loadgen/client.rs"]
mod client;
#[path = "../common/daemon.rs"]
mod daemon;
mod drive;
#[path = "../loadgen/latency.rs"]
mod latency;
#[path = "../common/ndjson.rs"]
mod ndjson;
mod peers;

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use client::post_json;
use daemon::Daemon;
use drive::{Measurement, Plan, drive, drive_socket, once, status_is};
use ndjson::LineClient;
use peers::Peers;

const USAGE: &str = "usage: cargo bench --bench fleet [-- [--quick] [--runs N] [--sandboxes N] [--workers N] [--no-peers] [--leases-only] [--keep]]";

const SPAWN_BODY: &str = r#"{"ttl":"1h"}"#;
const SPAWN_CONNECTIONS: usize = 16;
const LEASE_CONNECTIONS: usize = 8;
/// Bound on requests in one timed window, on top of the time bound.
const MAX_REQUESTS: usize = 1_000_000;
/// Bound on any fill (spawns or heartbeats that build state), in time.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);
/// The sandbox counts placement is compared at (the last is --sandboxes).
const SANDBOX_LEVELS: [usize; 2] = [1_000, 10_000];
/// The worker counts placement is compared at (the last is --workers).
const FIRST_WORKER_LEVEL: usize = 100;
const S1_TARGET: f64 = 3_750.0;
const S2_TARGET_MS: f64 = 2.8;
const MEM_TARGET_MB: f64 = 200.0;
const START_TARGET_MS: f64 = 500.0;
/// "Flat" placement cost from 1k to 100k sandboxes: the preflight p50 and
/// the spawn p50 (16 connections) may grow by at most this factor; from
/// 100 to 10,000 workers, by at most WORKER_FACTOR.
const FLAT_FACTOR: f64 = 1.25;
const WORKER_FACTOR: f64 = 2.0;
const MIB: f64 = 1024.0 * 1024.0;
/// Pause after building state (fills), before measuring: the checkpoint of
/// what the fill wrote happens here, not in the measurement.
const SETTLE: Duration = Duration::from_secs(2);
/// Preflight windows per placement point (the best p50 counts).
const PREFLIGHT_WINDOWS: usize = 3;
/// Longer than leases.renew_interval (10 s by default).
const RENEWAL_WINDOW: Duration = Duration::from_secs(12);

struct Options {
    runs: usize,
    duration: Duration,
    sandboxes: usize,
    workers: usize,
    peers: bool,
    /// Only L1 and L3 (the lease phase), not the fleet that follows.
    leases_only: bool,
    /// Leave the scratch dir (data dirs, configs, daemon logs) in place.
    keep: bool,
}

fn parse_options(mut arguments: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        runs: 3,
        duration: Duration::from_secs(3),
        sandboxes: 100_000,
        workers: 10_000,
        peers: true,
        leases_only: false,
        keep: false,
    };
    let number = |name: &str, value: Option<String>| -> Result<usize, String> {
        value
            .and_then(|value| value.replace('_', "").parse().ok())
            .filter(|&n: &usize| n > 0)
            .ok_or_else(|| format!("{name} needs a positive number"))
    };
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--quick" => {
                options.duration = Duration::from_secs(1);
                options.runs = 1;
            }
            "--runs" => options.runs = number("--runs", arguments.next())?,
            "--sandboxes" => options.sandboxes = number("--sandboxes", arguments.next())?,
            "--workers" => options.workers = number("--workers", arguments.next())?,
            "--no-peers" => options.peers = false,
            "--leases-only" => options.leases_only = true,
            "--keep" => options.keep = true,
            // `cargo bench` appends --bench to every bench binary's arguments.
            "--bench" => {}
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if options.sandboxes <= SANDBOX_LEVELS[1] {
        return Err(format!("--sandboxes must be above {}", SANDBOX_LEVELS[1]));
    }
    if options.workers <= FIRST_WORKER_LEVEL {
        return Err(format!("--workers must be above {FIRST_WORKER_LEVEL}"));
    }
    Ok(options)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fleet: error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let options = parse_options(std::env::args().skip(1))?;
    let binary = Path::new(env!("CARGO_BIN_EXE_stacyvmd"));
    if !binary.is_file() {
        return Err(format!(
            "{} is missing: run `cargo build --release && cargo bench --bench fleet`",
            binary.display()
        ));
    }
    let scratch = Scratch::new(options.keep)?;
    println!("machine: {}", daemon::machine_description());
    println!(
        "daemon:  {} ({})",
        daemon::daemon_version(binary)?,
        binary.display()
    );
    println!(
        "plan:    {} run(s), {:?} per window, {} sandboxes, {} workers, scratch {}",
        options.runs,
        options.duration,
        options.sandboxes,
        options.workers,
        scratch.path.display()
    );

    let mut rows = Vec::new();
    let leases = lease_phase(binary, &scratch.path, &options)?;
    rows.extend(leases);
    if !options.leases_only {
        let fleet = fleet_phase(binary, &scratch.path, &options)?;
        rows.extend(fleet);
    }

    println!();
    print_table(&rows);
    Ok(())
}

/// Starts `binary -c config serve`.
fn start_with_config(binary: &Path, config: &Path, stderr: &Path) -> Result<Daemon, String> {
    let args = ["-c".into(), config.as_os_str().to_owned(), "serve".into()];
    Daemon::start(binary, &args, None, stderr)
}

/// A scratch directory removed at the end, whatever happens.
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(keep: bool) -> Result<Scratch, String> {
        let path = std::env::temp_dir().join(format!("stacyvmd-fleet-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .map_err(|error| format!("creating {}: {error}", path.display()))?;
        Ok(Scratch { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("fleet: kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes a config for a daemon whose data dir is `<dir>/data`; returns
/// the config path.
fn write_config(dir: &Path, extra: &str) -> Result<PathBuf, String> {
    let data_dir = dir.join("data");
    fs::create_dir_all(&data_dir)
        .map_err(|error| format!("creating {}: {error}", data_dir.display()))?;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = {:?}\n\n[log]\nlevel = \"warn\"\n\n{extra}",
        data_dir.display().to_string()
    );
    let path = dir.join("stacyvmd.toml");
    fs::write(&path, config).map_err(|error| format!("writing {}: {error}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------- leases

/// L1 and L3: the daemon's lease routes (REST, and renewals also over the
/// admin socket) against PostgreSQL and etcd, side by side in each run.
fn lease_phase(binary: &Path, scratch: &Path, options: &Options) -> Result<Vec<Row>, String> {
    println!("\n== L1/L3: leases (daemon, PostgreSQL 15, etcd) ==");
    let dir = scratch.join("leases");
    let config = write_config(&dir, "")?;
    let daemon = start_with_config(binary, &config, &dir.join("stderr.log"))?;
    let admin = daemon
        .admin
        .clone()
        .ok_or("the daemon's readiness line names no admin socket")?;
    println!(
        "daemon pid {} on {}, admin socket {}",
        daemon.pid,
        daemon.addr,
        admin.display()
    );
    let peers = if options.peers {
        Some(Peers::start(
            Path::new(PEERS_SCRIPT),
            &scratch.join("peers"),
        ))
    } else {
        None
    };
    // initdb and etcd's first writes are still being written back.
    settle(Duration::from_secs(5));
    let peer_problem = |which: &str| -> String {
        match (&peers, which) {
            (None, _) => "skipped (--no-peers)".to_owned(),
            (Some(p), "pg") => p.pg.as_ref().err().cloned().unwrap_or_default(),
            (Some(p), _) => p.etcd.as_ref().err().cloned().unwrap_or_default(),
        }
    };

    let addr = daemon.addr;
    let window = |connections| Plan {
        connections,
        duration: options.duration,
        max_requests: MAX_REQUESTS,
    };
    let mut figures = LeaseFigures::default();
    for run in 1..=options.runs {
        println!("-- run {run}/{}", options.runs);
        for connections in [1, LEASE_CONNECTIONS] {
            let slot = usize::from(connections != 1);
            take_leases(addr, connections)?;
            settle(Duration::ZERO);
            let renew = renew_window(&daemon, "REST", connections, || {
                drive(addr, window(connections), status_is(200), |c| {
                    vec![lease_request(c, "renew", &format!("h-{c}"))]
                })?
                .clean("lease renew")
            })?;
            figures.renew[slot].push(renew.rate());

            take_socket_leases(&admin, connections)?;
            settle(Duration::ZERO);
            let renew = renew_window(&daemon, "socket", connections, || {
                drive_socket(&admin, window(connections), socket_renew_line)?
                    .clean("lease.renew over the admin socket")
            })?;
            figures.socket_renew[slot].push(renew.rate());

            take_leases(addr, connections)?;
            settle(Duration::ZERO);
            let acquire = drive(addr, window(connections), status_is(200), |c| {
                vec![lease_request(c, "acquire", &format!("h-{c}"))]
            })?
            .clean("lease acquire by its holder")?;
            println!(
                "daemon acquire, {connections} conn: {:>8.0}/s  p50 {:.3} ms  p99 {:.3} ms  (granted: the holder re-acquires)",
                acquire.rate(),
                acquire.p50_ms(),
                acquire.p99_ms()
            );
            figures.acquire[slot].push(acquire.rate());

            take_rival_leases(addr, connections)?;
            settle(Duration::ZERO);
            let metrics_before = scrape(addr)?;
            let refused = drive(addr, window(connections), status_is(409), |c| {
                vec![lease_request_on(
                    &format!("rival-{c}"),
                    "acquire",
                    &format!("h-{c}"),
                )]
            })?
            .clean("refused acquire")?;
            let store = StoreDelta::between(&metrics_before, &scrape(addr)?);
            println!(
                "daemon refused, {connections} conn: {:>8.0}/s  p50 {:.3} ms  p99 {:.3} ms  | {}",
                refused.rate(),
                refused.p50_ms(),
                refused.p99_ms(),
                store.describe(refused.elapsed)
            );
            figures.refused[slot].push(refused.rate());

            if let Some(peers) = &peers {
                settle(Duration::ZERO);
                match peers.pg_bench(connections, options.duration, "renew") {
                    Ok(pg) => {
                        println!(
                            "postgres upsert, {connections} conn: {:>7.0}/s  mean {:.3} ms",
                            pg.tps, pg.latency_ms
                        );
                        figures.pg[slot].push(pg.tps);
                    }
                    Err(error) => {
                        println!("postgres upsert, {connections} conn: not measured: {error}")
                    }
                }
                settle(Duration::ZERO);
                match peers.pg_bench(connections, options.duration, "refused") {
                    Ok(pg) => {
                        println!(
                            "postgres refused upsert, {connections} conn: {:>7.0}/s  mean {:.3} ms",
                            pg.tps, pg.latency_ms
                        );
                        figures.pg_refused[slot].push(pg.tps);
                    }
                    Err(error) => {
                        println!("postgres refused, {connections} conn: not measured: {error}")
                    }
                }
                match peers
                    .etcd_txn(window(connections))
                    .and_then(|m| m.clean("etcd txn"))
                {
                    Ok(txn) => {
                        println!(
                            "etcd txn CAS,   {connections} conn: {:>8.0}/s  p50 {:.3} ms  p99 {:.3} ms",
                            txn.rate(),
                            txn.p50_ms(),
                            txn.p99_ms()
                        );
                        figures.etcd_txn[slot].push(txn.rate());
                    }
                    Err(error) => println!("etcd txn, {connections} conn: not measured: {error}"),
                }
                settle(Duration::ZERO);
                match peers
                    .etcd_keepalive(window(connections))
                    .and_then(|m| m.clean("etcd keepalive"))
                {
                    Ok(keepalive) => {
                        println!(
                            "etcd keepalive, {connections} conn: {:>8.0}/s  p50 {:.3} ms  p99 {:.3} ms",
                            keepalive.rate(),
                            keepalive.p50_ms(),
                            keepalive.p99_ms()
                        );
                        figures.etcd_keepalive[slot].push(keepalive.rate());
                    }
                    Err(error) => {
                        println!("etcd keepalive, {connections} conn: not measured: {error}")
                    }
                }
            }
        }
    }
    let (pg_problem, etcd_problem) = (peer_problem("pg"), peer_problem("etcd"));
    drop(peers);
    stop(daemon)?;

    let mut rows = Vec::new();
    // L1 for each door: REST, then the admin socket.
    let doors = [
        ("REST", &figures.renew),
        ("admin socket", &figures.socket_renew),
    ];
    for (door, rates) in doors {
        for (slot, connections) in [(0, 1), (1, LEASE_CONNECTIONS)] {
            let renew = median(&rates[slot]);
            rows.push(peer_row(
                "L1",
                format!("renew ({door}) {}/s, {connections} conn", thousands(renew)),
                "PostgreSQL 15 upsert",
                renew,
                &figures.pg[slot],
                1.0,
                &pg_problem,
            ));
        }
    }
    for (door, rates) in doors {
        for (slot, connections) in [(0, 1), (1, LEASE_CONNECTIONS)] {
            let renew = median(&rates[slot]);
            let figure = format!("renew ({door}) {}/s, {connections} conn", thousands(renew));
            rows.push(peer_row(
                "L1",
                figure.clone(),
                "etcd txn compare-and-put",
                renew,
                &figures.etcd_txn[slot],
                2.5,
                &etcd_problem,
            ));
            // What an etcd client does to keep a lock alive: once, beside REST.
            // No target: shown, not judged.
            if door == "REST" {
                let mut keepalive = peer_row(
                    "L1 (info)",
                    figure,
                    "etcd lease keepalive (not durable)",
                    renew,
                    &figures.etcd_keepalive[slot],
                    2.5,
                    &etcd_problem,
                );
                keepalive.target = "-".to_owned();
                keepalive.verdict = None;
                rows.push(keepalive);
            }
        }
    }
    for (slot, connections) in [(0, 1), (1, LEASE_CONNECTIONS)] {
        let refused = median(&figures.refused[slot]);
        let renew = median(&figures.renew[slot]);
        rows.push(Row::ratio(
            "L3",
            format!(
                "refused acquire {}/s, {connections} conn",
                thousands(refused)
            ),
            format!("granted renew (REST) {}/s", thousands(renew)),
            refused / renew,
            1.5,
        ));
    }
    let acquire = median(&figures.acquire[1]);
    let renew = median(&figures.renew[1]);
    rows.push(Row::info(
        "L1 (info)",
        format!(
            "acquire by holder {}/s, {LEASE_CONNECTIONS} conn",
            thousands(acquire)
        ),
        format!("renew (REST) {}/s", thousands(renew)),
        acquire / renew,
    ));
    if !figures.pg_refused[1].is_empty() {
        let pg_refused = median(&figures.pg_refused[1]);
        let pg = median(&figures.pg[1]);
        rows.push(Row::info(
            "L3 (info)",
            format!(
                "PostgreSQL refused upsert {}/s, {LEASE_CONNECTIONS} conn",
                thousands(pg_refused)
            ),
            format!("its granted {}/s", thousands(pg)),
            pg_refused / pg,
        ));
    }
    Ok(rows)
}

/// One renew window (`measure`), printed with what the store did in it
/// and the daemon's CPU time per renew.
fn renew_window(
    daemon: &Daemon,
    door: &str,
    connections: usize,
    measure: impl FnOnce() -> Result<Measurement, String>,
) -> Result<Measurement, String> {
    let metrics_before = scrape(daemon.addr)?;
    let cpu_before = daemon.cpu_time()?;
    let renew = measure()?;
    let spent = daemon.cpu_time()?.saturating_sub(cpu_before);
    let store = StoreDelta::between(&metrics_before, &scrape(daemon.addr)?);
    println!(
        "daemon renew {:<9} {connections} conn: {:>8.0}/s  p50 {:.3} ms  p99 {:.3} ms  | {}, daemon CPU {:.1} us/op",
        format!("({door}),"),
        renew.rate(),
        renew.p50_ms(),
        renew.p99_ms(),
        store.describe(renew.elapsed),
        spent.as_secs_f64() * 1e6 / renew.ok.max(1) as f64
    );
    Ok(renew)
}

const PEERS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/fleet/peers.sh");

/// Per-run figures; index 0 is one connection, 1 is LEASE_CONNECTIONS.
#[derive(Default)]
struct LeaseFigures {
    /// Over REST.
    renew: [Vec<f64>; 2],
    /// `lease.renew` over the admin socket.
    socket_renew: [Vec<f64>; 2],
    acquire: [Vec<f64>; 2],
    refused: [Vec<f64>; 2],
    pg: [Vec<f64>; 2],
    pg_refused: [Vec<f64>; 2],
    etcd_txn: [Vec<f64>; 2],
    etcd_keepalive: [Vec<f64>; 2],
}

fn lease_request(connection: usize, verb: &str, holder: &str) -> Vec<u8> {
    lease_request_on(&format!("r-{connection}"), verb, holder)
}

fn lease_request_on(resource: &str, verb: &str, holder: &str) -> Vec<u8> {
    post_json(
        &format!("/api/v1/admin/leases/{resource}/{verb}"),
        &format!(r#"{{"holder_id":"{holder}","ttl":"30s"}}"#),
    )
}

/// Each connection's lease `r-<c>`, held by `h-<c>` (acquired again before
/// each window: a lease left from an earlier run may have lapsed).
fn take_leases(addr: SocketAddr, connections: usize) -> Result<(), String> {
    for c in 0..connections {
        expect(
            addr,
            &lease_request(c, "acquire", &format!("h-{c}")),
            200,
            "lease acquire",
        )?;
    }
    Ok(())
}

/// Connection `c`'s `lease.acquire` over the admin socket: lease `s-<c>`
/// for holder `h-<c>`, TTL 30 s like the REST ones.
fn socket_acquire_line(c: usize) -> Vec<u8> {
    format!(
        "{{\"id\":\"a\",\"method\":\"lease.acquire\",\"params\":{{\"resource_id\":\"s-{c}\",\"resource_type\":\"bench\",\"holder_id\":\"h-{c}\",\"ttl\":\"30s\"}}}}\n"
    )
    .into_bytes()
}

/// Connection `c`'s `lease.renew` over the admin socket.
fn socket_renew_line(c: usize) -> Vec<u8> {
    format!(
        "{{\"id\":\"r\",\"method\":\"lease.renew\",\"params\":{{\"resource_id\":\"s-{c}\",\"holder_id\":\"h-{c}\",\"ttl\":\"30s\"}}}}\n"
    )
    .into_bytes()
}

/// Each connection's lease `s-<c>`, held by `h-<c>`, acquired over the admin
/// socket (again before each window, as for REST).
fn take_socket_leases(admin: &Path, connections: usize) -> Result<(), String> {
    let mut client = LineClient::connect(admin)?;
    for c in 0..connections {
        client
            .round_trip(&socket_acquire_line(c))
            .map_err(|error| format!("lease acquire over the admin socket: {error}"))?;
    }
    Ok(())
}

/// `rival-<c>`, held by `rival` for an hour, for the refused acquires.
fn take_rival_leases(addr: SocketAddr, connections: usize) -> Result<(), String> {
    for c in 0..connections {
        let request = post_json(
            &format!("/api/v1/admin/leases/rival-{c}/acquire"),
            r#"{"holder_id":"rival","ttl":"1h"}"#,
        );
        expect(addr, &request, 200, "rival lease acquire")?;
    }
    Ok(())
}

fn peer_row(
    id: &'static str,
    figure: String,
    peer: &str,
    ours: f64,
    theirs: &[f64],
    target: f64,
    problem: &str,
) -> Row {
    if theirs.is_empty() {
        let why = if problem.is_empty() {
            "not measured"
        } else {
            problem
        };
        return Row {
            id,
            figure,
            comparison: format!("{peer}: {why}"),
            ratio: None,
            target: format!(">= {target:.1} x"),
            verdict: None,
        };
    }
    let theirs = median(theirs);
    Row::ratio(
        id,
        figure,
        format!("{peer} {}/s", thousands(theirs)),
        ours / theirs,
        target,
    )
}

// ---------------------------------------------------------------- fleet

/// S1, S2, MEM and START on one daemon that grows to `options.sandboxes`
/// sandboxes and `options.workers` workers.
fn fleet_phase(binary: &Path, scratch: &Path, options: &Options) -> Result<Vec<Row>, String> {
    println!("\n== S1/S2/MEM/START: sandboxes and workers ==");
    let dir = scratch.join("fleet");
    let config = write_config(
        &dir,
        "[worker]\nmax_sandboxes = 1000000\n\n[sandboxes]\nmax_sandboxes = 10000000\n",
    )?;
    let stderr = dir.join("stderr.log");
    let daemon = start_with_config(binary, &config, &stderr)?;
    println!(
        "daemon pid {} on {}, ready {:.0} ms after exec, RSS {:.1} MiB",
        daemon.pid,
        daemon.addr,
        daemon.startup.as_secs_f64() * 1e3,
        daemon.rss_bytes()? as f64 / MIB
    );
    let mut fleet = Fleet {
        addr: daemon.addr,
        live: 0,
        workers: 1,
        duration: options.duration,
    };

    let mut sandbox_points = Vec::new();
    for level in SANDBOX_LEVELS {
        fleet.fill_sandboxes(level)?;
        sandbox_points.push(fleet.placement_point(&format!("{level} sandboxes"))?);
    }

    // S2: one connection, request in to 201 out, as the client sees it.
    settle(Duration::ZERO);
    let s2 = drive(
        fleet.addr,
        Plan {
            connections: 1,
            duration: options.duration,
            max_requests: MAX_REQUESTS,
        },
        status_is(201),
        |_| vec![spawn_request()],
    )?
    .clean("S2 spawns")?;
    fleet.live += s2.ok as usize;
    println!(
        "S2 spawn, 1 conn: {:.0}/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        s2.rate(),
        s2.p50_ms(),
        s2.p99_ms(),
        s2.latencies.percentile(99.9).as_secs_f64() * 1e3,
        s2.latencies.percentile(100.0).as_secs_f64() * 1e3
    );

    // S1: 16 connections, median of the runs.
    let mut s1_rates = Vec::new();
    let mut s1_p99 = Vec::new();
    let s1_from = fleet.live;
    for run in 1..=options.runs {
        settle(Duration::ZERO);
        let metrics_before = scrape(fleet.addr)?;
        let cpu_before = daemon.cpu_time()?;
        let m = fleet.spawn_window(options.duration, MAX_REQUESTS)?;
        let spent = daemon.cpu_time()?.saturating_sub(cpu_before);
        let store = StoreDelta::between(&metrics_before, &scrape(fleet.addr)?);
        println!(
            "S1 run {run}: {:.0} spawns/s  p50 {:.3} ms  p99 {:.3} ms  | {}, daemon CPU {:.0} us/spawn",
            m.rate(),
            m.p50_ms(),
            m.p99_ms(),
            store.describe(m.elapsed),
            spent.as_secs_f64() * 1e6 / m.ok.max(1) as f64
        );
        s1_rates.push(m.rate());
        s1_p99.push(m.p99_ms());
    }
    let s1_to = fleet.live;

    fleet.fill_sandboxes(options.sandboxes)?;
    sandbox_points.push(fleet.placement_point(&format!("{} sandboxes", options.sandboxes))?);

    // S2 again at the full sandbox count, over a window longer than
    // leases.renew_interval (10 s), so one background renewal of every
    // sandbox lease falls inside it.
    settle(Duration::ZERO);
    let long_from = fleet.live;
    let long = drive(
        fleet.addr,
        Plan {
            connections: 1,
            duration: RENEWAL_WINDOW,
            max_requests: MAX_REQUESTS,
        },
        status_is(201),
        |_| vec![spawn_request()],
    )?
    .clean("S2 spawns at full size")?;
    fleet.live += long.ok as usize;
    println!(
        "S2 spawn @ {long_from} live, 1 conn, {RENEWAL_WINDOW:?}: {:.0}/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        long.rate(),
        long.p50_ms(),
        long.p99_ms(),
        long.latencies.percentile(99.9).as_secs_f64() * 1e3,
        long.latencies.percentile(100.0).as_secs_f64() * 1e3
    );

    let mut worker_points = Vec::new();
    for level in [FIRST_WORKER_LEVEL, options.workers] {
        fleet.fill_workers(level)?;
        worker_points.push(fleet.placement_point(&format!("{level} workers"))?);
    }

    let text = scrape(fleet.addr)?;
    println!(
        "store commits since start: {:.0}; slower than 100 ms: {:.0}; slower than 1 s: {:.0}",
        metric(&text, "stacyvmd_store_commit_duration_seconds_count"),
        slow_commits(&text, 0.1),
        slow_commits(&text, 1.0)
    );
    let rss = daemon.rss_bytes()? as f64 / MIB;
    let (live, workers) = (fleet.live, fleet.workers);
    println!("RSS with {workers} workers and {live} sandboxes: {rss:.1} MiB");
    stop(daemon)?;

    // START: restart on the same data dir, exec to readiness line.
    let mut startups = Vec::new();
    for run in 1..=options.runs {
        let daemon = start_with_config(binary, &config, &stderr)?;
        let ms = daemon.startup.as_secs_f64() * 1e3;
        let rss_after = daemon.rss_bytes()? as f64 / MIB;
        // Reconciliation kept every sandbox: none marked lost, none reaped.
        let (status, body) = once(daemon.addr, &client::get("/api/v1/scheduler"))?;
        if status != 200 {
            return Err(format!(
                "GET /api/v1/scheduler after restart: {status} {body}"
            ));
        }
        println!(
            "START run {run}: ready {ms:.0} ms after exec, RSS {rss_after:.1} MiB, {} lost",
            lost_sandboxes(daemon.addr)?
        );
        startups.push(ms);
        stop(daemon)?;
    }
    if let Some(line) = daemon::tail(&stderr, 200)
        .lines()
        .find(|line| line.contains("lost") || line.contains("reaped"))
    {
        println!("daemon log mentions: {line}");
    }

    let mut rows = Vec::new();
    let s1 = median(&s1_rates);
    rows.push(Row::ratio(
        "S1",
        format!(
            "spawns/s, {SPAWN_CONNECTIONS} conn ({}..{} live)",
            thousands(s1_from as f64),
            thousands(s1_to as f64)
        ),
        format!("{}/s (Nomad C1M)", thousands(S1_TARGET)),
        s1 / S1_TARGET,
        1.0,
    ));
    let (first, last) = (
        &sandbox_points[0],
        &sandbox_points[sandbox_points.len() - 1],
    );
    rows.push(Row::at_most(
        "S1",
        format!(
            "preflight p50 {:.3} ms @ {} sandboxes",
            last.preflight_p50_ms,
            thousands(last.live as f64)
        ),
        format!(
            "{:.3} ms @ {}",
            first.preflight_p50_ms,
            thousands(first.live as f64)
        ),
        last.preflight_p50_ms / first.preflight_p50_ms,
        FLAT_FACTOR,
    ));
    rows.push(Row::at_most(
        "S1",
        format!(
            "spawn p50 {:.2} ms ({}/s), {SPAWN_CONNECTIONS} conn @ {} sandboxes",
            last.spawn_p50_ms,
            thousands(last.spawn_rate),
            thousands(last.live as f64)
        ),
        format!(
            "{:.2} ms ({}/s) @ {}",
            first.spawn_p50_ms,
            thousands(first.spawn_rate),
            thousands(first.live as f64)
        ),
        last.spawn_p50_ms / first.spawn_p50_ms,
        FLAT_FACTOR,
    ));
    let (first, last) = (&worker_points[0], &worker_points[1]);
    rows.push(Row::at_most(
        "S1",
        format!(
            "preflight p50 {:.3} ms @ {} workers",
            last.preflight_p50_ms,
            thousands(last.workers as f64)
        ),
        format!(
            "{:.3} ms @ {}",
            first.preflight_p50_ms,
            thousands(first.workers as f64)
        ),
        last.preflight_p50_ms / first.preflight_p50_ms,
        WORKER_FACTOR,
    ));
    rows.push(Row::at_most(
        "S1",
        format!(
            "spawn p50 {:.2} ms ({}/s), {SPAWN_CONNECTIONS} conn @ {} workers",
            last.spawn_p50_ms,
            thousands(last.spawn_rate),
            thousands(last.workers as f64)
        ),
        format!(
            "{:.2} ms ({}/s) @ {}",
            first.spawn_p50_ms,
            thousands(first.spawn_rate),
            thousands(first.workers as f64)
        ),
        last.spawn_p50_ms / first.spawn_p50_ms,
        WORKER_FACTOR,
    ));
    rows.push(Row::at_most(
        "S2",
        format!("spawn p99 {:.3} ms, 1 conn", s2.p99_ms()),
        format!("{S2_TARGET_MS} ms"),
        s2.p99_ms() / S2_TARGET_MS,
        1.0,
    ));
    rows.push(Row::info(
        "S2 (info)",
        format!(
            "spawn p99 {:.3} ms, max {:.0} ms, 1 conn, {} live, {RENEWAL_WINDOW:?}",
            long.p99_ms(),
            long.latencies.percentile(100.0).as_secs_f64() * 1e3,
            thousands(long_from as f64)
        ),
        "(a lease renewal tick inside)".to_owned(),
        f64::NAN,
    ));
    rows.push(Row::info(
        "S1 (info)",
        format!(
            "spawn p99 {:.3} ms, {SPAWN_CONNECTIONS} conn",
            median(&s1_p99)
        ),
        "(no target)".to_owned(),
        f64::NAN,
    ));
    rows.push(Row::at_most(
        "MEM",
        format!(
            "RSS {rss:.1} MiB, {} workers + {} sandboxes",
            thousands(workers as f64),
            thousands(live as f64)
        ),
        format!("{MEM_TARGET_MB} MB"),
        rss * MIB / (MEM_TARGET_MB * 1e6),
        1.0,
    ));
    let start = median(&startups);
    rows.push(Row::at_most(
        "START",
        format!(
            "exec to ready {start:.0} ms, {} sandbox rows",
            thousands(live as f64)
        ),
        format!("{START_TARGET_MS} ms"),
        start / START_TARGET_MS,
        1.0,
    ));
    Ok(rows)
}

struct Fleet {
    addr: SocketAddr,
    /// Sandboxes this bench created (all live: TTL 1 h, nothing destroyed).
    live: usize,
    /// Registered workers, the local one included.
    workers: usize,
    duration: Duration,
}

struct PlacementPoint {
    live: usize,
    workers: usize,
    /// Best of PREFLIGHT_WINDOWS windows' p50: the least disturbed by
    /// background work (checkpoints, the other tenants of the machine).
    preflight_p50_ms: f64,
    spawn_rate: f64,
    /// p50 of the spawn window: unlike its rate, not moved much by one
    /// store stall (a lease renewal tick) inside a short window.
    spawn_p50_ms: f64,
}

fn spawn_request() -> Vec<u8> {
    post_json("/api/v1/sandboxes", SPAWN_BODY)
}

impl Fleet {
    /// A timed window of spawns on SPAWN_CONNECTIONS connections.
    fn spawn_window(&mut self, duration: Duration, max: usize) -> Result<Measurement, String> {
        let plan = Plan {
            connections: SPAWN_CONNECTIONS,
            duration,
            max_requests: max,
        };
        let m = drive(self.addr, plan, status_is(201), |_| vec![spawn_request()])?;
        self.live += m.ok as usize;
        m.clean("spawns")
    }

    /// Spawns until `target` sandboxes are live.
    fn fill_sandboxes(&mut self, target: usize) -> Result<(), String> {
        if self.live >= target {
            return Ok(());
        }
        let started = Instant::now();
        let count = target - self.live;
        let m = self.spawn_window(FILL_TIMEOUT, count)?;
        println!(
            "filled to {} sandboxes: {} spawns in {:.1} s ({:.0}/s)",
            self.live,
            m.ok,
            started.elapsed().as_secs_f64(),
            m.rate()
        );
        if self.live < target {
            return Err(format!(
                "fill stopped at {} of {target} sandboxes",
                self.live
            ));
        }
        Ok(())
    }

    /// Registers draining workers (heartbeats) until `target` workers are
    /// known, so the local worker stays the one placement selects.
    fn fill_workers(&mut self, target: usize) -> Result<(), String> {
        if self.workers >= target {
            return Ok(());
        }
        let first = self.workers;
        let count = target - first;
        let connections = SPAWN_CONNECTIONS.min(count);
        let per_connection = count.div_ceil(connections);
        let started = Instant::now();
        let m = drive(
            self.addr,
            Plan {
                connections,
                duration: FILL_TIMEOUT,
                max_requests: count,
            },
            status_is(200),
            |c| {
                (0..per_connection)
                    .map(|i| first + c * per_connection + i)
                    .filter(|&n| n < target)
                    .map(|n| {
                        post_json(
                            &format!("/api/v1/admin/workers/bench-w-{n:05}/heartbeat"),
                            r#"{"status":"draining"}"#,
                        )
                    })
                    .collect()
            },
        )?
        .clean("worker heartbeats")?;
        self.workers += m.ok as usize;
        println!(
            "registered {} draining workers ({} known) in {:.1} s",
            m.ok,
            self.workers,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Placement cost now: the admission preflight p50 (one connection,
    /// creates nothing) and a short spawn window.
    fn placement_point(&mut self, label: &str) -> Result<PlacementPoint, String> {
        settle(SETTLE);
        let live = self.live;
        let window = self.duration.min(Duration::from_secs(2));
        let mut preflights = Vec::new();
        for _ in 0..PREFLIGHT_WINDOWS {
            let preflight = drive(
                self.addr,
                Plan {
                    connections: 1,
                    duration: window / PREFLIGHT_WINDOWS as u32,
                    max_requests: MAX_REQUESTS,
                },
                |status, body: &[u8]| {
                    status == 200 && body.windows(14).any(|w| w == br#""allowed":true"#)
                },
                |_| vec![post_json("/api/v1/sandboxes/admission", SPAWN_BODY)],
            )?
            .clean("admission preflight")?;
            preflights.push(preflight);
        }
        let preflight = preflights
            .into_iter()
            .min_by(|a, b| a.p50_ms().total_cmp(&b.p50_ms()))
            .expect("at least one preflight window");
        // Short, and bounded so the 1k point stays near 1k.
        let spawns = self.spawn_window(window, live.max(2_000))?;
        println!(
            "placement @ {label} ({live} live, {} workers): preflight p50 {:.3} ms p99 {:.3} ms ({:.0}/s); spawns {:.0}/s p50 {:.3} ms p99 {:.3} ms ({} spawned)",
            self.workers,
            preflight.p50_ms(),
            preflight.p99_ms(),
            preflight.rate(),
            spawns.rate(),
            spawns.p50_ms(),
            spawns.p99_ms(),
            spawns.ok
        );
        Ok(PlacementPoint {
            live,
            workers: self.workers,
            preflight_p50_ms: preflight.p50_ms(),
            spawn_rate: spawns.rate(),
            spawn_p50_ms: spawns.p50_ms(),
        })
    }
}

/// Sandboxes in state `lost`, from the Prometheus text.
fn lost_sandboxes(addr: SocketAddr) -> Result<u64, String> {
    let text = scrape(addr)?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with("stacyvmd_sandboxes{state=\"lost\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

// ---------------------------------------------------------------- metrics

fn scrape(addr: SocketAddr) -> Result<String, String> {
    let (status, body) = once(addr, &client::get("/metrics"))?;
    if status != 200 {
        return Err(format!("GET /metrics: {status}"));
    }
    Ok(body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Store commits slower than `seconds` since the daemon started, from the
/// commit-duration histogram (bucket bounds, so "slower than the largest
/// bucket bound at or below `seconds`").
fn slow_commits(text: &str, seconds: f64) -> f64 {
    let prefix = "stacyvmd_store_commit_duration_seconds_bucket{le=\"";
    let mut within = 0.0;
    let mut bound = f64::NEG_INFINITY;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix) else {
            continue;
        };
        let Some((le, value)) = rest.split_once("\"} ") else {
            continue;
        };
        let (Ok(le), Ok(value)) = (le.parse::<f64>(), value.trim().parse::<f64>()) else {
            continue;
        };
        if le <= seconds * 1.000_001 && le > bound {
            bound = le;
            within = value;
        }
    }
    metric(text, "stacyvmd_store_commit_duration_seconds_count") - within
}

/// What the store thread did between two scrapes.
struct StoreDelta {
    commits: f64,
    writes: f64,
    commit_seconds: f64,
}

impl StoreDelta {
    fn between(before: &str, after: &str) -> StoreDelta {
        let delta = |name: &str| metric(after, name) - metric(before, name);
        StoreDelta {
            commits: delta("stacyvmd_store_commit_duration_seconds_count"),
            writes: delta("stacyvmd_store_commit_batch_size_sum"),
            commit_seconds: delta("stacyvmd_store_commit_duration_seconds_sum"),
        }
    }

    fn describe(&self, elapsed: Duration) -> String {
        if self.commits == 0.0 {
            return "store: no commits".to_owned();
        }
        format!(
            "store: {:.0} commits, {:.1} writes/commit, {:.3} ms/commit, committing {:.0}% of the time",
            self.commits,
            self.writes / self.commits,
            self.commit_seconds * 1e3 / self.commits,
            100.0 * self.commit_seconds / elapsed.as_secs_f64().max(1e-9)
        )
    }
}

// ---------------------------------------------------------------- helpers

fn expect(addr: SocketAddr, request: &[u8], status: u16, what: &str) -> Result<String, String> {
    let (got, body) = once(addr, request)?;
    if got == status {
        Ok(body)
    } else {
        Err(format!("{what}: expected {status}, got {got}: {body}"))
    }
}

/// Flushes dirty pages (from earlier fills, from the peers) and waits, so
/// one measurement does not pay for the write-back of another.
fn settle(pause: Duration) {
    let _ = Command::new("sync").status();
    std::thread::sleep(pause);
}

fn stop(daemon: Daemon) -> Result<(), String> {
    let status = daemon.stop()?;
    if !status.success() {
        println!("WARNING: daemon exited with {status} after SIGTERM");
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "?".to_owned();
    }
    let digits = format!("{:.0}", value.round());
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

struct Row {
    id: &'static str,
    figure: String,
    comparison: String,
    ratio: Option<f64>,
    target: String,
    verdict: Option<bool>,
}

impl Row {
    /// Passes when `ratio >= target`.
    fn ratio(id: &'static str, figure: String, comparison: String, ratio: f64, target: f64) -> Row {
        Row {
            id,
            figure,
            comparison,
            ratio: Some(ratio),
            target: format!(">= {target:.2} x"),
            verdict: Some(ratio >= target),
        }
    }

    /// Passes when `ratio <= target`.
    fn at_most(
        id: &'static str,
        figure: String,
        comparison: String,
        ratio: f64,
        target: f64,
    ) -> Row {
        Row {
            id,
            figure,
            comparison,
            ratio: Some(ratio),
            target: format!("<= {target:.2} x"),
            verdict: Some(ratio <= target),
        }
    }

    fn info(id: &'static str, figure: String, comparison: String, ratio: f64) -> Row {
        Row {
            id,
            figure,
            comparison,
            ratio: ratio.is_finite().then_some(ratio),
            target: "-".to_owned(),
            verdict: None,
        }
    }
}

fn print_table(rows: &[Row]) {
    let header = ["id", "figure", "comparison", "ratio", "target", "result"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|row| {
            [
                row.id.to_owned(),
                row.figure.clone(),
                row.comparison.clone(),
                row.ratio.map_or("-".to_owned(), |r| format!("{r:.2} x")),
                row.target.clone(),
                match row.verdict {
                    Some(true) => "PASS".to_owned(),
                    Some(false) => "FAIL".to_owned(),
                    None if row.target == "-" => "info".to_owned(),
                    None => "n/a".to_owned(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::from("|");
        for (cell, width) in cells.iter().zip(widths) {
            let _ = write!(out, " {cell:<width$} |");
        }
        out
    };
    println!("{}", line(&header.map(str::to_owned)));
    println!(
        "|{}",
        widths
            .iter()
            .map(|w| format!("{}|", "-".repeat(w + 2)))
            .collect::<String>()
    );
    for row in &cells {
        println!("{}", line(row));
    }
}
