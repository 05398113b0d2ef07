//! A process's stdio between containerd's FIFOs (or none) and the agent's streams: one
//! blocking `ReadStdout`/`ReadStderr` of up to 32 KiB at a time (an empty answer is EOF),
//! `WriteStdin` of what containerd writes, `CloseStdin` once containerd closes its side
//! (`CloseIO`) and everything read before has been sent. A terminal has only stdout.
//!
//! The FIFOs are opened read-write, as containerd's own shims do, so a containerd restart
//! (the reader going away for a moment) loses nothing and breaks nothing.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::vm::{AgentClient, ctx};
use crate::protocol::agent::{CloseStdinRequest, ReadStreamRequest, WriteStreamRequest};

/// How much one read asks the agent for (what kata asks).
pub(crate) const READ_LEN: u32 = 32768;

/// The paths containerd gave for a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Paths {
    /// stdin FIFO ("" = none).
    pub(crate) stdin: String,
    /// stdout FIFO.
    pub(crate) stdout: String,
    /// stderr FIFO ("" with a terminal).
    pub(crate) stderr: String,
    /// A terminal.
    pub(crate) terminal: bool,
}

fn check(path: &str) -> Result<(), super::Error> {
    if path.is_empty() || path.starts_with('/') {
        return Ok(());
    }
    if let Some(p) = path.strip_prefix("fifo://")
        && p.starts_with('/')
    {
        return Ok(());
    }
    Err(super::Error::InvalidArgument(format!(
        "stdio {path:?}: only FIFO paths are supported (containerd's CRI uses them)"
    )))
}

impl Paths {
    /// Rejects URIs the shim does not serve (`binary://`, `file://`).
    pub(crate) fn validate(&self) -> Result<(), super::Error> {
        check(&self.stdin)?;
        check(&self.stdout)?;
        check(&self.stderr)
    }
}

fn fifo(path: &str) -> &Path {
    Path::new(path.strip_prefix("fifo://").unwrap_or(path))
}

/// Copies the agent's stdout (or stderr) of `cid`/`eid` into the FIFO at `path` until EOF.
pub(crate) fn copy_out(
    agent: AgentClient,
    cid: String,
    eid: String,
    path: String,
    stdout: bool,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut out = match tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(fifo(&path))
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path, error = %e, "opening the output FIFO; output is dropped");
                None
            }
        };
        let name = if stdout { "ReadStdout" } else { "ReadStderr" };
        loop {
            let req = ReadStreamRequest {
                container_id: cid.clone(),
                exec_id: eid.clone(),
                len: READ_LEN,
                ..Default::default()
            };
            let r = if stdout {
                agent.api().read_stdout(ctx(Duration::ZERO), &req).await
            } else {
                agent.api().read_stderr(ctx(Duration::ZERO), &req).await
            };
            match r {
                Ok(r) if r.data.is_empty() => break,
                Ok(r) => {
                    if let Some(o) = out.as_mut()
                        && let Err(e) = o.write_all(&r.data).await
                    {
                        tracing::warn!(path, error = %e, "writing output; output is dropped");
                        out = None;
                    }
                }
                Err(e) => {
                    // The process is gone (EOF in kata's terms) or the connection is.
                    tracing::debug!(cid, eid, call = name, error = %e, "output ends");
                    break;
                }
            }
        }
    })
}

/// The stdin side: copies the FIFO to `WriteStdin` until `close` fires (containerd's
/// `CloseIO`), then sends what is left and `CloseStdin`.
pub(crate) fn copy_in(
    agent: AgentClient,
    cid: String,
    eid: String,
    path: String,
    mut close: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut input = match tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(fifo(&path))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path, error = %e, "opening the stdin FIFO");
                return;
            }
        };
        let mut buf = vec![0u8; 32768];
        let send = |data: Vec<u8>| {
            let agent = agent.clone();
            let (cid, eid) = (cid.clone(), eid.clone());
            async move {
                let mut rest = data;
                while !rest.is_empty() {
                    let req = WriteStreamRequest {
                        container_id: cid.clone(),
                        exec_id: eid.clone(),
                        data: rest.clone(),
                        ..Default::default()
                    };
                    match agent
                        .api()
                        .write_stdin(ctx(Duration::from_secs(30)), &req)
                        .await
                    {
                        Ok(r) if r.len > 0 => {
                            rest.drain(..(r.len as usize).min(rest.len()));
                        }
                        Ok(_) => return false,
                        Err(e) => {
                            tracing::debug!(cid, eid, error = %e, "stdin ends");
                            return false;
                        }
                    }
                }
                true
            }
        };
        loop {
            tokio::select! {
                n = input.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !send(buf[..n].to_vec()).await {
                            return;
                        }
                    }
                },
                _ = closed(&mut close) => {
                    // What containerd wrote before closing is in the FIFO: send it first.
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(20), input.read(&mut buf)).await
                    {
                        if n == 0 || !send(buf[..n].to_vec()).await {
                            break;
                        }
                    }
                    break;
                }
            }
        }
        let req = CloseStdinRequest {
            container_id: cid.clone(),
            exec_id: eid.clone(),
            ..Default::default()
        };
        if let Err(e) = agent
            .api()
            .close_stdin(ctx(Duration::from_secs(30)), &req)
            .await
        {
            tracing::debug!(cid, eid, error = %e, "CloseStdin");
        }
    })
}

/// Resolves once `rx` holds `true` (or its sender is gone).
async fn closed(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fifos_are_served() {
        let ok = Paths {
            stdin: String::new(),
            stdout: "/run/containerd/fifo/1-stdout".into(),
            stderr: "fifo:///run/x".into(),
            terminal: false,
        };
        assert!(ok.validate().is_ok());
        let bad = Paths {
            stdout: "binary:///usr/bin/logger".into(),
            ..ok.clone()
        };
        assert!(bad.validate().is_err());
    }
}
