//! Starting a process sandbox: its state directory's spec, the
//! `setsid --fork unshare ... stacyvmd sandbox-init` command line, the id
//! maps of its user namespace, its disk image, the CPUs it may use, and the
//! readiness line read with a deadline.

use super::*;

impl ProcessProvider {
    pub(super) fn start(&self, spec: &RuntimeSpec, dir: &Path) -> Result<Runtime, String> {
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
    pub(super) fn cpu_set(&self, spec: &SpecRecord) -> Vec<usize> {
        let n = (spec.vcpus as usize).clamp(1, self.cpus);
        if n >= self.cpus {
            return Vec::new();
        }
        let first = (spec.slot as usize * n) % self.cpus;
        (0..n).map(|i| (first + i) % self.cpus).collect()
    }
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
