//! The mounts `sandbox-init` builds the sandbox's root from: the image's
//! read-only binds, the writable tmpfs or disk, the minimal /dev, the /proc
//! masks, and the final read-only remount; and the loopback interface.

use super::*;

/// Entries of /proc that describe the host's kernel and hardware, or
/// reach it (as Docker's masked paths): hidden under /dev/null (files) or
/// an empty tmpfs (directories).
pub(super) const PROC_MASKS: &[&str] = &[
    "config.gz",
    "kcore",
    "kallsyms",
    "keys",
    "key-users",
    "kmsg",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "sysrq-trigger",
    "vmallocinfo",
    "slabinfo",
    "pagetypeinfo",
    "zoneinfo",
    "acpi",
    "asound",
    "scsi",
    "irq",
    "bus",
    "fs",
];

pub(super) fn mask_proc(proc_dir: &Path) -> Result<(), String> {
    for name in PROC_MASKS {
        let at = proc_dir.join(name);
        let Ok(meta) = fs::symlink_metadata(&at) else {
            continue;
        };
        let result = if meta.is_dir() {
            rustix::mount::mount(
                "tmpfs",
                &at,
                "tmpfs",
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                Some(c"size=4k,mode=0555"),
            )
        } else {
            rustix::mount::mount_bind("/dev/null", &at).and_then(|()| {
                rustix::mount::mount_remount(
                    &at,
                    MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID,
                    c"",
                )
            })
        };
        errno(|| format!("masking /proc/{name}"), result)?;
    }
    let sys = proc_dir.join("sys");
    if sys.is_dir() {
        errno(
            || "binding /proc/sys".into(),
            rustix::mount::mount_bind(&sys, &sys),
        )?;
        errno(
            || "making /proc/sys read-only".into(),
            rustix::mount::mount_remount(
                &sys,
                MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                c"",
            ),
        )?;
    }
    Ok(())
}

/// Mounts the tmpfs that holds `/workspace` and `/tmp` when there is no
/// disk image: its size and inode count are the sandbox's disk limit.
pub(super) fn mount_tmpfs(at: &Path, mb: u64, inodes: u64) -> Result<(), String> {
    let options = std::ffi::CString::new(format!("size={mb}m,nr_inodes={inodes},mode=0755"))
        .map_err(|e| e.to_string())?;
    errno(
        || format!("mounting the sandbox's tmpfs on {}", at.display()),
        rustix::mount::mount(
            "tmpfs",
            at,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(options.as_c_str()),
        ),
    )
}

/// Mounts the sandbox's ext4 image (util-linux `mount -o loop`).
pub(super) fn mount_disk(image: &Path, at: &Path) -> Result<(), String> {
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
    Ok(())
}

/// `workspace/` and `tmp/` on the sandbox's tmpfs or disk, owned by the
/// sandbox's root.
pub(super) fn make_writable_dirs(at: &Path, owner: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for (name, mode) in [("workspace", 0o755), ("tmp", 0o1777)] {
        let dir = at.join(name);
        ctx(
            || format!("creating {}", dir.display()),
            fs::create_dir(&dir),
        )?;
        ctx(
            || format!("chown {}", dir.display()),
            std::os::unix::fs::chown(&dir, Some(owner), Some(owner)),
        )?;
        ctx(
            || format!("chmod {}", dir.display()),
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)),
        )?;
    }
    Ok(())
}

/// Brings up `lo` in the new network namespace, with iproute2 from the host
/// (still visible at this point). Without it the sandbox has no network at
/// all, which is safe, so a failure is reported and not fatal.
pub(super) fn loopback_up() {
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
pub(super) fn bind_image(image: &Path, root: &Path, rootless: bool) -> Result<(), String> {
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
pub(super) fn read_only(at: &Path) -> Result<(), String> {
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

pub(super) fn build_dev(root: &Path) -> Result<(), String> {
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
