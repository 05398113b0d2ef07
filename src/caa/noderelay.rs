//! The node agent relay, `sandboxd caa-relay`: what kata's shim is connected to, kept out
//! of CAA's process and container so that a CAA crash, a DaemonSet rollout to a new image
//! or a `peer-pods-cm` change (which rolls CAA) leaves every running pod's agent
//! connection open. kata's shim holds one connection to its agent socket and never
//! reconnects: whatever serves that socket must outlive CAA.
//!
//! - It serves each pod's agent socket (`<pods dir>/<id>/agent.ttrpc`) and relays it frame
//!   by frame over mutual TLS to the pod VM's forwarder, exactly as CAA's in-process relay
//!   does ([`super::relay::AgentSockets`]). CAA tells it what to serve over a root-only
//!   control socket, and hands it the mTLS client identity (no CA key) in memory: no
//!   private key is written anywhere.
//! - It holds the remote hypervisor socket kata's shim dials ([`names::HYPERVISOR_SOCKET`])
//!   and passes each call on to CAA's own socket ([`names::CAA_SOCKET`]); while CAA is
//!   down (restart, rollout) a call waits for the next CAA instead of failing, so a StopVM
//!   of a pod deleted mid-rollout still reaches a CAA.
//! - It reads no ConfigMap or Secret and talks to no API server, and its DaemonSet is
//!   `OnDelete`: nothing a user edits rolls it. It is replaced when the node is drained.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::pki::{ClientIdentity, Pki};
use super::relay::{AgentSockets, RelayError};
use crate::api::names;

/// Flags of `sandboxd caa-relay`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The control socket CAA talks to.
    #[arg(long, env = "RELAY_CONTROL_SOCKET", default_value = names::RELAY_CONTROL_SOCKET)]
    pub(crate) control_socket: PathBuf,
    /// The remote hypervisor socket kata's shim dials.
    #[arg(long, env = "RELAY_HYPERVISOR_SOCKET", default_value = names::HYPERVISOR_SOCKET)]
    pub(crate) hypervisor_socket: PathBuf,
    /// CAA's own hypervisor socket, where each call is passed on.
    #[arg(long, env = "RELAY_CAA_SOCKET", default_value = names::CAA_SOCKET)]
    pub(crate) caa_socket: PathBuf,
    /// The directory of the pods' agent sockets (no socket is served elsewhere).
    #[arg(long, env = "RELAY_PODS_DIR", default_value = names::PODS_DIR)]
    pub(crate) pods_dir: PathBuf,
    /// Seconds a hypervisor call waits for CAA to be back (kata's shim gives StartVM 600).
    #[arg(long, env = "RELAY_CALL_WAIT_SECONDS", default_value_t = 600)]
    pub(crate) call_wait_seconds: u64,
}

/// One agent socket, as CAA asks for it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Serve {
    /// The sandbox.
    pub(crate) id: String,
    /// The socket (under the pods directory).
    pub(crate) path: PathBuf,
    /// The forwarder of the VM.
    pub(crate) addr: SocketAddr,
    /// The VM's name (its server certificate's name).
    pub(crate) vm: String,
    /// How long a new connection retries its dial (`PROXY_TIMEOUT`).
    pub(crate) timeout_ms: u64,
}

/// What CAA says on the control socket, one JSON object a line; each is answered with one
/// [`Answer`] line.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// The mTLS client identity new agent connections use from now on.
    Identity {
        /// The identity.
        identity: ClientIdentity,
    },
    /// Serve an agent socket (a no-op when it is served so already: its connections stay).
    Serve(Serve),
    /// Stop serving a sandbox's socket (its VM is being deleted).
    Stop {
        /// The sandbox.
        id: String,
    },
    /// Stop serving every sandbox but these (CAA's view after its start-up reconcile).
    Retain {
        /// The sandboxes CAA knows.
        ids: Vec<String>,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Answer {
    /// What failed, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// Longest control line read (an identity is a few KiB).
const MAX_LINE: usize = 1 << 20;

/// The relay's state.
#[derive(Default)]
struct Node {
    identity: Arc<std::sync::RwLock<Option<Arc<rustls::ClientConfig>>>>,
    sockets: AgentSockets,
    served: Mutex<HashMap<String, Serve>>,
}

impl Node {
    fn handle(&self, pods_dir: &Path, req: Request) -> Result<(), String> {
        match req {
            Request::Identity { identity } => {
                let cfg = identity.client_config().map_err(|e| e.to_string())?;
                *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
                Ok(())
            }
            Request::Serve(s) => {
                check_path(pods_dir, &s)?;
                let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
                // The same socket towards the same VM: its connections stay. (A changed
                // PROXY_TIMEOUT only bounds new dials; it is not worth cutting them for.)
                if let Some(old) = served.get(&s.id)
                    && (&old.path, old.addr, &old.vm) == (&s.path, s.addr, &s.vm)
                {
                    return Ok(());
                }
                let identity = self.identity.clone();
                self.sockets
                    .serve_with(
                        &s.id,
                        &s.path,
                        Arc::new(move || {
                            identity.read().unwrap_or_else(|e| e.into_inner()).clone()
                        }),
                        s.addr,
                        &s.vm,
                        Duration::from_millis(s.timeout_ms),
                    )
                    .map_err(|e| e.to_string())?;
                tracing::info!(sandbox = %s.id, vm = %s.vm, addr = %s.addr, "serving agent socket");
                served.insert(s.id.clone(), s);
                Ok(())
            }
            Request::Stop { id } => {
                self.stop(&id);
                remove_stale(pods_dir, &id);
                Ok(())
            }
            Request::Retain { ids } => {
                for id in self.sockets.ids() {
                    if !ids.contains(&id) {
                        tracing::info!(sandbox = %id, "CAA no longer knows this sandbox; its agent socket goes");
                        self.stop(&id);
                    }
                }
                // Sockets a previous relay left (it was killed) that nobody serves now.
                let entries = std::fs::read_dir(pods_dir).into_iter().flatten().flatten();
                for e in entries {
                    let id = e.file_name().to_string_lossy().into_owned();
                    if !ids.contains(&id) {
                        remove_stale(pods_dir, &id);
                    }
                }
                Ok(())
            }
        }
    }

    fn stop(&self, id: &str) {
        self.sockets.stop(id);
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// Removes `<pods dir>/<id>/agent.ttrpc` and its directory when they are left over (a
/// relay before this one was killed with them served).
fn remove_stale(pods_dir: &Path, id: &str) {
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return;
    }
    let dir = pods_dir.join(id);
    let _ = std::fs::remove_file(dir.join(names::AGENT_SOCKET_FILE));
    let _ = std::fs::remove_dir(&dir);
}

/// A socket must be `<pods dir>/<id>/agent.ttrpc`.
fn check_path(pods_dir: &Path, s: &Serve) -> Result<(), String> {
    let ok = !s.id.is_empty()
        && !s.id.contains('/')
        && s.id != ".."
        && s.id != "."
        && s.path == pods_dir.join(&s.id).join(names::AGENT_SOCKET_FILE);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent socket {} of sandbox {:?}: expected {}/<sandbox id>/{}",
            s.path.display(),
            s.id,
            pods_dir.display(),
            names::AGENT_SOCKET_FILE
        ))
    }
}

/// Binds a unix socket at `path` (directory made, stale socket removed, mode 0600).
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Runs `sandboxd caa-relay` until a signal arrives.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    let err = |p: &Path, e: std::io::Error| anyhow::anyhow!("{}: {e}", p.display());
    let control = bind(&args.control_socket).map_err(|e| err(&args.control_socket, e))?;
    let front = bind(&args.hypervisor_socket).map_err(|e| err(&args.hypervisor_socket, e))?;
    let node = Arc::new(Node::default());
    tokio::spawn(serve_control(
        control,
        node.clone(),
        args.pods_dir.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(serve_front(
        front,
        args.caa_socket.clone(),
        Duration::from_secs(args.call_wait_seconds),
        shutdown.clone(),
    ));
    tracing::info!(
        control = %args.control_socket.display(),
        hypervisor = %args.hypervisor_socket.display(),
        caa = %args.caa_socket.display(),
        "node agent relay serving"
    );
    shutdown.cancelled().await;
    // Stopped (the node is drained): the pods' agent connections end with it.
    for id in node.sockets.ids() {
        node.stop(&id);
    }
    let _ = std::fs::remove_file(&args.hypervisor_socket);
    let _ = std::fs::remove_file(&args.control_socket);
    Ok(())
}

async fn serve_control(
    listener: UnixListener,
    node: Arc<Node>,
    pods_dir: PathBuf,
    shutdown: CancellationToken,
) {
    while let Some(conn) = next_conn(&listener, &shutdown).await {
        let (node, pods_dir) = (node.clone(), pods_dir.clone());
        tokio::spawn(async move {
            if let Err(e) = control_conn(conn, &node, &pods_dir).await {
                tracing::warn!(error = %e, "control connection ended");
            }
        });
    }
}

/// The next accepted connection, or `None` once `shutdown` fires (a failed accept is retried
/// after a short pause: a full descriptor table must not spin).
async fn next_conn(listener: &UnixListener, shutdown: &CancellationToken) -> Option<UnixStream> {
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return None,
            c = listener.accept() => c,
        };
        match conn {
            Ok((conn, _)) => return Some(conn),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn control_conn(conn: UnixStream, node: &Node, pods_dir: &Path) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let answer = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => Answer {
                error: node.handle(pods_dir, req).err(),
            },
            Err(e) => Answer {
                error: Some(format!("undecodable control request: {e}")),
            },
        };
        let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

/// Passes each hypervisor call on to CAA's socket, waiting up to `wait` for a CAA to
/// accept it (CAA restarting or being rolled).
async fn serve_front(
    listener: UnixListener,
    caa: PathBuf,
    wait: Duration,
    shutdown: CancellationToken,
) {
    while let Some(conn) = next_conn(&listener, &shutdown).await {
        let caa = caa.clone();
        tokio::spawn(async move {
            let up = match dial_caa(&caa, wait).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %e, "a hypervisor call found no CAA");
                    return;
                }
            };
            if let Err(e) = crate::forwarder::relay::relay(conn, up, None).await {
                tracing::warn!(error = %e, "hypervisor call relay ended");
            }
        });
    }
}

/// Connects to CAA's socket, retrying until it accepts or `wait` passes.
async fn dial_caa(path: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    let begun = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(20);
    let mut told = false;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => {
                if told {
                    tracing::info!(
                        waited_ms = begun.elapsed().as_millis() as u64,
                        "CAA is back; passing the held hypervisor call on"
                    );
                }
                return Ok(s);
            }
            Err(e) if begun.elapsed() >= wait => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("CAA's socket {}: {e}", path.display()),
                ));
            }
            Err(e) => {
                if !told {
                    tracing::info!(error = %e, "CAA is not serving; holding a hypervisor call until it is");
                    told = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// CAA's side of the control socket: what it asked to be served is kept, so a relay that
/// restarted is told again on the next connection.
pub(crate) struct Client {
    path: PathBuf,
    pki: Pki,
    conn: tokio::sync::Mutex<Option<BufReader<UnixStream>>>,
    desired: Mutex<HashMap<String, Serve>>,
    /// When connecting last failed: within [`CONNECT_WAIT`] of it, calls try once instead
    /// of waiting again (a start-up reconcile of many pods with no relay takes one wait).
    failed_at: Mutex<Option<tokio::time::Instant>>,
}

/// How long CAA waits for the node agent relay to accept its control connection.
const CONNECT_WAIT: Duration = Duration::from_secs(60);

impl Client {
    /// A client of the relay's control socket at `path`, giving it `pki`'s client identity.
    pub(crate) fn new(path: PathBuf, pki: Pki) -> Arc<Self> {
        Arc::new(Self {
            path,
            pki,
            conn: tokio::sync::Mutex::new(None),
            desired: Mutex::new(HashMap::new()),
            failed_at: Mutex::new(None),
        })
    }

    /// Re-sends the identity every `every` (a rotated CA reaches the relay; a restarted
    /// relay is told what to serve) until `stop`.
    pub(crate) async fn keep_fresh(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.send(None).await {
                tracing::warn!(error = %e, "refreshing the node agent relay");
            }
        }
    }

    fn err(&self, detail: impl std::fmt::Display) -> RelayError {
        RelayError::Socket {
            path: self.path.display().to_string(),
            detail: format!(
                "the node agent relay ({}): {detail}",
                names::RELAY_DAEMONSET
            ),
        }
    }

    async fn exchange(
        conn: &mut BufReader<UnixStream>,
        req: &Request,
    ) -> std::io::Result<Result<(), String>> {
        let mut out = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        out.push(b'\n');
        conn.get_mut().write_all(&out).await?;
        let mut line = Vec::new();
        if conn.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let a: Answer = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
        Ok(a.error.map_or(Ok(()), Err))
    }

    /// A connection that has been given the identity and everything desired.
    async fn connect(&self) -> Result<BufReader<UnixStream>, RelayError> {
        let begun = tokio::time::Instant::now();
        let recently_failed = self
            .failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < CONNECT_WAIT);
        let s = loop {
            match UnixStream::connect(&self.path).await {
                Ok(s) => {
                    *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    break s;
                }
                Err(e) if recently_failed || begun.elapsed() >= CONNECT_WAIT => {
                    *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(tokio::time::Instant::now());
                    return Err(self.err(format!(
                        "not answering within {} s (is its pod running on this node?): {e}",
                        CONNECT_WAIT.as_secs()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut conn = BufReader::new(s);
        let identity = Request::Identity {
            identity: self.pki.client_identity(),
        };
        Self::exchange(&mut conn, &identity)
            .await
            .map_err(|e| self.err(e))?
            .map_err(|e| self.err(e))?;
        let desired: Vec<Serve> = self
            .desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for s in desired {
            let id = s.id.clone();
            if let Err(e) = Self::exchange(&mut conn, &Request::Serve(s))
                .await
                .map_err(|e| self.err(e))?
            {
                tracing::warn!(sandbox = %id, error = %e, "the node agent relay could not serve an agent socket");
            }
        }
        Ok(conn)
    }

    /// Sends the identity and then `req`, reconnecting once when the relay went away.
    async fn send(&self, req: Option<Request>) -> Result<(), RelayError> {
        let mut guard = self.conn.lock().await;
        let identity = Request::Identity {
            identity: self.pki.client_identity(),
        };
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let conn = guard.as_mut().expect("connected");
            let r = match Self::exchange(conn, &identity).await {
                Ok(Ok(())) => match &req {
                    Some(req) => Self::exchange(conn, req).await,
                    None => Ok(Ok(())),
                },
                other => other,
            };
            match r {
                Ok(answer) => return answer.map_err(|e| self.err(e)),
                Err(e) if attempt == 0 => {
                    tracing::info!(error = %e, "reconnecting to the node agent relay");
                    *guard = None;
                }
                Err(e) => {
                    *guard = None;
                    return Err(self.err(e));
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Serves an agent socket through the relay.
    pub(crate) async fn serve(&self, s: Serve) -> Result<(), RelayError> {
        self.desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s.id.clone(), s.clone());
        let id = s.id.clone();
        let r = self.send(Some(Request::Serve(s))).await;
        if r.is_err() {
            self.desired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
        r
    }

    /// Stops serving a sandbox's socket.
    pub(crate) async fn stop(&self, id: &str) {
        self.desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Err(e) = self.send(Some(Request::Stop { id: id.into() })).await {
            tracing::warn!(sandbox = %id, error = %e, "the node agent relay did not stop an agent socket");
        }
    }

    /// Tells the relay that only what this CAA asked for is wanted.
    pub(crate) async fn retain(&self) -> Result<(), RelayError> {
        let ids = self
            .desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        self.send(Some(Request::Retain { ids })).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(dir: &Path, id: &str) -> Serve {
        Serve {
            id: id.into(),
            path: dir.join(id).join(names::AGENT_SOCKET_FILE),
            addr: "127.0.0.1:9".parse().unwrap(),
            vm: "podvm-x-01234567".into(),
            timeout_ms: 1000,
        }
    }

    #[test]
    fn agent_sockets_are_served_only_at_their_sandboxes_path() {
        let dir = Path::new("/run/peerpod/pods");
        assert!(check_path(dir, &serve(dir, "abc")).is_ok());
        for bad in ["", "..", ".", "a/b"] {
            let mut s = serve(dir, "abc");
            s.id = bad.into();
            assert!(check_path(dir, &s).is_err(), "{bad:?}");
        }
        let mut s = serve(dir, "abc");
        s.path = PathBuf::from("/etc/abc/agent.ttrpc");
        let e = check_path(dir, &s).unwrap_err();
        assert!(
            e.contains("/run/peerpod/pods/<sandbox id>/agent.ttrpc"),
            "{e}"
        );
    }

    #[test]
    fn the_control_protocol_names_its_operations_and_hides_the_key_from_logs() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = Pki::generate().unwrap();
        let id = pki.client_identity();
        let line = serde_json::to_string(&Request::Identity {
            identity: id.clone(),
        })
        .unwrap();
        assert!(line.starts_with(r#"{"op":"identity""#), "{line}");
        assert!(!format!("{id:?}").contains("PRIVATE KEY"));
        let back: Request = serde_json::from_str(&line).unwrap();
        assert!(matches!(back, Request::Identity { identity } if identity == id));
        let s = serde_json::to_string(&Request::Stop { id: "x".into() }).unwrap();
        assert_eq!(s, r#"{"op":"stop","id":"x"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    /// A hypervisor call made while no CAA serves waits for the next one and gets its
    /// answer; nothing of the request is lost.
    #[tokio::test]
    async fn a_hypervisor_call_made_while_no_caa_serves_reaches_the_next_caa() {
        use crate::protocol::frame;
        let dir = tempfile::tempdir().unwrap();
        let (front, caa) = (dir.path().join("hv.sock"), dir.path().join("caa.sock"));
        let stop = CancellationToken::new();
        tokio::spawn(serve_front(
            bind(&front).unwrap(),
            caa.clone(),
            Duration::from_secs(30),
            stop.clone(),
        ));
        let mut shim = UnixStream::connect(&front).await.unwrap();
        let call = frame::Frame {
            stream_id: 1,
            kind: frame::TYPE_REQUEST,
            flags: 0,
            payload: b"StopVM".to_vec(),
        };
        frame::write_frame(&mut shim, &call).await.unwrap();
        // The next CAA comes up later and answers what it reads.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let l = bind(&caa).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut f = frame::read_frame(&mut s).await.unwrap().unwrap();
            f.kind = frame::TYPE_RESPONSE;
            f.payload.extend_from_slice(b" done");
            frame::write_frame(&mut s, &f).await.unwrap();
        });
        let answer = tokio::time::timeout(Duration::from_secs(20), frame::read_frame(&mut shim))
            .await
            .expect("the held call was never answered")
            .unwrap()
            .unwrap();
        assert_eq!(answer.payload, b"StopVM done");
        stop.cancel();
    }

    /// CAA's client against the relay's control loop: served sockets survive the client
    /// going away (CAA's restart), a repeated serve keeps them, retain drops the unknown.
    #[tokio::test]
    async fn served_sockets_outlive_the_caa_that_asked_and_retain_drops_the_unknown() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods");
        let control = dir.path().join("control.sock");
        let node = Arc::new(Node::default());
        let stop = CancellationToken::new();
        tokio::spawn(serve_control(
            bind(&control).unwrap(),
            node.clone(),
            pods.clone(),
            stop.clone(),
        ));
        let pki = Pki::generate().unwrap();
        let first = Client::new(control.clone(), pki.clone());
        first.serve(serve(&pods, "a")).await.unwrap();
        first.serve(serve(&pods, "b")).await.unwrap();
        let a = serve(&pods, "a").path;
        assert!(a.exists());
        let held = UnixStream::connect(&a).await.unwrap();
        drop(first);
        // The next CAA asks for "a" again and knows nothing of "b".
        let next = Client::new(control.clone(), pki);
        next.serve(serve(&pods, "a")).await.unwrap();
        next.retain().await.unwrap();
        assert_eq!(node.sockets.ids(), vec!["a".to_string()]);
        assert!(!serve(&pods, "b").path.exists());
        // What a killed relay left is cleaned by the next stop or retain.
        for stale in ["s1", "s2"] {
            std::fs::create_dir_all(pods.join(stale)).unwrap();
            std::fs::write(serve(&pods, stale).path, b"").unwrap();
        }
        next.stop("s1").await;
        next.retain().await.unwrap();
        assert!(!pods.join("s1").exists() && !pods.join("s2").exists());
        assert!(serve(&pods, "a").path.exists());
        // The connection accepted under the first CAA was not cut by the repeated serve.
        let mut held = held;
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(300), held.read(&mut b)).await;
        assert!(r.is_err(), "the held connection ended: {r:?}");
        // A path outside the pods directory is refused with the reason.
        let mut bad = serve(&pods, "c");
        bad.path = dir.path().join("elsewhere.sock");
        let e = next.serve(bad).await.unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
        // A relay that is gone: after one failed wait, the next calls fail at once instead
        // of waiting again each (a reconcile of many pods is not held for minutes).
        stop.cancel();
        drop(node);
        let _ = std::fs::remove_file(&control);
        *next.conn.lock().await = None;
        *next.failed_at.lock().unwrap() = Some(tokio::time::Instant::now());
        let e = tokio::time::timeout(CONNECT_WAIT / 2, next.serve(serve(&pods, "d")))
            .await
            .expect("a second full wait for a relay that is gone")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(names::RELAY_DAEMONSET) && e.contains("not answering"),
            "{e}"
        );
    }
}
