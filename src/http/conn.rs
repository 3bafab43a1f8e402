//! Client connections: our own acceptor in front of tiny_http.
//!
//! Why this exists. tiny_http 0.12 hands each accepted connection to an
//! internal task pool whose "is a thread idle?" check races with its own
//! wake-ups: when several connections are accepted back to back, more tasks
//! can be queued than there are idle threads, and a queued keep-alive
//! connection then waits until some *other* connection closes (measured here:
//! 1-22 of 64 new connections unanswered after 2 s). Workers hold long-lived
//! connections, so that is not acceptable. tiny_http also sets no TCP_NODELAY
//! and no timeouts, and hands a request to a handler thread before its body
//! has arrived.
//!
//! What we do, without touching tiny_http's code: the public TCP listener is
//! ours (TCP_NODELAY set on it, inherited by accepted sockets), and tiny_http
//! listens only on a private Unix socket in the data directory (0600). For
//! each client the `http-accept` thread starts a relay which opens one
//! internal connection and *confirms pickup* before relaying a byte: it sends
//! a `GET /-/handoff` probe and waits for its answer, under one process-wide
//! lock. Internal connections are therefore opened strictly one at a time,
//! each only after the previous one has a tiny_http thread of its own, so the
//! pool never sees a burst and the race cannot happen. The `http-spare`
//! thread keeps a few handed-off connections ready, so a burst of new clients
//! is served from those instead of queueing on handoffs. Then two threads
//! copy bytes, one per direction.
//!
//! Requests pass the [`Framer`](super::framer): each one reaches tiny_http
//! only once its head and body are complete, under the header and body
//! deadlines (a late client gets 408 and is closed), so a client's network
//! speed never holds an `http-N` thread; malformed request lines, private
//! paths and requests the router or auth will refuse are answered here.
//!
//! Limits: `server.max_connections` in all and
//! `server.max_connections_per_client` per client address. When the global
//! limit is reached, the connection that has been quiet longest (no request
//! under way) is closed to make room; only when none is quiet does the next
//! client get a 503. `server.idle_timeout` closes a connection that sends
//! nothing between requests. The fd budget ([`FdBudget`]) caps
//! `max_connections` so that the process never runs out of descriptors.
//!
//! The `http-spare` thread also watches tiny_http: if handoffs keep failing
//! (its accept thread died, or the internal listener is gone), the relay
//! marks itself failed, `/api/v1/ready` answers 503 and the thread ends,
//! which stops the daemon with a failure status so that systemd restarts it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::api::ApiError;
use super::framer::{self, BodyLimits, Deadlines, Framer, StreamSlots};
use super::router::RouteId;
use crate::config::LiveConfig;
use crate::metrics::METRICS;
use crate::supervise::ExitNotifier;

mod connections;

use connections::Activity;
pub use connections::{Connections, FdBudget};

/// Relay threads copy bytes only; a small stack keeps many connections cheap.
const RELAY_STACK: usize = 128 * 1024;
const RELAY_BUFFER: usize = 64 * 1024;
/// How long a relay waits for tiny_http to answer the pickup probe.
const HANDOFF_DEADLINE: Duration = Duration::from_secs(5);
const PROBE: &[u8] = b"GET /-/handoff HTTP/1.1\r\nHost: stacyvmd\r\n\r\n";
/// How often `http-spare` checks that tiny_http still takes connections
/// when nothing else has.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive failed handoffs after which tiny_http is declared dead.
const HANDOFF_FAILURES_FATAL: usize = 3;
/// After a refusal, how long the relay keeps reading (and dropping) what
/// the client still sends, so that closing does not reset the connection
/// before the client has read the answer.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

/// Binds the public listener with TCP_NODELAY set before `listen`, so every
/// accepted socket inherits it.
pub fn bind_public(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds tiny_http's private Unix listener: a stale socket file from a crashed
/// run is replaced, and the file is made owner-only.
pub fn bind_internal(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => log::debug!("removed stale internal socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The `http-accept` thread.
pub struct Acceptor {
    local: SocketAddr,
    thread: JoinHandle<()>,
    connections: Arc<Connections>,
}

impl Acceptor {
    pub fn start(
        listener: TcpListener,
        connections: Arc<Connections>,
        live: LiveConfig,
        on_exit: ExitNotifier,
    ) -> std::io::Result<Acceptor> {
        let local = listener.local_addr()?;
        let shared = connections.clone();
        let thread = std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || {
                let _exit = on_exit.guard("http-accept");
                accept_loop(listener, &shared, &live);
            })?;
        Ok(Acceptor {
            local,
            thread,
            connections,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting: new connections are refused from here on.
    pub fn stop(self) {
        self.connections.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a connection of our own.
        let _ = TcpStream::connect_timeout(&wake_addr(self.local), Duration::from_secs(1));
        let _ = self.thread.join();
    }
}

/// An unspecified listen address (0.0.0.0) is reached through loopback.
fn wake_addr(local: SocketAddr) -> SocketAddr {
    let mut addr = local;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// What a relay needs from the configuration, read once per connection.
struct RelaySettings {
    idle: Duration,
    deadlines: Deadlines,
    limits: BodyLimits,
}

/// Longest pause of the accept loop when accept keeps failing.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

fn accept_loop(listener: TcpListener, connections: &Arc<Connections>, live: &LiveConfig) {
    let mut backoff = Duration::ZERO;
    let mut failures: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off (up to a second), keep
                // serving; one line per episode, not per attempt.
                failures += 1;
                if failures == 1 {
                    log::warn!("accept failed: {e}; backing off");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), ACCEPT_BACKOFF_MAX);
                std::thread::sleep(backoff);
                continue;
            }
        };
        if failures > 0 {
            log::warn!("accept works again after {failures} failures");
            failures = 0;
            backoff = Duration::ZERO;
        }
        if connections.stopping.load(Ordering::SeqCst) {
            break;
        }
        METRICS.http.connections_accepted.inc();
        let config = live.get();
        let stream = Arc::new(stream);
        let (id, activity) =
            match connections.admit(&stream, peer.ip(), config.server.max_connections_per_client) {
                Ok(admitted) => admitted,
                Err(why) => {
                    METRICS.http.connections_rejected.inc();
                    log::warn!("refusing {peer}: {why}");
                    refuse(&stream, &ApiError::unavailable(why));
                    continue;
                }
            };
        let settings = RelaySettings {
            idle: config.server.idle_timeout,
            deadlines: Deadlines {
                header: config.server.header_timeout,
                body: config.server.body_timeout,
                min_rate: config.server.min_body_rate,
            },
            limits: BodyLimits {
                body: config.server.max_body_bytes,
                upload: config
                    .providers
                    .process
                    .max_upload_bytes
                    .max(config.server.max_body_bytes),
            },
        };
        connections.open.fetch_add(1, Ordering::SeqCst);
        METRICS.http.connections_open.inc();
        let (shared, live) = (connections.clone(), live.clone());
        let spawned = std::thread::Builder::new()
            .name("http-conn".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                relay(&stream, peer, &shared, &activity, &settings, &live);
                shared.registry().remove(id);
                shared.open.fetch_sub(1, Ordering::SeqCst);
                METRICS.http.connections_open.dec();
            });
        if let Err(e) = spawned {
            log::error!("cannot start a relay thread for {peer}: {e}");
            connections.registry().remove(id);
            connections.open.fetch_sub(1, Ordering::SeqCst);
            METRICS.http.connections_open.dec();
        }
    }
    log::debug!("http-accept: stopped accepting");
}

/// Answers a connection we cannot take with a JSON error and closes it.
fn refuse(stream: &TcpStream, error: &ApiError) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = (&*stream).write_all(&framer::refusal(error, None));
    let _ = stream.shutdown(Shutdown::Both);
}

fn relay(
    client: &Arc<TcpStream>,
    peer: SocketAddr,
    connections: &Arc<Connections>,
    activity: &Arc<Activity>,
    settings: &RelaySettings,
    live: &LiveConfig,
) {
    let upstream = match connections.internal_connection() {
        Ok(s) => Arc::new(s),
        Err(e) => {
            log::error!("internal handoff for {peer} failed: {e}");
            refuse(
                client,
                &ApiError::unavailable("the server is not ready; retry later"),
            );
            return;
        }
    };
    if connections.stopping.load(Ordering::SeqCst) {
        refuse(
            client,
            &ApiError::unavailable("the daemon is shutting down"),
        );
        return;
    }
    let last_word: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    // Responses flow on a second thread; this one carries requests.
    let responses = {
        let (upstream, client, last_word) = (upstream.clone(), client.clone(), last_word.clone());
        let (connections, activity) = (connections.clone(), activity.clone());
        std::thread::Builder::new()
            .name("http-conn-out".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                copy_responses(&upstream, &client, &last_word, &connections, &activity);
            })
    };
    match responses {
        Ok(responses) => {
            let end = copy_requests(
                client,
                &upstream,
                settings,
                connections,
                activity,
                live,
                &last_word,
            );
            match end {
                RequestsEnd::Idle => {
                    METRICS.http.connections_timed_out.inc();
                    log::debug!("closing idle connection from {peer}");
                }
                RequestsEnd::Late => {
                    METRICS.http.connections_timed_out.inc();
                    log::info!("{peer} was too slow sending a request: 408, closing");
                }
                RequestsEnd::Closed | RequestsEnd::Refused => {}
            }
            let _ = responses.join();
        }
        Err(e) => log::error!("cannot start a relay thread for {peer}: {e}"),
    }
}

/// Why a handoff failed: `Connect` means the internal listener is gone
/// (tiny_http's accept thread died, or the socket file was removed); `Probe`
/// only that tiny_http did not answer in time, as when every handler thread
/// is busy.
#[derive(Debug)]
enum HandoffError {
    Connect(std::io::Error),
    Probe(std::io::Error),
}

/// Opens an internal connection and waits until tiny_http has picked it up.
fn handoff(connections: &Connections) -> Result<UnixStream, HandoffError> {
    let _one_at_a_time = connections
        .handoff
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut upstream = UnixStream::connect(&connections.internal).map_err(HandoffError::Connect)?;
    probe(&mut upstream).map_err(HandoffError::Probe)?;
    Ok(upstream)
}

fn probe(upstream: &mut UnixStream) -> std::io::Result<()> {
    upstream.set_read_timeout(Some(HANDOFF_DEADLINE))?;
    upstream.write_all(PROBE)?;
    // The probe's answer has an empty body: read up to the end of its head.
    let mut seen = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        let n = upstream.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "internal server closed during handoff",
            ));
        }
        seen.push(byte[0]);
        if seen.len() > 4096 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "oversized handoff answer",
            ));
        }
    }
    upstream.set_read_timeout(None)
}

#[derive(Debug, PartialEq, Eq)]
enum RequestsEnd {
    /// The client closed its side, or the connection broke.
    Closed,
    /// The client sent nothing between requests for `server.idle_timeout`.
    Idle,
    /// A request's head or body missed its deadline: answered 408.
    Late,
    /// The framer refused a request; its answer is the connection's last word.
    Refused,
}

/// Client to tiny_http. Every byte passes the [`Framer`], so only whole,
/// checked requests reach tiny_http; a refused or late request is answered
/// here and the connection ends after the answers before it.
fn copy_requests(
    client: &TcpStream,
    upstream: &UnixStream,
    settings: &RelaySettings,
    connections: &Connections,
    activity: &Activity,
    live: &LiveConfig,
    last_word: &Mutex<Option<Vec<u8>>>,
) -> RequestsEnd {
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut framer = Framer::default();
    let mut out = Vec::with_capacity(RELAY_BUFFER);
    let mut timeout = None;
    let (end, answer) = loop {
        let deadline = framer.deadline(&settings.deadlines);
        // Within a request, silence is bounded by `idle_timeout` too.
        let left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
        let wait = left.map_or(settings.idle, |left| left.min(settings.idle));
        let silence_bound = left.is_some_and(|left| left >= settings.idle);
        if left.is_some_and(|left| left.is_zero()) {
            break (RequestsEnd::Late, Some(late()));
        }
        // One setsockopt per change: between requests the wait is constant.
        if timeout != Some(wait) {
            let _ = client.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
            timeout = Some(wait);
        }
        let n = match (&*client).read(&mut buf) {
            Ok(0) => break (RequestsEnd::Closed, None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if silence_bound {
                    // `idle_timeout` of silence in the middle of a request.
                    break (RequestsEnd::Late, Some(late()));
                }
                if deadline.is_some() {
                    continue; // The deadline is checked at the top.
                }
                break (RequestsEnd::Idle, None);
            }
            Err(_) => break (RequestsEnd::Closed, None),
        };
        out.clear();
        let config = live.get();
        let cx = framer::Context {
            limits: settings.limits,
            draining: connections.stopping.load(Ordering::SeqCst),
            auth: &config.auth,
            slots: &connections.streams,
        };
        let verdict = framer.feed(&buf[..n], Instant::now(), &cx, &mut out);
        connections.touch(activity);
        activity
            .receiving
            .store(framer.in_request(), Ordering::Relaxed);
        if !out.is_empty() {
            activity.awaiting.store(true, Ordering::Relaxed);
        }
        if !out.is_empty() && (&*upstream).write_all(&out).is_err() {
            break (RequestsEnd::Closed, None);
        }
        if let Err(refusal) = verdict {
            break (RequestsEnd::Refused, Some(refusal));
        }
    };
    if let Some(answer) = &answer {
        METRICS
            .http
            .observe(RouteId::Unmatched, answer.status, Duration::ZERO);
        *last_word.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(framer::refusal(answer, framer.request_id.as_deref()));
    }
    match end {
        // Idle: nothing is pending; close both ways so the response side ends.
        RequestsEnd::Idle => {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
        // A body was being streamed to a handler: cut it off there too.
        RequestsEnd::Late if framer.streaming() => {
            let _ = upstream.shutdown(Shutdown::Both);
        }
        // tiny_http answers what it has, then sees the end and closes.
        RequestsEnd::Closed | RequestsEnd::Refused | RequestsEnd::Late => {
            let _ = upstream.shutdown(Shutdown::Write);
        }
    }
    end
}

fn late() -> ApiError {
    ApiError::new(
        408,
        "REQUEST_TIMEOUT",
        "the request was not received in time (server.header_timeout, server.body_timeout, server.min_body_rate)",
    )
}

/// tiny_http to client; when tiny_http closes, the refusal (if any) is
/// written last and the client connection is closed.
fn copy_responses(
    upstream: &UnixStream,
    client: &TcpStream,
    last_word: &Mutex<Option<Vec<u8>>>,
    connections: &Connections,
    activity: &Activity,
) {
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        match (&*upstream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if (&*client).write_all(&buf[..n]).is_err() {
                    break;
                }
                activity.awaiting.store(false, Ordering::Relaxed);
                connections.touch(activity);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let answer = last_word.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(answer) = answer {
        let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
        if (&*client).write_all(&answer).is_ok() {
            linger(client, &mut buf);
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}

/// Half-closes after a refusal and drops what the client still sends for a
/// moment: closing a socket with unread input resets the connection, and
/// the client might then never read the answer.
fn linger(client: &TcpStream, buf: &mut [u8]) {
    let _ = client.shutdown(Shutdown::Write);
    let until = Instant::now() + LINGER;
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || client.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*client).read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => dropped += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_budget_caps_connections_and_spares() {
        // Plenty of descriptors: the configured limit and 64 spares.
        assert_eq!(
            FdBudget::new(1024, 500_000),
            FdBudget {
                max_connections: 1024,
                spares: 64
            }
        );
        // 100 descriptors: 6 spares (18 fds), (100 - 18) / 4 = 20 connections.
        assert_eq!(
            FdBudget::new(1024, 100),
            FdBudget {
                max_connections: 20,
                spares: 6
            }
        );
        // Nothing left: still one connection rather than none.
        assert_eq!(FdBudget::new(1024, 0).max_connections, 1);
    }
}
