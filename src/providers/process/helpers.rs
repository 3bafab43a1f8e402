//! The `sandbox-enter` helpers that run an exec or a file operation in a
//! running sandbox: finding the runtime, counting operations per sandbox,
//! starting a helper with an empty environment and its spec on stdin, and
//! the binary they run.

use super::*;

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

impl ProcessProvider {
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

    pub(super) fn start_helper(
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
pub(super) fn helper_binary() -> Result<(std::os::fd::OwnedFd, PathBuf), String> {
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
