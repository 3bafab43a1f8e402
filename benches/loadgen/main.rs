//! Load generator for the HTTP targets of PERFORMANCE.md (H1, H3, R1, R3, C1,
//! M1, MEM), and, with `--slowloris N`, SL: what slow clients cost everyone
//! else (the p50 and p99 of `/api/v1/live` with N slowloris connections
//! open, against without, in the same run).
//!
//!     cargo build --release && cargo bench --bench loadgen [-- --quick] [-- --runs N] [-- --slowloris N]
//!
//! Every target is a ratio or a bound measured in this one process on this
//! one machine: the release daemon is started on 127.0.0.1:0 with a fresh data
//! dir, a bare tiny_http server (the ceiling) runs in this process, and client
//! threads drive both over keep-alive connections. Each measurement is bounded
//! in time and request count; ratio targets report the median of `--runs`.
//! The program prints a table and exits 0 whether targets pass or fail; it
//! exits 1 only when it could not measure.
//! See docs/benchmarks.md.

mod baseline;
mod client;
#[path = "../common/daemon.rs"]
mod daemon;
mod latency;
mod load;
mod slowloris;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use baseline::Baseline;
use client::Client;
use daemon::Daemon;
use load::{Measurement, Plan};
use slowloris::SlowClients;

const USAGE: &str = "usage: cargo bench --bench loadgen [-- [--quick] [--runs N] [--slowloris N]]";

/// Bound on requests per measurement, on top of the time bound.
const MAX_REQUESTS: usize = 2_000_000;
const BASELINE_THREADS: usize = 4;
/// What the baseline answers in C1, shaped like the daemon's `/api/v1/live`.
const LIVE_BODY: &[u8] = br#"{"status":"ok"}"#;
const HEARTBEAT_BODY: &str = r#"{"capacity":{"max_sandboxes":8}}"#;
/// Worker ids each heartbeat connection cycles through (`w-<conn>-<i % 50>`).
const HEARTBEAT_IDS_PER_CONNECTION: usize = 50;
const LISTED_WORKERS: usize = 100;
const SCRAPED_WORKERS: usize = 1_000;
const BURST_CONNECTIONS: usize = 64;
const BURST_REPEATS: usize = 5;
const BURST_TIMEOUT: Duration = Duration::from_secs(2);
/// SL: how long the daemon may take to hold every slow connection (its
/// `stacyvmd_http_connections_open` gauge), and to drop them again.
const SLOWLORIS_SETTLE: Duration = Duration::from_secs(5);
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const MIB: f64 = 1024.0 * 1024.0;

struct Options {
    runs: usize,
    duration: Duration,
    /// SL's slow connections; `None` (the default) skips SL.
    slowloris: Option<usize>,
}

/// `None` when only help was asked for.
fn parse_options(mut arguments: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        runs: 3,
        duration: Duration::from_secs(3),
        slowloris: None,
    };
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--quick" => options.duration = Duration::from_secs(1),
            "--runs" => {
                options.runs = arguments
                    .next()
                    .and_then(|value| value.parse().ok())
                    .filter(|&runs| runs > 0)
                    .ok_or("--runs needs a positive number")?;
            }
            "--slowloris" => {
                options.slowloris = Some(
                    arguments
                        .next()
                        .and_then(|value| value.parse().ok())
                        .filter(|&count| count > 0)
                        .ok_or("--slowloris needs a positive number of connections")?,
                );
            }
            // `cargo bench` appends --bench to every bench binary's arguments.
            "--bench" => {}
            "--help" | "-h" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgen: error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let Some(options) = parse_options(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    // Cargo builds the binary targets before any bench and names the artifact
    // here: target/release/stacyvmd.
    let binary = Path::new(env!("CARGO_BIN_EXE_stacyvmd"));
    if !binary.is_file() {
        return Err(format!(
            "{} is missing: run `cargo build --release && cargo bench --bench loadgen`",
            binary.display()
        ));
    }
    println!("machine: {}", daemon::machine_description());
    // Anything else running on a 2-core box shows up in every figure.
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
        daemon::daemon_version(binary)?,
        binary.display()
    );
    println!(
        "plan:    {} run(s), {:?} per measurement, at most {MAX_REQUESTS} requests each",
        options.runs, options.duration
    );

    let scratch = daemon::ScratchDir::new("stacyvmd-loadgen")?;
    let data_dir = scratch.0.join("data");
    let daemon = Daemon::start(
        binary,
        &daemon::local_args(&data_dir),
        None,
        &scratch.0.join("stderr.log"),
    )?;
    let idle_rss = daemon.rss_bytes()?;
    println!("daemon pid {} listening on {}", daemon.pid, daemon.addr);
    fetch(daemon.addr, "/api/v1/live")?;

    let bench = Bench {
        daemon: daemon.addr,
        duration: options.duration,
    };
    let list_runs = (1..=options.runs)
        .map(|run| bench.list_run(run, options.runs))
        .collect::<Result<Vec<_>, _>>()?;
    let heartbeat_runs = (1..=options.runs)
        .map(|run| bench.heartbeat_run(run, options.runs))
        .collect::<Result<Vec<_>, _>>()?;
    let daemon_bursts = bursts("daemon", bench.daemon);
    let baseline = Baseline::start(LIVE_BODY.to_vec(), BASELINE_THREADS)?;
    let baseline_bursts = bursts("bare tiny_http", baseline.addr);
    drop(baseline);
    let scrape_p99s = bench.scrape(options.runs)?;
    let slowloris_runs = match options.slowloris {
        Some(count) => Some(
            (1..=options.runs)
                .map(|run| bench.slowloris_run(run, options.runs, count))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };

    let loaded_rss = daemon.rss_bytes()?;
    // A bad stop is a finding to report, not a reason to drop the figures.
    match daemon.stop() {
        Ok(status) if status.success() => println!("daemon stopped cleanly on SIGTERM"),
        Ok(status) => println!("WARNING: daemon exited with {status} after SIGTERM"),
        Err(problem) => println!("WARNING: {problem}"),
    }

    let mut rows = vec![
        heartbeat_throughput_row(&heartbeat_runs),
        heartbeat_latency_row(&heartbeat_runs),
        list_throughput_row(&list_runs),
        list_latency_row(&list_runs),
        burst_row(&daemon_bursts, &baseline_bursts),
        latency_row(
            "M1",
            "/metrics p99, 1 conn, 1,000 workers",
            median_duration(scrape_p99s),
            Bound::AtMost(5.0),
        ),
        memory_row(
            "RSS idle after startup",
            idle_rss,
            Some(Bound::AtMost(16.0)),
        ),
        memory_row("RSS after the load", loaded_rss, None),
    ];
    if let Some(runs) = &slowloris_runs {
        rows.extend(slowloris_rows(runs));
    }
    print_table(&rows, options.runs);
    Ok(())
}

/// Where the load goes and for how long.
struct Bench {
    daemon: SocketAddr,
    duration: Duration,
}

/// One run of H1 and H3.
struct HeartbeatRun {
    live_rate: f64,
    heartbeat_rate: f64,
    live_p99: Duration,
    heartbeat_p99: Duration,
}

/// One run of R1 and R3.
struct ListRun {
    daemon_rate: f64,
    baseline_rate: f64,
    daemon_p50: Duration,
}

/// One run of SL.
struct SlowlorisRun {
    connections: usize,
    quiet_p50: Duration,
    quiet_p99: Duration,
    loaded_p50: Duration,
    loaded_p99: Duration,
    /// `/api/v1/live` exchanges that failed with the slow clients open.
    failed: u64,
    /// Slow connections neither answered nor closed when the loaded
    /// measurement ended.
    held: usize,
}

/// Outcome of C1's repeats against one server.
struct Bursts {
    /// The slowest burst in which every connection was answered.
    slowest: Duration,
    /// How many were not (the reasons are printed as they happen).
    stalled: usize,
}

impl Bursts {
    fn describe(&self) -> String {
        if self.stalled == 0 {
            format!("slowest {}", format_duration(self.slowest))
        } else {
            format!("{} of {BURST_REPEATS} bursts stalled", self.stalled)
        }
    }
}

impl Bench {
    fn measure(
        &self,
        label: &str,
        addr: SocketAddr,
        connections: usize,
        requests: impl Fn(usize) -> Vec<Vec<u8>>,
    ) -> Result<Measurement, String> {
        let plan = Plan {
            connections,
            duration: self.duration,
            max_requests: MAX_REQUESTS,
        };
        let measurement = load::drive(addr, &plan, requests)?;
        let latencies = &measurement.latencies;
        print!(
            "  {label:<28} {connections:>2} conn  {:>8.0} req/s  p50 {:>9}  p99 {:>9}",
            measurement.rate(),
            format_duration(latencies.percentile(50.0)),
            format_duration(latencies.percentile(99.0)),
        );
        match &measurement.first_failure {
            Some(failure) => println!("  {} FAILED, first: {failure}", measurement.failed),
            None => println!(),
        }
        Ok(measurement)
    }

    /// R1 and R3: the worker list against the bare server serving its bytes.
    fn list_run(&self, run: usize, runs: usize) -> Result<ListRun, String> {
        if run == 1 {
            register_workers(
                self.daemon,
                (0..LISTED_WORKERS).map(|index| format!("w-list-{index:03}")),
            )?;
        }
        // Fetched per run: ages and staleness in the body drift over time.
        let body = fetch(self.daemon, "/api/v1/workers")?;
        println!(
            "run {run}/{runs}: GET /api/v1/workers, {} workers, {} byte body",
            count_json_array(&body)?,
            body.len()
        );
        let baseline = Baseline::start(body, BASELINE_THREADS)?;
        let list = || vec![client::get("/api/v1/workers")];
        let daemon = self.measure("daemon /api/v1/workers", self.daemon, 16, |_| list())?;
        let ceiling = self.measure("bare tiny_http, same body", baseline.addr, 16, |_| list())?;
        let single = self.measure("daemon /api/v1/workers", self.daemon, 1, |_| list())?;
        Ok(ListRun {
            daemon_rate: daemon.rate(),
            baseline_rate: ceiling.rate(),
            daemon_p50: single.latencies.percentile(50.0),
        })
    }

    /// H1 and H3: heartbeats against the daemon's trivial route.
    fn heartbeat_run(&self, run: usize, runs: usize) -> Result<HeartbeatRun, String> {
        println!("run {run}/{runs}: heartbeats vs /api/v1/live");
        let live = || vec![client::get("/api/v1/live")];
        let heartbeats = |connection: usize| {
            (0..HEARTBEAT_IDS_PER_CONNECTION)
                .map(|index| heartbeat_request(&format!("w-{connection}-{index}")))
                .collect()
        };
        let live16 = self.measure("daemon /api/v1/live", self.daemon, 16, |_| live())?;
        let heartbeat16 = self.measure("daemon heartbeat", self.daemon, 16, heartbeats)?;
        let live1 = self.measure("daemon /api/v1/live", self.daemon, 1, |_| live())?;
        let heartbeat1 = self.measure("daemon heartbeat", self.daemon, 1, heartbeats)?;
        Ok(HeartbeatRun {
            live_rate: live16.rate(),
            heartbeat_rate: heartbeat16.rate(),
            live_p99: live1.latencies.percentile(99.0),
            heartbeat_p99: heartbeat1.latencies.percentile(99.0),
        })
    }

    /// SL: `/api/v1/live` at 1 connection, then again while `count` slow
    /// connections are held open (see `slowloris.rs`), with the same client
    /// code as H1's `/live` measurement. The loaded measurement starts once
    /// the daemon counts every slow connection as open.
    fn slowloris_run(&self, run: usize, runs: usize, count: usize) -> Result<SlowlorisRun, String> {
        println!(
            "run {run}/{runs}: /api/v1/live without and with {count} slowloris connections \
             (from 127.0.0.2.., {} per address; half a silent 1 MiB body, half a head \
             trickled 1 byte per {:?})",
            slowloris::PER_SOURCE_ADDRESS,
            slowloris::TRICKLE_INTERVAL,
        );
        let live = || vec![client::get("/api/v1/live")];
        let quiet = self.measure("daemon /api/v1/live", self.daemon, 1, |_| live())?;
        let before = open_connections(self.daemon)?;
        let slow = SlowClients::open(self.daemon, count)?;
        wait_for_open_connections(self.daemon, |open| open >= before + slow.len())?;
        let loaded = self.measure("  ... with slowloris open", self.daemon, 1, |_| live())?;
        let held = slow.still_open();
        let open = open_connections(self.daemon)?;
        println!(
            "  slow connections still held after the measurement: {held} of {count} \
             (daemon: {open} connections open, {before} before)"
        );
        drop(slow);
        wait_for_open_connections(self.daemon, |open| open <= before)?;
        Ok(SlowlorisRun {
            connections: count,
            quiet_p50: quiet.latencies.percentile(50.0),
            quiet_p99: quiet.latencies.percentile(99.0),
            loaded_p50: loaded.latencies.percentile(50.0),
            loaded_p99: loaded.latencies.percentile(99.0),
            failed: loaded.failed,
            held,
        })
    }

    /// M1: the Prometheus scrape with 1,000 workers registered; the p99 of
    /// each of `runs` measurements.
    fn scrape(&self, runs: usize) -> Result<Vec<Duration>, String> {
        let registered = count_json_array(&fetch(self.daemon, "/api/v1/workers")?)?;
        register_workers(
            self.daemon,
            (registered..SCRAPED_WORKERS).map(|index| format!("w-scrape-{index:04}")),
        )?;
        let body = fetch(self.daemon, "/metrics")?;
        let age_series = String::from_utf8_lossy(&body)
            .lines()
            .filter(|line| line.starts_with("stacyvmd_worker_heartbeat_age_seconds{"))
            .count();
        println!(
            "M1: GET /metrics, {} workers, {} byte body, {age_series} heartbeat-age series",
            count_json_array(&fetch(self.daemon, "/api/v1/workers")?)?,
            body.len()
        );
        (0..runs)
            .map(|_| {
                let scrape = self.measure("daemon /metrics", self.daemon, 1, |_| {
                    vec![client::get("/metrics")]
                })?;
                Ok(scrape.latencies.percentile(99.0))
            })
            .collect()
    }
}

/// C1: repeated bursts of new connections, each burst held open until
/// all are answered or one stalls.
fn bursts(label: &str, addr: SocketAddr) -> Bursts {
    println!(
        "C1 {label}: {BURST_REPEATS} x {BURST_CONNECTIONS} new connections, GET /api/v1/live, held open"
    );
    let request = client::get("/api/v1/live");
    let mut bursts = Bursts {
        slowest: Duration::ZERO,
        stalled: 0,
    };
    for repeat in 1..=BURST_REPEATS {
        match load::burst(addr, BURST_CONNECTIONS, &request, BURST_TIMEOUT) {
            Ok(elapsed) => {
                println!(
                    "  burst {repeat}: all answered in {}",
                    format_duration(elapsed)
                );
                bursts.slowest = bursts.slowest.max(elapsed);
            }
            Err(problem) => {
                println!("  burst {repeat}: {problem}");
                bursts.stalled += 1;
            }
        }
    }
    bursts
}

fn heartbeat_request(worker_id: &str) -> Vec<u8> {
    client::post_json(
        &format!("/api/v1/admin/workers/{worker_id}/heartbeat"),
        HEARTBEAT_BODY,
    )
}

/// Registers (or refreshes) workers one heartbeat at a time.
fn register_workers(addr: SocketAddr, ids: impl Iterator<Item = String>) -> Result<(), String> {
    let mut client = Client::connect(addr, SETUP_TIMEOUT)
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    for id in ids {
        let response = client
            .exchange(&heartbeat_request(&id))
            .map_err(|error| format!("heartbeat for {id}: {error}"))?;
        if response.status != 200 {
            return Err(format!(
                "heartbeat for {id}: status {}: {}",
                response.status,
                String::from_utf8_lossy(response.body)
            ));
        }
    }
    Ok(())
}

/// One GET that must answer 200; returns the body.
fn fetch(addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut client = Client::connect(addr, SETUP_TIMEOUT)
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    let response = client
        .exchange(&client::get(path))
        .map_err(|error| format!("GET {path}: {error}"))?;
    if response.status != 200 {
        return Err(format!(
            "GET {path}: status {}: {}",
            response.status,
            String::from_utf8_lossy(response.body)
        ));
    }
    Ok(response.body.to_vec())
}

/// The daemon's `stacyvmd_http_connections_open` gauge (the connection
/// that asks included).
fn open_connections(addr: SocketAddr) -> Result<usize, String> {
    let body = fetch(addr, "/metrics")?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix("stacyvmd_http_connections_open "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| "/metrics has no stacyvmd_http_connections_open gauge".to_owned())
}

/// Polls the open-connections gauge until `settled` holds, for at most
/// [`SLOWLORIS_SETTLE`].
fn wait_for_open_connections(
    addr: SocketAddr,
    settled: impl Fn(usize) -> bool,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + SLOWLORIS_SETTLE;
    loop {
        let open = open_connections(addr)?;
        if settled(open) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "the daemon's open connections did not settle within {SLOWLORIS_SETTLE:?} \
                 (now {open})"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_json_array(body: &[u8]) -> Result<usize, String> {
    serde_json::from_slice::<Vec<serde_json::Value>>(body)
        .map(|items| items.len())
        .map_err(|error| format!("the worker list is not a JSON array: {error}"))
}

// ---- the table -------------------------------------------------------------

struct Row {
    id: &'static str,
    figure: String,
    ceiling: String,
    ratio: Option<f64>,
    goal: String,
    /// `None` for figures reported without a target.
    pass: Option<bool>,
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        count if count % 2 == 1 => values[count / 2],
        count => (values[count / 2 - 1] + values[count / 2]) / 2.0,
    }
}

fn median_duration(values: impl IntoIterator<Item = Duration>) -> Duration {
    Duration::from_secs_f64(median(values.into_iter().map(|value| value.as_secs_f64())))
}

fn heartbeat_throughput_row(runs: &[HeartbeatRun]) -> Row {
    let ratio = median(runs.iter().map(|run| run.heartbeat_rate / run.live_rate));
    Row {
        id: "H1",
        figure: format!(
            "heartbeats, 16 conn: {:.0}/s",
            median(runs.iter().map(|run| run.heartbeat_rate))
        ),
        ceiling: format!(
            "/api/v1/live: {:.0}/s",
            median(runs.iter().map(|run| run.live_rate))
        ),
        ratio: Some(ratio),
        goal: ">= 0.40".to_owned(),
        pass: Some(ratio >= 0.40),
    }
}

fn heartbeat_latency_row(runs: &[HeartbeatRun]) -> Row {
    let ratio = median(
        runs.iter()
            .map(|run| run.heartbeat_p99.as_secs_f64() / run.live_p99.as_secs_f64()),
    );
    Row {
        id: "H3",
        figure: format!(
            "heartbeat p99, 1 conn: {}",
            format_duration(median_duration(runs.iter().map(|run| run.heartbeat_p99)))
        ),
        ceiling: format!(
            "/api/v1/live p99: {}",
            format_duration(median_duration(runs.iter().map(|run| run.live_p99)))
        ),
        ratio: Some(ratio),
        goal: "<= 5.0".to_owned(),
        pass: Some(ratio <= 5.0),
    }
}

fn list_throughput_row(runs: &[ListRun]) -> Row {
    let ratio = median(runs.iter().map(|run| run.daemon_rate / run.baseline_rate));
    Row {
        id: "R1",
        figure: format!(
            "GET /workers, 16 conn: {:.0}/s",
            median(runs.iter().map(|run| run.daemon_rate))
        ),
        ceiling: format!(
            "tiny_http, same body: {:.0}/s",
            median(runs.iter().map(|run| run.baseline_rate))
        ),
        ratio: Some(ratio),
        goal: ">= 0.30".to_owned(),
        pass: Some(ratio >= 0.30),
    }
}

fn list_latency_row(runs: &[ListRun]) -> Row {
    let p50 = median_duration(runs.iter().map(|run| run.daemon_p50));
    latency_row("R3", "GET /workers p50, 1 conn", p50, Bound::Below(1.0))
}

fn burst_row(daemon: &Bursts, baseline: &Bursts) -> Row {
    let bound = Bound::AtMost(100.0);
    Row {
        id: "C1",
        figure: format!("64 new conns x {BURST_REPEATS}: {}", daemon.describe()),
        ceiling: format!("tiny_http: {}", baseline.describe()),
        ratio: None,
        goal: bound.describe("ms"),
        pass: Some(daemon.stalled == 0 && bound.holds(daemon.slowest.as_secs_f64() * 1e3)),
    }
}

/// SL: the p99 and the p50 of `/live` with the slow clients open, against
/// without; medians over the runs, ratios the median of the per-run ratios.
fn slowloris_rows(runs: &[SlowlorisRun]) -> [Row; 2] {
    let count = runs.first().map_or(0, |run| run.connections);
    let failed: u64 = runs.iter().map(|run| run.failed).sum();
    let held = runs.iter().map(|run| run.held).min().unwrap_or(0);
    let row = |what: &str,
               loaded: fn(&SlowlorisRun) -> Duration,
               quiet: fn(&SlowlorisRun) -> Duration| Row {
        id: "SL",
        figure: format!(
            "/live {what}, {count} slow open: {}{}",
            format_duration(median_duration(runs.iter().map(loaded))),
            if failed > 0 {
                format!(", {failed} failed")
            } else if held < count {
                format!(", only {held} held")
            } else {
                String::new()
            }
        ),
        ceiling: format!(
            "without: {}",
            format_duration(median_duration(runs.iter().map(quiet)))
        ),
        ratio: Some(median(
            runs.iter()
                .map(|run| loaded(run).as_secs_f64() / quiet(run).as_secs_f64()),
        )),
        goal: "(info)".to_owned(),
        pass: None,
    };
    [
        row("p99", |run| run.loaded_p99, |run| run.quiet_p99),
        row("p50", |run| run.loaded_p50, |run| run.quiet_p50),
    ]
}

/// An absolute limit on a figure.
#[derive(Clone, Copy)]
enum Bound {
    Below(f64),
    AtMost(f64),
}

impl Bound {
    fn holds(self, value: f64) -> bool {
        match self {
            Bound::Below(limit) => value < limit,
            Bound::AtMost(limit) => value <= limit,
        }
    }

    fn describe(self, unit: &str) -> String {
        match self {
            Bound::Below(limit) => format!("< {limit} {unit}"),
            Bound::AtMost(limit) => format!("<= {limit} {unit}"),
        }
    }
}

/// A latency held to a bound in milliseconds.
fn latency_row(id: &'static str, what: &str, figure: Duration, bound: Bound) -> Row {
    Row {
        id,
        figure: format!("{what}: {}", format_duration(figure)),
        ceiling: "-".to_owned(),
        ratio: None,
        goal: bound.describe("ms"),
        pass: Some(bound.holds(figure.as_secs_f64() * 1e3)),
    }
}

/// A resident set size, held to a bound in MiB when there is one.
fn memory_row(what: &str, bytes: u64, bound: Option<Bound>) -> Row {
    let mib = bytes as f64 / MIB;
    Row {
        id: "MEM",
        figure: format!("{what}: {mib:.1} MiB"),
        ceiling: "-".to_owned(),
        ratio: None,
        goal: bound.map_or_else(|| "(info)".to_owned(), |bound| bound.describe("MiB")),
        pass: bound.map(|bound| bound.holds(mib)),
    }
}

fn print_table(rows: &[Row], runs: usize) {
    println!();
    println!(
        "ratios, rates, R3 and M1 are medians of {runs} run(s); C1 is the worst of {BURST_REPEATS}"
    );
    println!(
        "{:<4} {:<44} {:<34} {:>6}  {:<10} result",
        "id", "figure", "compared with", "ratio", "goal"
    );
    for row in rows {
        println!(
            "{:<4} {:<44} {:<34} {:>6}  {:<10} {}",
            row.id,
            row.figure,
            row.ceiling,
            row.ratio
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}")),
            row.goal,
            match row.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "",
            }
        );
    }
    let failed = rows.iter().filter(|row| row.pass == Some(false)).count();
    let checked = rows.iter().filter(|row| row.pass.is_some()).count();
    println!("{} of {checked} targets met", checked - failed);
}

fn format_duration(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.0} us")
    } else {
        format!("{:.2} ms", micros / 1e3)
    }
}
