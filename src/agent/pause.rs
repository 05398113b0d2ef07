//! The sandbox's pause process, built into sandboxd: the pause container's rootfs holds the
//! running sandboxd binary (bind-mounted read-only) as `/pause`, and sandboxd started under
//! that name only waits: it reaps the orphans of a shared pid namespace and exits 0 on
//! SIGTERM or SIGINT. No pause image is pulled.

use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

/// The pause binary's path in the pause rootfs.
pub(crate) const PATH: &str = "/pause";

/// Whether this process was started as the pause process.
pub fn is_pause() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|a| std::path::Path::new(&a).file_name() == Some("pause".as_ref()))
}

/// Waits for SIGTERM or SIGINT, reaping children meanwhile.
pub fn main() -> ExitCode {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return ExitCode::FAILURE;
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if s == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => return ExitCode::SUCCESS,
            Err(_) => {}
        }
    }
}
