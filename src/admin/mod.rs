//! The admin socket: worker-protocol envelopes as newline-delimited JSON
//! over a Unix stream socket, for operators with `socat` or `nc -U`.
//!
//! Threads: `admin` accepts; each connection gets an `admin-conn` thread
//! (at most `admin.max_connections`; the next one gets a
//! `too_many_connections` line and is closed); `admin-events` writes event
//! lines to subscribers. Every connection has a read timeout
//! (`admin.idle_timeout`) and a write timeout, so a stalled client or one
//! that never reads its replies is cut off without delaying anyone else.
//!
//! The peer's uid/gid/pid (SO_PEERCRED) are read on accept and mapped to an
//! access level: root and the daemon's own uid are `admin`, then the
//! `admin.*_uids/gids` and `admin.read_*` lists; anyone else is refused.
//! Every mutating command is logged and audited with the peer's uid and pid.

mod methods;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::config::{AdminConfig, LiveConfig};
use crate::daemon::{ExitNotifier, Lifecycle as LifecycleEvent};
use crate::events::Event;
use crate::heartbeat::Draining;
use crate::lifecycle::Lifecycle;
use crate::scheduler::SchedulerHandle;
use crate::store::StoreHandle;
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

/// What the admin threads share.
pub struct AdminCtx {
    pub live: LiveConfig,
    pub store: StoreHandle,
    pub scheduler: SchedulerHandle,
    pub lifecycle: Arc<Lifecycle>,
    pub supervisor: Sender<LifecycleEvent>,
    pub draining: Draining,
    open: AtomicUsize,
    subscribers: Mutex<Vec<Subscriber>>,
    own_uid: u32,
    /// Open connections, to close them when the daemon stops.
    conns: Mutex<std::collections::HashMap<u64, UnixStream>>,
    next_conn: std::sync::atomic::AtomicU64,
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
        supervisor: Sender<LifecycleEvent>,
        draining: Draining,
        events: Option<Receiver<Event>>,
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
            open: AtomicUsize::new(0),
            subscribers: Mutex::new(Vec::new()),
            own_uid: rustix::process::getuid().as_raw(),
            conns: Mutex::new(Default::default()),
            next_conn: std::sync::atomic::AtomicU64::new(0),
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
            let _ = conn.shutdown(std::net::Shutdown::Both);
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
        if ctx.open.load(Ordering::SeqCst) >= config.admin.max_connections {
            let error = ProtoError::new(
                ErrorCode::TooManyConnections,
                format!("at most {} admin connections", config.admin.max_connections),
            );
            let _ = writeln!(stream, "{}", workerproto::error_reply(None, &error));
            continue;
        }
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
        ctx.open.fetch_add(1, Ordering::SeqCst);
        let conn_id = ctx.next_conn.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            ctx.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(conn_id, clone);
        }
        let conn_ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("admin-conn".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                serve(&conn_ctx, stream, peer, access);
                conn_ctx
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&conn_id);
                conn_ctx.open.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::error!("cannot start an admin connection thread: {e}");
            ctx.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&conn_id);
            ctx.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
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

fn serve(ctx: &Arc<AdminCtx>, stream: UnixStream, peer: Peer, access: Access) {
    let config = ctx.live.get();
    let limit = config.admin.max_line_bytes;
    let _ = stream.set_read_timeout(Some(config.admin.idle_timeout));
    let writer: Writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(_) => return,
    };
    if write_line(&writer, workerproto::greeting(&config.worker.id)).is_err() {
        return;
    }
    let claims = Claims::for_access(access, &config.worker.id);
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(limit as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    let error = ProtoError::new(ErrorCode::Unavailable, "idle timeout; closing");
                    let _ = write_line(&writer, workerproto::error_reply(None, &error));
                }
                break;
            }
        }
        if line.len() > limit || (line.len() == limit + 1 && line.last() != Some(&b'\n')) {
            let error = ProtoError::new(
                ErrorCode::LineTooLong,
                format!("a request line may be at most {limit} bytes; closing"),
            );
            let _ = write_line(&writer, workerproto::error_reply(None, &error));
            break;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = methods::handle(ctx, text, peer, &claims, &writer);
        if write_line(&writer, reply).is_err() {
            break;
        }
    }
    let mut subscribers = ctx.subscribers.lock().unwrap_or_else(|e| e.into_inner());
    subscribers.retain(|s| !Arc::ptr_eq(&s.writer, &writer));
    crate::events::set_listening(!subscribers.is_empty());
}

fn deliver(ctx: &AdminCtx, event: &Event) {
    let line = serde_json::json!({
        "event": event.name,
        "at": crate::time::rfc3339(event.at_ms),
        "data": event.data,
    })
    .to_string();
    let mut subscribers = ctx.subscribers.lock().unwrap_or_else(|e| e.into_inner());
    subscribers.retain(|s| {
        if !s.topics.iter().any(|t| t == event.topic) {
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
            max_line_bytes: 1 << 20,
            idle_timeout: Duration::from_secs(60),
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
}
