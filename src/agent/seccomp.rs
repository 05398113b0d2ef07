//! The OCI seccomp profile compiled to a classic BPF program in pure Rust and installed in
//! the container's process right before `execve` (libcontainer without libseccomp would run
//! the container unfiltered, silently).
//!
//! Semantics as runc gives them with libseccomp: the first rule naming the syscall whose
//! argument conditions hold decides; otherwise the default action. Conditions of one rule
//! are ANDed; a rule that tests the same argument twice is split into one rule per condition
//! (ORed), as runc does. Arguments are compared as 64-bit values (two 32-bit halves).
//! Syscall names this architecture lacks are skipped, as runc skips them. Only x86_64 system
//! calls are filtered: any other ABI (i386 `int 0x80`, x32) kills the process, so it cannot
//! bypass the profile.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::protocol::oci::{LinuxSeccomp, LinuxSeccompArg};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGE_K: u16 = 0x35;
const ALU_AND_K: u16 = 0x54;
const RET_K: u16 = 0x06;

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg(i: u32, high: bool) -> u32 {
    16 + 8 * i + if high { 4 } else { 0 }
}

/// Why a profile cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeccompError {
    /// An action this agent does not know or cannot give.
    #[error("seccomp action {0:?} is not supported")]
    Action(String),
    /// A comparison operator it does not know.
    #[error("seccomp operator {0:?} is not supported")]
    Operator(String),
    /// An argument index beyond the six a syscall has.
    #[error("seccomp argument index {0} is out of range (0-5)")]
    Index(u64),
    /// A filter flag it does not know.
    #[error("seccomp flag {0:?} is not supported")]
    Flag(String),
    /// The program is longer than the kernel takes.
    #[error("the seccomp program has {0} instructions, over the kernel's 4096")]
    TooLong(usize),
}

/// A compiled filter: BPF instructions and `seccomp(2)` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    /// (code, jt, jf, k) for each instruction.
    pub program: Vec<(u16, u8, u8, u32)>,
    /// `SECCOMP_FILTER_FLAG_*`.
    pub flags: u32,
}

fn action(name: &str, errno: Option<u32>) -> Result<u32, SeccompError> {
    let e = errno.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS" => RET_KILL_PROCESS,
        "SCMP_ACT_TRAP" => RET_TRAP,
        "SCMP_ACT_ERRNO" => RET_ERRNO | e,
        "SCMP_ACT_TRACE" => RET_TRACE | e,
        "SCMP_ACT_LOG" => RET_LOG,
        "SCMP_ACT_ALLOW" => RET_ALLOW,
        other => return Err(SeccompError::Action(other.into())),
    })
}

fn flag(name: &str) -> Result<u32, SeccompError> {
    Ok(match name {
        "SECCOMP_FILTER_FLAG_TSYNC" => 1,
        "SECCOMP_FILTER_FLAG_LOG" => 2,
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => 4,
        other => return Err(SeccompError::Flag(other.into())),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Ne,
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
    MaskedEq,
}

fn op(name: &str) -> Result<Op, SeccompError> {
    Ok(match name {
        "SCMP_CMP_NE" => Op::Ne,
        "SCMP_CMP_LT" => Op::Lt,
        "SCMP_CMP_LE" => Op::Le,
        "SCMP_CMP_EQ" => Op::Eq,
        "SCMP_CMP_GE" => Op::Ge,
        "SCMP_CMP_GT" => Op::Gt,
        "SCMP_CMP_MASKED_EQ" => Op::MaskedEq,
        other => return Err(SeccompError::Operator(other.into())),
    })
}

/// An instruction, or a long jump to a label.
enum Insn {
    Raw(u16, u8, u8, u32),
    Ja(usize),
    Label(usize),
}

#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels += 1;
        self.labels
    }
    fn at(&mut self, l: usize) {
        self.code.push(Insn::Label(l));
    }
    fn raw(&mut self, code: u16, jt: u8, jf: u8, k: u32) {
        self.code.push(Insn::Raw(code, jt, jf, k));
    }
    fn ld(&mut self, off: u32) {
        self.raw(LD_W_ABS, 0, 0, off);
    }
    fn ret(&mut self, k: u32) {
        self.raw(RET_K, 0, 0, k);
    }
    /// Goes on when `code k` holds, else jumps to `fail`.
    fn need(&mut self, code: u16, k: u32, fail: usize) {
        self.raw(code, 1, 0, k);
        self.code.push(Insn::Ja(fail));
    }
    /// Jumps to `to` when `code k` holds, else goes on.
    fn when(&mut self, code: u16, k: u32, to: usize) {
        self.raw(code, 0, 1, k);
        self.code.push(Insn::Ja(to));
    }

    /// One 64-bit comparison of argument `a`; jumps to `fail` when it does not hold.
    fn condition(&mut self, a: &LinuxSeccompArg, op: Op, fail: usize) {
        let i = a.Index as u32;
        let (hi, lo) = ((a.Value >> 32) as u32, a.Value as u32);
        let ok = self.label();
        match op {
            Op::Eq => {
                self.ld(off_arg(i, true));
                self.need(JMP_JEQ_K, hi, fail);
                self.ld(off_arg(i, false));
                self.need(JMP_JEQ_K, lo, fail);
            }
            Op::Ne => {
                self.ld(off_arg(i, true));
                self.raw(JMP_JEQ_K, 1, 0, hi);
                self.code.push(Insn::Ja(ok));
                self.ld(off_arg(i, false));
                self.when(JMP_JEQ_K, lo, fail);
            }
            Op::Gt | Op::Ge => {
                let lo_op = if op == Op::Gt { JMP_JGT_K } else { JMP_JGE_K };
                self.ld(off_arg(i, true));
                self.when(JMP_JGT_K, hi, ok);
                self.need(JMP_JEQ_K, hi, fail);
                self.ld(off_arg(i, false));
                self.need(lo_op, lo, fail);
            }
            Op::Lt | Op::Le => {
                // Not (>= or >).
                let lo_op = if op == Op::Lt { JMP_JGE_K } else { JMP_JGT_K };
                self.ld(off_arg(i, true));
                self.when(JMP_JGT_K, hi, fail);
                self.raw(JMP_JEQ_K, 1, 0, hi);
                self.code.push(Insn::Ja(ok));
                self.ld(off_arg(i, false));
                self.when(lo_op, lo, fail);
            }
            Op::MaskedEq => {
                let (mhi, mlo) = (hi, lo);
                let (vhi, vlo) = ((a.ValueTwo >> 32) as u32, a.ValueTwo as u32);
                self.ld(off_arg(i, true));
                self.raw(ALU_AND_K, 0, 0, mhi);
                self.need(JMP_JEQ_K, vhi, fail);
                self.ld(off_arg(i, false));
                self.raw(ALU_AND_K, 0, 0, mlo);
                self.need(JMP_JEQ_K, vlo, fail);
            }
        }
        self.at(ok);
    }

    fn finish(self) -> Result<Vec<(u16, u8, u8, u32)>, SeccompError> {
        let mut pos = BTreeMap::new();
        let mut n = 0;
        for i in &self.code {
            match i {
                Insn::Label(l) => {
                    pos.insert(*l, n);
                }
                _ => n += 1,
            }
        }
        if n > 4096 {
            return Err(SeccompError::TooLong(n));
        }
        let mut out = Vec::with_capacity(n);
        for i in &self.code {
            match i {
                Insn::Label(_) => {}
                Insn::Raw(c, jt, jf, k) => out.push((*c, *jt, *jf, *k)),
                Insn::Ja(l) => {
                    let here = out.len() + 1;
                    out.push((JMP_JA, 0, 0, (pos[l] - here) as u32));
                }
            }
        }
        Ok(out)
    }
}

/// The rules of one profile entry: per syscall, the condition sets (ORed) and the action.
fn split_args(args: &[LinuxSeccompArg]) -> Vec<Vec<&LinuxSeccompArg>> {
    let mut seen = std::collections::HashSet::new();
    let repeated = args.iter().any(|a| !seen.insert(a.Index));
    if repeated {
        args.iter().map(|a| vec![a]).collect()
    } else {
        vec![args.iter().collect()]
    }
}

/// Compiles `profile` for x86_64.
pub(crate) fn compile(profile: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    let default = action(&profile.DefaultAction, None)?;
    let mut flags = 0;
    for f in &profile.Flags {
        flags |= flag(f)?;
    }
    let mut a = Asm::default();
    a.ld(OFF_ARCH);
    a.raw(JMP_JEQ_K, 1, 0, AUDIT_ARCH_X86_64);
    a.ret(RET_KILL_PROCESS);
    a.ld(OFF_NR);
    a.raw(JMP_JGE_K, 0, 1, X32_SYSCALL_BIT);
    a.ret(RET_KILL_PROCESS);
    for s in &profile.Syscalls {
        let act = action(&s.Action, s.has_errnoret().then(|| s.errnoret()))?;
        for arg in &s.Args {
            if arg.Index > 5 {
                return Err(SeccompError::Index(arg.Index));
            }
            op(&arg.Op)?;
        }
        for name in &s.Names {
            let Ok(nr) = syscalls::Sysno::from_str(name) else {
                tracing::debug!(syscall = %name, "seccomp: not an x86_64 system call, skipped");
                continue;
            };
            for conds in split_args(&s.Args) {
                let next = a.label();
                a.ld(OFF_NR);
                a.need(JMP_JEQ_K, nr.id() as u32, next);
                for c in conds {
                    a.condition(c, op(&c.Op)?, next);
                }
                a.ret(act);
                a.at(next);
            }
        }
    }
    a.ret(default);
    Ok(Filter {
        program: a.finish()?,
        flags,
    })
}

impl Filter {
    /// Installs the filter on the calling thread (and its future children). Needs
    /// `no_new_privs` or CAP_SYS_ADMIN.
    pub(crate) fn install(&self) -> std::io::Result<()> {
        let mut insns: Vec<libc::sock_filter> = self
            .program
            .iter()
            .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
            .collect();
        let prog = libc::sock_fprog {
            len: insns.len() as u16,
            filter: insns.as_mut_ptr(),
        };
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog` and the `len` instructions
        // it points to, both alive for the call; it writes no memory of ours.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs the program on one `seccomp_data` (nr, arch, args): the action it returns. The
    /// tests' interpreter, following the kernel's classic BPF semantics.
    #[cfg(test)]
    pub(crate) fn evaluate(&self, nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let word = |off: u32| -> u32 {
            match off {
                0 => nr,
                4 => arch,
                o if o >= 16 => {
                    let i = ((o - 16) / 8) as usize;
                    if (o - 16) % 8 == 4 {
                        (args[i] >> 32) as u32
                    } else {
                        args[i] as u32
                    }
                }
                _ => 0,
            }
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        while let Some(&(code, jt, jf, k)) = self.program.get(pc) {
            pc += 1;
            match code {
                LD_W_ABS => acc = word(k),
                ALU_AND_K => acc &= k,
                RET_K => return k,
                JMP_JA => pc += k as usize,
                JMP_JEQ_K | JMP_JGT_K | JMP_JGE_K => {
                    let t = match code {
                        JMP_JEQ_K => acc == k,
                        JMP_JGT_K => acc > k,
                        _ => acc >= k,
                    };
                    pc += if t { jt } else { jf } as usize;
                }
                _ => return RET_KILL_PROCESS,
            }
        }
        RET_KILL_PROCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::oci::{LinuxSyscall, linux_syscall};

    fn nr(name: &str) -> u32 {
        syscalls::Sysno::from_str(name).unwrap().id() as u32
    }

    fn rule(
        names: &[&str],
        act: &str,
        errno: Option<u32>,
        args: Vec<LinuxSeccompArg>,
    ) -> LinuxSyscall {
        LinuxSyscall {
            Names: names.iter().map(|s| s.to_string()).collect(),
            Action: act.into(),
            ErrnoRet: errno.map(linux_syscall::ErrnoRet::Errnoret),
            Args: args,
            ..Default::default()
        }
    }

    fn arg(i: u64, v: u64, v2: u64, op: &str) -> LinuxSeccompArg {
        LinuxSeccompArg {
            Index: i,
            Value: v,
            ValueTwo: v2,
            Op: op.into(),
            ..Default::default()
        }
    }

    fn profile(default: &str, rules: Vec<LinuxSyscall>) -> LinuxSeccomp {
        LinuxSeccomp {
            DefaultAction: default.into(),
            Syscalls: rules,
            ..Default::default()
        }
    }

    #[test]
    fn an_allow_list_allows_what_it_names_and_answers_the_default_errno_otherwise() {
        let p = profile(
            "SCMP_ACT_ERRNO",
            vec![rule(
                &["read", "write", "no_such_call"],
                "SCMP_ACT_ALLOW",
                None,
                vec![],
            )],
        );
        let f = compile(&p).unwrap();
        let x = AUDIT_ARCH_X86_64;
        assert_eq!(f.evaluate(nr("read"), x, [0; 6]), RET_ALLOW);
        assert_eq!(f.evaluate(nr("write"), x, [0; 6]), RET_ALLOW);
        assert_eq!(
            f.evaluate(nr("mkdir"), x, [0; 6]),
            RET_ERRNO | libc::EPERM as u32
        );
        // Another ABI cannot go around it.
        assert_eq!(
            f.evaluate(nr("read"), 0x4000_0003, [0; 6]),
            RET_KILL_PROCESS
        );
        assert_eq!(
            f.evaluate(nr("read") | X32_SYSCALL_BIT, x, [0; 6]),
            RET_KILL_PROCESS
        );
    }

    #[test]
    fn argument_conditions_compare_all_64_bits() {
        let big = 0x1_0000_0005u64;
        let x = AUDIT_ARCH_X86_64;
        // (operator, value, [(argument, denied)]).
        type Case<'a> = (&'a str, u64, &'a [(u64, bool)]);
        let cases: &[Case] = &[
            (
                "SCMP_CMP_EQ",
                big,
                &[(big, true), (5, false), (big + 1, false)],
            ),
            (
                "SCMP_CMP_NE",
                big,
                &[(big, false), (5, true), (0x2_0000_0005, true)],
            ),
            (
                "SCMP_CMP_GT",
                big,
                &[
                    (big + 1, true),
                    (big, false),
                    (0x2_0000_0000, true),
                    (0xffff_ffff, false),
                ],
            ),
            (
                "SCMP_CMP_GE",
                big,
                &[(big, true), (big - 1, false), (0x2_0000_0000, true)],
            ),
            (
                "SCMP_CMP_LT",
                big,
                &[
                    (big - 1, true),
                    (big, false),
                    (0xffff_ffff, true),
                    (0x2_0000_0000, false),
                ],
            ),
            (
                "SCMP_CMP_LE",
                big,
                &[(big, true), (big + 1, false), (0, true)],
            ),
        ];
        for (opname, v, checks) in cases {
            let p = profile(
                "SCMP_ACT_ALLOW",
                vec![rule(
                    &["personality"],
                    "SCMP_ACT_ERRNO",
                    Some(22),
                    vec![arg(0, *v, 0, opname)],
                )],
            );
            let f = compile(&p).unwrap();
            for (a, denied) in *checks {
                let got = f.evaluate(nr("personality"), x, [*a, 0, 0, 0, 0, 0]);
                let want = if *denied { RET_ERRNO | 22 } else { RET_ALLOW };
                assert_eq!(got, want, "{opname} {v:#x} on {a:#x}");
            }
        }
        // MASKED_EQ: (arg & value) == valueTwo, as the clone flag rules use it.
        let p = profile(
            "SCMP_ACT_ERRNO",
            vec![rule(
                &["clone"],
                "SCMP_ACT_ALLOW",
                None,
                vec![arg(0, 0x7e02_0000, 0, "SCMP_CMP_MASKED_EQ")],
            )],
        );
        let f = compile(&p).unwrap();
        assert_eq!(f.evaluate(nr("clone"), x, [0x11, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            f.evaluate(nr("clone"), x, [0x1000_0000, 0, 0, 0, 0, 0]),
            RET_ERRNO | libc::EPERM as u32
        );
    }

    #[test]
    fn two_conditions_on_one_argument_are_alternatives_and_on_two_arguments_both_hold() {
        let x = AUDIT_ARCH_X86_64;
        let p = profile(
            "SCMP_ACT_ERRNO",
            vec![
                rule(
                    &["personality"],
                    "SCMP_ACT_ALLOW",
                    None,
                    vec![arg(0, 0, 0, "SCMP_CMP_EQ"), arg(0, 8, 0, "SCMP_CMP_EQ")],
                ),
                rule(
                    &["socket"],
                    "SCMP_ACT_ALLOW",
                    None,
                    vec![arg(0, 1, 0, "SCMP_CMP_EQ"), arg(1, 2, 0, "SCMP_CMP_EQ")],
                ),
            ],
        );
        let f = compile(&p).unwrap();
        let deny = RET_ERRNO | libc::EPERM as u32;
        assert_eq!(f.evaluate(nr("personality"), x, [0; 6]), RET_ALLOW);
        assert_eq!(
            f.evaluate(nr("personality"), x, [8, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(f.evaluate(nr("personality"), x, [9, 0, 0, 0, 0, 0]), deny);
        assert_eq!(f.evaluate(nr("socket"), x, [1, 2, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(f.evaluate(nr("socket"), x, [1, 3, 0, 0, 0, 0]), deny);
    }

    #[test]
    fn unknown_actions_and_operators_are_errors_not_ignored() {
        let p = profile("SCMP_ACT_NOTIFY", vec![]);
        assert!(matches!(compile(&p), Err(SeccompError::Action(_))));
        let p = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(
                &["read"],
                "SCMP_ACT_ERRNO",
                None,
                vec![arg(0, 1, 0, "SCMP_CMP_SOMETIMES")],
            )],
        );
        assert!(matches!(compile(&p), Err(SeccompError::Operator(_))));
        let p = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(
                &["read"],
                "SCMP_ACT_ERRNO",
                None,
                vec![arg(6, 1, 0, "SCMP_CMP_EQ")],
            )],
        );
        assert!(matches!(compile(&p), Err(SeccompError::Index(6))));
    }

    #[test]
    fn a_denied_syscall_fails_with_the_profiles_errno_in_a_filtered_thread() {
        let p = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(
                &["mkdirat", "mkdir"],
                "SCMP_ACT_ERRNO",
                Some(libc::EACCES as u32),
                vec![],
            )],
        );
        let f = compile(&p).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("denied");
        let t = target.clone();
        // Filters (and no_new_privs) are per thread without TSYNC: this one goes with it.
        let got = std::thread::spawn(move || {
            nix::sys::prctl::set_no_new_privs().unwrap();
            f.install().unwrap();
            std::fs::create_dir(&t).map_err(|e| e.raw_os_error())
        })
        .join()
        .unwrap();
        assert_eq!(got, Err(Some(libc::EACCES)));
        assert!(!target.exists());
        // This thread is unfiltered.
        std::fs::create_dir(&target).unwrap();
    }
}
