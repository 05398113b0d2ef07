//! A kata-agent **stand-in for developers and tests** (`sandboxd dev agent --socket PATH`,
//! hidden): a real ttrpc server that answers `grpc.Health/Check` (SERVING),
//! `grpc.Health/Version` and a handful of `grpc.AgentService` methods, recording the raw
//! payload of every request it receives. It runs no containers; it never belongs in a
//! production pod VM image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use ttrpc::r#async::{MethodHandler, Server, Service, TtrpcContext};
use ttrpc::proto::{Request, Response};

use super::Error;

/// What the agent received: (method, payload bytes).
pub type Log = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// The agent service.
pub(crate) const AGENT_SERVICE: &str = "grpc.AgentService";
/// kata's health service.
pub const HEALTH_SERVICE: &str = crate::protocol::health_wire::SERVICE;

/// `grpc.AgentService` methods the stand-in answers.
pub(crate) const METHODS: &[&str] = &[
    "CreateSandbox",
    "CreateContainer",
    "StartContainer",
    "ExecProcess",
    "ReadStdout",
    "DestroySandbox",
];

/// `HealthCheckResponse.ServingStatus.SERVING` of kata's health.proto.
pub const SERVING: u64 = crate::protocol::health_wire::SERVING;

/// The `grpc.Health/Check` answer: `HealthCheckResponse{status = SERVING}` (field 1, varint).
pub(crate) const HEALTH_SERVING: &[u8] = &[0x08, SERVING as u8];

/// The answer payload of an agent method (distinct per method, so replies can be checked):
/// field 1 as bytes holding the method name.
pub fn answer(method: &str) -> Vec<u8> {
    let mut v = vec![0x0a, method.len() as u8];
    v.extend_from_slice(method.as_bytes());
    v
}

/// A `CheckRequest{service}` payload (field 1, string).
pub fn check_request(service: &str) -> Vec<u8> {
    let mut v = Vec::new();
    if !service.is_empty() {
        v.push(0x0a);
        v.push(service.len() as u8);
        v.extend_from_slice(service.as_bytes());
    }
    v
}

/// The `status` (field 1, varint) of a `HealthCheckResponse` payload; 0 (UNKNOWN) when absent.
pub fn health_status(payload: &[u8]) -> Option<u64> {
    crate::protocol::health_wire::status(payload)
}

/// `VersionCheckResponse{grpc_version = 1, agent_version = 2}` of the stand-in.
fn version_answer() -> Vec<u8> {
    let mut v = Vec::new();
    for (field, s) in [(1u8, "ttrpc"), (2u8, crate::VERSION)] {
        v.push(field << 3 | 2);
        v.push(s.len() as u8);
        v.extend_from_slice(s.as_bytes());
    }
    v
}

struct Handler {
    method: String,
    log: Log,
}

#[async_trait::async_trait]
impl MethodHandler for Handler {
    async fn handler(&self, _ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        if let Ok(mut log) = self.log.lock() {
            log.push((self.method.clone(), req.payload.clone()));
        }
        let mut r = Response::new();
        r.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
        r.payload = match self.method.as_str() {
            // Echoes large payloads back, for throughput.
            "ReadStdout" => req.payload,
            "Check" => HEALTH_SERVING.to_vec(),
            "Version" => version_answer(),
            m => answer(m),
        };
        Ok(r)
    }
}

fn service(methods: &[&str], log: &Log) -> Service {
    let mut handlers: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    for m in methods {
        handlers.insert(
            m.to_string(),
            Box::new(Handler {
                method: m.to_string(),
                log: log.clone(),
            }),
        );
    }
    Service {
        methods: handlers,
        streams: HashMap::new(),
    }
}

/// Serves the stand-in on `socket` until the returned server is dropped or shut down.
pub async fn start(socket: &Path) -> Result<(Server, Log), Error> {
    let log: Log = Arc::default();
    let services = HashMap::from([
        (AGENT_SERVICE.to_string(), service(METHODS, &log)),
        (
            HEALTH_SERVICE.to_string(),
            service(&["Check", "Version"], &log),
        ),
    ]);
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).map_err(|e| super::io(&d.display().to_string(), e))?;
    }
    let _ = std::fs::remove_file(socket);
    let agent = |e: ttrpc::Error| Error::Agent(format!("serving {}: {e}", socket.display()));
    let mut server = Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .map_err(agent)?
        .register_service(services);
    server.start().await.map_err(agent)?;
    Ok((server, log))
}

/// Sends `payload` to `service`/`method` over `client`; returns the answer payload.
pub(crate) async fn call_service(
    client: &ttrpc::r#async::Client,
    service: &str,
    method: &str,
    payload: Vec<u8>,
) -> Result<Vec<u8>, Error> {
    let mut req = Request::new();
    req.service = service.into();
    req.method = method.into();
    req.payload = payload;
    req.timeout_nano = 30_000_000_000;
    let resp = client
        .request(req)
        .await
        .map_err(|e| Error::Agent(format!("{service}/{method}: {e}")))?;
    if resp.status.code() != ttrpc::Code::OK {
        return Err(Error::Agent(format!(
            "{service}/{method}: {:?}",
            resp.status
        )));
    }
    Ok(resp.payload)
}

/// Sends `payload` to `method` of the agent service over `client`; returns the answer.
pub async fn call(
    client: &ttrpc::r#async::Client,
    method: &str,
    payload: Vec<u8>,
) -> Result<Vec<u8>, Error> {
    call_service(client, AGENT_SERVICE, method, payload).await
}

/// Flags of `sandboxd dev agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The unix socket to serve ttrpc on (kata-agent's is
    /// `/run/kata-containers/agent.sock`).
    #[arg(long)]
    pub(crate) socket: PathBuf,
}

/// Runs the stand-in until `shutdown`.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), Error> {
    let (mut server, _log) = start(&args.socket).await?;
    tracing::info!(socket = %args.socket.display(), "kata-agent stand-in serving (developer tool, runs no containers)");
    shutdown.cancelled().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn client(socket: &Path) -> ttrpc::r#async::Client {
        ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .expect("connect")
    }

    #[tokio::test]
    async fn health_check_answers_serving_and_agent_calls_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agent.sock");
        let (_server, log) = start(&socket).await.unwrap();
        let c = client(&socket).await;
        let a = call_service(&c, HEALTH_SERVICE, "Check", check_request(""))
            .await
            .unwrap();
        assert_eq!(health_status(&a), Some(SERVING));
        let v = call_service(&c, HEALTH_SERVICE, "Version", check_request(""))
            .await
            .unwrap();
        assert!(
            v.windows(crate::VERSION.len())
                .any(|w| w == crate::VERSION.as_bytes())
        );
        let a = call(&c, "StartContainer", vec![0x0a, 2, b'c', b'1'])
            .await
            .unwrap();
        assert_eq!(a, answer("StartContainer"));
        let big = vec![7u8; 100_000];
        assert_eq!(call(&c, "ReadStdout", big.clone()).await.unwrap(), big);
        let got = log.lock().unwrap().clone();
        let names: Vec<&str> = got.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(names, ["Check", "Version", "StartContainer", "ReadStdout"]);
        assert_eq!(got[2].1, vec![0x0a, 2, b'c', b'1']);
    }

    #[tokio::test]
    async fn unknown_methods_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let (_server, _log) = start(&socket).await.unwrap();
        let c = client(&socket).await;
        assert!(call(&c, "PullImage", vec![]).await.is_err());
    }

    #[test]
    fn health_status_reads_field_one_and_skips_others() {
        assert_eq!(health_status(HEALTH_SERVING), Some(SERVING));
        assert_eq!(health_status(&[]), Some(0));
        assert_eq!(health_status(&[0x12, 1, b'x', 0x08, 2]), Some(2));
        assert_eq!(health_status(&[0x08]), None);
    }
}
