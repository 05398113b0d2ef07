//! A small test kata-agent: a real ttrpc server (the ttrpc crate) answering a handful of
//! `grpc.AgentService` methods, recording the raw payload of every request it receives.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ttrpc::r#async::{MethodHandler, Server, Service, TtrpcContext};
use ttrpc::proto::{Request, Response};

/// What the agent received: (method, payload bytes).
pub type Log = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Methods the test agent answers.
pub const METHODS: &[&str] = &[
    "CreateSandbox",
    "CreateContainer",
    "StartContainer",
    "ExecProcess",
    "ReadStdout",
    "DestroySandbox",
];

/// The answer payload of a method (distinct per method, so replies can be checked).
pub fn answer(method: &str) -> Vec<u8> {
    // Field 1 as bytes: the method name; field 15: a big blob for ReadStdout.
    let mut v = vec![0x0a, method.len() as u8];
    v.extend_from_slice(method.as_bytes());
    v
}

struct Handler {
    method: String,
    log: Log,
}

#[async_trait::async_trait]
impl MethodHandler for Handler {
    async fn handler(&self, _ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        self.log
            .lock()
            .unwrap()
            .push((self.method.clone(), req.payload.clone()));
        let mut r = Response::new();
        r.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
        r.payload = if self.method == "ReadStdout" {
            // Echo large payloads back, for throughput.
            req.payload
        } else {
            answer(&self.method)
        };
        Ok(r)
    }
}

/// Serves the test agent on `socket` until the returned server is dropped.
pub async fn start(socket: &Path) -> anyhow::Result<(Server, Log)> {
    let log: Log = Arc::default();
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    for m in METHODS {
        methods.insert(
            m.to_string(),
            Box::new(Handler {
                method: m.to_string(),
                log: log.clone(),
            }),
        );
    }
    let services = HashMap::from([(
        "grpc.AgentService".to_string(),
        Service {
            methods,
            streams: HashMap::new(),
        },
    )]);
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_file(socket);
    let mut server = Server::new()
        .bind(&format!("unix://{}", socket.display()))?
        .register_service(services);
    server.start().await?;
    Ok((server, log))
}

/// Sends `payload` to `method` of the agent service over `client`; returns the answer.
pub async fn call(
    client: &ttrpc::r#async::Client,
    method: &str,
    payload: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    let mut req = Request::new();
    req.service = "grpc.AgentService".into();
    req.method = method.into();
    req.payload = payload;
    req.timeout_nano = 30_000_000_000;
    let resp = client.request(req).await?;
    if resp.status.code() != ttrpc::Code::OK {
        anyhow::bail!("{method}: {:?}", resp.status);
    }
    Ok(resp.payload)
}
