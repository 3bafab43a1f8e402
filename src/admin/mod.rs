//! The admin socket: worker-protocol envelopes as newline-delimited JSON
//! over a Unix stream socket, for operators with `socat` or `nc -U`.
//!
//! Threads: `admin` accepts; each connection gets an `admin-conn` thread;
//! `admin-events` writes event lines to subscribers. Every connection has
//! read deadlines (`admin.idle_timeout` between lines, `admin.line_timeout`
//! from a line's first byte to its newline) and a write timeout, so a
//! stalled client or one that never reads its replies is cut off without
//! delaying anyone else.
//!
//! Slots: at most `admin.max_connections` connections, and at most
//! `admin.max_connections_per_client` of them for one peer uid. At either
//! limit the connection within it that has waited longest for a request is
//! closed to make room (a uid at its share loses its own, never another
//! uid's), so idle or stuck clients can never lock an operator out. A
//! connection running a request is never closed for room; when all within
//! the limit run one, the newcomer gets a `too_many_connections` line.
//!
//! The peer's uid/gid/pid (SO_PEERCRED) are read on accept and mapped to an
//! access level: root and the daemon's own uid are `admin`, then the
//! `admin.*_uids/gids` and `admin.read_*` lists; anyone else is refused.
//! Every mutating command is logged and audited with the peer's uid and pid.

mod methods;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::{AdminConfig, LiveConfig};
use crate::controlplane::Lifecycle;
use crate::events::Stamped;
use crate::scheduler::SchedulerHandle;
use crate::store::StoreHandle;
use crate::supervise::{ExitNotifier, SupervisorEvent};
use crate::worker::heartbeat::Draining;
use crate::workerproto::{self, Access, Claims, ErrorCode, ProtoError};

/// A client that does not read its replies is cut off after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const CONN_STACK: usize = 256 * 1024;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl Peer {
    /// How audit rows and logs name the peer.
    pub fn actor(self) -> String {
        format!("uid:{} pid:{}", self.uid, self.pid)
    }
}

/// Maps a peer to its access level; `None` = refused.
pub fn access_for(peer: Peer, own_uid: u32, config: &AdminConfig) -> Option<Access> {
    if peer.uid == 0
        || peer.uid == own_uid
        || config.admin_uids.contains(&peer.uid)
        || config.admin_gids.contains(&peer.gid)
    {
        Some(Access::Admin)
    } else if config.read_uids.contains(&peer.uid) || config.read_gids.contains(&peer.gid) {
        Some(Access::Read)
    } else {
        None
    }
}

/// One connection's writer, shared by its replies and its event lines.
type Writer = Arc<Mutex<UnixStream>>;

struct Subscriber {
    topics: Vec<String>,
    /// The connection's writer (to find and replace a subscription).
    writer: Writer,
    /// Lines for this subscriber's own `admin-sub` writer thread: a slow
    /// reader fills only its own queue, and is dropped when it is full.
    lines: Sender<String>,
}

/// Queued event lines per subscriber before it counts as not keeping up.
const SUBSCRIBER_QUEUE: usize = 1024;

impl Subscriber {
    /// Starts the subscriber's writer thread.
    fn start(topics: Vec<String>, writer: &Writer) -> std::io::Result<Subscriber> {
        let (lines, queue) = crossbeam_channel::bounded::<String>(SUBSCRIBER_QUEUE);
        let out = writer.clone();
        std::thread::Builder::new()
            .name("admin-sub".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                while let Ok(line) = queue.recv() {
                    if write_line(&out, line).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Subscriber {
            topics,
            writer: writer.clone(),
            lines,
        })
    }
}

/// One open connection, as the accept thread sees it when it makes room.
struct Slot {
    /// A clone of the connection's stream, to close it.
    stream: UnixStream,
    uid: u32,
    /// Since when the connection has waited for a request: an
    /// [`AdminCtx::mark`], or [`BUSY`] while it runs one, or [`CLOSED`]
    /// once the accept thread took its slot.
    idle_since: Arc<AtomicU64>,
}

const BUSY: u64 = 0;
const CLOSED: u64 = u64::MAX;

/// What the admin threads share.
pub struct AdminCtx {
    pub live: LiveConfig,
    pub store: StoreHandle,
    pub scheduler: SchedulerHandle,
    pub lifecycle: Arc<Lifecycle>,
    pub supervisor: Sender<SupervisorEvent>,
    pub draining: Draining,
    subscribers: Mutex<Vec<Subscriber>>,
    own_uid: u32,
    /// Open connections: their slots, and to close them when the daemon
    /// stops.
    conns: Mutex<std::collections::HashMap<u64, Slot>>,
    next_conn: AtomicU64,
    /// The origin of the idle marks.
    epoch: Instant,
}

impl AdminCtx {
    /// Connections holding a slot.
    pub fn open_connections(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// "Idle from now", for [`Slot::idle_since`]: never `BUSY` or `CLOSED`.
    fn mark(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(CLOSED - 1)
            .clamp(1, CLOSED - 1)
    }
}

pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    ctx: Arc<AdminCtx>,
    /// The listening socket, to wake the blocked accept() at stop even when
    /// the socket file was removed from under the daemon.
    listener: UnixListener,
}

impl AdminServer {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        live: LiveConfig,
        store: StoreHandle,
        scheduler: SchedulerHandle,
        lifecycle: Arc<Lifecycle>,
        supervisor: Sender<SupervisorEvent>,
        draining: Draining,
        events: Option<Receiver<Stamped>>,
        on_exit: ExitNotifier,
    ) -> Result<AdminServer, String> {
        let config = live.get().admin.clone();
        let listener = bind(&config)?;
        let waker = listener
            .try_clone()
            .map_err(|e| format!("cannot clone the admin socket: {e}"))?;
        let ctx = Arc::new(AdminCtx {
            live,
            store,
            scheduler,
            lifecycle,
            supervisor,
            draining,
            subscribers: Mutex::new(Vec::new()),
            own_uid: rustix::process::getuid().as_raw(),
            conns: Mutex::new(Default::default()),
            next_conn: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        if let Some(events) = events {
            // Weak: the bus lives as long as the process, and must not keep
            // the store and scheduler handles alive past shutdown.
            let weak = Arc::downgrade(&ctx);
            std::thread::Builder::new()
                .name("admin-events".into())
                .spawn(move || {
                    while let Ok(event) = events.recv() {
                        match weak.upgrade() {
                            Some(ctx) => deliver(&ctx, &event),
                            None => break,
                        }
                    }
                })
                .map_err(|e| format!("cannot start the admin events thread: {e}"))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread_ctx = ctx.clone();
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                let _exit = on_exit.guard("admin");
                accept_loop(&listener, &thread_ctx, &thread_stop);
            })
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        log::info!("admin socket listening on {}", config.socket.display());
        Ok(AdminServer {
            path: config.socket,
            stop,
            thread,
            ctx,
            listener: waker,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and closes every connection; their threads then end
    /// and release the handles they hold.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(): shutting a listening socket down makes
        // accept() fail at once, whether or not the file still exists.
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Both);
        let _ = UnixStream::connect(&self.path);
        let _ = self.thread.join();
        for conn in self
            .ctx
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        let mut subscribers = self
            .ctx
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        subscribers.clear();
        crate::events::set_listening(false);
        drop(subscribers);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket: a stale file from a crashed run is replaced, a live
/// daemon's socket is never stolen. Mode 0600, or 0660 with `socket_gid`.
fn bind(config: &AdminConfig) -> Result<UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = &config.socket;
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another daemon is answering on the admin socket {}; refusing to take it over",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
        log::warn!("replaced a stale admin socket at {}", path.display());
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind the admin socket {}: {e}", path.display()))?;
    let mode = if config.socket_gid.is_some() {
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    if let Some(gid) = config.socket_gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("cannot give {} to gid {gid}: {e}", path.display()))?;
    }
    Ok(listener)
}

fn accept_loop(listener: &UnixListener, ctx: &Arc<AdminCtx>, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("admin accept failed: {e}");
                continue;
            }
        };
        let config = ctx.live.get();
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let peer = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(c) => Peer {
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
                pid: c.pid.as_raw_nonzero().get(),
            },
            Err(e) => {
                log::warn!("admin connection without peer credentials refused: {e}");
                continue;
            }
        };
        let Some(access) = access_for(peer, ctx.own_uid, &config.admin) else {
            log::warn!(
                "admin connection from {} refused: no access level",
                peer.actor()
            );
            let error = ProtoError::new(
                ErrorCode::Forbidden,
                "this uid has no access to the admin socket",
            );
            let _ = writeln!(stream, "{}", workerproto::error_reply(None, &error));
            continue;
        };
        let Ok(clone) = stream.try_clone() else {
            log::warn!(
                "admin connection from {} refused: cannot clone it",
                peer.actor()
            );
            continue;
        };
        let idle_since = Arc::new(AtomicU64::new(ctx.mark()));
        let slot = Slot {
            stream: clone,
            uid: peer.uid,
            idle_since: idle_since.clone(),
        };
        let conn_id = ctx.next_conn.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = admit(ctx, conn_id, slot, &config.admin) {
            log::warn!(
                "admin connection from {} refused: {}",
                peer.actor(),
                error.message
            );
            let _ = writeln!(stream, "{}", workerproto::error_reply(None, &error));
            continue;
        }
        let conn_ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("admin-conn".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                serve(&conn_ctx, stream, peer, access, &idle_since);
                conn_ctx
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&conn_id);
            });
        if let Err(e) = spawned {
            log::error!("cannot start an admin connection thread: {e}");
            ctx.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&conn_id);
        }
    }
}

/// Takes a slot for a new connection, or says why not. At a limit (the
/// peer uid's share first, then the total) the connection within that
/// limit that has waited longest for a request is closed to make room; one
/// running a request never is, and with none waiting the newcomer is
/// refused. So a client only ever gives up its own connections for its
/// own newcomers, and anyone's idle ones for a client under its share.
fn admit(ctx: &AdminCtx, id: u64, slot: Slot, config: &AdminConfig) -> Result<(), ProtoError> {
    let mut conns = ctx.conns.lock().unwrap_or_else(|e| e.into_inner());
    let uid = slot.uid;
    let mine = conns.values().filter(|s| s.uid == uid).count();
    let full = if mine >= config.max_connections_per_client {
        Some((
            Some(uid),
            format!(
                "uid {uid} has its {} admin connections (admin.max_connections_per_client)",
                config.max_connections_per_client
            ),
        ))
    } else if conns.len() >= config.max_connections {
        Some((
            None,
            format!(
                "all {} admin connections (admin.max_connections) are open",
                config.max_connections
            ),
        ))
    } else {
        None
    };
    if let Some((only, why)) = full
        && !make_room(ctx, &mut conns, only, &why)
    {
        return Err(ProtoError::new(
            ErrorCode::TooManyConnections,
            format!("{why}, each running a request; try again"),
        ));
    }
    conns.insert(id, slot);
    Ok(())
}

/// Closes the connection (of uid `only`, when given) that has waited
/// longest for a request; false when every one is running a request.
fn make_room(
    ctx: &AdminCtx,
    conns: &mut std::collections::HashMap<u64, Slot>,
    only: Option<u32>,
    why: &str,
) -> bool {
    let mut waiting: Vec<(u64, u64)> = conns
        .iter()
        .filter(|(_, s)| only.is_none_or(|uid| s.uid == uid))
        .map(|(id, s)| (s.idle_since.load(Ordering::SeqCst), *id))
        .filter(|(since, _)| *since != BUSY && *since != CLOSED)
        .collect();
    waiting.sort_unstable();
    // The claim fails when that connection has just started a request.
    let claimed = waiting.into_iter().find(|(since, id)| {
        conns[id]
            .idle_since
            .compare_exchange(*since, CLOSED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    });
    let Some((since, oldest)) = claimed else {
        return false;
    };
    if let Some(closed) = conns.remove(&oldest) {
        let _ = closed.stream.shutdown(std::net::Shutdown::Both);
        let waited = Duration::from_nanos(ctx.mark().saturating_sub(since));
        log::info!(
            "admin: {why}; closed a connection of uid {} that had waited {} for a request, to make room",
            closed.uid,
            crate::time::format_duration(waited),
        );
    }
    true
}

/// One write per line, so the reader wakes once per reply. Takes the line
/// by value to add the newline in place.
fn write_line(writer: &Writer, mut line: String) -> std::io::Result<()> {
    line.push('\n');
    writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .write_all(line.as_bytes())
}

fn serve(
    ctx: &Arc<AdminCtx>,
    stream: UnixStream,
    peer: Peer,
    access: Access,
    idle_since: &AtomicU64,
) {
    let config = ctx.live.get();
    let admin = &config.admin;
    let writer: Writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(_) => return,
    };
    if write_line(&writer, workerproto::greeting(&config.worker.id)).is_err() {
        return;
    }
    let claims = Claims::for_access(access, &config.worker.id);
    let line_timeout = admin.line_timeout.min(admin.idle_timeout);
    let mut lines = LineReader::new(stream, admin.max_line_bytes);
    loop {
        let text = match lines.next_line(admin.idle_timeout, line_timeout) {
            Ok(Some(text)) => text,
            Ok(None) => break,
            Err(stop) => {
                let error = match stop {
                    Stop::TooLong => ProtoError::new(
                        ErrorCode::LineTooLong,
                        format!(
                            "a request line may be at most {} bytes, newline excluded; closing",
                            admin.max_line_bytes
                        ),
                    ),
                    Stop::Idle => ProtoError::new(ErrorCode::Unavailable, "idle timeout; closing"),
                    Stop::LineUnfinished => ProtoError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "line timeout: a request line must end within {} of its first byte; closing",
                            crate::time::format_duration(line_timeout)
                        ),
                    ),
                };
                let _ = write_line(&writer, workerproto::error_reply(None, &error));
                break;
            }
        };
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // The accept thread may have taken this slot while we waited.
        if idle_since.swap(BUSY, Ordering::SeqCst) == CLOSED {
            break;
        }
        let reply = methods::handle(ctx, text, peer, &claims, &writer);
        let written = write_line(&writer, reply);
        idle_since.store(ctx.mark(), Ordering::SeqCst);
        if written.is_err() {
            break;
        }
    }
    let mut subscribers = ctx.subscribers.lock().unwrap_or_else(|e| e.into_inner());
    subscribers.retain(|s| !Arc::ptr_eq(&s.writer, &writer));
    crate::events::set_listening(!subscribers.is_empty());
}

/// Why a connection stops reading.
#[derive(Debug, PartialEq)]
enum Stop {
    /// A line is longer than the limit.
    TooLong,
    /// No byte of a new line within the idle timeout.
    Idle,
    /// A started line did not end within the line timeout.
    LineUnfinished,
}

/// Request lines from one connection, under two deadlines: the idle
/// timeout while no byte of a line has arrived, the line timeout from a
/// line's first byte to its newline (a client holding half a line gives up
/// its slot in seconds, not minutes).
struct LineReader<R> {
    source: R,
    /// Unread bytes are `buf[start..end]`; `buf[start..scanned]` holds no
    /// newline. Grows up to the limit, zeroed only when it grows.
    buf: Vec<u8>,
    start: usize,
    scanned: usize,
    end: usize,
    limit: usize,
    /// When the first byte of the unfinished line arrived.
    line_started: Option<Instant>,
    /// The read timeout last set, to set it only when it changes.
    timeout: Option<Duration>,
}

/// What a [`LineReader`] reads from: a socket, or bytes in a unit test.
trait TimedRead: Read {
    fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()>;
}

impl TimedRead for UnixStream {
    fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

const FIRST_BUFFER: usize = 16 * 1024;

impl<R: TimedRead> LineReader<R> {
    fn new(source: R, limit: usize) -> LineReader<R> {
        LineReader {
            source,
            buf: vec![0; FIRST_BUFFER.min(limit + 1)],
            start: 0,
            scanned: 0,
            end: 0,
            limit,
            line_started: None,
            timeout: None,
        }
    }

    /// The next line without its newline; `None` at the end of the stream
    /// (an unfinished last line is returned first) or on a read error.
    fn next_line(&mut self, idle: Duration, line: Duration) -> Result<Option<&[u8]>, Stop> {
        if self.start == self.end {
            (self.start, self.scanned, self.end) = (0, 0, 0);
        }
        loop {
            if let Some(at) = self.buf[self.scanned..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let (first, newline) = (self.start, self.scanned + at);
                self.start = newline + 1;
                self.scanned = self.start;
                // Bytes after the newline (pipelined) start the next line.
                self.line_started = (self.start < self.end).then(Instant::now);
                if newline - first > self.limit {
                    return Err(Stop::TooLong);
                }
                return Ok(Some(&self.buf[first..newline]));
            }
            self.scanned = self.end;
            if self.end - self.start > self.limit {
                return Err(Stop::TooLong);
            }
            if self.end == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    (self.start, self.scanned) = (0, self.end);
                } else {
                    // Room for `limit` bytes and the newline.
                    let grown = (self.buf.len() * 2).min(self.limit + 1);
                    self.buf.resize(grown, 0);
                }
            }
            let timeout = match self.line_started {
                None => idle,
                Some(started) => line
                    .checked_sub(started.elapsed())
                    .filter(|left| !left.is_zero())
                    .ok_or(Stop::LineUnfinished)?,
            };
            if self.timeout != Some(timeout) {
                if self.source.set_timeout(timeout).is_err() {
                    return Ok(None);
                }
                self.timeout = Some(timeout);
            }
            match self.source.read(&mut self.buf[self.end..]) {
                Ok(0) if self.start == self.end => return Ok(None),
                Ok(0) => {
                    let first = self.start;
                    self.start = self.end;
                    self.line_started = None;
                    return Ok(Some(&self.buf[first..self.end]));
                }
                Ok(n) => {
                    if self.line_started.is_none() {
                        self.line_started = Some(Instant::now());
                    }
                    self.end += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(match self.line_started {
                        None => Stop::Idle,
                        Some(_) => Stop::LineUnfinished,
                    });
                }
                Err(_) => return Ok(None),
            }
        }
    }
}

fn deliver(ctx: &AdminCtx, stamped: &Stamped) {
    let event = &stamped.event;
    let line = serde_json::json!({
        "event": event.name(),
        "at": crate::time::rfc3339(stamped.at_ms),
        "data": event.data(),
    })
    .to_string();
    let mut subscribers = ctx.subscribers.lock().unwrap_or_else(|e| e.into_inner());
    subscribers.retain(|s| {
        if !s.topics.iter().any(|t| t == event.topic()) {
            return true;
        }
        // Never waits: a subscriber whose queue is full (it does not read)
        // or whose writer ended is dropped.
        s.lines.try_send(line.clone()).is_ok()
    });
    crate::events::set_listening(!subscribers.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin_uids: Vec<u32>, read_uids: Vec<u32>, read_gids: Vec<u32>) -> AdminConfig {
        AdminConfig {
            enabled: true,
            socket: PathBuf::from("/tmp/x.sock"),
            socket_gid: None,
            admin_uids,
            admin_gids: vec![],
            read_uids,
            read_gids,
            max_connections: 64,
            max_connections_per_client: 16,
            max_line_bytes: 1 << 20,
            idle_timeout: Duration::from_secs(60),
            line_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn access_levels() {
        let peer = |uid, gid| Peer { uid, gid, pid: 1 };
        let c = config(vec![500], vec![600], vec![700]);
        assert_eq!(access_for(peer(0, 0), 999, &c), Some(Access::Admin));
        assert_eq!(access_for(peer(999, 1), 999, &c), Some(Access::Admin));
        assert_eq!(access_for(peer(500, 1), 999, &c), Some(Access::Admin));
        assert_eq!(access_for(peer(600, 1), 999, &c), Some(Access::Read));
        assert_eq!(access_for(peer(601, 700), 999, &c), Some(Access::Read));
        assert_eq!(access_for(peer(601, 701), 999, &c), None);
    }

    /// Hands out its chunks one read at a time (a read may take part of
    /// one), then the end of the stream.
    struct Chunks(Vec<Vec<u8>>);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some(chunk) = self.0.first_mut() else {
                return Ok(0);
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.0.remove(0);
            }
            Ok(n)
        }
    }

    impl TimedRead for Chunks {
        fn set_timeout(&mut self, _: Duration) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn read_all(chunks: &[&[u8]], limit: usize) -> (Vec<Vec<u8>>, Option<Stop>) {
        let source = Chunks(chunks.iter().map(|c| c.to_vec()).collect());
        let mut reader = LineReader::new(source, limit);
        let mut lines = Vec::new();
        let long = Duration::from_secs(60);
        loop {
            match reader.next_line(long, long) {
                Ok(Some(line)) => lines.push(line.to_vec()),
                Ok(None) => return (lines, None),
                Err(stop) => return (lines, Some(stop)),
            }
        }
    }

    #[test]
    fn lines_of_exactly_the_limit_pass_and_one_byte_more_does_not() {
        let at = vec![b'a'; 100];
        let mut input = at.clone();
        input.push(b'\n');
        assert_eq!(read_all(&[&input], 100), (vec![at.clone()], None));
        let over = [b'a'; 101];
        let mut input = over.to_vec();
        input.push(b'\n');
        assert_eq!(read_all(&[&input], 100), (vec![], Some(Stop::TooLong)));
        // Without a newline yet: refused as soon as it is over.
        assert_eq!(read_all(&[&over], 100), (vec![], Some(Stop::TooLong)));
        // Exactly the limit and then the end of the stream: one line.
        assert_eq!(read_all(&[&at], 100), (vec![at], None));
    }

    #[test]
    fn split_pipelined_and_long_lines_come_out_whole() {
        let (lines, stop) = read_all(&[b"ab", b"c\nde", b"f\n\ng\nh"], 10);
        assert_eq!(stop, None);
        assert_eq!(lines, [&b"abc"[..], b"def", b"", b"g", b"h"]);
        // Past the first buffer, in odd pieces, twice.
        let big = vec![b'x'; FIRST_BUFFER * 3 + 7];
        let mut input = big.clone();
        input.push(b'\n');
        input.extend_from_slice(&big);
        input.push(b'\n');
        let pieces: Vec<&[u8]> = input.chunks(4093).collect();
        let (lines, stop) = read_all(&pieces, big.len());
        assert_eq!(stop, None);
        assert_eq!(lines, [big.clone(), big]);
    }
}
