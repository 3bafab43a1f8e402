//! Load drivers: `drive` keeps N keep-alive connections busy for a bounded
//! time and request count (one client thread per connection, closed loop);
//! `burst` opens many fresh connections at once and times the last answer.

use std::io;
use std::net::SocketAddr;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::latency::Latencies;

/// Longest one exchange may take before it counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long and how hard one measurement runs.
pub struct Plan {
    pub connections: usize,
    pub duration: Duration,
    /// Upper bound on requests across all connections.
    pub max_requests: usize,
}

/// Outcome of one `drive`: only answers with status 200 count as `ok` and
/// contribute latency samples.
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
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// What one connection's thread saw.
struct ConnectionTally {
    ok: u64,
    failed: u64,
    first_failure: Option<String>,
    samples: Vec<Duration>,
    finished: Instant,
}

/// Runs `plan` against `addr`. Connection `c` sends the requests of
/// `requests(c)` in rotation; every connection is open before the clock
/// starts.
pub fn drive(
    addr: SocketAddr,
    plan: &Plan,
    requests: impl Fn(usize) -> Vec<Vec<u8>>,
) -> Result<Measurement, String> {
    let per_connection = plan.max_requests / plan.connections;
    let clients = (0..plan.connections)
        .map(|_| Client::connect(addr, IO_TIMEOUT))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("connecting to {addr}: {error}"))?;
    let rotations: Vec<Vec<Vec<u8>>> = (0..plan.connections).map(requests).collect();
    let start_line = Barrier::new(plan.connections + 1);

    let (start, tallies) = thread::scope(|scope| {
        let handles: Vec<_> = clients
            .into_iter()
            .zip(&rotations)
            .enumerate()
            .map(|(index, (client, rotation))| {
                let start_line = &start_line;
                thread::Builder::new()
                    .name(format!("loadgen-conn-{index}"))
                    .spawn_scoped(scope, move || {
                        start_line.wait();
                        let deadline = Instant::now() + plan.duration;
                        run_connection(addr, client, rotation, deadline, per_connection)
                    })
                    .expect("spawning a client thread")
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let tallies: Vec<ConnectionTally> = handles
            .into_iter()
            .map(|handle| handle.join().expect("client thread panicked"))
            .collect();
        (start, tallies)
    });

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
    Ok(measurement)
}

/// The closed loop of one connection: send, wait for the answer, repeat. A
/// failed exchange is counted and the connection replaced.
fn run_connection(
    addr: SocketAddr,
    mut client: Client,
    rotation: &[Vec<u8>],
    deadline: Instant,
    max_requests: usize,
) -> ConnectionTally {
    let mut tally = ConnectionTally {
        ok: 0,
        failed: 0,
        first_failure: None,
        samples: Vec::with_capacity(64 * 1024),
        finished: Instant::now(),
    };
    for request in rotation.iter().cycle().take(max_requests) {
        let sent_at = Instant::now();
        if sent_at >= deadline {
            break;
        }
        let failure = match client.exchange(request) {
            Ok(response) if response.status == 200 => {
                tally.samples.push(sent_at.elapsed());
                tally.ok += 1;
                continue;
            }
            Ok(response) => format!(
                "status {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body[..response.body.len().min(200)])
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

/// Opens `connections` new connections back to back, sends `request` on each
/// as soon as it is open and keeps them all open; returns the time from the
/// first connect until every one has been answered with 200. A server that
/// serves only as many connections as it has threads fails here after
/// `timeout`.
pub fn burst(
    addr: SocketAddr,
    connections: usize,
    request: &[u8],
    timeout: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut clients = Vec::with_capacity(connections);
    for index in 0..connections {
        let mut client = Client::connect(addr, timeout)
            .map_err(|error| format!("connection {index}: connect: {error}"))?;
        client
            .send(request)
            .map_err(|error| format!("connection {index}: send: {error}"))?;
        clients.push(client);
    }
    for (index, client) in clients.iter_mut().enumerate() {
        match client.receive() {
            Ok(response) if response.status == 200 => {}
            Ok(response) => return Err(format!("connection {index}: status {}", response.status)),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "only {index} of {connections} answered, then none for {timeout:?}"
                ));
            }
            Err(error) => {
                return Err(format!(
                    "only {index} of {connections} answered, then: {error}"
                ));
            }
        }
    }
    Ok(start.elapsed())
}
