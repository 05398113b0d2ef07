//! The forwarder's relay: mTLS listener → kata-agent's unix socket, frame by frame, with
//! CreateSandbox/CreateContainer rewritten (see [`super::rewrite`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::protocol::frame::{self, FrameError};

/// How the relay runs.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// kata-agent's socket.
    pub agent_socket: PathBuf,
    /// The namespace path CreateContainer gets.
    pub netns: String,
    /// How long a connection waits for the agent socket to accept.
    pub agent_wait: Duration,
}

/// Accepts mTLS connections until `shutdown`, relaying each to the agent.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: RelayOptions,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let opts = opts.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(super::tls::transport(tcp)),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "refused a client: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "refused a client: TLS handshake timed out");
                    return;
                }
            };
            let agent = match dial_agent(&opts.agent_socket, opts.agent_wait, &shutdown).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "no agent to relay to");
                    return;
                }
            };
            tracing::debug!(%peer, "relaying to the agent");
            if let Err(e) = relay(tls, agent, Some(opts.netns.as_str())).await {
                tracing::warn!(%peer, error = %e, kind = e.metric_label(), "relay ended");
            }
        });
    }
}

/// Connects to the agent socket, retrying until it accepts or `wait` passes.
pub(crate) async fn dial_agent(
    path: &Path,
    wait: Duration,
    shutdown: &CancellationToken,
) -> std::io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut delay = Duration::from_millis(20);
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => {
                enlarge_send_buffer(&s);
                return Ok(s);
            }
            Err(e) if tokio::time::Instant::now() >= deadline || shutdown.is_cancelled() => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("agent socket {}: {e}", path.display()),
                ));
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Send buffer asked for on the unix sockets a relay writes to (the kernel caps it at
/// `net.core.wmem_max`): a large frame is handed over in a few writes instead of stalling
/// on the default ~208 KiB until the reader catches up.
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// Enlarges the send buffer of a unix socket a relay writes frames to (best effort: the
/// default only costs more wake-ups).
pub(crate) fn enlarge_send_buffer(s: &UnixStream) {
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &UNIX_SEND_BUFFER);
}

/// Read buffer of each direction of a relayed connection: a small frame's header and
/// payload arrive in one read; reads of at least this much (the bulk of a large frame) go
/// straight into the chunk buffer instead of through it.
const READ_BUFFER: usize = 64 << 10;
/// Largest piece of a frame a relay holds before passing it on.
const CHUNK: usize = 256 << 10;
/// Bytes of a request read to find its service and method.
const ROUTE_PREFIX: usize = 256;

/// Relays frames between `client` and `upstream` until either side ends. With `netns`,
/// requests from the client are rewritten on the way; everything else passes unchanged.
pub(crate) async fn relay<C, U>(
    client: C,
    upstream: U,
    netns: Option<&str>,
) -> Result<(), FrameError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, mut cw) = tokio::io::split(client);
    let (ur, mut uw) = tokio::io::split(upstream);
    // Header and payload of a small frame in one read call.
    let mut cr = tokio::io::BufReader::with_capacity(READ_BUFFER, cr);
    let mut ur = tokio::io::BufReader::with_capacity(READ_BUFFER, ur);
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        while let Some((len, stream_id, kind, flags, h)) = frame::read_header(&mut cr).await? {
            let Some(ns) = netns.filter(|_| kind == frame::TYPE_REQUEST) else {
                frame::forward_rest(&mut cr, &mut uw, h.to_vec(), len, &mut buf).await?;
                continue;
            };
            // Only CreateSandbox and CreateContainer are decoded: the route is in the
            // request's first bytes, so every other request is forwarded as it arrives.
            let peek = len.min(ROUTE_PREFIX);
            let prefix = frame::read_payload(&mut cr, Vec::new(), peek).await?;
            let plain = matches!(
                frame::request_route(&prefix),
                Some((service, method)) if service != super::rewrite::AGENT_SERVICE
                    || !super::rewrite::REWRITTEN.contains(&method)
            );
            if plain {
                let mut head = h.to_vec();
                head.extend_from_slice(&prefix);
                frame::forward_rest(&mut cr, &mut uw, head, len - peek, &mut buf).await?;
                continue;
            }
            let f = frame::Frame {
                stream_id,
                kind,
                flags,
                payload: frame::read_payload(&mut cr, prefix, len).await?,
            };
            let f = match super::rewrite::rewrite(&f, ns) {
                Ok(Some(new)) => new,
                Ok(None) => f,
                Err(e) => {
                    // The agent answers such a request with its own error.
                    tracing::warn!(error = %e, "passing a request that cannot be decoded unchanged");
                    f
                }
            };
            frame::write_frame(&mut uw, &f).await?;
        }
        let _ = uw.shutdown().await;
        Ok::<(), FrameError>(())
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        while let Some((len, _, _, _, h)) = frame::read_header(&mut ur).await? {
            frame::forward_rest(&mut ur, &mut cw, h.to_vec(), len, &mut buf).await?;
        }
        let _ = cw.shutdown().await;
        Ok::<(), FrameError>(())
    };
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => {
            r?;
            // The client finished sending; let the answers drain.
            match tokio::time::timeout(Duration::from_secs(600), down).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
        r = &mut down => r,
    }
}
