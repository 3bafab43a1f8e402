//! Admin socket benchmark (A1 of issue 4).
//!
//!     cargo build --release && cargo bench --bench admin [-- --quick] [-- --runs N]
//!
//! In one process on one machine: the release daemon is started with a fresh
//! data dir, and a raw Unix-socket NDJSON echo server (the ceiling: read a
//! line, parse it with serde_json, write a small JSON reply line) runs in
//! this process. Client threads drive `worker.status` round trips over one
//! connection each, with 1 and with 8 clients, against both, alternating;
//! every measurement is bounded in time and request count, and the ratios
//! are the median of `--runs` runs. `lease.renew` (a durable commit per
//! renew) is measured over the socket and over REST in the same run.
//! Prints a table; exits 0 whether targets pass or fail, 1 only when it
//! could not measure. See docs/benchmarks-admin.md.

#[path = "../common/daemon.rs"]
mod daemon;
mod echo;
#[path = "../loadgen/latency.rs"]
mod latency;
#[path = "../common/ndjson.rs"]
mod ndjson;
#[allow(dead_code)]
#[path = "../loadgen/client.rs"]
mod rest;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use daemon::Daemon;
use echo::Echo;
use latency::Latencies;
use ndjson::LineClient;

const USAGE: &str = "usage: cargo bench --bench admin [-- [--quick] [--runs N]]";
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on samples per client per measurement, on top of the time bound.
const MAX_SAMPLES_PER_CLIENT: usize = 1_000_000;
const WARMUP: Duration = Duration::from_millis(200);
const MANY: usize = 8;
const STATUS: &[u8] = b"{\"id\":\"b\",\"method\":\"worker.status\"}\n";
const LEASE_TTL: &str = "10m";

struct Options {
    runs: usize,
    duration: Duration,
}

fn parse_options(mut arguments: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        runs: 3,
        duration: Duration::from_secs(2),
    };
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--quick" => {
                options.duration = Duration::from_millis(700);
                options.runs = 1;
            }
            "--runs" => {
                options.runs = arguments
                    .next()
                    .and_then(|value| value.parse().ok())
                    .filter(|&runs| runs > 0)
                    .ok_or("--runs needs a positive number")?;
            }
            // `cargo bench` appends --bench to every bench binary's arguments.
            "--bench" => {}
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("admin bench: error: {error}");
            ExitCode::FAILURE
        }
    }
}

// ---- clients ----------------------------------------------------------------

type RoundTrip = Box<dyn FnMut() -> Result<(), String> + Send>;

fn ndjson(path: &Path, request: Vec<u8>) -> Result<RoundTrip, String> {
    let mut client = LineClient::connect(path)?;
    Ok(Box::new(move || client.round_trip(&request)))
}

fn http(addr: SocketAddr, request: Vec<u8>) -> Result<RoundTrip, String> {
    let mut client = rest::Client::connect(addr, IO_TIMEOUT)
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    Ok(Box::new(move || {
        let response = client
            .exchange(&request)
            .map_err(|error| format!("REST exchange: {error}"))?;
        if response.status == 200 {
            Ok(())
        } else {
            Err(format!(
                "REST status {}: {}",
                response.status,
                String::from_utf8_lossy(response.body)
            ))
        }
    }))
}

// ---- measurement ------------------------------------------------------------

struct Measurement {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs every client on its own thread for `WARMUP + duration`; samples
/// taken after the warm-up count.
fn measure(clients: Vec<RoundTrip>, duration: Duration) -> Result<Measurement, String> {
    let start = Instant::now();
    let from = start + WARMUP;
    let until = from + duration;
    let threads: Vec<_> = clients
        .into_iter()
        .map(|mut round_trip| {
            thread::spawn(move || -> Result<Vec<Duration>, String> {
                let mut samples = Vec::with_capacity(64 * 1024);
                loop {
                    let sent = Instant::now();
                    if sent >= until || samples.len() >= MAX_SAMPLES_PER_CLIENT {
                        return Ok(samples);
                    }
                    round_trip()?;
                    if sent >= from {
                        samples.push(sent.elapsed());
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for thread in threads {
        all.extend(
            thread
                .join()
                .map_err(|_| "a client thread panicked".to_owned())??,
        );
    }
    let window = Instant::now().min(until).saturating_duration_since(from);
    let count = all.len();
    if count == 0 {
        return Err("no samples".to_owned());
    }
    let latencies = Latencies::new(all);
    Ok(Measurement {
        rate: count as f64 / window.as_secs_f64(),
        p50: latencies.percentile(50.0),
        p99: latencies.percentile(99.0),
    })
}

fn clients(
    count: usize,
    make: impl Fn(usize) -> Result<RoundTrip, String>,
) -> Result<Vec<RoundTrip>, String> {
    (0..count).map(make).collect()
}

// ---- the run ----------------------------------------------------------------

#[derive(Default)]
struct Runs {
    status_1: Vec<(Measurement, Measurement)>,
    status_n: Vec<(Measurement, Measurement)>,
    renew_1: Vec<(Measurement, Measurement)>,
    renew_n: Vec<(Measurement, Measurement)>,
}

fn run() -> Result<(), String> {
    let options = parse_options(std::env::args().skip(1))?;
    // Cargo builds the binary targets before any bench: target/release/stacyvmd.
    let binary = Path::new(env!("CARGO_BIN_EXE_stacyvmd"));
    if !binary.is_file() {
        return Err(format!(
            "{} is missing: run `cargo build --release && cargo bench --bench admin`",
            binary.display()
        ));
    }
    let scratch = std::env::temp_dir().join(format!("stacyvmd-admin-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)
        .map_err(|error| format!("creating {}: {error}", scratch.display()))?;
    let result = bench(binary, &scratch, &options);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn bench(binary: &Path, scratch: &Path, options: &Options) -> Result<(), String> {
    println!("machine: {}", daemon::machine_description());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load:    {} (1, 5, 15 min) at start",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "daemon:  {} ({})",
        daemon::daemon_version(binary).unwrap_or_else(|e| format!("unknown ({e})")),
        binary.display()
    );
    println!(
        "plan:    {} run(s), {:?} per measurement after {WARMUP:?} warm-up, 1 and {MANY} clients",
        options.runs, options.duration
    );

    let args = daemon::local_args(&scratch.join("data"));
    let daemon = Daemon::start(binary, &args, Some(scratch), &scratch.join("stderr.log"))?;
    let admin = daemon
        .admin
        .clone()
        .ok_or("the readiness line names no admin socket")?;
    println!(
        "daemon pid {} http {} admin {}",
        daemon.pid,
        daemon.addr,
        admin.display()
    );
    let echo = Echo::start(&scratch.join("echo.sock"))?;
    let http_addr = daemon.addr;

    // One lease per client and door, acquired once.
    let mut setup = LineClient::connect(&admin)?;
    for i in 0..MANY {
        setup.round_trip(
            format!(
                "{{\"id\":\"a\",\"method\":\"lease.acquire\",\"params\":{{\"resource_id\":\"bench-sock-{i}\",\"resource_type\":\"bench\",\"holder_id\":\"bench\",\"ttl\":\"{LEASE_TTL}\"}}}}\n"
            )
            .as_bytes(),
        )?;
        http(
            http_addr,
            rest::post_json(
                &format!("/api/v1/admin/leases/bench-rest-{i}/acquire"),
                &format!(
                    "{{\"holder_id\":\"bench\",\"resource_type\":\"bench\",\"ttl\":\"{LEASE_TTL}\"}}"
                ),
            ),
        )?()?;
    }
    drop(setup);
    let socket_renew = |i: usize| {
        ndjson(
            &admin,
            format!(
                "{{\"id\":\"r\",\"method\":\"lease.renew\",\"params\":{{\"resource_id\":\"bench-sock-{i}\",\"holder_id\":\"bench\",\"ttl\":\"{LEASE_TTL}\"}}}}\n"
            )
            .into_bytes(),
        )
    };
    let rest_renew = |i: usize| {
        http(
            http_addr,
            rest::post_json(
                &format!("/api/v1/admin/leases/bench-rest-{i}/renew"),
                &format!("{{\"holder_id\":\"bench\",\"ttl\":\"{LEASE_TTL}\"}}"),
            ),
        )
    };
    let status_on = |path: &Path, count: usize| clients(count, |_| ndjson(path, STATUS.to_vec()));

    let duration = options.duration;
    let mut runs = Runs::default();
    for run in 1..=options.runs {
        eprintln!("run {run}/{}", options.runs);
        // Alternate which side goes first, so drift hits both.
        let pair = |a: &Path,
                    b: &Path,
                    n: usize,
                    daemon_first: bool|
         -> Result<(Measurement, Measurement), String> {
            if daemon_first {
                let d = measure(status_on(a, n)?, duration)?;
                let e = measure(status_on(b, n)?, duration)?;
                Ok((d, e))
            } else {
                let e = measure(status_on(b, n)?, duration)?;
                let d = measure(status_on(a, n)?, duration)?;
                Ok((d, e))
            }
        };
        let first = run % 2 == 1;
        runs.status_1.push(pair(&admin, &echo.path, 1, first)?);
        runs.status_n.push(pair(&admin, &echo.path, MANY, !first)?);
        let s1 = measure(clients(1, socket_renew)?, duration)?;
        let r1 = measure(clients(1, rest_renew)?, duration)?;
        runs.renew_1.push((s1, r1));
        let sn = measure(clients(MANY, socket_renew)?, duration)?;
        let rn = measure(clients(MANY, rest_renew)?, duration)?;
        runs.renew_n.push((sn, rn));
    }
    drop(echo);

    // The leases really were renewed (and are still held).
    let mut check = LineClient::connect(&admin)?;
    check.round_trip(
        b"{\"id\":\"g\",\"method\":\"lease.get\",\"params\":{\"resource_id\":\"bench-sock-0\"}}\n",
    )?;
    drop(check);
    match daemon.stop() {
        Ok(status) if status.success() => println!("daemon stopped cleanly on SIGTERM"),
        Ok(status) => println!("WARNING: daemon exited with {status} after SIGTERM"),
        Err(problem) => println!("WARNING: {problem}"),
    }

    print_runs(&runs);
    let rows = vec![
        rate_row(
            "A1",
            "worker.status rate, 1 client",
            "echo",
            &runs.status_1,
            Some(0.5),
        ),
        rate_row(
            "A1",
            &format!("worker.status rate, {MANY} clients"),
            "echo",
            &runs.status_n,
            Some(0.5),
        ),
        p99_row(
            "A1",
            "worker.status p99, 1 client",
            &runs.status_1,
            Some(5.0),
        ),
        p99_row(
            "-",
            &format!("worker.status p99, {MANY} clients"),
            &runs.status_n,
            None,
        ),
        rate_row(
            "-",
            "lease.renew rate, 1 client",
            "REST",
            &runs.renew_1,
            None,
        ),
        rate_row(
            "-",
            &format!("lease.renew rate, {MANY} clients"),
            "REST",
            &runs.renew_n,
            None,
        ),
        p99_row(
            "-",
            "lease.renew p99, 1 client (vs REST)",
            &runs.renew_1,
            None,
        ),
    ];
    print_table(&rows, options.runs);
    Ok(())
}

// ---- the table --------------------------------------------------------------

struct Row {
    id: &'static str,
    what: String,
    figure: String,
    ceiling: String,
    ratio: f64,
    goal: String,
    pass: Option<bool>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn rate_row(
    id: &'static str,
    what: &str,
    ceiling: &str,
    runs: &[(Measurement, Measurement)],
    at_least: Option<f64>,
) -> Row {
    let ratio = median(runs.iter().map(|(d, c)| d.rate / c.rate).collect());
    let figure = median(runs.iter().map(|(d, _)| d.rate).collect());
    let base = median(runs.iter().map(|(_, c)| c.rate).collect());
    Row {
        id,
        what: what.to_owned(),
        figure: format!("{figure:.0}/s"),
        ceiling: format!("{ceiling} {base:.0}/s"),
        ratio,
        goal: at_least.map_or_else(|| "report".to_owned(), |g| format!(">= {g}x")),
        pass: at_least.map(|g| ratio >= g),
    }
}

fn p99_row(
    id: &'static str,
    what: &str,
    runs: &[(Measurement, Measurement)],
    at_most: Option<f64>,
) -> Row {
    let ratio = median(
        runs.iter()
            .map(|(d, c)| d.p99.as_secs_f64() / c.p99.as_secs_f64().max(1e-9))
            .collect(),
    );
    let figure = median(runs.iter().map(|(d, _)| d.p99.as_secs_f64()).collect());
    let base = median(runs.iter().map(|(_, c)| c.p99.as_secs_f64()).collect());
    Row {
        id,
        what: what.to_owned(),
        figure: micros(figure),
        ceiling: micros(base),
        ratio,
        goal: at_most.map_or_else(|| "report".to_owned(), |g| format!("<= {g}x")),
        pass: at_most.map(|g| ratio <= g),
    }
}

fn micros(seconds: f64) -> String {
    format!("{:.0} us", seconds * 1e6)
}

fn print_runs(runs: &Runs) {
    println!();
    println!("per run (daemon | ceiling): rate, p50, p99");
    let show = |name: &str, list: &[(Measurement, Measurement)]| {
        for (i, (d, c)) in list.iter().enumerate() {
            println!(
                "  {name:<28} run {}: {:>8.0}/s {:>6} {:>7} | {:>8.0}/s {:>6} {:>7}",
                i + 1,
                d.rate,
                micros(d.p50.as_secs_f64()),
                micros(d.p99.as_secs_f64()),
                c.rate,
                micros(c.p50.as_secs_f64()),
                micros(c.p99.as_secs_f64()),
            );
        }
    };
    show("worker.status 1 vs echo", &runs.status_1);
    show(&format!("worker.status {MANY} vs echo"), &runs.status_n);
    show("lease.renew 1 vs REST", &runs.renew_1);
    show(&format!("lease.renew {MANY} vs REST"), &runs.renew_n);
}

fn print_table(rows: &[Row], runs: usize) {
    println!();
    println!(
        "{:<3} {:<40} {:>12} {:>18} {:>7} {:>8} result",
        "id", "measurement", "figure", "ceiling", "ratio", "goal"
    );
    for row in rows {
        let result = match row.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "-",
        };
        println!(
            "{:<3} {:<40} {:>12} {:>18} {:>7.2} {:>8} {result}",
            row.id, row.what, row.figure, row.ceiling, row.ratio, row.goal
        );
    }
    println!("(ratios are the median of {runs} run(s); figures the median of the runs)");
}
