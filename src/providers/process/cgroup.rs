//! cgroup v2 limits for process sandboxes, where the daemon has a
//! delegated cgroup (the systemd unit sets `Delegate=yes`).
//!
//! Layout under the delegated directory `D`: the daemon moves itself to
//! the leaf `D/daemon` (cgroup v2 allows controllers for children only in
//! cgroups without processes of their own), enables `memory`, `pids` and
//! `cpu` for `D` and `D/sandboxes`, and gives each sandbox `D/sandboxes/<id>`
//! with `memory.max`, `memory.swap.max`, `pids.max` and `cpu.max`.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cgroups {
    sandboxes: PathBuf,
}

const CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];

/// The cgroup v2 directory of this process, from `/proc/self/cgroup` and
/// the cgroup2 mount point in `/proc/self/mountinfo`.
fn own_cgroup() -> Option<PathBuf> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split(' ').nth(4).map(PathBuf::from))?
    })?;
    Some(mount.join(relative.trim_start_matches('/')))
}

fn has_controllers(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join("cgroup.controllers")) else {
        return false;
    };
    let have: Vec<&str> = text.split_whitespace().collect();
    CONTROLLERS.iter().all(|c| have.contains(c))
}

fn enable(dir: &Path) -> std::io::Result<()> {
    let line: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    fs::write(dir.join("cgroup.subtree_control"), line.join(" "))
}

impl Cgroups {
    /// `setting` is `auto` (use the daemon's own cgroup if it is delegated
    /// and has the controllers), `off`, or an explicit directory. `Ok(None)`
    /// means rlimits; an explicit directory that cannot be used is an error.
    pub fn open(setting: &str) -> Result<Option<Cgroups>, String> {
        let (dir, explicit) = match setting {
            "off" => return Ok(None),
            "auto" => match own_cgroup() {
                Some(d) => (d, false),
                None => return Ok(None),
            },
            path => (PathBuf::from(path), true),
        };
        match Cgroups::prepare(&dir) {
            Ok(c) => Ok(Some(c)),
            Err(e) if explicit => Err(format!("cgroup {}: {e}", dir.display())),
            Err(e) => {
                log::info!(
                    "process sandboxes: cgroup v2 not usable at {} ({e}); limits are rlimits",
                    dir.display()
                );
                Ok(None)
            }
        }
    }

    fn prepare(dir: &Path) -> Result<Cgroups, String> {
        if !has_controllers(dir) {
            return Err(format!(
                "controllers {} are not all available",
                CONTROLLERS.join(", ")
            ));
        }
        let io = |what: &str, r: std::io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
        let own = dir.join("daemon");
        if !own.exists() {
            io("creating daemon/", fs::create_dir(&own))?;
        }
        io(
            "moving the daemon to daemon/",
            fs::write(own.join("cgroup.procs"), std::process::id().to_string()),
        )?;
        io("enabling controllers", enable(dir))?;
        let sandboxes = dir.join("sandboxes");
        if !sandboxes.exists() {
            io("creating sandboxes/", fs::create_dir(&sandboxes))?;
        }
        io("enabling controllers for sandboxes/", enable(&sandboxes))?;
        Ok(Cgroups { sandboxes })
    }

    /// Creates (or reuses) the cgroup of one sandbox with its limits.
    pub fn create(
        &self,
        sandbox_id: &str,
        memory_mb: u32,
        vcpus: u32,
        max_processes: u32,
    ) -> std::io::Result<PathBuf> {
        let dir = self.sandboxes.join(sandbox_id);
        if !dir.exists() {
            fs::create_dir(&dir)?;
        }
        fs::write(
            dir.join("memory.max"),
            (u64::from(memory_mb) << 20).to_string(),
        )?;
        // Not every kernel has swap accounting; the memory limit holds
        // without it.
        let _ = fs::write(dir.join("memory.swap.max"), "0");
        fs::write(dir.join("pids.max"), max_processes.to_string())?;
        fs::write(
            dir.join("cpu.max"),
            format!("{} 100000", u64::from(vcpus) * 100_000),
        )?;
        Ok(dir)
    }

    /// Removes a sandbox's cgroup once its processes are gone; they die
    /// asynchronously after the init is killed, so this retries briefly.
    pub fn remove(dir: &Path) {
        for _ in 0..100 {
            match fs::remove_dir(dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        log::warn!("could not remove cgroup {}", dir.display());
    }
}
