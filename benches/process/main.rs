//! Process provider benchmark (P1-P4 of issue 5).
//!
//!     cargo bench --bench process [-- --quick]
//!
//! One run, one machine, as root (the provider's namespaces and mounts need
//! it): the release daemon is started with a fresh data dir, and
//! - P1 times `POST /api/v1/sandboxes {"provider":"process","image":"host"}`
//!   to its 201, interleaved with the same isolation set up without the
//!   daemon (`by_hand.rs`): by hand with util-linux (the target's
//!   baseline), the daemon's own `setsid unshare stacyvmd sandbox-init`
//!   launch, and bare `unshare ... true`. Each sandbox is destroyed before
//!   the next sample, so at most one exists;
//! - P4 spawns 100 sandboxes and reads the daemon's RSS before and after;
//! - P2 times `exec` of `true` in them with 1 client, and counts execs/s
//!   with 8 clients over 4 sandboxes (2 each) and over 1;
//! - P3 writes a 10 MiB file with `PUT .../files?path=` (raw body) and with
//!   `POST .../files` (JSON), and reads it back with `GET .../files?path=`.
//!
//! Every sandbox is destroyed before the daemon is stopped (runtimes
//! outlive the daemon). Prints a table; exits 0 whether targets pass or
//! fail, 1 only when it could not measure. See docs/benchmarks-process.md.

mod by_hand;
#[allow(dead_code)]
#[path = "../loadgen/client.rs"]
mod client;
#[path = "../common/daemon.rs"]
mod daemon;
#[path = "../loadgen/latency.rs"]
mod latency;

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use by_hand::Baseline;
use client::Client;
use daemon::{Daemon, ScratchDir};
use latency::Latencies;

const USAGE: &str = "usage: cargo bench --bench process [-- --quick]";
/// Bounds every read and write: a spawn or a 10 MiB transfer on a loaded
/// box can take a while, but never this long.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const SPAWN_BODY: &str = r#"{"provider":"process","image":"host"}"#;
/// `true` as a client sends it by default (shell mode: `/bin/sh -c true`).
const EXEC_TRUE: &str = r#"{"command":"true"}"#;
const EXEC_TRUE_ARGV: &str = r#"{"command":"true","mode":"argv"}"#;
const IDLE_SANDBOXES: usize = 100;
const EXEC_CLIENTS: usize = 8;
const EXEC_SANDBOXES: usize = 4;
const FILE_BYTES: usize = 10 << 20;
const MIB: f64 = (1 << 20) as f64;

struct Options {
    /// P1 samples of each kind.
    spawns: usize,
    /// Each P2 measurement.
    exec_duration: Duration,
    /// P3 rounds (write both ways, read back).
    file_rounds: usize,
}

fn parse_options(arguments: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        spawns: 30,
        exec_duration: Duration::from_secs(3),
        file_rounds: 5,
    };
    for argument in arguments {
        match argument.as_str() {
            "--quick" => {
                options.spawns = 10;
                options.exec_duration = Duration::from_secs(1);
                options.file_rounds = 2;
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
            eprintln!("process bench: error: {error}");
            ExitCode::FAILURE
        }
    }
}

// ---- the daemon's API -------------------------------------------------------

/// One keep-alive connection to the daemon; answers other than the
/// expected status are errors that carry the body.
struct Api(Client);

impl Api {
    fn connect(addr: SocketAddr) -> Result<Api, String> {
        Client::connect(addr, IO_TIMEOUT)
            .map(Api)
            .map_err(|error| format!("connecting to {addr}: {error}"))
    }

    /// Sends `request`, checks the status; the body borrows the client.
    fn call(&mut self, request: &[u8], want: u16) -> Result<&[u8], String> {
        let response = self
            .0
            .exchange(request)
            .map_err(|error| format!("HTTP exchange: {error}"))?;
        if response.status != want {
            let head = String::from_utf8_lossy(&request[..request.len().min(80)]);
            let head = head.lines().next().unwrap_or_default().to_owned();
            return Err(format!(
                "{head}: status {} (wanted {want}): {}",
                response.status,
                String::from_utf8_lossy(&response.body[..response.body.len().min(500)])
            ));
        }
        Ok(response.body)
    }

    /// Spawns a process sandbox: its id and the time to the 201.
    fn spawn(&mut self) -> Result<(String, Duration), String> {
        let request = client::post_json("/api/v1/sandboxes", SPAWN_BODY);
        let started = Instant::now();
        let body = self.call(&request, 201)?;
        let elapsed = started.elapsed();
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|error| format!("spawn answer is not JSON: {error}"))?;
        let id = value["id"]
            .as_str()
            .ok_or_else(|| format!("spawn answer without an id: {value}"))?;
        Ok((id.to_owned(), elapsed))
    }

    fn destroy(&mut self, id: &str) -> Result<Duration, String> {
        let request = format!("DELETE /api/v1/sandboxes/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .into_bytes();
        let started = Instant::now();
        self.call(&request, 200)?;
        Ok(started.elapsed())
    }
}

/// The sandboxes alive in the daemon; whatever is left is destroyed when
/// this is dropped (before the daemon, which is declared first), so a
/// failed run leaves no runtime behind.
struct Live {
    addr: SocketAddr,
    ids: Vec<String>,
}

impl Live {
    fn spawn(&mut self, api: &mut Api) -> Result<Duration, String> {
        let (id, elapsed) = api.spawn()?;
        self.ids.push(id);
        Ok(elapsed)
    }

    /// Destroys every sandbox; the destroy times.
    fn destroy_all(&mut self, api: &mut Api) -> Result<Vec<Duration>, String> {
        let mut times = Vec::with_capacity(self.ids.len());
        while let Some(id) = self.ids.last() {
            times.push(api.destroy(id)?);
            self.ids.pop();
        }
        Ok(times)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        eprintln!("destroying {} sandboxes left by the run", self.ids.len());
        if let Ok(mut api) = Api::connect(self.addr) {
            for id in std::mem::take(&mut self.ids) {
                if let Err(error) = api.destroy(&id) {
                    eprintln!("destroying {id}: {error}");
                }
            }
        }
    }
}

// ---- measurements -----------------------------------------------------------

struct Rate {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    count: usize,
}

/// Each client (an exec request and its sandbox) on its own thread and
/// connection, in a closed loop for `duration`.
fn exec_load(addr: SocketAddr, requests: Vec<Vec<u8>>, duration: Duration) -> Result<Rate, String> {
    let start = Instant::now();
    let until = start + duration;
    let threads: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            thread::Builder::new()
                .name(format!("exec-client-{i}"))
                .spawn(move || -> Result<Vec<Duration>, String> {
                    let mut api = Api::connect(addr)?;
                    let mut samples = Vec::with_capacity(4096);
                    while Instant::now() < until {
                        let sent = Instant::now();
                        let body = api.call(&request, 200)?;
                        if !contains(body, b"\"exit_code\":0") {
                            return Err(format!(
                                "exec of true did not exit 0: {}",
                                String::from_utf8_lossy(body)
                            ));
                        }
                        samples.push(sent.elapsed());
                    }
                    Ok(samples)
                })
                .map_err(|error| format!("spawning a client thread: {error}"))
        })
        .collect::<Result<_, _>>()?;
    let mut all = Vec::new();
    for thread in threads {
        all.extend(
            thread
                .join()
                .map_err(|_| "a client thread panicked".to_owned())??,
        );
    }
    let window = start.elapsed();
    let count = all.len();
    if count == 0 {
        return Err("no exec finished".to_owned());
    }
    let latencies = Latencies::new(all);
    Ok(Rate {
        per_second: count as f64 / window.as_secs_f64(),
        p50: latencies.percentile(50.0),
        p99: latencies.percentile(99.0),
        count,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn exec_request(id: &str, body: &str) -> Vec<u8> {
    client::post_json(&format!("/api/v1/sandboxes/{id}/exec"), body)
}

/// Deterministic filler: `ascii` keeps it a valid JSON string body.
fn filler(len: usize, ascii: bool) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let byte = (state >> 24) as u8;
            if ascii {
                ALPHABET[usize::from(byte & 63)]
            } else {
                byte
            }
        })
        .collect()
}

fn upload_request(method: &str, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

struct FileRates {
    put: Vec<f64>,
    post: Vec<f64>,
    get: Vec<f64>,
}

/// P3 in sandbox `id`: rounds of PUT, POST and GET of a 10 MiB file; the
/// GET body is checked against what was written.
fn file_rounds(api: &mut Api, id: &str, rounds: usize) -> Result<FileRates, String> {
    let raw = filler(FILE_BYTES, false);
    let text = filler(FILE_BYTES, true);
    let put = upload_request(
        "PUT",
        &format!("/api/v1/sandboxes/{id}/files?path=bench-put.bin"),
        "application/octet-stream",
        &raw,
    );
    let mut json = br#"{"path":"bench-post.txt","content":""#.to_vec();
    json.extend_from_slice(&text);
    json.extend_from_slice(b"\"}");
    let post = upload_request(
        "POST",
        &format!("/api/v1/sandboxes/{id}/files"),
        "application/json",
        &json,
    );
    let get = client::get(&format!("/api/v1/sandboxes/{id}/files?path=bench-put.bin"));
    let get_post = client::get(&format!("/api/v1/sandboxes/{id}/files?path=bench-post.txt"));
    let rate = |elapsed: Duration| FILE_BYTES as f64 / MIB / elapsed.as_secs_f64();
    let mut rates = FileRates {
        put: Vec::new(),
        post: Vec::new(),
        get: Vec::new(),
    };
    for _ in 0..rounds {
        let started = Instant::now();
        api.call(&put, 200)?;
        rates.put.push(rate(started.elapsed()));

        let started = Instant::now();
        api.call(&post, 200)?;
        rates.post.push(rate(started.elapsed()));

        let started = Instant::now();
        let body = api.call(&get, 200)?;
        let elapsed = started.elapsed();
        if body != raw.as_slice() {
            return Err(format!(
                "GET returned {} bytes that differ from the {} written",
                body.len(),
                raw.len()
            ));
        }
        rates.get.push(rate(elapsed));
    }
    if api.call(&get_post, 200)? != text.as_slice() {
        return Err("the POSTed file reads back different".to_owned());
    }
    Ok(rates)
}

/// RSS of the sandboxes' own processes (each `unshare` and its
/// `sandbox-init`), found by their `--state <data_dir>/process/` argument.
fn sandbox_processes_rss(data_dir: &Path) -> u64 {
    let needle = format!("--state\0{}/process/", data_dir.display());
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            fs::read(entry.path().join("cmdline"))
                .is_ok_and(|cmdline| contains(&cmdline, needle.as_bytes()))
        })
        .filter_map(|entry| {
            let status = fs::read_to_string(entry.path().join("status")).ok()?;
            let kib = status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?;
            Some(kib * 1024)
        })
        .sum()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- the run ----------------------------------------------------------------

struct Row {
    id: &'static str,
    what: String,
    figure: String,
    compared: String,
    ratio: String,
    goal: &'static str,
    pass: Option<bool>,
}

fn row(id: &'static str, what: impl Into<String>, figure: impl Into<String>) -> Row {
    Row {
        id,
        what: what.into(),
        figure: figure.into(),
        compared: String::new(),
        ratio: String::new(),
        goal: "",
        pass: None,
    }
}

fn run() -> Result<(), String> {
    let options = parse_options(std::env::args().skip(1))?;
    // Cargo builds the binary targets before any bench: target/release/stacyvmd.
    let binary = Path::new(env!("CARGO_BIN_EXE_stacyvmd"));
    if !binary.is_file() {
        return Err(format!(
            "{} is missing: run `cargo bench --bench process`",
            binary.display()
        ));
    }
    if !rustix::process::geteuid().is_root() {
        return Err("run as root: the benchmark sets up namespaces and mounts itself".into());
    }
    let scratch = ScratchDir::new("stacyvmd-process-bench")?;
    println!("machine: {}", daemon::machine_description());
    println!("load:    {} (1, 5, 15 min) at start", load_average());
    println!(
        "daemon:  {} ({})",
        daemon::daemon_version(binary).unwrap_or_else(|e| format!("unknown ({e})")),
        binary.display()
    );
    println!(
        "plan:    {} spawns of each kind; exec {:?} per measurement; {} file rounds of {} MiB",
        options.spawns,
        options.exec_duration,
        options.file_rounds,
        FILE_BYTES >> 20
    );
    let rows = bench(binary, &scratch.0, &options)?;
    println!("load:    {} (1, 5, 15 min) at the end", load_average());
    println!();
    print_table(&rows);
    Ok(())
}

fn bench(binary: &Path, scratch: &Path, options: &Options) -> Result<Vec<Row>, String> {
    let data_dir = scratch.join("data");
    // The local worker's default capacity (64) is below P4's 100.
    let config = scratch.join("stacyvmd.toml");
    fs::write(&config, "[worker]\nmax_sandboxes = 256\n")
        .map_err(|error| format!("writing {}: {error}", config.display()))?;
    let mut args = vec!["--config".into(), config.into_os_string()];
    args.extend(daemon::local_args(&data_dir));
    let daemon = Daemon::start(binary, &args, Some(scratch), &scratch.join("stderr.log"))?;
    let addr = daemon.addr;
    println!("daemon pid {} http {addr}", daemon.pid);
    let mut live = Live {
        addr,
        ids: Vec::new(),
    };
    let mut api = Api::connect(addr)?;
    let mut rows = Vec::new();

    // P1: interleaved, the order rotating, so that drift in the machine's
    // load falls on every kind alike. One warm-up of each first.
    let kinds = [None, Some(Baseline::ByHand), Some(Baseline::InitDirect)];
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let mut destroys = Vec::new();
    for n in 0..=options.spawns {
        for k in 0..kinds.len() + 1 {
            let which = (n + k) % (kinds.len() + 1);
            let elapsed = match which {
                0 => {
                    let elapsed = live.spawn(&mut api)?;
                    destroys.extend(live.destroy_all(&mut api)?);
                    elapsed
                }
                1 => by_hand::sample(Baseline::ByHand, binary, scratch, n)?,
                2 => by_hand::sample(Baseline::InitDirect, binary, scratch, n)?,
                _ => by_hand::sample(Baseline::NamespacesOnly, binary, scratch, n)?,
            };
            if n > 0 {
                samples[which].push(elapsed);
            }
        }
    }
    let [daemon_spawn, hand, init_direct, floor] = samples.map(Latencies::new);
    let destroy = Latencies::new(destroys);
    let spawn_p50 = daemon_spawn.percentile(50.0);
    let hand_p50 = hand.percentile(50.0);
    let ratio = spawn_p50.as_secs_f64() / hand_p50.as_secs_f64();
    println!(
        "P1 spawn p50 {} (p90 {}); by hand {} (p90 {}); sandbox-init direct {}; namespaces only {}; destroy p50 {}",
        ms(spawn_p50),
        ms(daemon_spawn.percentile(90.0)),
        ms(hand_p50),
        ms(hand.percentile(90.0)),
        ms(init_direct.percentile(50.0)),
        ms(floor.percentile(50.0)),
        ms(destroy.percentile(50.0)),
    );
    rows.push(Row {
        compared: format!("by hand (unshare + sh + mount): {}", ms(hand_p50)),
        ratio: format!("{ratio:.2}"),
        goal: "<= 2.0",
        pass: Some(ratio <= 2.0),
        ..row("P1", "spawn to 201, p50", ms(spawn_p50))
    });
    rows.push(Row {
        goal: "< 50 ms",
        pass: Some(spawn_p50 < Duration::from_millis(50)),
        ..row("P1", "spawn to 201, p50", ms(spawn_p50))
    });
    rows.push(Row {
        compared: format!(
            "sandbox-init alone: {}; namespaces only: {}",
            ms(init_direct.percentile(50.0)),
            ms(floor.percentile(50.0))
        ),
        ratio: format!(
            "{:.2}",
            spawn_p50.as_secs_f64() / init_direct.percentile(50.0).as_secs_f64()
        ),
        goal: "report",
        ..row("-", "spawn to 201, p50 (context)", ms(spawn_p50))
    });
    rows.push(Row {
        goal: "report",
        ..row(
            "-",
            "destroy (DELETE to 200), p50",
            ms(destroy.percentile(50.0)),
        )
    });

    // P4: 100 idle sandboxes; they stay for P2 and P3.
    let rss_before = daemon.rss_bytes()?;
    let mut spawns = Vec::with_capacity(IDLE_SANDBOXES);
    let started = Instant::now();
    for _ in 0..IDLE_SANDBOXES {
        spawns.push(live.spawn(&mut api)?);
    }
    let spawn_all = started.elapsed();
    let rss_after = daemon.rss_bytes()?;
    let per_sandbox = rss_after.saturating_sub(rss_before) as f64 / IDLE_SANDBOXES as f64;
    let own_rss = sandbox_processes_rss(&data_dir) as f64 / IDLE_SANDBOXES as f64;
    let spawns = Latencies::new(spawns);
    println!(
        "P4 RSS {:.1} -> {:.1} MiB with {IDLE_SANDBOXES} sandboxes ({:.1} KiB each); their own processes {:.2} MiB each; spawned in {:.2} s, p50 {}",
        rss_before as f64 / MIB,
        rss_after as f64 / MIB,
        per_sandbox / 1024.0,
        own_rss / MIB,
        spawn_all.as_secs_f64(),
        ms(spawns.percentile(50.0)),
    );
    rows.push(Row {
        compared: format!(
            "RSS {:.1} -> {:.1} MiB",
            rss_before as f64 / MIB,
            rss_after as f64 / MIB
        ),
        goal: "<= 1 MiB",
        pass: Some(per_sandbox <= MIB),
        ..row(
            "P4",
            format!("daemon RSS per idle sandbox ({IDLE_SANDBOXES})"),
            format!("{:.1} KiB", per_sandbox / 1024.0),
        )
    });
    rows.push(Row {
        goal: "report",
        ..row(
            "-",
            "sandbox's own processes (unshare + init) RSS each",
            format!("{:.2} MiB", own_rss / MIB),
        )
    });
    rows.push(Row {
        goal: "report",
        ..row(
            "-",
            format!("spawn p50 while 0-{IDLE_SANDBOXES} exist (sequential)"),
            ms(spawns.percentile(50.0)),
        )
    });

    // P2: exec of `true`.
    let ids = live.ids.clone();
    for _ in 0..5 {
        api.call(&exec_request(&ids[0], EXEC_TRUE), 200)?;
    }
    let one = exec_load(
        addr,
        vec![exec_request(&ids[0], EXEC_TRUE)],
        options.exec_duration,
    )?;
    let one_argv = exec_load(
        addr,
        vec![exec_request(&ids[0], EXEC_TRUE_ARGV)],
        options.exec_duration,
    )?;
    let spread = exec_load(
        addr,
        (0..EXEC_CLIENTS)
            .map(|i| exec_request(&ids[i % EXEC_SANDBOXES], EXEC_TRUE))
            .collect(),
        options.exec_duration,
    )?;
    let single = exec_load(
        addr,
        (0..EXEC_CLIENTS)
            .map(|_| exec_request(&ids[0], EXEC_TRUE))
            .collect(),
        options.exec_duration,
    )?;
    println!(
        "P2 exec true: 1 client p50 {} p99 {} ({:.0}/s, {} execs); argv mode p50 {}; 8 clients / 4 sandboxes {:.0}/s p50 {} ({} execs); 8 clients / 1 sandbox {:.0}/s",
        ms(one.p50),
        ms(one.p99),
        one.per_second,
        one.count,
        ms(one_argv.p50),
        spread.per_second,
        ms(spread.p50),
        spread.count,
        single.per_second,
    );
    rows.push(Row {
        goal: "<= 5 ms",
        pass: Some(one.p50 <= Duration::from_millis(5)),
        ..row("P2", "exec `true`, 1 client, p50", ms(one.p50))
    });
    rows.push(Row {
        compared: format!("p50 {}, p99 {}", ms(spread.p50), ms(spread.p99)),
        goal: ">= 200/s",
        pass: Some(spread.per_second >= 200.0),
        ..row(
            "P2",
            format!("exec `true`, {EXEC_CLIENTS} clients over {EXEC_SANDBOXES} sandboxes"),
            format!("{:.0}/s", spread.per_second),
        )
    });
    rows.push(Row {
        goal: "report",
        ..row(
            "-",
            "exec `true`, 1 client, p99 / argv mode p50",
            format!("{} / {}", ms(one.p99), ms(one_argv.p50)),
        )
    });
    rows.push(Row {
        compared: format!("p50 {}", ms(single.p50)),
        goal: "report",
        ..row(
            "-",
            format!("exec `true`, {EXEC_CLIENTS} clients, 1 sandbox"),
            format!("{:.0}/s", single.per_second),
        )
    });

    // P3: a 10 MiB file.
    let mut rates = file_rounds(&mut api, &ids[0], options.file_rounds)?;
    let [put, post, get] = [&mut rates.put, &mut rates.post, &mut rates.get].map(|v| median(v));
    println!("P3 10 MiB: PUT {put:.0} MiB/s, POST JSON {post:.0} MiB/s, GET {get:.0} MiB/s");
    for (what, rate) in [
        ("write 10 MiB, PUT raw body", put),
        ("read 10 MiB back, GET", get),
    ] {
        rows.push(Row {
            goal: ">= 100 MiB/s",
            pass: Some(rate >= 100.0),
            ..row("P3", what, format!("{rate:.0} MiB/s"))
        });
    }
    // The target's reference figure: the JSON body is buffered and parsed
    // whole before the file is written.
    rows.push(Row {
        goal: "reference",
        ..row("-", "write 10 MiB, POST JSON", format!("{post:.0} MiB/s"))
    });

    let destroys = Latencies::new(live.destroy_all(&mut api)?);
    let rss_end = daemon.rss_bytes()?;
    println!(
        "destroyed {IDLE_SANDBOXES}: p50 {}; daemon RSS {:.1} MiB",
        ms(destroys.percentile(50.0)),
        rss_end as f64 / MIB
    );
    drop(live);
    let status = daemon.stop()?;
    if !status.success() {
        eprintln!("warning: the daemon exited with {status}");
    }
    Ok(rows)
}

fn print_table(rows: &[Row]) {
    println!("| id | measurement | figure | compared with | ratio | goal | result |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let result = match r.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "-",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.id, r.what, r.figure, r.compared, r.ratio, r.goal, result
        );
    }
}
