#![allow(unsafe_code)]
//! The last layers between a sandbox process and the kernel: everything a
//! process of a sandbox gives up before it runs a byte of the sandbox's
//! code, in the order bubblewrap uses.
//!
//! 1. The bounding set is emptied (needs `CAP_SETPCAP`, so first).
//! 2. Securebits are set and locked: `NO_ROOT` (uid 0 gains nothing at
//!    `execve`), `NO_SETUID_FIXUP`, `KEEP_CAPS` locked off. Sandbox root is
//!    then root by number only.
//! 3. The ambient, inheritable, permitted and effective sets are cleared.
//! 4. `PR_SET_NO_NEW_PRIVS`: no setuid bit or file capability can give any
//!    of it back.
//! 5. A seccomp-bpf allowlist ([`super::seccomp`]), architecture checked, installed
//!    last (it denies `capset` to nothing, but the prctl calls above come
//!    before it so that a future tightening cannot break the order).
//!
//! Who calls it: the exec helper for its command, between `fork` and
//! `execve` ([`confine_command`]), and the file helper for itself before a
//! file operation ([`confine_self`]). The sandbox's init never runs sandbox
//! code.
//!
//! This is the only module with `unsafe`: `Command::pre_exec` and the
//! `unshare(2)` of the init, the `seccomp(2)` call. Each block says why it
//! is sound.

use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::thread::{CapabilitiesSecureBits, CapabilitySet, CapabilitySets};

/// What a sandbox process gives up, prepared before any fork so that
/// applying it allocates nothing: the seccomp program (see
/// [`super::seccomp`]) and the kernel's highest capability number.
pub struct Filter {
    program: Vec<libc::sock_filter>,
    last_cap: u32,
}

impl Filter {
    pub fn new() -> Result<Filter, String> {
        Ok(Filter {
            program: super::seccomp::program()?,
            last_cap: last_capability(),
        })
    }

    /// `seccomp(SECCOMP_SET_MODE_FILTER)`: needs `no_new_privs` (or
    /// `CAP_SYS_ADMIN`) first. Makes one system call, so it may run
    /// between `fork` and `execve`.
    fn install(&self) -> Result<(), rustix::io::Errno> {
        let program = libc::sock_fprog {
            len: u16::try_from(self.program.len()).map_err(|_| rustix::io::Errno::INVAL)?,
            filter: self.program.as_ptr().cast_mut(),
        };
        // SAFETY: `program` points at `self.program`, alive and unchanged
        // for the call; the kernel copies the instructions and does not
        // write through the pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &program as *const libc::sock_fprog,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(rustix::io::Errno::from_raw_os_error(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL),
            ))
        }
    }
}

/// The highest capability number the running kernel knows
/// (`/proc/sys/kernel/cap_last_cap`); 63 when it cannot be read, as
/// dropping an unknown one only fails with `EINVAL`, which is ignored.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u32| n < 64)
        .unwrap_or(63)
}

/// Steps 1 to 4 of the module doc. Makes only system calls (no
/// allocation), so it may run between `fork` and `execve`.
fn drop_privileges(last_cap: u32) -> Result<(), rustix::io::Errno> {
    for cap in 0..=last_cap {
        match rustix::thread::remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(
            1 << cap,
        )) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e),
        }
    }
    rustix::thread::set_capabilities_secure_bits(
        CapabilitiesSecureBits::NO_ROOT
            | CapabilitiesSecureBits::NO_ROOT_LOCKED
            | CapabilitiesSecureBits::NO_SETUID_FIXUP
            | CapabilitiesSecureBits::NO_SETUID_FIXUP_LOCKED
            | CapabilitiesSecureBits::KEEP_CAPS_LOCKED,
    )?;
    rustix::thread::clear_ambient_capability_set()?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )?;
    rustix::thread::set_no_new_privs(true)?;
    Ok(())
}

/// Confines this process (the file helper) for good.
pub fn confine_self(filter: &Filter) -> Result<(), String> {
    drop_privileges(filter.last_cap).map_err(|e| format!("dropping privileges: {e}"))?;
    filter
        .install()
        .map_err(|e| format!("installing the seccomp filter: {e}"))
}

/// How the command of an exec starts.
pub struct Launch<'a> {
    pub filter: &'a Filter,
    /// CPUs to pin the command to (empty: all).
    pub cpus: Option<rustix::thread::CpuSet>,
    /// Detached: a new session whose leader's parent is inside the
    /// sandbox, so it is the sandbox init's to reap once its parent is
    /// gone (see [`confine_command`]).
    pub background: bool,
}

/// Makes `command` confine itself between `fork` and `execve`: pinning,
/// then the privilege drop, then the filter (the filter denies
/// `sched_setaffinity`, so the pinning comes first).
///
/// With `background`, the forked child forks once more and exits; the
/// grandchild calls `setsid` and becomes the command. Its parent (the
/// child) lived in the sandbox's PID namespace, so the orphaned command
/// is re-parented to the sandbox's init, never to the host's; the helper
/// reaps the child at once and the exec returns while the command runs on.
/// std's exec-error pipe is inherited by both and closed by the command's
/// successful `execve`, so a command that cannot start is still reported.
pub fn confine_command(command: &mut Command, launch: Launch<'_>) {
    let Launch {
        filter,
        cpus,
        background,
    } = launch;
    let filter = Filter {
        program: filter.program.clone(),
        last_cap: filter.last_cap,
    };
    let hook = move || -> std::io::Result<()> {
        let fail = |e: rustix::io::Errno| std::io::Error::from_raw_os_error(e.raw_os_error());
        if background {
            // SAFETY: we are in the child of std's fork of a
            // single-threaded helper, before execve; fork here duplicates
            // only this thread, and the parent of the new child calls only
            // `_exit`, which is async-signal-safe. No lock or allocation is
            // touched between the fork and the exec.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if pid > 0 {
                // SAFETY: `_exit` ends this intermediate process without
                // running atexit handlers or flushing std's buffers, which
                // belong to the helper.
                unsafe { libc::_exit(0) };
            }
            rustix::process::setsid().map_err(fail)?;
        }
        if let Some(set) = &cpus {
            rustix::thread::sched_setaffinity(None, set).map_err(fail)?;
        }
        drop_privileges(filter.last_cap).map_err(fail)?;
        filter.install().map_err(fail)
    };
    // SAFETY: the hook runs between fork and execve in the child of a
    // single-threaded process. It makes system calls only (rustix wrappers
    // and the seccomp call, which reads the program cloned above, before
    // the fork) and allocates nothing; std's documented
    // pre_exec contract is met.
    unsafe {
        command.pre_exec(hook);
    }
}

/// `unshare(CLONE_NEWUSER | CLONE_NEWNS)` for the sandbox's init: a user
/// namespace whose root owns nothing on the host, and a copy of the mount
/// namespace owned by it, in which every mount made so far is locked.
pub fn enter_new_user_namespace() -> Result<(), String> {
    // SAFETY: rustix marks unshare unsafe because CLONE_FILES would split
    // the fd table between threads; neither flag here touches the fd table,
    // and the init is single-threaded when it calls this.
    unsafe {
        rustix::thread::unshare_unsafe(
            rustix::thread::UnshareFlags::NEWUSER | rustix::thread::UnshareFlags::NEWNS,
        )
    }
    .map_err(|e| format!("creating the sandbox's user namespace: {e}"))
}

/// The user namespace that owns the sandbox's own one (`NS_GET_PARENT` on
/// `/proc/<init>/ns/user`): for a rootless daemon, the namespace its
/// `unshare --user` made, which owns the sandbox's PID, network and other
/// namespaces. The helper joins it first, to have the capabilities that
/// joining those needs.
pub fn parent_user_namespace(init_pid: i32) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let own = std::fs::File::open(format!("/proc/{init_pid}/ns/user"))
        .map_err(|e| format!("opening the sandbox's user namespace: {e}"))?;
    // NS_GET_PARENT = _IO(0xb7, 0x2)
    const NS_GET_PARENT: libc::c_ulong = (0xb7 << 8) | 0x2;
    // SAFETY: an ioctl without an argument on a descriptor we own; it
    // returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(own.as_raw_fd(), NS_GET_PARENT as _) };
    if fd < 0 {
        return Err(format!(
            "finding the sandbox's outer user namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// An open file description of the host-wide uid registry holding the
/// write lock on byte `uid` (an OFD lock: it belongs to the description,
/// so it is shared by every descriptor of it, inherited across fork and
/// exec, and released when the last one closes: when the sandbox's init,
/// which keeps one, is gone).
pub struct UidLock {
    fd: std::os::fd::OwnedFd,
}

impl UidLock {
    /// Takes the lock on `uid` in `registry` (created 0600 if missing);
    /// `None` when another description (another sandbox, of this daemon
    /// or any other) holds it.
    pub fn take(registry: &std::path::Path, uid: u32) -> Result<Option<UidLock>, String> {
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(registry)
            .map_err(|e| format!("opening the uid registry {}: {e}", registry.display()))?;
        match lock_byte(file.as_raw_fd(), uid) {
            Ok(()) => Ok(Some(UidLock {
                fd: OwnedFd::from(file),
            })),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(None),
            Err(e) => Err(format!("locking uid {uid} in {}: {e}", registry.display())),
        }
    }

    /// The descriptor's number, for the init's `--uid-lock-fd`.
    pub fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// Lets `command`'s process inherit the lock: its copy of the
    /// descriptor loses close-on-exec between fork and exec.
    pub fn pass_to(&self, command: &mut Command) {
        let fd = self.raw_fd();
        let hook = move || -> std::io::Result<()> {
            // SAFETY: the descriptor is owned by the parent's UidLock,
            // alive for the whole spawn; this child only clears a flag
            // on its copy, with one system call.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::empty())
                .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
        };
        // SAFETY: the hook runs between fork and execve and makes one
        // system call; it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(hook);
        }
    }

    /// The init's side: keeps the inherited descriptor `fd` (checked to
    /// be the registry's, holding `uid`'s lock) for the init's lifetime.
    pub fn adopt(fd: i32, uid: u32) -> Result<UidLock, String> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: a number is only trusted after fcntl says it is open;
        // nothing else in this process owns or closes it.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("--uid-lock-fd {fd} is not open"));
        }
        // SAFETY: checked open above; from here the init owns it.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // Re-taking a lock this description holds succeeds, and so does
        // taking a free one; one that another description holds fails.
        // Either way, from here this description holds it.
        lock_byte(owned.as_raw_fd(), uid)
            .map_err(|e| format!("uid {uid} is not locked by this sandbox: {e}"))?;
        Ok(UidLock { fd: owned })
    }
}

/// `F_OFD_SETLK`: a write lock on byte `uid` of `fd`'s file, without
/// waiting.
fn lock_byte(fd: std::os::fd::RawFd, uid: u32) -> std::io::Result<()> {
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: libc::off_t::from(uid),
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads the flock struct we own for the call; an
    // fd that is not open fails EBADF.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut lock) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Marks every inherited file descriptor above stderr close-on-exec, so
/// that nothing the daemon (or the daemon's own parent) left open reaches
/// a sandbox process: one `close_range(CLOSE_RANGE_CLOEXEC)` (Linux 5.11),
/// or, on an older kernel, each descriptor `/proc/self/fd` lists (so call
/// it while the host's, or any, procfs is mounted).
pub fn close_inherited_fds() -> Result<(), String> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
    // sets a flag on descriptors this process owns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let entries = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("listing /proc/self/fd: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&fd| fd > 2)
        .collect::<Vec<_>>();
    for fd in entries {
        // SAFETY: the fd is only borrowed for one fcntl; a number from the
        // listing that was the listing's own (now closed) fd fails EBADF,
        // which is ignored.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        match rustix::io::fcntl_getfd(borrowed) {
            Ok(flags) => {
                rustix::io::fcntl_setfd(borrowed, flags | rustix::io::FdFlags::CLOEXEC)
                    .map_err(|e| format!("marking fd {fd} close-on-exec: {e}"))?;
            }
            Err(rustix::io::Errno::BADF) => {}
            Err(e) => return Err(format!("fd {fd}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_for_this_architecture() {
        let filter = Filter::new().unwrap();
        assert!(
            !filter.program.is_empty() && filter.program.len() < 4096,
            "BPF programs are limited to 4096 instructions"
        );
    }
}
