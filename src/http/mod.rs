//! The REST API: our connection layer (`conn`) in front of a tiny_http
//! server, and a pool of `http-N` threads that take parsed requests from it.
//!
//! Threads: `http-accept` (accepts, enforces connection limits), `http-conn`
//! / `http-conn-out` (one pair per client, relaying bytes), tiny_http's own
//! internal threads, and `http-0..N` which run the handlers. Handlers talk to
//! the store and the scheduler only through their handles.

pub mod api;
pub mod auth;
mod conn;
mod framer;
mod handlers;
mod io_handlers;
mod ndjson;
pub mod router;
mod sandbox_handlers;
mod template_handlers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::LiveConfig;
use crate::controlplane::Lifecycle;
use crate::metrics::METRICS;
use crate::scheduler::SchedulerHandle;
use crate::store::StoreHandle;
use crate::supervise::ExitNotifier;
use conn::{Acceptor, Connections, FdBudget};
use handlers::{Incoming, Reply, Streamed};
use router::RouteId;

/// What every handler thread shares.
pub struct Ctx {
    pub live: LiveConfig,
    pub store: StoreHandle,
    pub scheduler: SchedulerHandle,
    pub lifecycle: Arc<Lifecycle>,
    connections: Arc<Connections>,
    /// Set at the start of a graceful stop: answers carry `Connection: close`.
    draining: AtomicBool,
    in_flight: AtomicUsize,
    request_ids: RequestIds,
}

pub struct HttpServer {
    acceptor: Acceptor,
    ctx: Arc<Ctx>,
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    internal: PathBuf,
}

/// How long a handler thread blocks in `recv` before re-checking `stop`.
const RECV_POLL: Duration = Duration::from_millis(100);

impl HttpServer {
    pub fn start(
        live: LiveConfig,
        store: StoreHandle,
        scheduler: SchedulerHandle,
        lifecycle: Arc<Lifecycle>,
        on_exit: ExitNotifier,
    ) -> Result<HttpServer, String> {
        let config = live.get();
        let internal = config.store.path.with_file_name("http.sock");
        if internal.as_os_str().len() > 100 {
            return Err(format!(
                "the internal socket path {} is too long for a Unix socket; use a shorter store.path",
                internal.display()
            ));
        }
        let unix = conn::bind_internal(&internal).map_err(|e| {
            format!(
                "cannot bind the internal socket {}: {e}",
                internal.display()
            )
        })?;
        let server = Arc::new(
            tiny_http::Server::from_listener(unix, None)
                .map_err(|e| format!("cannot start the HTTP server: {e}"))?,
        );
        let public = conn::bind_public(config.server.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
        let budget = fd_budget(&config);
        // A few streamed bodies (big uploads, `Expect: 100-continue`) may
        // hold handler threads at the client's pace; never most of them.
        let streamed = (config.server.http_threads / 4).max(1);
        let connections = Connections::new(internal.clone(), budget, streamed, on_exit.clone())
            .map_err(|e| format!("cannot start the connection layer: {e}"))?;
        let ctx = Arc::new(Ctx {
            live: live.clone(),
            store,
            scheduler,
            lifecycle,
            connections: connections.clone(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            request_ids: RequestIds::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(config.server.http_threads);
        for i in 0..config.server.http_threads {
            let (server, ctx, stop, on_exit) =
                (server.clone(), ctx.clone(), stop.clone(), on_exit.clone());
            let thread = std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    let _exit = on_exit.guard("http");
                    serve_loop(&server, &ctx, &stop);
                })
                .map_err(|e| format!("cannot start HTTP threads: {e}"))?;
            threads.push(thread);
        }
        let acceptor = Acceptor::start(public, connections, live, on_exit)
            .map_err(|e| format!("cannot start the accept thread: {e}"))?;
        Ok(HttpServer {
            acceptor,
            ctx,
            server,
            stop,
            threads,
            internal,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }

    /// `server.max_connections` as the file-descriptor limit allows it.
    pub fn max_connections(&self) -> usize {
        self.ctx.connections.budget().max_connections
    }

    /// Graceful stop: refuse new connections, let requests in flight finish
    /// (up to `deadline`), close the remaining connections, stop the threads.
    pub fn shutdown(self, deadline: Duration) {
        let until = Instant::now() + deadline;
        self.ctx.draining.store(true, Ordering::SeqCst);
        self.acceptor.stop();
        // A short bounded wait: in-flight requests are finishing on the
        // handler threads; nothing to block on but the counter.
        while self.ctx.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.ctx.connections.close_all();
        while self.ctx.connections.open() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            let _ = thread.join();
        }
        drop(self.server);
        let _ = std::fs::remove_file(&self.internal);
        log::info!("HTTP server stopped");
    }
}

/// Descriptors kept for everything but client connections: the store,
/// listeners, logs, provider pipes and files opened by handlers.
const FD_RESERVE: u64 = 64;

/// Sizes the connection layer from `RLIMIT_NOFILE` (raised at startup, see
/// `daemon`): what is open now and a reserve for the rest are set aside.
fn fd_budget(config: &crate::config::Config) -> FdBudget {
    let limit = crate::daemon::nofile_limit();
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count() as u64);
    let admin = if config.admin.enabled {
        config.admin.max_connections as u64
    } else {
        0
    };
    let reserve = FD_RESERVE + admin + 2 * config.server.http_threads as u64;
    let available = limit.saturating_sub(open + reserve);
    let budget = FdBudget::new(config.server.max_connections, available);
    if budget.max_connections < config.server.max_connections {
        log::warn!(
            "server.max_connections lowered from {} to {}: RLIMIT_NOFILE is {limit} ({open} open, {reserve} kept for the rest); raise LimitNOFILE= to allow more",
            config.server.max_connections,
            budget.max_connections
        );
    } else {
        log::info!(
            "server.max_connections {} (RLIMIT_NOFILE {limit}, {open} open)",
            budget.max_connections
        );
    }
    budget
}

fn serve_loop(server: &tiny_http::Server, ctx: &Ctx, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match server.recv_timeout(RECV_POLL) {
            Ok(Some(request)) => serve(ctx, request),
            Ok(None) => {}
            Err(e) => {
                log::error!("HTTP server failed: {e}");
                break;
            }
        }
    }
}

fn header<'r>(request: &'r tiny_http::Request, name: &'static str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Echoes a caller's request id when it is short printable ASCII.
fn usable_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

fn serve(ctx: &Ctx, mut request: tiny_http::Request) {
    let received = Instant::now();
    ctx.in_flight.fetch_add(1, Ordering::SeqCst);
    let request_id = match header(&request, "X-Request-ID").filter(|id| usable_request_id(id)) {
        Some(id) => id.to_owned(),
        None => ctx.request_ids.next(),
    };
    let method = request.method().as_str().to_owned();
    let url = request.url().to_owned();
    // Owned copies, so that the body reader can borrow the request mutably.
    let api_key = header(&request, "X-API-Key").map(str::to_owned);
    let admin_key = header(&request, "X-Admin-API-Key").map(str::to_owned);
    let user_id = header(&request, "X-User-ID").map(str::to_owned);
    let idempotency_key = header(&request, "Idempotency-Key").map(str::to_owned);
    let bearer = header(&request, "Authorization")
        .and_then(auth::bearer_token)
        .map(str::to_owned);
    let incoming = Incoming {
        method: &method,
        url: &url,
        request_id: &request_id,
        presented: auth::Presented {
            api_key: api_key.as_deref(),
            bearer: bearer.as_deref(),
            admin_key: admin_key.as_deref(),
            user_id: user_id.as_deref(),
        },
        received,
        idempotency_key: idempotency_key.as_deref(),
    };
    let body_length = request.body_length();
    let (route, result) = handlers::handle(ctx, &incoming, request.as_reader(), body_length);
    let (reply, extra) = match result {
        Ok(reply) => (reply, None),
        Err(e) => {
            // A full disk fails every write alike; the store logs the
            // change of state, not each answer.
            if e.status == 507 {
                log::debug!("{method} {url}: {} (request {request_id})", e.message);
            } else if e.status >= 500 {
                log::error!("{method} {url}: {} (request {request_id})", e.message);
            }
            let extra = e
                .allow
                .map(|allow| ("Allow", allow))
                .or(matches!(e.status, 503 | 507).then_some(("Retry-After", "1")));
            (Reply::json(e.status, e.body()), extra)
        }
    };
    let status = reply.status;
    let mut headers = vec![
        make_header("Content-Type", reply.content_type),
        make_header("X-Request-ID", &request_id),
    ];
    if let Some((name, value)) = extra {
        headers.push(make_header(name, value));
    }
    // 413 leaves an unread body behind; close rather than parse it as the
    // next request. While draining, tell keep-alive clients to go.
    if status == 413 || ctx.draining.load(Ordering::SeqCst) {
        headers.push(make_header("Connection", "close"));
    }
    let sent = match reply.stream {
        None => {
            let mut response = tiny_http::Response::from_data(reply.body).with_status_code(status);
            for h in headers {
                response.add_header(h);
            }
            request.respond(response)
        }
        Some(Streamed::File(reader)) => {
            let len = reader.byte_len() as usize;
            // Content-Length whatever the size: tiny_http would switch to
            // chunked from 32 KiB, and the length is known up front.
            request.respond(
                tiny_http::Response::new(
                    tiny_http::StatusCode(status),
                    headers,
                    reader,
                    Some(len),
                    None,
                )
                .with_chunked_threshold(usize::MAX),
            )
        }
        Some(Streamed::Ndjson(produce)) => stream_ndjson(request, status, &headers, produce),
    };
    if let Err(e) = sent {
        log::debug!("{method} {url}: client went away before the answer: {e}");
    }
    ctx.in_flight.fetch_sub(1, Ordering::SeqCst);
    if route != RouteId::Handoff {
        METRICS.http.observe(route, status, received.elapsed());
    }
}

/// Answers with a chunked body written as it is produced. tiny_http's own
/// chunked encoder holds 8 KiB before sending anything, which would delay
/// every short line of a streamed exec; so the head and the chunks are
/// written here, on the connection's raw writer, one chunk per flush.
fn stream_ndjson(
    request: tiny_http::Request,
    status: u16,
    headers: &[tiny_http::Header],
    produce: handlers::Producer,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut head = format!(
        "HTTP/1.1 {status} OK\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"
    );
    for h in headers {
        head.push_str(&format!("{}: {}\r\n", h.field, h.value));
    }
    head.push_str("\r\n");
    let mut raw = request.into_writer();
    raw.write_all(head.as_bytes())?;
    raw.flush()?;
    let mut chunked = ChunkedWriter {
        inner: raw,
        pending: Vec::new(),
    };
    produce(&mut chunked);
    chunked.flush()?;
    chunked.inner.write_all(b"0\r\n\r\n")?;
    chunked.inner.flush()
}

/// Buffers writes; each flush sends what is buffered as one chunk.
struct ChunkedWriter {
    inner: Box<dyn std::io::Write + Send>,
    pending: Vec<u8>,
}

impl std::io::Write for ChunkedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut chunk = format!("{:x}\r\n", self.pending.len()).into_bytes();
        chunk.append(&mut self.pending);
        chunk.extend_from_slice(b"\r\n");
        self.inner.write_all(&chunk)?;
        self.inner.flush()
    }
}

fn make_header(name: &str, value: &str) -> tiny_http::Header {
    // Names are ours and values are validated ASCII; fall back to a harmless
    // header rather than panic if that ever stops being true.
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap_or_else(|_| {
        tiny_http::Header::from_bytes(&b"X-Invalid-Header"[..], &b"1"[..])
            .expect("static header is valid")
    })
}

/// Request ids for requests that bring none: a per-boot random prefix and a
/// counter, unique and cheap.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        let mut bytes = [0u8; 8];
        let random = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        let prefix = match random {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => crate::time::now_ms() as u64 ^ u64::from(std::process::id()),
        };
        RequestIds {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:016x}-{:08x}",
            self.prefix,
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }
}
