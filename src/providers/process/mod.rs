//! The `process` provider: each sandbox is a process tree in its own PID,
//! mount, UTS, IPC and network namespaces (plus a user namespace when the
//! daemon is not root), with a read-only root from its image, private
//! writable `/workspace` and `/tmp`, and limits from cgroup v2 or rlimits.
//! No VM and no container engine: util-linux `setsid` and `unshare` start
//! `stacyvmd sandbox-init` ([`init`]) as the sandbox's PID 1, and the
//! `stacyvmd sandbox-enter` helper ([`enter`]) joins it for exec and files.
//!
//! Runtimes outlive the daemon: each has a state directory
//! (`<data_dir>/process/<id>/`, see [`state`]) naming its init by pid and
//! start time, so a restarted daemon finds, adopts or reaps it.

mod cgroup;
pub mod confine;
pub mod enter;
mod exec_io;
mod file_io;
pub mod files;
mod helpers;
pub mod init;
mod launch;
mod seccomp;
pub mod state;
mod uids;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::ProcessConfig;

use super::{EnterError, Provider, ProviderError, RuntimeSpec};
use crate::worker::ops::{ExecOutcome, ExecRequest, FileStream, FsOp, OpError, Sink};
use cgroup::Cgroups;
use enter::{Action, EnterSpec};
use state::{InitRecord, SpecRecord};

/// How long a new sandbox's init may take to report ready.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// How long destroy waits for a killed init to be gone.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Runtime {
    init: InitRecord,
    spec: SpecRecord,
}

pub struct ProcessProvider {
    config: ProcessConfig,
    /// `<data_dir>/process`.
    base: PathBuf,
    /// Host paths hidden from sandboxes: every path of the daemon's that an
    /// image could show (see [`ProcessProvider::open`]).
    masks: Vec<PathBuf>,
    /// This daemon's binary, open without close-on-exec, and the path that
    /// names it in any child (see [`helper_binary`]).
    _exe: std::os::fd::OwnedFd,
    exe: PathBuf,
    rootless: bool,
    /// The kernel gives sandboxes cgroup and time namespaces.
    cgroup_ns: bool,
    time_ns: bool,
    cgroups: Option<Cgroups>,
    cpus: usize,
    runtimes: Mutex<HashMap<String, Runtime>>,
    /// Exec and file operations in flight, per sandbox (at most
    /// `max_ops_per_sandbox`: a stuck sandbox cannot hold every HTTP thread).
    ops: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    /// Where the next sandbox uid is looked for (root daemon).
    uids: Mutex<uids::UidAllocator>,
    /// Why sandboxes cannot be started here: found at open, or by the
    /// start-up probe, a real sandbox spawned, entered and destroyed on a
    /// thread of its own (so the daemon's start does not wait for it).
    unusable: Option<String>,
    probe: Mutex<Option<std::thread::JoinHandle<Result<(), String>>>>,
    probed: std::sync::OnceLock<Option<String>>,
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Refuses to delete a state directory that has anything mounted below it
/// in the daemon's mount namespace (sandbox mounts live only in the
/// sandbox's own namespace, so this never happens unless something is
/// badly wrong, and then deleting would reach into the mounted tree).
fn has_mounts_below(dir: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    mounts.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|m| Path::new(m).starts_with(dir))
    })
}

impl ProcessProvider {
    /// Opens the provider. `masks` are the daemon's paths besides the data
    /// directory (database, admin socket, configuration files, systemd
    /// state and runtime directories) that sandboxes must never see.
    pub fn open(
        config: ProcessConfig,
        data_dir: &Path,
        masks: &[PathBuf],
    ) -> Result<ProcessProvider, String> {
        let base = data_dir.join("process");
        fs::create_dir_all(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
        let base = fs::canonicalize(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        let data_dir =
            fs::canonicalize(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let (exe_fd, exe) = helper_binary()?;
        let rootless = !rustix::process::geteuid().is_root();
        let mut needed = vec!["setsid", "unshare"];
        if config.disk_mb > 0 {
            if rootless {
                return Err(
                    "providers.process.disk_mb needs a daemon running as root (loop devices)"
                        .into(),
                );
            }
            needed.extend(["mkfs.ext4", "mount"]);
        }
        let unusable = needed
            .iter()
            .find(|p| which(p).is_none())
            .map(|p| format!("`{p}` is not on PATH (util-linux, e2fsprogs)"));
        let cgroups = if rootless {
            None
        } else {
            Cgroups::open(&config.cgroup)?
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut all_masks = vec![data_dir];
        for m in masks {
            // Masked by its real path: that is what an image shows.
            let real = fs::canonicalize(m).unwrap_or_else(|_| m.clone());
            if !all_masks.iter().any(|have| real.starts_with(have)) {
                all_masks.push(real);
            }
        }
        let uids = uids::UidAllocator::open(&base, config.uid_base, config.uid_count)?;
        if !rootless {
            uids::prepare_registry(&config.uid_registry)?;
        }
        let provider = ProcessProvider {
            base,
            masks: all_masks,
            _exe: exe_fd,
            exe,
            rootless,
            cgroup_ns: Path::new("/proc/self/ns/cgroup").exists(),
            time_ns: Path::new("/proc/self/ns/time").exists(),
            cgroups,
            cpus,
            runtimes: Mutex::new(HashMap::new()),
            ops: std::sync::Arc::default(),
            uids: Mutex::new(uids),
            unusable,
            probe: Mutex::new(None),
            probed: std::sync::OnceLock::new(),
            config,
        };
        provider.load();
        Ok(provider)
    }

    /// Starts the probe: one real sandbox, spawned, entered (`true`) and
    /// destroyed, so that "healthy" means a spawn works here. Its result is
    /// waited for by the first spawn or health check that needs it.
    pub fn start_probe(self: &std::sync::Arc<Self>) {
        if self.unusable.is_some() {
            return;
        }
        let me = std::sync::Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("process-probe".into())
            .spawn(move || me.probe_once());
        match handle {
            Ok(h) => *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
            Err(e) => {
                let _ = self
                    .probed
                    .set(Some(format!("cannot start the probe: {e}")));
            }
        }
    }

    fn probe_once(&self) -> Result<(), String> {
        let dir = self.base.join(format!(".probe-{}", std::process::id()));
        if dir.exists() {
            self.remove_state("probe", &dir, None);
        }
        let spec = RuntimeSpec {
            sandbox_id: "probe".into(),
            image: "host".into(),
            memory_mb: 64,
            vcpus: 1,
        };
        let result = self.start(&spec, &dir).and_then(|runtime| {
            let entered = self.run_probe_exec(&runtime);
            kill_and_wait(&runtime.init);
            entered
        });
        let cgroup = SpecRecord::read(&dir).ok().and_then(|s| s.cgroup);
        self.remove_state("probe", &dir, cgroup.as_deref());
        result
    }

    fn run_probe_exec(&self, runtime: &Runtime) -> Result<(), String> {
        let action = Action::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: self.base_env("probe"),
            workdir: files::WORKSPACE.into(),
            background: false,
        };
        let helper = self
            .start_helper(runtime, action, Stdio::null(), Stdio::piped())
            .map_err(|e| match e {
                EnterError::NotRunning(m) | EnterError::Failed(m) => m,
            })?;
        let output = helper
            .wait_with_output()
            .map_err(|e| format!("waiting for the probe's exec: {e}"))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "a probe sandbox could not run a command ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }

    /// Why sandboxes cannot start here, if they cannot (waits for the
    /// probe the first time).
    fn unusable(&self) -> Option<&String> {
        if self.unusable.is_some() {
            return self.unusable.as_ref();
        }
        self.probed
            .get_or_init(|| {
                let handle = self.probe.lock().unwrap_or_else(|e| e.into_inner()).take();
                let result = match handle {
                    Some(h) => h
                        .join()
                        .unwrap_or_else(|_| Err("the probe panicked".into())),
                    None => Ok(()),
                };
                match result {
                    Ok(()) => None,
                    Err(why) => {
                        log::warn!("process provider: sandboxes cannot start here: {why}");
                        Some(why)
                    }
                }
            })
            .as_ref()
    }

    fn runtimes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Runtime>> {
        self.runtimes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds the runtimes left by an earlier daemon. Live ones are kept for
    /// reconciliation to adopt or reap; the state of dead ones is removed.
    fn load(&self) {
        let Ok(entries) = fs::read_dir(&self.base) else {
            return;
        };
        let mut runtimes = self.runtimes();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !crate::sandboxes::is_sandbox_id(&id) {
                continue;
            }
            let dir = entry.path();
            match (InitRecord::read(&dir), SpecRecord::read(&dir)) {
                (Ok(init), Ok(spec)) if init.alive() => {
                    runtimes.insert(id, Runtime { init, spec });
                }
                _ => {
                    log::warn!("process sandbox {id}: its init is gone; removing its state");
                    self.remove_state(&id, &dir, None);
                }
            }
        }
    }

    fn dir(&self, sandbox_id: &str) -> Result<PathBuf, ProviderError> {
        if !crate::sandboxes::is_sandbox_id(sandbox_id) {
            return Err(ProviderError(format!("not a sandbox id: {sandbox_id:?}")));
        }
        Ok(self.base.join(sandbox_id))
    }

    fn remove_state(&self, id: &str, dir: &Path, cgroup: Option<&str>) {
        if let Some(cg) = cgroup {
            Cgroups::remove(Path::new(cg));
        }
        if has_mounts_below(dir) {
            log::error!(
                "process sandbox {id}: {} has mounts below it; leaving it in place",
                dir.display()
            );
            return;
        }
        if let Err(e) = fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::error!("process sandbox {id}: removing {}: {e}", dir.display());
        }
    }

    fn image_root(&self, image: &str) -> Result<&Path, String> {
        self.config
            .images
            .get(image)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                let names: Vec<&str> = self.config.images.keys().map(String::as_str).collect();
                format!(
                    "image {image:?} is not configured for the process provider (configured: {})",
                    names.join(", ")
                )
            })
    }

    /// The lowest slot no live runtime uses: where the sandbox's CPUs
    /// start in rlimit mode (its uid comes from `uids`).
    fn free_slot(runtimes: &HashMap<String, Runtime>) -> u32 {
        let used: std::collections::HashSet<u32> = runtimes.values().map(|r| r.spec.slot).collect();
        (0..).find(|s| !used.contains(s)).unwrap_or(0)
    }

    pub fn config(&self) -> &ProcessConfig {
        &self.config
    }
}

/// Kills a sandbox's init (and with it the whole PID namespace) and waits
/// until it is gone. Returns false if it could not be confirmed gone.
pub use helpers::OpGuard;
use helpers::helper_binary;
pub use launch::unshare_args;

fn kill_and_wait(init: &InitRecord) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let Some(pid) = rustix::process::Pid::from_raw(init.pid) else {
        return true;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
        return true; // already gone
    };
    if !init.alive() {
        return true; // the pid now names another process
    }
    if let Err(e) = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL) {
        return e == rustix::io::Errno::SRCH;
    }
    let timeout = rustix::time::Timespec {
        tv_sec: EXIT_DEADLINE.as_secs() as i64,
        tv_nsec: 0,
    };
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

impl Provider for ProcessProvider {
    fn name(&self) -> &str {
        "process"
    }

    fn capabilities(&self) -> Vec<String> {
        ["spawn", "destroy", "exec", "exec_stream", "files"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }

    fn limits(&self) -> String {
        if self.cgroups.is_some() {
            "cgroup-v2".into()
        } else {
            "rlimits".into()
        }
    }

    /// Without a delegated cgroup, memory is `RLIMIT_AS` per process and
    /// vCPUs an affinity share, not totals.
    fn soft_limits(&self) -> Vec<&'static str> {
        if self.cgroups.is_some() {
            Vec::new()
        } else {
            vec!["memory", "vcpus"]
        }
    }

    fn check_image(&self, image: &str) -> Result<(), String> {
        self.image_root(image).map(|_| ())
    }

    fn spawn(&self, spec: &RuntimeSpec) -> Result<(), ProviderError> {
        if let Some(why) = self.unusable() {
            return Err(ProviderError(why.clone()));
        }
        let dir = self.dir(&spec.sandbox_id)?;
        if self.runtimes().contains_key(&spec.sandbox_id) {
            return Err(ProviderError(format!(
                "sandbox {} already has a runtime",
                spec.sandbox_id
            )));
        }
        if dir.exists() {
            // Left by a spawn that failed half-way: nothing runs there.
            self.remove_state(&spec.sandbox_id, &dir, None);
        }
        match self.start(spec, &dir) {
            Ok(runtime) => {
                self.runtimes().insert(spec.sandbox_id.clone(), runtime);
                Ok(())
            }
            Err(e) => {
                let cgroup = SpecRecord::read(&dir).ok().and_then(|s| s.cgroup);
                self.remove_state(&spec.sandbox_id, &dir, cgroup.as_deref());
                Err(ProviderError(e))
            }
        }
    }

    fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let dir = self.dir(sandbox_id)?;
        let known = self.runtimes().get(sandbox_id).cloned();
        let init = known
            .as_ref()
            .map(|r| r.init)
            .or_else(|| InitRecord::read(&dir).ok());
        let cgroup = known
            .map(|r| r.spec)
            .or_else(|| SpecRecord::read(&dir).ok())
            .and_then(|s| s.cgroup);
        if let Some(init) = init
            && !kill_and_wait(&init)
        {
            return Err(ProviderError(format!(
                "sandbox {sandbox_id}: its init (pid {}) did not exit after SIGKILL",
                init.pid
            )));
        }
        self.remove_state(sandbox_id, &dir, cgroup.as_deref());
        self.runtimes().remove(sandbox_id);
        Ok(())
    }

    fn list_runtimes(&self) -> Result<Vec<String>, ProviderError> {
        Ok(self
            .runtimes()
            .iter()
            .filter(|(_, r)| r.init.alive())
            .map(|(id, _)| id.clone())
            .collect())
    }

    fn runtime_count(&self) -> usize {
        self.runtimes().values().filter(|r| r.init.alive()).count()
    }

    fn health(&self) -> Result<(), ProviderError> {
        if let Some(why) = self.unusable() {
            return Err(ProviderError(why.clone()));
        }
        fs::metadata(&self.base)
            .map(|_| ())
            .map_err(|e| ProviderError(format!("{}: {e}", self.base.display())))
    }

    fn runs_commands(&self) -> bool {
        true
    }

    fn check_running(&self, sandbox_id: &str) -> Result<(), EnterError> {
        ProcessProvider::check_running(self, sandbox_id)
    }

    fn validate_exec(&self, sandbox_id: &str, req: &ExecRequest) -> Result<(), OpError> {
        exec_io::validate(self, sandbox_id, req)
    }

    fn exec(
        &self,
        sandbox_id: &str,
        req: &ExecRequest,
        sink: Sink<'_>,
    ) -> Result<ExecOutcome, OpError> {
        exec_io::exec(self, sandbox_id, req, sink)
    }

    fn file_op(
        &self,
        sandbox_id: &str,
        op: FsOp,
        input: Option<&mut dyn std::io::Read>,
    ) -> Result<Vec<u8>, OpError> {
        file_io::file_op(self, sandbox_id, op, input)
    }

    fn read_file(&self, sandbox_id: &str, path: &str) -> Result<Box<dyn FileStream>, OpError> {
        Ok(Box::new(file_io::read_file(self, sandbox_id, path)?))
    }
}
