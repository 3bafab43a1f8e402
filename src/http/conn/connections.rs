//! The connection table behind the relay: the file-descriptor budget, the
//! registry of open client connections with their activity (for the
//! per-client limit and for evicting the quietest one when the global
//! limit is reached), the spare handed-off internal connections, and the
//! handoff itself.

use super::*;

/// How many connections the file-descriptor limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// `server.max_connections`, lowered to what the descriptors allow.
    pub max_connections: usize,
    /// Handed-off internal connections kept ready.
    pub spares: usize,
}

/// Descriptors per relayed connection: the client socket, our end of the
/// internal connection, and tiny_http's end of it (which it duplicates).
pub(super) const FDS_PER_CONNECTION: u64 = 4;
/// A spare is an internal connection without a client.
pub(super) const FDS_PER_SPARE: u64 = 3;
/// How many handed-off internal connections wait for clients. Each pins an
/// idle tiny_http thread, which costs a small stack and nothing else.
pub(super) const SPARES: usize = 64;

impl FdBudget {
    /// `available`: descriptors this layer may use (the limit, less those
    /// open now and a reserve for everything else).
    pub fn new(configured: usize, available: u64) -> FdBudget {
        let spares = SPARES.min((available / 16) as usize);
        let left = available.saturating_sub(spares as u64 * FDS_PER_SPARE);
        let allowed = usize::try_from(left / FDS_PER_CONNECTION).unwrap_or(usize::MAX);
        FdBudget {
            max_connections: configured.min(allowed).max(1),
            spares,
        }
    }
}

/// Marks when a connection last moved a byte and whether a request is under
/// way, so that the quietest connection can make room at the limit.
pub(super) struct Activity {
    /// Milliseconds since `Connections::epoch`.
    pub(super) last: AtomicU64,
    /// A request is arriving (its head or body is not complete).
    pub(super) receiving: AtomicBool,
    /// A request was forwarded and no byte of an answer has come back yet.
    pub(super) awaiting: AtomicBool,
}

impl Activity {
    pub(super) fn quiet(&self) -> bool {
        !self.receiving.load(Ordering::Relaxed) && !self.awaiting.load(Ordering::Relaxed)
    }
}

pub(super) struct Entry {
    pub(super) stream: Arc<TcpStream>,
    pub(super) ip: IpAddr,
    pub(super) activity: Arc<Activity>,
}

#[derive(Default)]
pub(super) struct Registry {
    pub(super) connections: HashMap<u64, Entry>,
    pub(super) per_client: HashMap<IpAddr, usize>,
}

impl Registry {
    pub(super) fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.connections.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&entry.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&entry.ip);
            }
        }
        Some(entry)
    }
}

/// State shared by the acceptor, the relays and the supervisor.
pub struct Connections {
    pub(super) internal: PathBuf,
    /// Relay threads alive.
    pub(super) open: AtomicUsize,
    pub(super) stopping: AtomicBool,
    /// Serialises internal connection set-up (see the module doc).
    pub(super) handoff: Mutex<()>,
    /// Every client connection, to enforce the limits and to close them
    /// all at the end of a graceful stop.
    pub(super) registry: Mutex<Registry>,
    pub(super) next_id: AtomicU64,
    pub(super) epoch: Instant,
    pub(super) budget: FdBudget,
    /// Internal connections already handed off and waiting for a client, so
    /// a burst of new clients does not wait on one handoff after another.
    pub(super) spares: Mutex<Vec<UnixStream>>,
    /// Rings the `http-spare` thread to top the spares up.
    pub(super) doorbell: crossbeam_channel::Sender<()>,
    /// Handoffs failing back to back (see [`HANDOFF_FAILURES_FATAL`]).
    pub(super) handoff_failures: AtomicUsize,
    /// tiny_http stopped taking connections: the daemon is going down.
    pub(super) failed: AtomicBool,
    pub(super) streams: Arc<StreamSlots>,
}

impl Connections {
    pub fn new(
        internal: PathBuf,
        budget: FdBudget,
        streamed_bodies: usize,
        on_exit: ExitNotifier,
    ) -> std::io::Result<Arc<Connections>> {
        let (doorbell, rings) = crossbeam_channel::bounded::<()>(1);
        let connections = Arc::new(Connections {
            internal,
            open: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            handoff: Mutex::new(()),
            registry: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
            budget,
            spares: Mutex::new(Vec::with_capacity(budget.spares)),
            doorbell,
            handoff_failures: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            streams: StreamSlots::new(streamed_bodies),
        });
        let weak = Arc::downgrade(&connections);
        std::thread::Builder::new()
            .name("http-spare".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                let _exit = on_exit.guard("http-internal");
                // Ends when the last `Connections` is dropped (the doorbell's
                // sender goes with it), or when tiny_http is dead; only the
                // latter reports to the supervisor.
                loop {
                    let rang = rings.recv_timeout(WATCH_INTERVAL);
                    if rang == Err(crossbeam_channel::RecvTimeoutError::Disconnected) {
                        break;
                    }
                    let Some(connections) = weak.upgrade() else {
                        break;
                    };
                    if connections.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    if rang.is_ok() {
                        connections.top_up_spares();
                    } else {
                        connections.check_internal();
                    }
                    if connections.failed.load(Ordering::SeqCst) {
                        // `_exit` tells the supervisor, which stops the
                        // daemon with a failure status.
                        return;
                    }
                }
            })?;
        connections.ring();
        Ok(connections)
    }

    pub(super) fn ring(&self) {
        let _ = self.doorbell.try_send(());
    }

    /// False once tiny_http stopped taking connections.
    pub fn healthy(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    pub fn budget(&self) -> FdBudget {
        self.budget
    }

    pub(super) fn top_up_spares(&self) {
        let started = Instant::now();
        let before = self.spares().len();
        while !self.stopping.load(Ordering::SeqCst) && self.spares().len() < self.budget.spares {
            match self.handoff() {
                Ok(spare) => self.spares().push(spare),
                Err(_) => return,
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

    /// With nothing else to do, one handoff proves tiny_http still accepts.
    pub(super) fn check_internal(&self) {
        if self.spares().len() < self.budget.spares {
            self.top_up_spares();
        } else if let Ok(probe) = self.handoff() {
            drop(probe);
        }
    }

    pub(super) fn spares(&self) -> std::sync::MutexGuard<'_, Vec<UnixStream>> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handed-off internal connection: a spare if one is ready, else a
    /// fresh handoff.
    pub(super) fn internal_connection(&self) -> std::io::Result<UnixStream> {
        let spare = self.spares().pop();
        self.ring();
        match spare {
            Some(s) => Ok(s),
            None => self.handoff(),
        }
    }

    /// Opens an internal connection and waits until tiny_http has picked it
    /// up; counts the failures that mean tiny_http is gone.
    pub(super) fn handoff(&self) -> std::io::Result<UnixStream> {
        match handoff(self) {
            Ok(upstream) => {
                self.handoff_failures.store(0, Ordering::SeqCst);
                Ok(upstream)
            }
            // Out of descriptors on our side says nothing about tiny_http.
            Err(HandoffError::Connect(e)) if is_out_of_fds(&e) => {
                log::warn!("could not open an internal connection: {e}");
                Err(e)
            }
            Err(HandoffError::Connect(e)) => {
                let failures = self.handoff_failures.fetch_add(1, Ordering::SeqCst) + 1;
                if self.stopping.load(Ordering::SeqCst) {
                    // Shutting down: tiny_http goes away on purpose.
                } else if failures >= HANDOFF_FAILURES_FATAL {
                    if !self.failed.swap(true, Ordering::SeqCst) {
                        log::error!(
                            "the internal HTTP server ({}) stopped taking connections ({failures} handoffs failed, last: {e}); stopping",
                            self.internal.display()
                        );
                    }
                } else {
                    log::warn!("internal handoff failed ({failures} in a row): {e}");
                }
                Err(e)
            }
            Err(HandoffError::Probe(e)) => {
                log::warn!("the internal server did not answer a handoff probe: {e}");
                Err(e)
            }
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Registers a new client, closing the quietest connection if the
    /// global limit is reached; `Err` is the reason to refuse it.
    pub(super) fn admit(
        &self,
        stream: &Arc<TcpStream>,
        ip: IpAddr,
        per_client: usize,
    ) -> Result<(u64, Arc<Activity>), String> {
        let mut registry = self.registry();
        let max = self.budget.max_connections;
        let per_client = per_client.min(max);
        if registry.per_client.get(&ip).copied().unwrap_or(0) >= per_client {
            return Err(format!(
                "too many connections from this client (server.max_connections_per_client = {per_client}); retry later"
            ));
        }
        if registry.connections.len() >= max {
            let quietest = registry
                .connections
                .iter()
                .filter(|(_, e)| e.activity.quiet())
                .min_by_key(|(_, e)| e.activity.last.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            let Some(victim) = quietest.and_then(|id| registry.remove(id)) else {
                return Err(format!(
                    "too many connections (server.max_connections = {max}); retry later"
                ));
            };
            METRICS.http.connections_timed_out.inc();
            log::debug!("closing a quiet connection from {} to make room", victim.ip);
            let _ = victim.stream.shutdown(Shutdown::Both);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            last: AtomicU64::new(self.now_ms()),
            receiving: AtomicBool::new(false),
            awaiting: AtomicBool::new(false),
        });
        registry.connections.insert(
            id,
            Entry {
                stream: stream.clone(),
                ip,
                activity: activity.clone(),
            },
        );
        *registry.per_client.entry(ip).or_insert(0) += 1;
        Ok((id, activity))
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn touch(&self, activity: &Activity) {
        activity.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Closes every client connection (both directions), ending their relays.
    pub fn close_all(&self) {
        self.spares().clear();
        for entry in self.registry().connections.values() {
            let _ = entry.stream.shutdown(Shutdown::Both);
        }
    }
}

pub(super) fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}
