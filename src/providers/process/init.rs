//! `stacyvmd sandbox-init`: the first process of a sandbox.
//!
//! The daemon starts it through util-linux (`setsid --fork unshare --pid
//! --mount --uts --ipc --net --fork --propagation private`), so it begins as
//! PID 1 of fresh namespaces, with a private copy of the host's mounts. It
//! then builds the sandbox's root and waits, reaping orphans, until it is
//! killed: killing it (SIGKILL from the host) ends every process of the
//! sandbox, because they all live in its PID namespace.
//!
//! The root it builds: a small tmpfs holding read-only bind mounts of the
//! image's top-level entries, `/workspace` and `/tmp` bound from the
//! sandbox's state directory, a minimal `/dev`, a fresh `/proc`, and
//! read-only empty tmpfs over each masked host path (the daemon's data
//! directory). The tmpfs is then made read-only too.
//!
//! Its stdout is the daemon's readiness pipe: one line, `ready`, once the
//! root is built; then stdout is pointed at /dev/null. Its stderr is the
//! sandbox's `init.log`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::mount::{MountFlags, UnmountFlags};

use super::state::{InitRecord, read_start_time};

/// Top-level image entries a sandbox never gets from its image: they are
/// built fresh (or deliberately absent).
const NOT_FROM_IMAGE: &[&str] = &["proc", "sys", "dev", "tmp", "workspace", "run"];

/// Device nodes bound into the sandbox's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

pub struct InitArgs {
    pub state: PathBuf,
    pub image: PathBuf,
    pub hostname: String,
    pub masks: Vec<PathBuf>,
    pub cgroup: Option<PathBuf>,
    /// An ext4 image to hold `/workspace` and `/tmp` (a disk limit).
    pub disk: Option<PathBuf>,
    /// Owner (uid = gid) of `/workspace` and `/tmp` on the disk image.
    pub owner: Option<u32>,
}

impl InitArgs {
    pub fn parse(args: &[String]) -> Result<InitArgs, String> {
        let mut out = InitArgs {
            state: PathBuf::new(),
            image: PathBuf::new(),
            hostname: String::new(),
            masks: Vec::new(),
            cgroup: None,
            disk: None,
            owner: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--state" => out.state = PathBuf::from(value),
                "--image" => out.image = PathBuf::from(value),
                "--hostname" => out.hostname = value.clone(),
                "--mask" => out.masks.push(PathBuf::from(value)),
                "--cgroup" => out.cgroup = Some(PathBuf::from(value)),
                "--disk" => out.disk = Some(PathBuf::from(value)),
                "--owner" => {
                    out.owner = Some(value.parse().map_err(|_| format!("bad --owner {value}"))?)
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if out.state.as_os_str().is_empty() || out.image.as_os_str().is_empty() {
            return Err("--state and --image are required".into());
        }
        Ok(out)
    }
}

/// Runs the init; returns only on a set-up failure (the caller exits 1).
pub fn run(args: &InitArgs) -> String {
    match build(args) {
        Ok(()) => reap_forever(),
        Err(e) => format!("sandbox init failed: {e}"),
    }
}

fn ctx<T>(what: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn errno<T>(what: impl FnOnce() -> String, r: rustix::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn build(args: &InitArgs) -> Result<(), String> {
    // The host's /proc is still mounted: it names this process by its host
    // pid, which the daemon needs to find, enter and kill the sandbox.
    let host_pid: i32 = fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .ok_or("cannot read this process's host pid from /proc/self")?;
    let start_time = read_start_time(host_pid).ok_or("cannot read this process's start time")?;
    if let Some(cg) = &args.cgroup {
        ctx(
            || format!("joining cgroup {}", cg.display()),
            fs::write(cg.join("cgroup.procs"), host_pid.to_string()),
        )?;
    }
    // Recorded first: if the daemon dies from here on, its restart still
    // finds this runtime and adopts or reaps it.
    InitRecord {
        pid: host_pid,
        start_time,
    }
    .write(&args.state)
    .map_err(|e| format!("writing init.json: {e}"))?;

    errno(
        || "setting the hostname".into(),
        rustix::system::sethostname(args.hostname.as_bytes()),
    )?;
    loopback_up();

    let root = args.state.join("rootfs");
    let m = |what: String, r: rustix::io::Result<()>| errno(|| what, r);
    m(
        format!("mounting tmpfs on {}", root.display()),
        rustix::mount::mount(
            "tmpfs",
            &root,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=0755,size=4m"),
        ),
    )?;
    let rootless = !rustix::process::getuid().is_root()
        || fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
            // A user namespace maps a small range, not the whole id space.
            m.split_whitespace().nth(2) != Some("4294967295")
        });
    bind_image(&args.image, &root, rootless)?;
    // With a disk image, the writable directories live on it: mounted
    // here, in the sandbox's own mount namespace (the loop device is freed
    // when the namespace ends).
    let writable = match &args.disk {
        Some(image) => mount_disk(image, &args.state.join("disk"), args.owner)?,
        None => args.state.clone(),
    };
    for (name, from) in [
        ("workspace", writable.join("workspace")),
        ("tmp", writable.join("tmp")),
    ] {
        let at = root.join(name);
        ctx(|| format!("creating {}", at.display()), fs::create_dir(&at))?;
        m(
            format!("binding {} on {}", from.display(), at.display()),
            rustix::mount::mount_bind(&from, &at),
        )?;
        m(
            format!("remounting {}", at.display()),
            rustix::mount::mount_remount(
                &at,
                MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV,
                c"",
            ),
        )?;
    }
    build_dev(&root)?;
    for mask in &args.masks {
        let Ok(relative) = mask.strip_prefix("/") else {
            continue;
        };
        let at = root.join(relative);
        if at.is_dir() {
            m(
                format!("masking {}", mask.display()),
                rustix::mount::mount(
                    "tmpfs",
                    &at,
                    "tmpfs",
                    MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                    Some(c"size=4k,mode=0755"),
                ),
            )?;
        }
    }
    // /proc of the new PID namespace, mounted while the host's /proc is
    // still visible here: in a user namespace the kernel allows a new
    // procfs only where a fully visible one exists.
    let proc_dir = root.join("proc");
    ctx(|| "creating /proc".into(), fs::create_dir(&proc_dir))?;
    m(
        "mounting /proc".into(),
        rustix::mount::mount(
            "proc",
            &proc_dir,
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        ),
    )?;

    // Into the new root; the old one is detached and gone from this
    // namespace.
    ctx(
        || "entering the new root".into(),
        std::env::set_current_dir(&root),
    )?;
    m("pivot_root".into(), rustix::process::pivot_root(".", "."))?;
    m(
        "detaching the old root".into(),
        rustix::mount::unmount(".", UnmountFlags::DETACH),
    )?;
    ctx(|| "chdir /".into(), std::env::set_current_dir("/"))?;
    m(
        "making / read-only".into(),
        rustix::mount::mount_remount("/", MountFlags::RDONLY | MountFlags::NOSUID, c""),
    )?;

    let mut stdout = std::io::stdout();
    ctx(
        || "reporting readiness".into(),
        stdout.write_all(b"ready\n").and_then(|()| stdout.flush()),
    )?;
    let null = ctx(|| "opening /dev/null".into(), fs::File::open("/dev/null"))?;
    errno(
        || "closing the readiness pipe".into(),
        rustix::stdio::dup2_stdout(&null),
    )?;
    Ok(())
}

/// Mounts the sandbox's ext4 image (util-linux `mount -o loop`) and makes
/// its `workspace/` and `tmp/`, owned by the sandbox's user.
fn mount_disk(image: &Path, at: &Path, owner: Option<u32>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let status = Command::new("mount")
        .arg("-o")
        .arg("loop,nosuid,nodev")
        .arg(image)
        .arg(at)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running mount for the disk image: {e}"))?;
    if !status.success() {
        return Err(format!(
            "mounting the disk image {} failed ({status})",
            image.display()
        ));
    }
    for (name, mode) in [("workspace", 0o755), ("tmp", 0o1777)] {
        let dir = at.join(name);
        ctx(
            || format!("creating {}", dir.display()),
            fs::create_dir(&dir),
        )?;
        ctx(
            || format!("chown {}", dir.display()),
            std::os::unix::fs::chown(&dir, owner, owner),
        )?;
        ctx(
            || format!("chmod {}", dir.display()),
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)),
        )?;
    }
    Ok(at.to_owned())
}

/// Brings up `lo` in the new network namespace, with iproute2 from the host
/// (still visible at this point). Without it the sandbox has no network at
/// all, which is safe, so a failure is reported and not fatal.
fn loopback_up() {
    let status = Command::new("ip")
        .args(["link", "set", "dev", "lo", "up"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("warning: `ip link set dev lo up` failed ({s}); no loopback"),
        Err(e) => eprintln!("warning: cannot run `ip` ({e}); no loopback"),
    }
}

/// Read-only binds of each top-level entry of the image into `root`.
/// Symlinks (`/bin -> usr/bin`) are recreated as symlinks.
fn bind_image(image: &Path, root: &Path, rootless: bool) -> Result<(), String> {
    let entries = ctx(
        || format!("reading image {}", image.display()),
        fs::read_dir(image),
    )?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if NOT_FROM_IMAGE.iter().any(|n| name == *n) {
            continue;
        }
        let from = entry.path();
        let at = root.join(&name);
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_symlink() {
            if let Ok(target) = fs::read_link(&from) {
                ctx(
                    || format!("linking {}", at.display()),
                    std::os::unix::fs::symlink(target, &at),
                )?;
            }
            continue;
        }
        if kind.is_dir() {
            ctx(|| format!("creating {}", at.display()), fs::create_dir(&at))?;
        } else if kind.is_file() {
            ctx(
                || format!("creating {}", at.display()),
                fs::File::create(&at),
            )?;
        } else {
            continue;
        }
        // In a user namespace (rootless daemon) a mount with mounts below
        // it can only be bound with them (the kernel locks them together).
        let bind = if rootless {
            rustix::mount::mount_bind_recursive(&from, &at)
        } else {
            rustix::mount::mount_bind(&from, &at)
        };
        errno(|| format!("binding {}", from.display()), bind)?;
        read_only(&at)?;
    }
    Ok(())
}

/// Remounts a bind mount read-only, nosuid and nodev, keeping the flags it
/// already has: in a user namespace, flags inherited from the host mount
/// (noexec, the atime ones) are locked, and dropping one is refused.
fn read_only(at: &Path) -> Result<(), String> {
    use rustix::fs::StatVfsMountFlags as S;
    let have = errno(
        || format!("statvfs {}", at.display()),
        rustix::fs::statvfs(at),
    )?
    .f_flag;
    let mut flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
    for (st, ms) in [
        (S::NOEXEC, MountFlags::NOEXEC),
        (S::NOATIME, MountFlags::NOATIME),
        (S::NODIRATIME, MountFlags::NODIRATIME),
        (S::RELATIME, MountFlags::RELATIME),
    ] {
        if have.contains(st) {
            flags |= ms;
        }
    }
    errno(
        || format!("making {} read-only", at.display()),
        rustix::mount::mount_remount(at, flags, c""),
    )
}

fn build_dev(root: &Path) -> Result<(), String> {
    let dev = root.join("dev");
    ctx(|| "creating /dev".into(), fs::create_dir(&dev))?;
    errno(
        || "mounting /dev".into(),
        rustix::mount::mount(
            "tmpfs",
            &dev,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some(c"mode=0755,size=64k"),
        ),
    )?;
    for name in DEVICES {
        let from = Path::new("/dev").join(name);
        if !from.exists() {
            continue;
        }
        let at = dev.join(name);
        ctx(
            || format!("creating {}", at.display()),
            fs::File::create(&at),
        )?;
        errno(
            || format!("binding {}", from.display()),
            rustix::mount::mount_bind(&from, &at),
        )?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(
            || format!("linking /dev/{name}"),
            std::os::unix::fs::symlink(target, dev.join(name)),
        )?;
    }
    let shm = dev.join("shm");
    ctx(|| "creating /dev/shm".into(), fs::create_dir(&shm))?;
    errno(
        || "mounting /dev/shm".into(),
        rustix::mount::mount(
            "tmpfs",
            &shm,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            Some(c"mode=1777,size=16m"),
        ),
    )?;
    Ok(())
}

/// PID 1's job: reap every orphan that is re-parented to it, forever.
/// Orphans arrive at any time (every exec's leftovers are killed and end
/// up here), so it blocks on SIGCHLD and reaps all it can on each one; a
/// killed exec's processes stop counting against the sandbox's process
/// limit as soon as they are reaped.
fn reap_forever() -> ! {
    use rustix::process::WaitOptions;
    let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGCHLD]) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: cannot watch SIGCHLD ({e}); reaping once a second");
            None
        }
    };
    loop {
        while let Ok(Some(_)) = rustix::process::wait(WaitOptions::NOHANG) {}
        match signals.as_mut() {
            Some(s) => {
                let _ = s.wait().count();
            }
            None => std::thread::sleep(std::time::Duration::from_secs(1)),
        }
    }
}
