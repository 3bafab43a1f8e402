//! Client connections: our own acceptor in front of tiny_http.
//!
//! Why this exists. tiny_http 0.12 hands each accepted connection to an
//! internal task pool whose "is a thread idle?" check races with its own
//! wake-ups: when several connections are accepted back to back, more tasks
//! can be queued than there are idle threads, and a queued keep-alive
//! connection then waits until some *other* connection closes (measured here:
//! 1-22 of 64 new connections unanswered after 2 s). Workers hold long-lived
//! connections, so that is not acceptable. tiny_http also sets no TCP_NODELAY
//! and no timeouts.
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
//! This layer also enforces what tiny_http lacks: `server.max_connections`
//! (the next client gets a 503 and is closed), and `server.idle_timeout` (a
//! client that sends nothing for that long, such as a half-open or stalled
//! connection, is closed).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::LiveConfig;
use crate::metrics::METRICS;

/// Relay threads copy bytes only; a small stack keeps many connections cheap.
const RELAY_STACK: usize = 128 * 1024;
const RELAY_BUFFER: usize = 64 * 1024;
/// How long a relay waits for tiny_http to answer the pickup probe.
const HANDOFF_DEADLINE: Duration = Duration::from_secs(5);
const PROBE: &[u8] = b"GET /-/handoff HTTP/1.1\r\nHost: stacyvmd\r\n\r\n";

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

/// State shared by the acceptor, the relays and the supervisor.
pub struct Connections {
    internal: PathBuf,
    open: AtomicUsize,
    stopping: AtomicBool,
    /// Serialises internal connection set-up (see the module doc).
    handoff: Mutex<()>,
    /// Client sockets, to close them all at the end of a graceful stop.
    clients: Mutex<std::collections::HashMap<u64, TcpStream>>,
    next_id: AtomicUsize,
    /// Internal connections already handed off and waiting for a client, so
    /// a burst of new clients does not wait on one handoff after another.
    spares: Mutex<Vec<UnixStream>>,
    /// Rings the `http-spare` thread to top the spares up.
    doorbell: crossbeam_channel::Sender<()>,
}

/// How many handed-off internal connections wait for clients. Each pins an
/// idle tiny_http thread, which costs a small stack and nothing else.
const SPARES: usize = 64;

impl Connections {
    pub fn new(internal: PathBuf) -> std::io::Result<Arc<Connections>> {
        let (doorbell, rings) = crossbeam_channel::bounded::<()>(1);
        let connections = Arc::new(Connections {
            internal,
            open: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            handoff: Mutex::new(()),
            clients: Mutex::new(Default::default()),
            next_id: AtomicUsize::new(0),
            spares: Mutex::new(Vec::with_capacity(SPARES)),
            doorbell,
        });
        let weak = Arc::downgrade(&connections);
        std::thread::Builder::new()
            .name("http-spare".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                // Ends when the last `Connections` is dropped (the doorbell's
                // sender goes with it).
                while rings.recv().is_ok() {
                    let Some(connections) = weak.upgrade() else {
                        break;
                    };
                    connections.top_up_spares();
                }
            })?;
        connections.ring();
        Ok(connections)
    }

    fn ring(&self) {
        let _ = self.doorbell.try_send(());
    }

    fn top_up_spares(&self) {
        let started = std::time::Instant::now();
        let before = self.spares().len();
        while !self.stopping.load(Ordering::SeqCst) && self.spares().len() < SPARES {
            match handoff(self) {
                Ok(spare) => self.spares().push(spare),
                Err(e) => {
                    log::warn!("could not prepare a spare internal connection: {e}");
                    return;
                }
            }
        }
        let added = self.spares().len().saturating_sub(before);
        if added > 0 {
            log::debug!(
                "{added} spare internal connections ready in {:?}",
                started.elapsed()
            );
        }
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<UnixStream>> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handed-off internal connection: a spare if one is ready, else a
    /// fresh handoff.
    fn internal_connection(&self) -> std::io::Result<UnixStream> {
        let spare = self.spares().pop();
        self.ring();
        match spare {
            Some(s) => Ok(s),
            None => handoff(self),
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Closes every client connection (both directions), ending their relays.
    pub fn close_all(&self) {
        self.spares().clear();
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for stream in clients.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
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
        on_exit: crate::daemon::ExitNotifier,
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

fn accept_loop(listener: TcpListener, connections: &Arc<Connections>, live: &LiveConfig) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: log, back off briefly, keep serving.
                log::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if connections.stopping.load(Ordering::SeqCst) {
            break;
        }
        METRICS.http.connections_accepted.inc();
        let config = live.get();
        if connections.open() >= config.server.max_connections {
            METRICS.http.connections_rejected.inc();
            log::warn!(
                "refusing {peer}: server.max_connections ({}) reached",
                config.server.max_connections
            );
            refuse(stream);
            continue;
        }
        let idle = config.server.idle_timeout;
        let max_body = BodyLimits {
            body: config.server.max_body_bytes,
            upload: config
                .providers
                .process
                .max_upload_bytes
                .max(config.server.max_body_bytes),
        };
        connections.open.fetch_add(1, Ordering::SeqCst);
        METRICS.http.connections_open.inc();
        let shared = connections.clone();
        let spawned = std::thread::Builder::new()
            .name("http-conn".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                relay(stream, peer, &shared, idle, max_body);
                shared.open.fetch_sub(1, Ordering::SeqCst);
                METRICS.http.connections_open.dec();
            });
        if let Err(e) = spawned {
            log::error!("cannot start a relay thread for {peer}: {e}");
            connections.open.fetch_sub(1, Ordering::SeqCst);
            METRICS.http.connections_open.dec();
        }
    }
    log::debug!("http-accept: stopped accepting");
}

/// Answers a connection we cannot take with a JSON 503 and closes it.
fn refuse(mut stream: TcpStream) {
    let body = br#"{"code":"UNAVAILABLE","message":"too many connections; retry later"}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body));
    let _ = stream.shutdown(Shutdown::Both);
}

fn relay(
    client: TcpStream,
    peer: SocketAddr,
    connections: &Arc<Connections>,
    idle: Duration,
    max_body: BodyLimits,
) {
    let upstream = match connections.internal_connection() {
        Ok(s) => s,
        Err(e) => {
            log::error!("internal handoff for {peer} failed: {e}");
            refuse(client);
            return;
        }
    };
    let id = connections.next_id.fetch_add(1, Ordering::Relaxed) as u64;
    let registered = client.try_clone().map(|c| {
        connections
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, c);
    });
    if registered.is_err() || connections.stopping.load(Ordering::SeqCst) {
        refuse(client);
        return;
    }
    let _ = client.set_read_timeout(Some(idle));
    let (client_reader, upstream_writer) = match (client.try_clone(), upstream.try_clone()) {
        (Ok(c), Ok(u)) => (c, u),
        _ => {
            refuse(client);
            return;
        }
    };
    let last_word: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    let last_word_out = last_word.clone();
    // Responses flow on a second thread; this one carries requests.
    let responses = std::thread::Builder::new()
        .name("http-conn-out".into())
        .stack_size(RELAY_STACK)
        .spawn(move || {
            copy_responses(upstream, client, &last_word_out);
        });
    match responses {
        Ok(responses) => {
            let end = copy_requests(
                client_reader,
                upstream_writer,
                max_body,
                &connections.stopping,
                &last_word,
            );
            if end == RequestsEnd::Idle {
                METRICS.http.connections_timed_out.inc();
                log::debug!("closing idle connection from {peer}");
            }
            let _ = responses.join();
        }
        Err(e) => log::error!("cannot start a relay thread for {peer}: {e}"),
    }
    connections
        .clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
}

/// Opens an internal connection and waits until tiny_http has picked it up.
fn handoff(connections: &Connections) -> std::io::Result<UnixStream> {
    let _one_at_a_time = connections
        .handoff
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut upstream = UnixStream::connect(&connections.internal)?;
    upstream.set_read_timeout(Some(HANDOFF_DEADLINE))?;
    upstream.write_all(PROBE)?;
    // The probe's answer has an empty body: read up to the end of its head.
    let mut seen = Vec::with_capacity(256);
    let mut byte = [0u8; 256];
    while !seen.ends_with(b"\r\n\r\n") {
        let n = upstream.read(&mut byte[..1])?;
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
    upstream.set_read_timeout(None)?;
    Ok(upstream)
}

#[derive(Debug, PartialEq, Eq)]
enum RequestsEnd {
    /// The client closed its side, or the connection broke.
    Closed,
    /// The client sent nothing for `server.idle_timeout`.
    Idle,
    /// The framer refused a request; its answer is the connection's last word.
    Refused,
}

/// Client to tiny_http. Every byte passes the [`Framer`], so a request
/// tiny_http must not see (oversized body, chunked body, oversized head) is
/// answered here and the connection ends after the answers before it.
fn copy_requests(
    mut client: TcpStream,
    mut upstream: UnixStream,
    max_body: BodyLimits,
    stopping: &AtomicBool,
    last_word: &Mutex<Option<Vec<u8>>>,
) -> RequestsEnd {
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut framer = Framer::default();
    let mut out = Vec::with_capacity(RELAY_BUFFER);
    let end = loop {
        let n = match client.read(&mut buf) {
            Ok(0) => break RequestsEnd::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break RequestsEnd::Idle;
            }
            Err(_) => break RequestsEnd::Closed,
        };
        out.clear();
        let draining = stopping.load(Ordering::SeqCst);
        let verdict = framer.feed(&buf[..n], max_body, draining, &mut out);
        if !out.is_empty() && upstream.write_all(&out).is_err() {
            break RequestsEnd::Closed;
        }
        if let Err(refusal) = verdict {
            *last_word.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(refusal.response(framer.request_id.as_deref()));
            break RequestsEnd::Refused;
        }
    };
    match end {
        // Idle: nothing is pending; close both ways so the response side ends.
        RequestsEnd::Idle => {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
        // tiny_http answers what it has, then sees the end and closes.
        RequestsEnd::Closed | RequestsEnd::Refused => {
            let _ = upstream.shutdown(Shutdown::Write);
        }
    }
    end
}

/// tiny_http to client; when tiny_http closes, the refusal (if any) is
/// written last and the client connection is closed.
fn copy_responses(
    mut upstream: UnixStream,
    mut client: TcpStream,
    last_word: &Mutex<Option<Vec<u8>>>,
) {
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        match upstream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if client.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if let Some(answer) = last_word.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = client.write_all(&answer);
    }
    let _ = client.shutdown(Shutdown::Both);
}

/// Ids for answers the relay gives itself when the client sent none.
static RELAY_IDS: AtomicUsize = AtomicUsize::new(0);

/// Request body limits: `body` for every request, `upload` for file
/// uploads (`POST`/`PUT /api/v1/sandboxes/{id}/files`).
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    body: u64,
    upload: u64,
}

impl BodyLimits {
    fn for_request(&self, head: &str) -> u64 {
        let mut words = head.split(' ');
        let method = words.next().unwrap_or("");
        let path = words.next().unwrap_or("").split('?').next().unwrap_or("");
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let upload = matches!(method, "POST" | "PUT")
            && matches!(segments.as_slice(), ["api", "v1", "sandboxes", _, "files"]);
        if upload { self.upload } else { self.body }
    }
}

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Finds request boundaries in the client's byte stream. tiny_http allocates
/// a request's whole remaining body at once when it skips an unread body, so
/// a hostile `Content-Length` must never reach it: the framer checks each
/// head before forwarding it, then lets exactly that many body bytes through.
#[derive(Default)]
struct Framer {
    head: Vec<u8>,
    body_left: u64,
    /// The X-Request-ID of the head being refused, to echo in the answer.
    request_id: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: u16,
    reason: &'static str,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn response(&self, request_id: Option<&str>) -> Vec<u8> {
        let body = serde_json::json!({"code": self.code, "message": self.message}).to_string();
        let id = match request_id {
            Some(id) => format!("X-Request-ID: {id}\r\n"),
            None => format!(
                "X-Request-ID: relay-{:x}\r\n",
                RELAY_IDS.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let retry = if self.status == 503 {
            "Retry-After: 1\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{id}{retry}Connection: close\r\n\r\n{body}",
            self.status,
            self.reason,
            body.len()
        )
        .into_bytes()
    }
}

impl Framer {
    /// Appends to `out` the bytes that may go to tiny_http; an error means
    /// the request whose head just ended must be refused.
    /// While `draining` (a graceful stop), new requests get a 503 and the
    /// connection ends once the requests before them are answered.
    fn feed(
        &mut self,
        mut input: &[u8],
        max_body: BodyLimits,
        draining: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        while !input.is_empty() {
            if self.body_left > 0 {
                let n = input
                    .len()
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..n]);
                self.body_left -= n as u64;
                input = &input[n..];
                continue;
            }
            let byte = input[0];
            input = &input[1..];
            self.head.push(byte);
            if self.head.ends_with(b"\r\n\r\n") {
                self.body_left = self.check_head(max_body)?;
                if draining {
                    return Err(Refusal {
                        status: 503,
                        reason: "Service Unavailable",
                        code: "UNAVAILABLE",
                        message: "the daemon is shutting down".into(),
                    });
                }
                out.extend_from_slice(&self.head);
                self.head.clear();
            } else if self.head.len() > MAX_HEAD {
                return Err(Refusal {
                    status: 431,
                    reason: "Request Header Fields Too Large",
                    code: "BAD_REQUEST",
                    message: format!("request head is larger than {MAX_HEAD} bytes"),
                });
            }
        }
        Ok(())
    }

    /// Returns the body length the head announces.
    fn check_head(&mut self, limits: BodyLimits) -> Result<u64, Refusal> {
        self.request_id = None;
        let text = String::from_utf8_lossy(&self.head);
        let max_body = limits.for_request(&text);
        // `/-/` paths are the relay's own (the handoff probe): never a
        // client's.
        let target = text.split(' ').nth(1).unwrap_or("");
        if target.starts_with("/-/") {
            return Err(Refusal {
                status: 404,
                reason: "Not Found",
                code: "NOT_FOUND",
                message: format!(
                    "no route for {}",
                    target.split('?').next().unwrap_or(target)
                ),
            });
        }
        let mut length: Option<u64> = None;
        for line in text.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("x-request-id") {
                self.request_id = Some(value.to_owned()).filter(|v| super::usable_request_id(v));
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Refusal {
                    status: 411,
                    reason: "Length Required",
                    code: "BAD_REQUEST",
                    message: "chunked request bodies are not accepted; send Content-Length".into(),
                });
            } else if name.eq_ignore_ascii_case("content-length") {
                let parsed = value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| length.is_none_or(|l| l == *n));
                let Some(n) = parsed else {
                    return Err(Refusal {
                        status: 400,
                        reason: "Bad Request",
                        code: "BAD_REQUEST",
                        message: "invalid or conflicting Content-Length".into(),
                    });
                };
                length = Some(n);
            }
        }
        let length = length.unwrap_or(0);
        if length > max_body {
            return Err(Refusal {
                status: 413,
                reason: "Payload Too Large",
                code: "PAYLOAD_TOO_LARGE",
                message: format!("request body is larger than {max_body} bytes"),
            });
        }
        Ok(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(body: u64) -> BodyLimits {
        BodyLimits {
            body,
            upload: body * 10,
        }
    }

    #[test]
    fn uploads_have_their_own_limit() {
        let l = limits(100);
        assert_eq!(
            l.for_request("PUT /api/v1/sandboxes/sb-1/files?path=x HTTP/1.1"),
            1000
        );
        assert_eq!(
            l.for_request("POST /api/v1/sandboxes/sb-1/files HTTP/1.1"),
            1000
        );
        assert_eq!(
            l.for_request("POST /api/v1/sandboxes/sb-1/exec HTTP/1.1"),
            100
        );
        assert_eq!(
            l.for_request("POST /api/v1/sandboxes/sb-1/files/move HTTP/1.1"),
            100
        );
        assert_eq!(
            l.for_request("GET /api/v1/sandboxes/sb-1/files HTTP/1.1"),
            100
        );
    }

    fn feed_all(chunks: &[&[u8]], max_body: u64) -> (Vec<u8>, Result<(), Refusal>) {
        let max_body = limits(max_body);
        let mut framer = Framer::default();
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(r) = framer.feed(chunk, max_body, false, &mut out) {
                return (out, Err(r));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn passes_pipelined_requests_split_anywhere() {
        let stream = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n";
        for split in 0..stream.len() {
            let (out, verdict) = feed_all(&[&stream[..split], &stream[split..]], 100);
            assert_eq!(verdict, Ok(()));
            assert_eq!(out, stream.to_vec(), "split at {split}");
        }
    }

    #[test]
    fn body_bytes_are_not_read_as_heads() {
        // A body that contains a blank line must not end a head early.
        let stream = b"POST /a HTTP/1.1\r\nContent-Length: 8\r\n\r\n\r\n\r\nabcd";
        let (out, verdict) = feed_all(&[stream], 100);
        assert_eq!(verdict, Ok(()));
        assert_eq!(out, stream.to_vec());
    }

    #[test]
    fn refusals() {
        let cases: &[(&[u8], u16)] = &[
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999\r\n\r\n",
                413,
            ),
            (b"POST / HTTP/1.1\r\ncontent-length: 101\r\n\r\n", 413),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (b"GET /-/handoff HTTP/1.1\r\n\r\n", 404),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
        ];
        for (head, status) in cases {
            let (out, verdict) = feed_all(&[head], 100);
            assert_eq!(
                verdict.map_err(|r| r.status),
                Err(*status),
                "{}",
                String::from_utf8_lossy(head)
            );
            assert!(out.is_empty(), "a refused head must not be forwarded");
        }
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(feed_all(&[&huge], 100).1.map_err(|r| r.status), Err(431));
    }

    #[test]
    fn draining_refuses_new_requests_but_finishes_bodies() {
        let mut framer = Framer::default();
        let mut out = Vec::new();
        // A body already under way is still forwarded while draining...
        framer
            .feed(
                b"POST /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nab",
                limits(100),
                false,
                &mut out,
            )
            .unwrap();
        framer.feed(b"cd", limits(100), true, &mut out).unwrap();
        assert!(out.ends_with(b"abcd"));
        // ...but the next request is answered 503 by the relay.
        let r = framer
            .feed(b"GET /b HTTP/1.1\r\n\r\n", limits(100), true, &mut out)
            .unwrap_err();
        assert_eq!(r.status, 503);
    }

    #[test]
    fn refusal_echoes_request_id() {
        let mut framer = Framer::default();
        let mut out = Vec::new();
        let r = framer
            .feed(
                b"POST / HTTP/1.1\r\nX-Request-ID: abc-1\r\nContent-Length: 500\r\n\r\n",
                limits(10),
                false,
                &mut out,
            )
            .unwrap_err();
        let text = String::from_utf8(r.response(framer.request_id.as_deref())).unwrap();
        assert!(text.starts_with("HTTP/1.1 413 "));
        assert!(text.contains("X-Request-ID: abc-1\r\n"));
        assert!(
            text.ends_with(r#""message":"request body is larger than 10 bytes"}"#)
                || text.contains("PAYLOAD_TOO_LARGE")
        );
    }

    proptest::proptest! {
        #[test]
        fn framer_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..8)) {
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let _ = feed_all(&refs, 32);
        }
    }
}
