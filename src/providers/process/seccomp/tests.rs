//! Unit tests of `seccomp`.

use super::*;

/// What the kernel would see: the fields of `struct seccomp_data`.
#[derive(Clone, Copy, Debug)]
struct Call {
    arch: u32,
    nr: u32,
    args: [u64; 6],
}

impl Call {
    fn new(nr: u32) -> Call {
        Call {
            arch: audit_arch().unwrap(),
            nr,
            args: [0; 6],
        }
    }

    fn arg(mut self, i: usize, v: u64) -> Call {
        self.args[i] = v;
        self
    }

    fn word(&self, offset: u32) -> u32 {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend(self.nr.to_ne_bytes());
        bytes.extend(self.arch.to_ne_bytes());
        bytes.extend(0u64.to_ne_bytes());
        for a in self.args {
            bytes.extend(a.to_ne_bytes());
        }
        let o = offset as usize;
        u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap())
    }
}

/// Runs a classic BPF program the way the kernel's seccomp does, for
/// the instructions seccomp programs use; panics on anything else
/// (a jump out of the program, no return). Returns the program's
/// answer and how many instructions it ran.
fn trace(program: &[libc::sock_filter], call: &Call) -> (u32, usize) {
    let mut acc = 0u32;
    let mut pc = 0usize;
    for steps in 1..=program.len() {
        let i = program[pc];
        pc += 1;
        let taken = |cond: bool| if cond { i.jt } else { i.jf } as usize;
        match i.code {
            LD_W_ABS => acc = call.word(i.k),
            JMP_JA => pc += i.k as usize,
            JMP_JEQ_K => pc += taken(acc == i.k),
            JMP_JGE_K => pc += taken(acc >= i.k),
            JMP_JSET_K => pc += taken(acc & i.k != 0),
            // seccompiler's programs also use these.
            JMP_JGT_K => pc += taken(acc > i.k),
            ALU_AND_K => acc &= i.k,
            RET_K => return (i.k, steps),
            other => panic!("unexpected instruction {other:#x}"),
        }
        assert!(pc < program.len(), "jump out of the program");
    }
    panic!("the program did not return");
}

fn run(program: &[libc::sock_filter], call: &Call) -> u32 {
    trace(program, call).0
}

const JMP_JGT_K: u16 = 0x05 | 0x20;
const ALU_AND_K: u16 = 0x04 | 0x50;

fn errno(e: i32) -> u32 {
    RET_ERRNO | e as u32
}

/// What the policy tables say, written plainly.
fn expected(call: &Call) -> u32 {
    let nr = i64::from(call.nr);
    let low = |i: usize| call.args[i] as u32;
    if call.arch != audit_arch().unwrap() {
        RET_KILL_PROCESS
    } else if ALLOWED.contains(&nr) || ALLOWED_LEGACY.contains(&nr) {
        RET_ALLOW
    } else if nr == libc::SYS_clone {
        if low(0) & CLONE_NAMESPACES == 0 {
            RET_ALLOW
        } else {
            errno(libc::EPERM)
        }
    } else if nr == libc::SYS_ioctl {
        if DENIED_IOCTLS.contains(&low(1)) {
            errno(libc::EPERM)
        } else {
            RET_ALLOW
        }
    } else if nr == libc::SYS_personality {
        if PERSONALITIES.contains(&low(0)) {
            RET_ALLOW
        } else {
            errno(libc::EPERM)
        }
    } else if nr == libc::SYS_clone3 {
        errno(libc::ENOSYS)
    } else {
        errno(libc::EPERM)
    }
}

/// Every number a test tries: all of the architecture's range and
/// beyond, the x32 range's start, and the far end.
fn numbers() -> impl Iterator<Item = u32> {
    (0..2048).chain([
        X32_SYSCALL_BIT,
        X32_SYSCALL_BIT | libc::SYS_read as u32,
        X32_SYSCALL_BIT | libc::SYS_mount as u32,
        u32::MAX - 1,
        u32::MAX,
    ])
}

/// Argument values worth trying: zero, every single bit, the
/// policy's own values, and each with high bits set.
fn values() -> Vec<u64> {
    let mut v: Vec<u64> = vec![0, u64::MAX, 0x1_0000_0000];
    v.extend((0..64).map(|b| 1u64 << b));
    for &x in DENIED_IOCTLS.iter().chain(PERSONALITIES) {
        v.extend([
            u64::from(x),
            u64::from(x) | 0xffff_ffff_0000_0000,
            u64::from(x) + 1,
        ]);
    }
    v.extend([
        u64::from(CLONE_NAMESPACES),
        (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::SIGCHLD) as u64,
        (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64,
    ]);
    v
}

/// Every call a test tries: each number with zero arguments, and the
/// three calls with argument rules with each value in each argument.
fn calls() -> Vec<Call> {
    let mut out: Vec<Call> = numbers().map(Call::new).collect();
    for nr in [libc::SYS_clone, libc::SYS_ioctl, libc::SYS_personality] {
        for arg in 0..6 {
            out.extend(
                values()
                    .into_iter()
                    .map(|v| Call::new(nr as u32).arg(arg, v)),
            );
        }
    }
    out
}

#[test]
fn the_program_decides_every_call_as_the_policy_says() {
    let program = program().unwrap();
    for call in calls() {
        assert_eq!(run(&program, &call), expected(&call), "{call:?}");
    }
}

#[test]
fn another_architecture_is_killed() {
    let program = program().unwrap();
    for arch in [0x4000_0003u32, 0xC000_0028, 0, u32::MAX] {
        let call = Call {
            arch,
            ..Call::new(libc::SYS_read as u32)
        };
        assert_eq!(run(&program, &call), RET_KILL_PROCESS, "arch {arch:#x}");
    }
}

#[test]
fn the_program_is_a_short_search() {
    let program = program().unwrap();
    assert!(program.len() < 1000, "{} instructions", program.len());
    let longest = numbers()
        .map(|nr| trace(&program, &Call::new(nr)).1)
        .max()
        .unwrap();
    assert!(longest <= 24, "a call runs up to {longest} instructions");
}

/// The same policy through seccompiler (the compiler used before):
/// both programs give the same answer for every call tried.
#[test]
fn the_program_agrees_with_seccompiler() {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
        SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
    };
    use std::collections::BTreeMap;
    let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
    let cond = |arg, len, op, v| Cond::new(arg, len, op, v).unwrap();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(ALLOWED_LEGACY)
        .map(|&nr| (nr, vec![]))
        .collect();
    rules.insert(
        libc::SYS_clone,
        vec![
            SeccompRule::new(vec![cond(
                0,
                Len::Dword,
                Op::MaskedEq(u64::from(CLONE_NAMESPACES)),
                0,
            )])
            .unwrap(),
        ],
    );
    rules.insert(
        libc::SYS_ioctl,
        vec![
            SeccompRule::new(
                DENIED_IOCTLS
                    .iter()
                    .map(|&r| cond(1, Len::Dword, Op::Ne, u64::from(r)))
                    .collect(),
            )
            .unwrap(),
        ],
    );
    rules.insert(
        libc::SYS_personality,
        PERSONALITIES
            .iter()
            .map(|&p| SeccompRule::new(vec![cond(0, Len::Dword, Op::Eq, u64::from(p))]).unwrap())
            .collect(),
    );
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let allowlist: BpfProgram = SeccompFilter::new(rules, eperm, SeccompAction::Allow, arch)
        .unwrap()
        .try_into()
        .unwrap();
    let clone3: BpfProgram = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .unwrap()
    .try_into()
    .unwrap();
    let to_libc = |p: &BpfProgram| -> Vec<libc::sock_filter> {
        p.iter().map(|i| jump(i.code, i.k, i.jt, i.jf)).collect()
    };
    let (allowlist, clone3) = (to_libc(&allowlist), to_libc(&clone3));
    // The kernel runs the newest program first and keeps the first of
    // the strictest actions (errno data does not break a tie).
    let both = |call: &Call| {
        let newest = run(&clone3, call);
        let oldest = run(&allowlist, call);
        if oldest & 0xffff_0000 < newest & 0xffff_0000 {
            oldest
        } else {
            newest
        }
    };
    let ours = program().unwrap();
    // seccompiler's program knows nothing of x32; compare below it.
    for call in calls().into_iter().filter(|c| c.nr < X32_SYSCALL_BIT) {
        assert_eq!(run(&ours, &call), both(&call), "{call:?}");
    }
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
