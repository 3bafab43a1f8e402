//! The closed-loop driver: N keep-alive connections, one client thread each,
//! send a request, wait for its answer, repeat, until a time bound or a
//! request bound is reached. What counts as a success is the caller's test
//! (a 201 for a spawn, a 409 for a refused acquire, `"succeeded":true` for
//! an etcd transaction); only successes contribute latency samples.
//! `drive_socket` does the same over the daemon's admin socket, one NDJSON
//! request line and one reply line per round trip.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::latency::Latencies;
use crate::ndjson::LineClient;

/// Longest one exchange may take before it counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A measurement stops early once this many exchanges failed.
const MAX_FAILURES: u64 = 100;

/// How long and how hard one measurement runs.
#[derive(Clone, Copy)]
pub struct Plan {
    pub connections: usize,
    pub duration: Duration,
    /// Upper bound on requests across all connections.
    pub max_requests: usize,
}

pub fn status_is(status: u16) -> impl Fn(u16, &[u8]) -> bool + Sync + Copy {
    move |got, _| got == status
}

pub struct Measurement {
    pub ok: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
    pub elapsed: Duration,
    pub latencies: Latencies,
}

impl Measurement {
    /// Successful requests per second.
    pub fn rate(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.ok as f64 / seconds
        } else {
            0.0
        }
    }

    pub fn p50_ms(&self) -> f64 {
        self.latencies.percentile(50.0).as_secs_f64() * 1e3
    }

    pub fn p99_ms(&self) -> f64 {
        self.latencies.percentile(99.0).as_secs_f64() * 1e3
    }

    /// The measurement as an error if anything failed: every figure this
    /// bench reports is over answers that all succeeded.
    pub fn clean(self, what: &str) -> Result<Measurement, String> {
        match (&self.first_failure, self.failed) {
            (_, 0) => Ok(self),
            (failure, failed) => Err(format!(
                "{what}: {failed} of {} requests failed; first: {}",
                self.ok + failed,
                failure.as_deref().unwrap_or("?")
            )),
        }
    }
}

struct Tally {
    ok: u64,
    failed: u64,
    first_failure: Option<String>,
    samples: Vec<Duration>,
    finished: Instant,
}

impl Tally {
    fn new(max_requests: usize) -> Tally {
        Tally {
            ok: 0,
            failed: 0,
            first_failure: None,
            samples: Vec::with_capacity(max_requests.min(1 << 18)),
            finished: Instant::now(),
        }
    }
}

/// Runs `plan` against `addr`. Connection `c` sends the requests of
/// `requests(c)` in rotation; every connection is open before the clock
/// starts.
pub fn drive<A>(
    addr: SocketAddr,
    plan: Plan,
    accept: A,
    requests: impl Fn(usize) -> Vec<Vec<u8>>,
) -> Result<Measurement, String>
where
    A: Fn(u16, &[u8]) -> bool + Sync,
{
    let connections = plan.connections.max(1);
    let clients = (0..connections)
        .map(|_| Client::connect(addr, IO_TIMEOUT))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    let rotations: Vec<Vec<Vec<u8>>> = (0..connections).map(requests).collect();
    let accept = &accept;
    Ok(race(
        "fleet-conn",
        plan,
        clients.into_iter().zip(&rotations).collect(),
        |(client, rotation), deadline, max_requests| {
            run_connection(addr, client, rotation, deadline, max_requests, accept)
        },
    ))
}

/// Runs `plan` over the admin socket at `path`: connection `c` sends the
/// NDJSON line `request(c)` (with its newline) again and again, one thread
/// per connection. A reply without `"ok":true` (or a broken connection)
/// counts as failed and ends that connection; every connection is open,
/// its greeting read, before the clock starts.
pub fn drive_socket(
    path: &Path,
    plan: Plan,
    request: impl Fn(usize) -> Vec<u8>,
) -> Result<Measurement, String> {
    let connections = plan.connections.max(1);
    let clients = (0..connections)
        .map(|_| LineClient::connect(path))
        .collect::<Result<Vec<_>, _>>()?;
    let lines: Vec<Vec<u8>> = (0..connections).map(request).collect();
    Ok(race(
        "fleet-sock",
        plan,
        clients.into_iter().zip(&lines).collect(),
        |(mut client, line), deadline, max_requests| {
            let mut tally = Tally::new(max_requests);
            while tally.ok < max_requests as u64 && Instant::now() < deadline {
                let sent_at = Instant::now();
                match client.round_trip(line) {
                    Ok(()) => {
                        tally.samples.push(sent_at.elapsed());
                        tally.ok += 1;
                    }
                    Err(error) => {
                        tally.failed += 1;
                        tally.first_failure = Some(error);
                        break;
                    }
                }
            }
            tally.finished = Instant::now();
            tally
        },
    ))
}

/// Runs `work` for each connection on its own thread, all released at
/// once when every thread is ready; each gets the window's deadline and
/// its share of `plan.max_requests`. The measurement is timed from the
/// release to the last connection's end.
fn race<W: Send>(
    name: &str,
    plan: Plan,
    connections: Vec<W>,
    work: impl Fn(W, Instant, usize) -> Tally + Sync,
) -> Measurement {
    let per_connection = plan.max_requests.div_ceil(connections.len().max(1));
    let start_line = Barrier::new(connections.len() + 1);
    let (start, tallies) = thread::scope(|scope| {
        let handles: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(index, connection)| {
                let (start_line, work) = (&start_line, &work);
                thread::Builder::new()
                    .name(format!("{name}-{index}"))
                    .spawn_scoped(scope, move || {
                        start_line.wait();
                        work(connection, Instant::now() + plan.duration, per_connection)
                    })
                    .expect("spawning a client thread")
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let tallies: Vec<Tally> = handles
            .into_iter()
            .map(|handle| handle.join().expect("client thread panicked"))
            .collect();
        (start, tallies)
    });
    gather(start, tallies)
}

/// One measurement from the connections' tallies, timed from `start` to the
/// last connection's end.
fn gather(start: Instant, tallies: Vec<Tally>) -> Measurement {
    let finished = tallies.iter().map(|tally| tally.finished).max();
    let mut measurement = Measurement {
        ok: 0,
        failed: 0,
        first_failure: None,
        elapsed: finished.map_or(Duration::ZERO, |end| end.saturating_duration_since(start)),
        latencies: Latencies::new(Vec::new()),
    };
    let mut samples = Vec::new();
    for tally in tallies {
        measurement.ok += tally.ok;
        measurement.failed += tally.failed;
        measurement.first_failure = measurement.first_failure.or(tally.first_failure);
        samples.extend(tally.samples);
    }
    measurement.latencies = Latencies::new(samples);
    measurement
}

fn run_connection(
    addr: SocketAddr,
    mut client: Client,
    rotation: &[Vec<u8>],
    deadline: Instant,
    max_requests: usize,
    accept: &(impl Fn(u16, &[u8]) -> bool + Sync),
) -> Tally {
    let mut tally = Tally::new(max_requests);
    for request in rotation.iter().cycle().take(max_requests) {
        let sent_at = Instant::now();
        if sent_at >= deadline || tally.failed >= MAX_FAILURES {
            break;
        }
        let failure = match client.exchange(request) {
            Ok(response) if accept(response.status, response.body) => {
                tally.samples.push(sent_at.elapsed());
                tally.ok += 1;
                continue;
            }
            Ok(response) => format!(
                "status {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body[..response.body.len().min(300)])
            ),
            Err(error) => error.to_string(),
        };
        tally.failed += 1;
        tally.first_failure.get_or_insert(failure);
        match Client::connect(addr, IO_TIMEOUT) {
            Ok(fresh) => client = fresh,
            Err(error) => {
                tally
                    .first_failure
                    .get_or_insert(format!("reconnecting: {error}"));
                break;
            }
        }
    }
    tally.finished = Instant::now();
    tally
}

/// One request on a fresh connection; the status and body as text.
pub fn once(addr: SocketAddr, request: &[u8]) -> Result<(u16, String), String> {
    let mut client = Client::connect(addr, IO_TIMEOUT)
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    let response = client
        .exchange(request)
        .map_err(|error| format!("request to {addr}: {error}"))?;
    Ok((
        response.status,
        String::from_utf8_lossy(response.body).into_owned(),
    ))
}
