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
pub mod init;
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

/// One exec or file operation counted against its sandbox's share.
pub struct OpGuard {
    ops: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    sandbox_id: String,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = ops.get_mut(&self.sandbox_id) {
            *n -= 1;
            if *n == 0 {
                ops.remove(&self.sandbox_id);
            }
        }
    }
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

    fn start(&self, spec: &RuntimeSpec, dir: &Path) -> Result<Runtime, String> {
        let image = self.image_root(&spec.image)?.to_owned();
        if !image.is_dir() {
            return Err(format!("image root {} is not a directory", image.display()));
        }
        let io = |what: String, r: std::io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
        io(format!("creating {}", dir.display()), fs::create_dir(dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            io(
                format!("chmod {}", dir.display()),
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)),
            )?;
        }
        for sub in ["rootfs", "disk"] {
            io(format!("creating {sub}/"), fs::create_dir(dir.join(sub)))?;
        }
        // The uid's lock (root daemon) is held here until the init has its
        // own copy of it, and by the init from then on.
        let (slot, uid, uid_lock) = {
            let runtimes = self.runtimes();
            let slot = Self::free_slot(&runtimes);
            let (uid, lock) = if self.rootless {
                (0, None)
            } else {
                let in_use: std::collections::HashSet<u32> =
                    runtimes.values().map(|r| r.spec.uid).collect();
                let (uid, lock) = self
                    .uids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .next(&in_use, &self.config.uid_registry)?;
                (uid, Some(lock))
            };
            (slot, uid, lock)
        };
        let cgroup = match &self.cgroups {
            Some(c) => Some(
                c.create(
                    &spec.sandbox_id,
                    spec.memory_mb,
                    spec.vcpus,
                    self.config.max_processes,
                )
                .map_err(|e| format!("creating the sandbox's cgroup: {e}"))?
                .to_string_lossy()
                .into_owned(),
            ),
            None => None,
        };
        let record = SpecRecord {
            image: spec.image.clone(),
            uid,
            slot,
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            cgroup: cgroup.clone(),
            userns: true,
        };
        io("writing spec.json".into(), record.write(dir))?;

        let disk = if self.config.disk_mb > 0 {
            Some(self.make_disk(dir, uid)?)
        } else {
            None
        };
        let log = fs::File::create(dir.join("init.log"))
            .map_err(|e| format!("creating init.log: {e}"))?;
        let mut command = Command::new("setsid");
        command
            .arg("--fork")
            .arg("unshare")
            .args(unshare_args(self.rootless, self.cgroup_ns, self.time_ns))
            .arg("--")
            .arg(&self.exe)
            .arg("sandbox-init")
            .arg("--state")
            .arg(dir)
            .arg("--image")
            .arg(&image)
            .args(["--hostname", &spec.sandbox_id])
            .args(["--owner", &uid.to_string()])
            .args(["--tmpfs-mb", &self.config.workspace_mb.to_string()])
            .args(["--tmpfs-inodes", &self.config.workspace_inodes.to_string()])
            .args(["--proc", &self.config.proc]);
        for mask in &self.masks {
            command.arg("--mask").arg(mask);
        }
        if let Some(cg) = &cgroup {
            command.args(["--cgroup", cg]);
        }
        if let Some(image) = &disk {
            command.arg("--disk").arg(image);
        }
        if let Some(lock) = &uid_lock {
            command.args(["--uid-lock-fd", &lock.raw_fd().to_string()]);
            lock.pass_to(&mut command);
        }
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut launcher = command
            .spawn()
            .map_err(|e| format!("starting setsid/unshare: {e}"))?;
        let ready = launcher.stdout.take().ok_or("no readiness pipe")?;
        let go = launcher.stdin.take().ok_or("no map pipe")?;
        // setsid --fork returns at once; the init carries on detached.
        let _ = launcher.wait();
        let deadline = Instant::now() + READY_DEADLINE;
        let mut ready = BufReader::new(ready);
        let mut line = read_line_before(&mut ready, deadline);
        if line.as_deref() == Some("userns") {
            line = match self.write_id_maps(dir, uid, go) {
                Ok(()) => read_line_before(&mut ready, deadline),
                Err(e) => Some(e),
            };
        }
        let init = InitRecord::read(dir).ok();
        match (line.as_deref(), init) {
            (Some("ready"), Some(init)) => Ok(Runtime { init, spec: record }),
            (_, init) => {
                if let Some(init) = init {
                    kill_and_wait(&init);
                }
                let log = fs::read_to_string(dir.join("init.log")).unwrap_or_default();
                let last = log.lines().last().unwrap_or("no message").to_owned();
                Err(match line {
                    None => format!("the sandbox did not start in time: {last}"),
                    Some(_) => format!("the sandbox did not start: {last}"),
                })
            }
        }
    }

    /// Maps the sandbox's root to its host uid (root daemon): written by
    /// the daemon, which alone has `CAP_SETUID` over the init's new user
    /// namespace, then `go` to the init.
    fn write_id_maps(
        &self,
        dir: &Path,
        uid: u32,
        mut go: std::process::ChildStdin,
    ) -> Result<(), String> {
        use std::io::Write;
        let init = InitRecord::read(dir).map_err(|e| format!("reading init.json: {e}"))?;
        if !init.alive() {
            return Err("the sandbox's init is gone".into());
        }
        for file in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{}/{file}", init.pid), format!("0 {uid} 1\n"))
                .map_err(|e| format!("writing the sandbox's {file}: {e}"))?;
        }
        go.write_all(b"go\n")
            .map_err(|e| format!("telling the init to go on: {e}"))
    }

    /// Creates the sandbox's ext4 image (sparse, `disk_mb` MiB, no
    /// journal: it lives and dies with the sandbox); `disk/` is its mount
    /// point.
    fn make_disk(&self, dir: &Path, uid: u32) -> Result<PathBuf, String> {
        let image = dir.join("disk.img");
        let file = fs::File::create(&image).map_err(|e| format!("creating disk.img: {e}"))?;
        file.set_len(self.config.disk_mb << 20)
            .map_err(|e| format!("sizing disk.img: {e}"))?;
        drop(file);
        let output = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E"])
            .arg(format!("root_owner={uid}:{uid},lazy_itable_init=1"))
            .arg(&image)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running mkfs.ext4: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(image)
    }

    /// Which CPUs a sandbox's processes may run on (rlimit mode's vCPU
    /// limit): `vcpus` consecutive CPUs starting at a slot-dependent one.
    fn cpu_set(&self, spec: &SpecRecord) -> Vec<usize> {
        let n = (spec.vcpus as usize).clamp(1, self.cpus);
        if n >= self.cpus {
            return Vec::new();
        }
        let first = (spec.slot as usize * n) % self.cpus;
        (0..n).map(|i| (first + i) % self.cpus).collect()
    }

    /// Whether the sandbox's runtime runs here now.
    pub fn check_running(&self, sandbox_id: &str) -> Result<(), EnterError> {
        self.runtime(sandbox_id).map(|_| ())
    }

    fn runtime(&self, sandbox_id: &str) -> Result<Runtime, EnterError> {
        let runtime = self.runtimes().get(sandbox_id).cloned().ok_or_else(|| {
            EnterError::NotRunning(format!("sandbox {sandbox_id} has no runtime here"))
        })?;
        if !runtime.init.alive() {
            return Err(EnterError::NotRunning(format!(
                "sandbox {sandbox_id} is not running: its processes were killed from outside"
            )));
        }
        Ok(runtime)
    }

    /// Counts one exec or file operation against the sandbox's share;
    /// `None` when it has `max_ops_per_sandbox` in flight already.
    pub fn begin_op(&self, sandbox_id: &str) -> Option<OpGuard> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let n = ops.entry(sandbox_id.to_owned()).or_insert(0);
        if *n >= self.config.max_ops_per_sandbox {
            return None;
        }
        *n += 1;
        Some(OpGuard {
            ops: std::sync::Arc::clone(&self.ops),
            sandbox_id: sandbox_id.to_owned(),
        })
    }

    /// Starts the `sandbox-enter` helper for `action` in the sandbox, with
    /// its stdout and stderr as given and its stdin a pipe that first
    /// carries the helper's spec (then, for a file write, the content).
    pub fn helper(
        &self,
        sandbox_id: &str,
        action: Action,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<std::process::Child, EnterError> {
        let runtime = self.runtime(sandbox_id)?;
        if !runtime.spec.userns {
            return Err(EnterError::Failed(format!(
                "sandbox {sandbox_id} was started by an older stacyvmd without a user namespace; destroy it and spawn a new one"
            )));
        }
        self.start_helper(&runtime, action, stdout, stderr)
    }

    fn start_helper(
        &self,
        runtime: &Runtime,
        action: Action,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<std::process::Child, EnterError> {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let limits_by_cgroup = runtime.spec.cgroup.is_some();
        let spec = EnterSpec {
            pid: runtime.init.pid,
            start_time: runtime.init.start_time,
            rootless: self.rootless,
            cgroup_ns: self.cgroup_ns,
            time_ns: self.time_ns,
            max_processes: self.config.max_processes,
            max_open_files: self.config.max_open_files,
            max_file_bytes: self.config.max_file_bytes,
            address_space: (!limits_by_cgroup).then_some(u64::from(runtime.spec.memory_mb) << 20),
            cpus: if limits_by_cgroup {
                Vec::new()
            } else {
                self.cpu_set(&runtime.spec)
            },
            cgroup: runtime.spec.cgroup.clone(),
            action,
        };
        let bytes = enter::encode_spec(&spec).map_err(EnterError::Failed)?;
        // An empty environment: nothing of the request reaches a process
        // that has not yet dropped every privilege (the dynamic loader of
        // this root process reads LD_PRELOAD and friends).
        let mut child = Command::new(&self.exe)
            .arg("sandbox-enter")
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| EnterError::Failed(format!("starting the sandbox helper: {e}")))?;
        if let Some(stdin) = child.stdin.as_mut() {
            // A helper that failed at once closes its end; its exit status
            // and report say why.
            match stdin.write_all(&bytes) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(EnterError::Failed(format!(
                        "sending the helper its spec: {e}"
                    )));
                }
            }
        }
        Ok(child)
    }

    /// The environment every exec starts from; the request's `env` is laid
    /// over it.
    pub fn base_env(&self, sandbox_id: &str) -> Vec<(String, String)> {
        vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), files::WORKSPACE.into()),
            ("HOSTNAME".into(), sandbox_id.into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TMPDIR".into(), "/tmp".into()),
        ]
    }

    pub fn config(&self) -> &ProcessConfig {
        &self.config
    }
}

/// The binary that runs `sandbox-init` and `sandbox-enter`: exactly this
/// daemon's, opened once at start and left open without close-on-exec, so
/// every child names it as `/proc/self/fd/<n>`: its own descriptor, which
/// it may follow even in a new user namespace (where the daemon's
/// `/proc/<pid>/exe` is out of reach). The descriptor names the running
/// binary's file even after it was replaced or deleted on disk (an
/// upgrade, a rebuild), so a daemon and its helpers always agree on the
/// protocol between them. Helpers mark it close-on-exec before they run
/// anything.
fn helper_binary() -> Result<(std::os::fd::OwnedFd, PathBuf), String> {
    use std::os::fd::AsRawFd;
    let fd = rustix::fs::open(
        "/proc/self/exe",
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("opening this daemon's binary: {e}"))?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok((fd, path))
}

/// util-linux `unshare` options for a sandbox's namespaces (also the
/// process benchmark's by-hand baseline): a user namespace first when
/// rootless, then PID (with the fork that makes the init its PID 1),
/// mount (private propagation), UTS, IPC, network, and cgroup and time
/// where the kernel has them. The init adds the sandbox's own user
/// namespace inside these (see `init`).
pub fn unshare_args(rootless: bool, cgroup_ns: bool, time_ns: bool) -> Vec<&'static str> {
    let mut args = Vec::with_capacity(12);
    if rootless {
        args.extend(["--user", "--map-root-user"]);
    }
    args.extend([
        "--pid",
        "--mount",
        "--uts",
        "--ipc",
        "--net",
        "--fork",
        "--propagation",
        "private",
    ]);
    if cgroup_ns {
        args.push("--cgroup");
    }
    if time_ns {
        args.push("--time");
    }
    args
}

/// Reads one line from `pipe` before `deadline`; `None` on EOF, timeout or
/// error.
fn read_line_before(
    reader: &mut BufReader<std::process::ChildStdout>,
    deadline: Instant,
) -> Option<String> {
    use rustix::event::{PollFd, PollFlags};
    let left = deadline.checked_duration_since(Instant::now())?;
    let timeout = rustix::time::Timespec {
        tv_sec: left.as_secs() as i64,
        tv_nsec: i64::from(left.subsec_nanos()),
    };
    if reader.buffer().is_empty() {
        let mut fds = [PollFd::new(reader.get_ref(), PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
    // The init writes each line at once; a partial line is a failure.
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim_end().to_owned()),
        _ => None,
    }
}

/// Kills a sandbox's init (and with it the whole PID namespace) and waits
/// until it is gone. Returns false if it could not be confirmed gone.
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
