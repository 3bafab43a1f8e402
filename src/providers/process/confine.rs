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
//! 5. A seccomp-bpf allowlist ([`filter`]), architecture checked, installed
//!    last (it denies `capset` to nothing, but the prctl calls above come
//!    before it so that a future tightening cannot break the order).
//!
//! Who calls it: the exec helper for its command, between `fork` and
//! `execve` ([`confine_command`]), and the file helper for itself before a
//! file operation ([`confine_self`]). The sandbox's init never runs sandbox
//! code.
//!
//! Why seccompiler: it is Firecracker's filter compiler, maintained by
//! rust-vmm, checks the architecture in the generated program and compiles
//! argument conditions; hand-assembled BPF is the classic place for an
//! off-by-one that silently allows everything.
//!
//! This is the only module with `unsafe`: `Command::pre_exec` and the
//! `unshare(2)` of the init. Each block says why it is sound.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::thread::{CapabilitiesSecureBits, CapabilitySet, CapabilitySets};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Namespace flags `clone(2)` may not carry from inside a sandbox. Not
/// `CLONE_NEWTIME` (0x80): in `clone(2)` that bit is part of the exit
/// signal, and a time namespace can only be made with `unshare`/`clone3`,
/// both denied.
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// `ioctl` requests that reach outside the sandbox through a terminal:
/// `TIOCSTI` pushes input into the terminal's queue, `TIOCLINUX` does
/// similar things on a virtual console.
const DENIED_IOCTLS: &[u64] = &[0x5412, 0x541C];

/// The only `personality(2)` values allowed (as Docker's default profile):
/// the default, `PER_LINUX32`, `UNAME26`, both, and the query.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// System calls a sandbox may make unconditionally. Everything not listed
/// here (or in the conditional rules below) fails with `EPERM`. Left out on
/// purpose, among others: `mount`, `umount2`, `pivot_root`, `chroot`,
/// `unshare`, `setns`, the new mount API (`fsopen`, `fsmount`,
/// `move_mount`, `open_tree`, ...), `keyctl`, `add_key`, `request_key`,
/// `io_uring_*`, `bpf`, `perf_event_open`, `userfaultfd`,
/// `open_by_handle_at`, `name_to_handle_at`, `kexec_*`, `init_module`,
/// `finit_module`, `delete_module`, `ptrace`, `process_vm_readv`/`writev`,
/// `kcmp`, `pidfd_getfd`, `sched_setaffinity` (the vCPU pinning stays),
/// `swapon`, `reboot`, `acct`, `syslog`, `quotactl`, the clock setters,
/// `sethostname`, `fanotify_init`, `move_pages`, `migrate_pages`,
/// `mbind`, `set_mempolicy`, `modify_ldt`, `iopl`, `ioperm`, `uselib`.
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_get_robust_list,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lgetxattr,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd4,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
];

/// The x86_64 system calls that newer architectures dropped (libc and
/// older binaries still use them).
#[cfg(target_arch = "x86_64")]
const ALLOWED_LEGACY: &[libc::c_long] = &[
    libc::SYS_access,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_creat,
    libc::SYS_dup2,
    libc::SYS_epoll_create,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd,
    libc::SYS_fork,
    libc::SYS_futimesat,
    libc::SYS_getdents,
    libc::SYS_getpgrp,
    libc::SYS_inotify_init,
    libc::SYS_lchown,
    libc::SYS_link,
    libc::SYS_lstat,
    libc::SYS_mkdir,
    libc::SYS_mknod,
    libc::SYS_open,
    libc::SYS_pause,
    libc::SYS_pipe,
    libc::SYS_poll,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_rmdir,
    libc::SYS_select,
    libc::SYS_signalfd,
    libc::SYS_stat,
    libc::SYS_symlink,
    libc::SYS_time,
    libc::SYS_unlink,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_vfork,
];

#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_LEGACY: &[libc::c_long] = &[];

fn target_arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("seccomp: unsupported architecture: {e}"))
}

fn condition(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).expect("argument index below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule with conditions")
}

/// The sandbox's seccomp programs for this architecture: the allowlist,
/// whose refusals fail with `EPERM`, and a second program that makes
/// `clone3` fail with `ENOSYS` instead, so that libc falls back to `clone`,
/// whose flags a filter can check (clone3 passes them in memory, out of a
/// filter's reach).
pub struct Filter {
    allowlist: BpfProgram,
    clone3: BpfProgram,
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    SeccompFilter::new(rules, mismatch, matched, target_arch()?)
        .and_then(BpfProgram::try_from)
        .map_err(|e| format!("seccomp: building the filter: {e}"))
}

impl Filter {
    pub fn new() -> Result<Filter, String> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for &nr in ALLOWED.iter().chain(ALLOWED_LEGACY) {
            rules.insert(nr, Vec::new());
        }
        // clone without any namespace flag (arg 0 holds the flags on every
        // supported architecture).
        rules.insert(
            libc::SYS_clone,
            vec![rule(vec![condition(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(CLONE_NAMESPACES),
                0,
            )])],
        );
        // ioctl, except the terminal injection requests (compared on the
        // low 32 bits: the kernel reads the request as an unsigned int).
        rules.insert(
            libc::SYS_ioctl,
            vec![rule(
                DENIED_IOCTLS
                    .iter()
                    .map(|&r| condition(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, r))
                    .collect(),
            )],
        );
        rules.insert(
            libc::SYS_personality,
            PERSONALITIES
                .iter()
                .map(|&p| {
                    rule(vec![condition(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        p,
                    )])
                })
                .collect(),
        );
        let allowlist = compile(
            rules,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
        )?;
        let clone3 = compile(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?;
        Ok(Filter { allowlist, clone3 })
    }

    /// Installs both programs: the allowlist first, `clone3`'s second. The
    /// kernel runs every program on each call and keeps the strictest
    /// result; between two errno results, the most recently installed
    /// program's, so `clone3` gets ENOSYS, not EPERM.
    fn install(&self) -> Result<(), rustix::io::Errno> {
        for program in [&self.allowlist, &self.clone3] {
            seccompiler::apply_filter(program).map_err(|e| match e {
                seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => {
                    rustix::io::Errno::from_io_error(&io).unwrap_or(rustix::io::Errno::PERM)
                }
                _ => rustix::io::Errno::INVAL,
            })?;
        }
        Ok(())
    }
}

/// Steps 1 to 4 of the module doc. Makes only system calls (no
/// allocation), so it may run between `fork` and `execve`.
fn drop_privileges() -> Result<(), rustix::io::Errno> {
    for cap in 0..64u32 {
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
    drop_privileges().map_err(|e| format!("dropping privileges: {e}"))?;
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
        allowlist: filter.allowlist.clone(),
        clone3: filter.clone3.clone(),
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
        drop_privileges().map_err(fail)?;
        filter.install().map_err(fail)
    };
    // SAFETY: the hook runs between fork and execve in the child of a
    // single-threaded process. It makes system calls only (rustix wrappers
    // and seccompiler's prctl/seccomp calls, which read the program cloned
    // above, before the fork) and allocates nothing; std's documented
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

/// Marks every inherited file descriptor above stderr close-on-exec, so
/// that nothing the daemon (or the daemon's own parent) left open reaches
/// a sandbox process. Reads `/proc/self/fd`, so call it while the host's
/// (or any) procfs is mounted.
pub fn close_inherited_fds() -> Result<(), String> {
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
    fn the_filter_compiles_for_this_architecture() {
        let filter = Filter::new().unwrap();
        assert!(!filter.clone3.is_empty() && !filter.allowlist.is_empty());
        assert!(
            filter.allowlist.len() < 4096,
            "BPF programs are limited to 4096 instructions"
        );
    }

    #[test]
    fn dangerous_calls_are_not_on_the_allowlist() {
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_io_uring_setup,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_open_by_handle_at,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_ptrace,
            libc::SYS_sched_setaffinity,
            libc::SYS_clone3,
            libc::SYS_fsopen,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
        ] {
            assert!(
                !ALLOWED.contains(&nr) && !ALLOWED_LEGACY.contains(&nr),
                "syscall {nr} is allowed"
            );
        }
    }
}
