//! Graceful shutdown: SIGTERM (what the kubelet sends) or SIGINT cancel one token that
//! every long-running task of a daemon watches.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Errors installing the signal handlers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process could not register a signal handler.
    #[error("installing the {signal} handler: {source}")]
    Signal {
        /// Which signal.
        signal: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Returns a token cancelled on the first SIGTERM or SIGINT. Must be called inside a tokio
/// runtime. A second signal is left to the default behaviour only after the first was seen
/// and logged, so an operator stuck in cleanup can still be stopped.
pub fn on_signals() -> Result<CancellationToken, Error> {
    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| Error::Signal {
        signal: "SIGINT",
        source,
    })?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "shutting down");
        cancel.cancel();
        // A second signal ends the process at once.
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without cleanup");
        std::process::exit(130);
    });
    Ok(token)
}
