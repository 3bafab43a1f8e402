//! The sandbox's seccomp-bpf program: which system calls a sandbox
//! process may make, and the classic BPF that decides it.
//!
//! The policy is an allowlist ([`ALLOWED`], [`ALLOWED_LEGACY`]) plus three
//! calls decided on an argument (`clone`'s namespace flags, `ioctl`'s
//! terminal requests, `personality`'s value); everything else fails with
//! `EPERM`, except `clone3`, which fails with `ENOSYS` so that libc falls
//! back to `clone`, whose flags a filter can see (clone3 passes them in
//! memory, out of a filter's reach). A program for another architecture,
//! or an x32 call, is killed or refused before any of that.
//!
//! Why not a filter compiler's linear chain: the kernel runs the program
//! on every system call of the sandbox and builds it (checks, converts and
//! JIT-compiles it) on every `exec`. seccompiler emits one comparison per
//! allowed call in a row, about 1,300 instructions for this policy:
//! installing it took 0.8-1.0 ms of each exec's 5-7 ms here, and a call
//! near the end of the row ran ~500 instructions. The program built here
//! merges neighbouring numbers with the same verdict into ranges and
//! searches the ranges as a balanced tree: a handful of comparisons per
//! call, a program a fraction of the size. The builder is checked against
//! the policy tables by an interpreter in the tests, for every system call
//! number and the interesting argument values, and against seccompiler's
//! program for the same policy.
//!
//! Only the program is built here (safe code); [`super::confine`] installs it.

/// Namespace flags `clone(2)` may not carry from inside a sandbox. Not
/// `CLONE_NEWTIME` (0x80): in `clone(2)` that bit is part of the exit
/// signal, and a time namespace can only be made with `unshare`/`clone3`,
/// both denied.
const CLONE_NAMESPACES: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

/// `ioctl` requests that reach outside the sandbox through a terminal:
/// `TIOCSTI` pushes input into the terminal's queue, `TIOCLINUX` does
/// similar things on a virtual console.
const DENIED_IOCTLS: &[u32] = &[0x5412, 0x541C];

/// The only `personality(2)` values allowed (as Docker's default profile):
/// the default, `PER_LINUX32`, `UNAME26`, both, and the query.
const PERSONALITIES: &[u32] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

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

/// What the program answers for one system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Errno(u16),
}

/// How one system call number is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Always(Verdict),
    /// `EPERM` when the low 32 bits of argument `arg` have any bit of `mask`.
    DenyAnyBit {
        arg: u8,
        mask: u32,
    },
    /// `EPERM` when the low 32 bits of argument `arg` equal one of these.
    DenyValues {
        arg: u8,
        values: &'static [u32],
    },
    /// Allowed only when the low 32 bits of argument `arg` equal one of these.
    AllowValues {
        arg: u8,
        values: &'static [u32],
    },
}

const DENY: Verdict = Verdict::Errno(libc::EPERM as u16);

/// The decision for every listed call; unlisted ones get `EPERM`. Each
/// argument rule reads the low 32 bits only, as the kernel does: `clone`
/// takes its flags from `lower_32_bits(clone_flags)`, `ioctl`'s request and
/// `personality`'s value are `unsigned int`s (a 64-bit comparison would
/// let `0x1_0000_5412` through as `TIOCSTI`).
fn policy() -> Vec<(u32, Decision)> {
    let mut calls: Vec<(u32, Decision)> = ALLOWED
        .iter()
        .chain(ALLOWED_LEGACY)
        .map(|&nr| (nr as u32, Decision::Always(Verdict::Allow)))
        .collect();
    calls.push((
        libc::SYS_clone as u32,
        Decision::DenyAnyBit {
            arg: 0,
            mask: CLONE_NAMESPACES,
        },
    ));
    calls.push((
        libc::SYS_ioctl as u32,
        Decision::DenyValues {
            arg: 1,
            values: DENIED_IOCTLS,
        },
    ));
    calls.push((
        libc::SYS_personality as u32,
        Decision::AllowValues {
            arg: 0,
            values: PERSONALITIES,
        },
    ));
    calls.push((
        libc::SYS_clone3 as u32,
        Decision::Always(Verdict::Errno(libc::ENOSYS as u16)),
    ));
    calls.sort_by_key(|&(nr, _)| nr);
    calls
}

// Classic BPF, as <linux/bpf_common.h> encodes it: class | size/op | mode/source.
const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;
const LD_W_ABS: u16 = BPF_LD | BPF_W | BPF_ABS;
const JMP_JA: u16 = BPF_JMP;
const JMP_JEQ_K: u16 = BPF_JMP | 0x10 | BPF_K;
const JMP_JGE_K: u16 = BPF_JMP | 0x30 | BPF_K;
const JMP_JSET_K: u16 = BPF_JMP | 0x40 | BPF_K;
const RET_K: u16 = BPF_RET | BPF_K;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
/// The kernel's limit on a program's length.
const MAX_INSNS: usize = 4096;

// struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64),
// args[6] (u64 each).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const fn data_arg_low(arg: u8) -> u32 {
    let offset = 16 + 8 * arg as u32;
    if cfg!(target_endian = "little") {
        offset
    } else {
        offset + 4
    }
}

/// `AUDIT_ARCH_*` of the architecture this daemon was built for: the
/// only one its sandboxes may call the kernel as.
fn audit_arch() -> Result<u32, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(0xC000_003E),
        "aarch64" => Ok(0xC000_00B7),
        "riscv64" => Ok(0xC000_00F3),
        other => Err(format!("seccomp: unsupported architecture {other}")),
    }
}

/// On x86_64, numbers with this bit are the x32 ABI's calls.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn ret(verdict: Verdict) -> libc::sock_filter {
    stmt(
        RET_K,
        match verdict {
            Verdict::Allow => RET_ALLOW,
            Verdict::Errno(e) => RET_ERRNO | u32::from(e),
        },
    )
}

/// A jump offset of a conditional jump (8 bits in classic BPF).
fn short(n: usize) -> u8 {
    u8::try_from(n).expect("argument rules have fewer than 255 values")
}

/// The code of one decision; it always ends in a return.
fn decide(decision: Decision) -> Vec<libc::sock_filter> {
    match decision {
        Decision::Always(v) => vec![ret(v)],
        Decision::DenyAnyBit { arg, mask } => vec![
            stmt(LD_W_ABS, data_arg_low(arg)),
            jump(JMP_JSET_K, mask, 0, 1),
            ret(DENY),
            ret(Verdict::Allow),
        ],
        Decision::DenyValues { arg, values } | Decision::AllowValues { arg, values } => {
            let (on_match, otherwise) = match decision {
                Decision::DenyValues { .. } => (DENY, Verdict::Allow),
                _ => (Verdict::Allow, DENY),
            };
            let n = values.len();
            let mut code = vec![stmt(LD_W_ABS, data_arg_low(arg))];
            // From the i-th comparison, the on-match return is n - i ahead.
            code.extend(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| jump(JMP_JEQ_K, v, short(n - i), 0)),
            );
            code.push(ret(otherwise));
            code.push(ret(on_match));
            code
        }
    }
}

/// Consecutive numbers `first..` with one decision, up to the next range.
#[derive(Debug, Clone, Copy)]
struct Range {
    first: u32,
    decision: Decision,
}

/// The whole u32 number space as ranges, neighbours with the same
/// decision merged; gaps are denied.
fn ranges(calls: &[(u32, Decision)]) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    let mut push = |first: u32, decision: Decision| match out.last() {
        Some(last) if last.decision == decision && !has_args(decision) => {}
        _ => out.push(Range { first, decision }),
    };
    let mut next = 0u32;
    for &(nr, decision) in calls {
        if nr > next {
            push(next, Decision::Always(DENY));
        }
        push(nr, decision);
        next = nr + 1;
    }
    push(next, Decision::Always(DENY));
    out
}

fn has_args(decision: Decision) -> bool {
    !matches!(decision, Decision::Always(_))
}

/// A balanced search over `ranges` (the syscall number is in the
/// accumulator); every path ends in a return.
fn search(ranges: &[Range]) -> Vec<libc::sock_filter> {
    if let [only] = ranges {
        return decide(only.decision);
    }
    let mid = ranges.len() / 2;
    let low = search(&ranges[..mid]);
    let high = search(&ranges[mid..]);
    let mut code = Vec::with_capacity(low.len() + high.len() + 2);
    match u8::try_from(low.len()) {
        // nr >= first of the upper half: jump over the lower half.
        Ok(skip) => code.push(jump(JMP_JGE_K, ranges[mid].first, skip, 0)),
        Err(_) => {
            code.push(jump(JMP_JGE_K, ranges[mid].first, 0, 1));
            code.push(stmt(JMP_JA, low.len() as u32));
        }
    }
    code.extend(low);
    code.extend(high);
    code
}

/// The program for this architecture.
pub fn program() -> Result<Vec<libc::sock_filter>, String> {
    let mut code = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JMP_JEQ_K, audit_arch()?, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
    ];
    if cfg!(target_arch = "x86_64") {
        code.push(jump(JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        code.push(ret(DENY));
    }
    code.extend(search(&ranges(&policy())));
    if code.len() > MAX_INSNS {
        return Err(format!(
            "seccomp: the program has {} instructions (at most {MAX_INSNS})",
            code.len()
        ));
    }
    Ok(code)
}

#[cfg(test)]
mod tests;
