//! Processes of containers: their standard streams (pipes, or a terminal) and their exits.
//!
//! Streams follow kata's semantics: `ReadStdout`/`ReadStderr` block until up to `len` bytes
//! are there and answer them; an empty answer is the end of the stream. Once the process has
//! exited, a pending read still drains what the pipe holds for up to [`DRAIN_AFTER_EXIT`]
//! (a grandchild may hold the pipe open forever), then answers the end.
//!
//! Exits: the agent is a child subreaper, so every container process ends as its child; one
//! task reaps on SIGCHLD and hands each exit status to the process waiting for it (kata's
//! convention: the exit code, or 128 + the signal).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::{Error, sys};

/// How long a read keeps draining after the process exited (kata: 500 ms).
pub(crate) const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// One end of a pipe or a terminal master, non-blocking, driven by the runtime.
#[derive(Debug)]
pub(crate) struct Stream(AsyncFd<OwnedFd>);

impl Stream {
    /// Wraps `fd` (made non-blocking).
    pub(crate) fn new(fd: OwnedFd) -> Result<Self, Error> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(sys("F_GETFL"))?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(sys("F_SETFL O_NONBLOCK"))?;
        // Deprecated for descriptors the wrapper does not own; this one owns its `OwnedFd`.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd);
        fd.map(Self).map_err(super::io("registering a stream"))
    }

    /// Reads up to `len` bytes; empty at the end of the stream. A terminal whose other side
    /// is gone (EIO) is its end too.
    pub(crate) async fn read(&self, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len.max(1)];
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(Vec::new()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data`.
    pub(crate) async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// The file descriptor (for terminal ioctls).
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

/// The standard streams of a process as the agent holds them.
#[derive(Debug, Default)]
pub(crate) struct Stdio {
    /// Write end of the process's stdin (`None` once closed, or without stdin).
    pub stdin: tokio::sync::Mutex<Option<Arc<Stream>>>,
    /// Read end of stdout.
    pub stdout: Option<Arc<Stream>>,
    /// Read end of stderr.
    pub stderr: Option<Arc<Stream>>,
    /// The terminal master, when the process has a terminal (stdin and stdout both).
    pub tty: Option<Arc<Stream>>,
}

/// The child's ends of fresh pipes: (stdin read end, stdout write end, stderr write end).
pub(crate) type ChildStdio = (OwnedFd, OwnedFd, OwnedFd);

/// Pipes for a process without a terminal: the agent's ends and the child's.
pub(crate) fn pipes() -> Result<(Stdio, ChildStdio), Error> {
    let (in_r, in_w) = nix::unistd::pipe().map_err(sys("pipe"))?;
    let (out_r, out_w) = nix::unistd::pipe().map_err(sys("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe().map_err(sys("pipe"))?;
    // The agent's ends must not leak into containers.
    for fd in [&in_w, &out_r, &err_r] {
        cloexec(fd)?;
    }
    let stdio = Stdio {
        stdin: tokio::sync::Mutex::new(Some(Arc::new(Stream::new(in_w)?))),
        stdout: Some(Arc::new(Stream::new(out_r)?)),
        stderr: Some(Arc::new(Stream::new(err_r)?)),
        tty: None,
    };
    Ok((stdio, (in_r, out_w, err_w)))
}

fn cloexec(fd: &OwnedFd) -> Result<(), Error> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(sys("F_SETFD FD_CLOEXEC"))
}

/// The streams of a process with a terminal: everything goes through `master`.
pub(crate) fn terminal(master: OwnedFd) -> Result<Stdio, Error> {
    cloexec(&master)?;
    let tty = Arc::new(Stream::new(master)?);
    Ok(Stdio {
        stdin: tokio::sync::Mutex::new(Some(tty.clone())),
        stdout: None,
        stderr: None,
        tty: Some(tty),
    })
}

/// Sets the terminal's window size.
pub(crate) fn resize(tty: &Stream, rows: u16, cols: u16) -> Result<(), Error> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    #[allow(unsafe_code)]
    unsafe { set_winsize(tty.fd().as_raw_fd(), &ws) }
        .map(drop)
        .map_err(sys("TIOCSWINSZ"))
}

/// A process of a container: its exec id, pid, streams and exit.
#[derive(Debug)]
pub(crate) struct Process {
    /// The exec id (the container id for its init process, as kata names it).
    pub exec_id: String,
    /// Its pid in the agent's pid namespace.
    pub pid: i32,
    /// Its streams.
    pub stdio: Stdio,
    /// `Some(status)` once it exited.
    pub exit: watch::Receiver<Option<i32>>,
}

impl Process {
    /// The exit status once the process exited.
    pub(crate) async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().unwrap_or(255);
            }
        }
    }

    /// Whether it exited.
    pub(crate) fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Reads up to `len` bytes of stdout (`stdout`) or stderr with kata's semantics.
    pub(crate) async fn read(&self, stdout: bool, len: usize) -> Result<Vec<u8>, Error> {
        let stream = match (&self.stdio.tty, stdout) {
            (Some(t), true) => Some(t.clone()),
            // A terminal has no separate stderr: its end at once.
            (Some(_), false) => return Ok(Vec::new()),
            (None, true) => self.stdio.stdout.clone(),
            (None, false) => self.stdio.stderr.clone(),
        }
        .ok_or_else(|| Error::NotFound(format!("process {} has no such stream", self.exec_id)))?;
        let read = stream.read(len);
        tokio::pin!(read);
        let data = tokio::select! {
            biased;
            r = &mut read => r,
            _ = self.wait() => match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut read).await {
                Ok(r) => r,
                Err(_) => Ok(Vec::new()),
            },
        };
        data.map_err(super::io(format!("reading the output of {}", self.exec_id)))
    }

    /// Writes `data` to stdin; empty data closes it (as kata does).
    pub(crate) async fn write(&self, data: &[u8]) -> Result<usize, Error> {
        if data.is_empty() {
            self.close_stdin().await;
            return Ok(0);
        }
        let stdin = self.stdio.stdin.lock().await.clone();
        let stdin = stdin.ok_or_else(|| {
            Error::FailedPrecondition(format!("the stdin of {} is closed", self.exec_id))
        })?;
        stdin.write_all(data).await.map_err(super::io(format!(
            "writing to the stdin of {}",
            self.exec_id
        )))?;
        Ok(data.len())
    }

    /// Closes stdin (a terminal gets end-of-file, ^D, instead).
    pub(crate) async fn close_stdin(&self) {
        if let Some(tty) = &self.stdio.tty {
            let _ = tty.write_all(&[4]).await;
            return;
        }
        self.stdio.stdin.lock().await.take();
    }
}

/// Makes the agent the child subreaper: container processes whose parent exits (they are
/// started by libcontainer's short-lived helper) become its children.
pub(crate) fn become_subreaper() -> Result<(), Error> {
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("PR_SET_CHILD_SUBREAPER"))
}

/// Exit statuses by pid, handed from the reaper to whoever registered the pid.
#[derive(Debug, Default)]
pub(crate) struct Exits {
    inner: Mutex<ExitsInner>,
}

#[derive(Debug, Default)]
struct ExitsInner {
    waiting: HashMap<i32, watch::Sender<Option<i32>>>,
    // Exits reaped before anyone registered them (a container that ends at once).
    early: HashMap<i32, i32>,
}

/// How many unclaimed exits are kept.
const EARLY_LIMIT: usize = 1024;

impl Exits {
    /// Watches the exit of `pid`.
    pub(crate) fn register(&self, pid: i32) -> watch::Receiver<Option<i32>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = inner.early.remove(&pid) {
            return watch::channel(Some(status)).1;
        }
        let (tx, rx) = watch::channel(None);
        inner.waiting.insert(pid, tx);
        rx
    }

    fn reaped(&self, pid: i32, status: i32) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.waiting.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(Some(status));
            }
            None => {
                if inner.early.len() >= EARLY_LIMIT {
                    inner.early.clear();
                }
                inner.early.insert(pid, status);
            }
        }
    }

    /// Reaps every exited child now.
    pub(crate) fn reap_now(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.reaped(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.reaped(pid.as_raw(), 128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Reaps children on every SIGCHLD until aborted.
pub(crate) async fn reap(exits: Arc<Exits>) {
    let mut sig = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGCHLD: exits are polled");
            loop {
                exits.reap_now();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    loop {
        exits.reap_now();
        if sig.recv().await.is_none() {
            return;
        }
    }
}
