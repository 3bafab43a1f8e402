//! The supervisor: starts every component in order, waits for lifecycle
//! events, reloads, and stops everything in reverse order.
//!
//! Runs on the main thread. Startup order: store (migrations) -> local
//! worker registered -> scheduler (loaded from the store) -> heartbeat ->
//! HTTP bound -> readiness line + `READY=1`. Shutdown order: `STOPPING=1` ->
//! HTTP drains -> heartbeat marks the local worker offline -> scheduler ->
//! store commits what is queued -> final checkpoint.
//!
//! A component thread that ends on its own (a panic or a fatal error) sends
//! `ComponentExited`; the supervisor then stops the rest and the process
//! exits with status 1 so that systemd restarts it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select, tick, unbounded};

use std::sync::Arc;

use crate::admin::AdminServer;
use crate::config::{Config, LiveConfig, Overrides};
use crate::controlplane;
use crate::controlplane::reaper::Reaper;
use crate::http::HttpServer;
use crate::notify::Notifier;
use crate::providers::mock::MockProvider;
use crate::providers::process::ProcessProvider;
use crate::providers::{Provider, Registry};
use crate::scheduler::{self, health::Windows};
use crate::signals::SignalThread;
use crate::store;
use crate::supervise::SupervisorEvent;
use crate::worker::executor::Executor;
use crate::worker::heartbeat::Draining;
use crate::worker::heartbeat::{self, HeartbeatThread};
use crate::worker::{Links, LocalLink};

use crate::supervise::ExitNotifier;

/// Why the daemon stopped, mapped to the exit code by `main`.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A signal asked for it; everything stopped in order.
    Stopped,
    /// A component died; the rest was stopped in order.
    ComponentFailed(&'static str),
}

/// Why the daemon could not start (`main` maps it to the exit code).
#[derive(Debug)]
pub struct StartError {
    pub message: String,
    /// The filesystem of the database has no room: exit code 3.
    pub storage_full: bool,
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError {
            message,
            storage_full: false,
        }
    }
}

impl From<store::OpenError> for StartError {
    fn from(e: store::OpenError) -> Self {
        match e {
            store::OpenError::Full(message) => StartError {
                message,
                storage_full: true,
            },
            store::OpenError::Other(message) => message.into(),
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub fn run(
    config: Config,
    overrides: Overrides,
    apply_log_level: &dyn Fn(log::LevelFilter),
) -> Result<Outcome, StartError> {
    let started = Instant::now();
    raise_nofile_limit();
    let notifier = Notifier::from_env();
    let (events_tx, events) = unbounded::<SupervisorEvent>();
    let on_exit = ExitNotifier::new(events_tx.clone());
    let supervisor = events_tx.clone();
    let signals = SignalThread::start(events_tx)
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;

    // The mock provider reads one marker file per runtime at open (100,000
    // at fleet scale): it does so on its own thread while the store loads.
    let mock_opening = {
        let (dir, latency, failure_rate) = (
            config.store.data_dir.join("mock-runtimes"),
            config.providers.mock.latency,
            config.providers.mock.failure_rate,
        );
        std::thread::Builder::new()
            .name("mock-open".into())
            .spawn(move || MockProvider::open(dir, latency, failure_rate))
            .map_err(|e| format!("cannot start opening the mock provider: {e}"))?
    };
    let store = store::open(&config.store, on_exit.clone())?;
    let local = heartbeat::register_local(&store.handle, &config).map_err(|e| match e {
        store::StoreError::Full(_) => StartError {
            message: store::full_at_start(
                store.handle.path(),
                "cannot register the local worker in",
                e,
            ),
            storage_full: true,
        },
        other => format!("cannot register the local worker: {other}").into(),
    })?;
    let loaded = store
        .handle
        .list_workers()
        .map_err(|e| format!("cannot load workers: {e}"))?;
    let live_counts = store
        .handle
        .live_counts()
        .map_err(|e| format!("cannot count sandboxes: {e}"))?;
    log::info!(
        "loaded {} workers; local worker {} registered",
        loaded.len(),
        local.id
    );
    let windows = Windows {
        stale_after: config.worker.stale_after,
        down_after: config.worker.down_after,
    };
    let (scheduler, scheduler_thread) = scheduler::start(
        loaded,
        live_counts,
        config.worker.id.clone(),
        windows,
        config.scheduler.policy,
        store.handle.clone(),
        on_exit.clone(),
    )
    .map_err(|e| format!("cannot start the scheduler: {e}"))?;

    let mock = mock_opening
        .join()
        .map_err(|_| "the mock provider's open panicked".to_string())?
        .map_err(|e| format!("cannot open the mock provider: {e}"))?;
    let mut enabled = vec![Arc::new(mock) as Arc<dyn Provider>];
    if config.worker.providers.iter().any(|p| p == "process") {
        let process = ProcessProvider::open(
            config.providers.process.clone(),
            &config.store.data_dir,
            &daemon_paths(&config),
        )
        .map(Arc::new)
        .map_err(|e| format!("cannot open the process provider: {e}"))?;
        process.start_probe();
        log::info!(
            "process provider: limits by {}, images {:?}",
            process.limits(),
            process.config().images.keys().collect::<Vec<_>>()
        );
        enabled.push(process);
    }
    let providers = Registry::new(enabled, &config.providers.default);
    let executor = Executor::start(4, &on_exit)
        .map_err(|e| format!("cannot start the worker executor: {e}"))?;

    let live = LiveConfig::new(config);
    let local_worker = LocalLink::new(
        live.get().worker.id.clone(),
        executor.handle.clone(),
        providers,
    );
    let sandboxes = Arc::new(controlplane::Lifecycle::new(
        live.clone(),
        store.handle.clone(),
        scheduler.clone(),
        Links::new(local_worker),
    ));
    sandboxes
        .reconcile()
        .map_err(|e| format!("startup reconciliation failed: {e}"))?;
    let draining = Draining::default();
    let heartbeat = HeartbeatThread::start(
        live.clone(),
        store.handle.clone(),
        scheduler.clone(),
        draining.clone(),
        on_exit.clone(),
    )
    .map_err(|e| format!("cannot start the heartbeat thread: {e}"))?;
    let reaper = {
        let c = live.get();
        Reaper::start(
            sandboxes.clone(),
            c.sandboxes.reap_interval,
            c.leases.renew_interval,
            on_exit.clone(),
        )
        .map_err(|e| format!("cannot start the reaper: {e}"))?
    };
    let admin = if live.get().admin.enabled {
        Some(AdminServer::start(
            live.clone(),
            store.handle.clone(),
            scheduler.clone(),
            sandboxes.clone(),
            supervisor,
            draining,
            crate::events::open(),
            on_exit.clone(),
        )?)
    } else {
        None
    };
    let http = HttpServer::start(
        live.clone(),
        store.handle.clone(),
        scheduler.clone(),
        sandboxes.clone(),
        on_exit,
    )?;

    let config = live.get();
    let mut ready_line = format!(
        "stacyvmd ready http={} worker_id={} db={}",
        http.local_addr(),
        config.worker.id,
        std::fs::canonicalize(&config.store.path)
            .unwrap_or_else(|_| config.store.path.clone())
            .display()
    );
    if let Some(admin) = &admin {
        ready_line.push_str(&format!(" admin={}", admin.path().display()));
    }
    ready_line.push_str(&format!(
        " max_connections={} nofile={}",
        http.max_connections(),
        nofile_limit()
    ));
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{ready_line}");
        let _ = stdout.flush();
    }
    log::info!("ready in {:?}: {}", started.elapsed(), ready_line);
    notifier.send(&format!(
        "READY=1\nSTATUS=serving on {}\nMAINPID={}",
        http.local_addr(),
        std::process::id()
    ));

    let outcome = supervise(
        &events,
        &live,
        &overrides,
        &notifier,
        &store.handle,
        &scheduler,
        apply_log_level,
    );

    notifier.send("STOPPING=1\nSTATUS=stopping");
    log::info!("stopping: {outcome:?}");
    http.shutdown(live.get().server.shutdown_timeout);
    if let Some(admin) = admin {
        admin.stop();
    }
    reaper.stop();
    heartbeat.stop();
    drop(sandboxes);
    executor.join();
    drop(scheduler);
    let _ = scheduler_thread.join();
    let store::Store {
        handle,
        thread,
        checkpointer,
        lock,
    } = store;
    drop(handle);
    let _ = thread.join();
    checkpointer.stop();
    drop(lock);
    signals.stop();
    log::info!("stopped");
    Ok(outcome)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every client
/// connection costs descriptors, and the shell default (1024) is far below
/// what the connection limits allow. The HTTP layer then sizes
/// `server.max_connections` from the result.
fn raise_nofile_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(hard) = limit.maximum.or_else(nr_open) else {
        return;
    };
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= hard {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: Some(hard),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => log::info!("RLIMIT_NOFILE raised from {soft} to {hard}"),
        Err(e) => log::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}"),
    }
}

/// The kernel's cap on descriptors per process, for an unlimited hard limit.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The soft `RLIMIT_NOFILE` in force.
pub fn nofile_limit() -> u64 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current.or_else(nr_open).unwrap_or(1024)
}

/// Waits for lifecycle events; pings the watchdog while the store and the
/// scheduler answer.
fn supervise(
    events: &Receiver<SupervisorEvent>,
    live: &LiveConfig,
    overrides: &Overrides,
    notifier: &Notifier,
    store: &store::StoreHandle,
    scheduler: &scheduler::SchedulerHandle,
    apply_log_level: &dyn Fn(log::LevelFilter),
) -> Outcome {
    let period = notifier
        .watchdog()
        .map_or(Duration::from_secs(5), |w| w / 2);
    let ticks = tick(period);
    loop {
        select! {
            recv(events) -> event => match event {
                Ok(SupervisorEvent::Shutdown(signal)) => {
                    log::info!("{signal} received: graceful stop");
                    return Outcome::Stopped;
                }
                Ok(SupervisorEvent::Reload) => reload(live, overrides, scheduler, apply_log_level),
                Ok(SupervisorEvent::ComponentExited { name, panicked }) => {
                    log::error!("component {name} {}; stopping", if panicked { "panicked" } else { "exited" });
                    return Outcome::ComponentFailed(name);
                }
                Err(_) => return Outcome::ComponentFailed("supervisor channel"),
            },
            recv(ticks) -> _ => {
                match (store.ping(), scheduler.figures()) {
                    (Ok(latency), Ok(f)) => notifier.send(&format!(
                        "WATCHDOG=1\nSTATUS=serving; {} workers ({} stale); store {:.1} ms",
                        f.total, f.stale, latency.as_secs_f64() * 1000.0
                    )),
                    (Err(e), _) => log::warn!("watchdog withheld: {e}"),
                    (_, Err(e)) => log::warn!("watchdog withheld: {e}"),
                }
            }
        }
    }
}

/// SIGHUP: re-read file and environment; apply reloadable keys; keep the old
/// config on any error.
fn reload(
    live: &LiveConfig,
    overrides: &Overrides,
    scheduler: &scheduler::SchedulerHandle,
    apply_log_level: &dyn Fn(log::LevelFilter),
) {
    let current = live.get();
    let fresh = match Config::load(overrides, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(problems) => {
            for p in &problems {
                log::error!("reload refused: {p}");
            }
            log::error!("reload refused: keeping the running configuration");
            return;
        }
    };
    let (merged, ignored) = current.reload(&fresh);
    for key in ignored {
        log::warn!("reload: {key} changed but needs restart; keeping the running value");
    }
    apply_log_level(merged.log.level);
    let windows = Windows {
        stale_after: merged.worker.stale_after,
        down_after: merged.worker.down_after,
    };
    let policy = merged.scheduler.policy;
    if let Err(e) = scheduler
        .set_windows(windows)
        .and_then(|()| scheduler.set_policy(policy))
    {
        log::warn!("reload: the scheduler did not take the new settings: {e}");
    }
    live.replace(merged);
    log::info!("configuration reloaded");
}

/// Every path of this daemon's that a sandbox image could show, for the
/// process provider to mask (the data directory is masked in any case):
/// the database, the admin socket, the configuration file, and systemd's
/// state and runtime directories. A file is hidden with its directory when
/// that directory is its own (`/etc/stacyvmd/`, `/var/lib/stacyvmd/`):
/// then a file replaced by rename after a sandbox started (an editor
/// saving the configuration) stays hidden too. Directly in a directory
/// every sandbox needs (`/etc`, `/var/lib`, `/`), only the file itself
/// (and the database's `-wal` and `-shm`) is hidden.
fn daemon_paths(config: &Config) -> Vec<PathBuf> {
    const SHARED: &[&str] = &[
        "/",
        "/etc",
        "/usr",
        "/usr/local",
        "/var",
        "/var/lib",
        "/run",
        "/tmp",
        "/home",
        "/opt",
        "/srv",
        "/root",
        "/mnt",
    ];
    let mut out = Vec::new();
    let mut hide = |file: &Path, siblings: &[&str]| {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
        match file.parent() {
            Some(dir) if !SHARED.iter().any(|s| dir == Path::new(s)) => out.push(dir.to_owned()),
            _ => {
                out.push(file.clone());
                for suffix in siblings {
                    let mut name = file.as_os_str().to_owned();
                    name.push(suffix);
                    out.push(PathBuf::from(name));
                }
            }
        }
    };
    hide(&config.store.path, &["-wal", "-shm", "-journal"]);
    if config.admin.enabled {
        hide(&config.admin.socket, &[]);
    }
    if let Some(source) = &config.source {
        hide(source, &[]);
    }
    for var in [
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "CONFIGURATION_DIRECTORY",
    ] {
        // systemd may list several, separated by colons.
        if let Some(dirs) = std::env::var_os(var) {
            out.extend(std::env::split_paths(&dirs).filter(|p| p.is_absolute()));
        }
    }
    out
}
